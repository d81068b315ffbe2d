"""Sequence packing: several examples per row, told apart by segment ids.

A batch stays a dict of int32 [batch, length] arrays. In a packed row:

  input_ids       the examples back to back, then `pad_id`
  attention_mask  segment ids: 1, 2, 3, ... = the example a token belongs to; 0 = padding
  labels          the examples' labels; -100 on padding, on unsupervised tokens (SFT prompts) and
                  on the first token of every segment after the first

An unpacked row (mask 1 then 0) is the one-segment case, so unpacked data is valid packed data.
The train step shifts labels by one (`labels[t + 1]` is the target at position t): masking the
first label of a segment keeps one example's last token from being trained to predict the next
example's first token. The model derives positions (restarting at 0 per segment) and attention
(same segment, causal, not padding) from the segment ids.

Packing happens once, when a dataset is built: rows are stored as they train, so the loader's
batch stays a pure function of (seed, step) and resuming is unaffected.

* SFT: `best_fit_decreasing` places whole examples (already truncated to the row length, so none
  is ever split) into as few rows as it can; `encode.pack_row` writes a row.
* Pre-training: blocks are full already (documents concatenated and cut, as the paper's
  `group_texts`), so packing adds no tokens; `document_segments` gives each document in a block
  its own segment, so attention stops at document ends and positions restart at each BOS.
"""
from __future__ import annotations

import bisect
import heapq
from typing import Sequence

import numpy as np

from cnllama_jax.data.encode import IGNORE_INDEX


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, row_length: int) -> list[np.ndarray]:
  """Groups examples into rows of at most `row_length` tokens (best-fit decreasing).

  Examples are taken longest first (ties: lower index first); each goes into the open row whose
  free space is the smallest that holds it (ties: the row opened first), or opens a new row.
  Deterministic: the result depends only on `lengths` and `row_length`.

  Args:
    lengths: int [n], each in [1, row_length].
    row_length: tokens per row.

  Returns:
    One int64 array of example indices per row, in the order rows were opened (within a row, in
    the order placed). Every index appears in exactly one row; no row is empty.
  """
  lengths = np.asarray(lengths, np.int64)                                      # [n]
  if len(lengths) and (lengths.min() < 1 or lengths.max() > row_length):
    bad = int(np.flatnonzero((lengths < 1) | (lengths > row_length))[0])
    raise ValueError(f"example {bad} has {lengths[bad]} tokens; packing needs 1 to {row_length}")
  order = np.lexsort((np.arange(len(lengths)), -lengths))                      # [n]
  rows: list[list[int]] = []
  rows_by_space: dict[int, list[int]] = {}  # free tokens -> heap of open rows with that space
  spaces: list[int] = []  # sorted keys of rows_by_space
  for index in order:
    need = int(lengths[index])
    k = bisect.bisect_left(spaces, need)
    if k < len(spaces):
      space = spaces[k]
      row = heapq.heappop(rows_by_space[space])
      if not rows_by_space[space]:
        del rows_by_space[space]
        spaces.pop(k)
    else:
      row, space = len(rows), row_length
      rows.append([])
    rows[row].append(int(index))
    left = space - need
    if left:
      if left not in rows_by_space:
        rows_by_space[left] = []
        bisect.insort(spaces, left)
      heapq.heappush(rows_by_space[left], row)
  return [np.asarray(row, np.int64) for row in rows]


def document_segments(input_ids: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Segment ids and labels of a pre-training block: a new segment at every BOS.

  The block's first token starts segment 1 whatever it is (a document continued from the
  previous block); every later BOS starts the next segment.

  Args:
    input_ids: int [length], a block of concatenated documents.
    bos_id: the tokenizer's BOS id.

  Returns:
    `(attention_mask [length], labels [length])` int32: segment ids 1, 2, ...; labels = input ids
    with -100 at the first token of every segment after the first.
  """
  starts = np.asarray(input_ids) == bos_id                                      # [length]
  starts[0] = True
  segments = np.cumsum(starts, dtype=np.int32)                                  # [length]
  labels = np.asarray(input_ids, np.int32).copy()                               # [length]
  starts[0] = False
  labels[starts] = IGNORE_INDEX
  return segments, labels


def packing_stats(rows: Sequence[np.ndarray], lengths: np.ndarray, row_length: int) -> dict:
  """How full the rows are.

  Args:
    rows: example indices per row (`best_fit_decreasing`, or one example per row).
    lengths: int [n_examples], tokens per example.
    row_length: tokens per row.

  Returns:
    `rows`, `examples_per_row` (mean) and `real_token_fraction` (non-padding tokens over
    `rows * row_length`).
  """
  n_rows = len(rows)
  examples = sum(len(r) for r in rows)
  tokens = int(sum(int(np.sum(lengths[r])) for r in rows))
  return {"rows": n_rows, "examples_per_row": round(examples / max(n_rows, 1), 4),
          "real_token_fraction": round(tokens / max(n_rows * row_length, 1), 4)}
