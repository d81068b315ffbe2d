"""Token-level encodings of the paper: pre-training documents and Alpaca SFT examples.

Pure functions of a tokenizer and text. The tokenizer is a `text_tokenizer.TextTokenizer`
(`encode(str | list[str]) -> ids`, `bos_id()`, `eos_id()`): a `sentencepiece.SentencePieceProcessor`
or a byte-level BPE `tokenizer.json`, opened with `text_tokenizer.load`; `check_bos_eos` says
whether it can encode for a LLaMA-style model.

Pre-training (`run_clm_pt_with_peft.py`): each document (one line) is encoded like the Hugging
Face LLaMA tokenizer with default settings -- BOS, no EOS -- the documents are concatenated and cut
into `block_size` blocks; the tail shorter than a block is dropped (HF `group_texts`). Labels =
input ids. The paper's script groups each file in batches of 1,000 lines (the HF `map` default)
and drops a remainder per batch; we concatenate the whole corpus and drop one remainder of at most
`block_size - 1` tokens.

Instruction tuning (`run_clm_sft_with_peft.py`):

    source = PROMPT_TEMPLATE.format(instruction=instruction [+ "\\n" + input])
    target = output + "</s>"
    input_ids = ([bos] + sp(source) + sp(output) + [eos])[:max_seq_len]
    labels    = ([-100] * (1 + len(sp(source))) + sp(output) + [eos])[:max_seq_len]

then right-padded to `max_seq_len` (input ids with `pad_id`, labels with -100, attention mask 0).
The paper tokenises the *string* `output + "</s>"` with the HF tokenizer, which splits off the
special token `</s>` and maps it to the eos id 2; a bare SentencePiece processor would instead
spell "</s>" out as ordinary pieces. We reproduce the HF result: `sp.encode(output) + [eos_id]`
(a byte-level BPE: the same, with its own BOS / EOS ids, e.g. LLaMA-3's <|begin_of_text|> and
<|end_of_text|>).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from cnllama_jax.data.text_tokenizer import TextTokenizer

IGNORE_INDEX = -100  # a label that takes no loss (prompt tokens, padding, segment starts)
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: ")


def check_bos_eos(tokenizer: TextTokenizer, path: str | os.PathLike) -> None:
  """Raises a one-line ValueError naming `path` unless the tokenizer defines BOS and EOS."""
  if tokenizer.bos_id() < 0 or tokenizer.eos_id() < 0:
    raise ValueError(f"{path}: tokenizer has no BOS/EOS (bos={tokenizer.bos_id()}, "
                     f"eos={tokenizer.eos_id()}); LLaMA-style models need both (a tokenizer.json "
                     "takes them from bos_token / eos_token in the tokenizer_config.json beside it)")


def build_prompt(instruction: str, input: str | None = None) -> str:
  """The paper's Alpaca prompt; a non-empty `input` is joined as `instruction + "\\n" + input`."""
  if input:
    instruction = instruction + "\n" + input
  return PROMPT_TEMPLATE.format_map({"instruction": instruction})


def combine_sft(source_ids: Sequence[int], target_ids: Sequence[int],
                max_seq_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
  """Concatenates source and target, masks the source, right-truncates.

  Args:
    source_ids: BOS + prompt ids.
    target_ids: output ids + [eos].
    max_seq_len: the longest result kept.

  Returns:
    `(input_ids [n], labels [n], truncated)`, int32 arrays with
    `n = min(len(source) + len(target), max_seq_len)`.
  """
  ids = np.asarray(list(source_ids) + list(target_ids), np.int32)           # [s + t]
  labels = np.concatenate([np.full(len(source_ids), IGNORE_INDEX, np.int32),
                           np.asarray(target_ids, np.int32)])               # [s + t]
  truncated = len(ids) > max_seq_len
  return ids[:max_seq_len], labels[:max_seq_len], truncated


def pack_row(input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray], row_length: int,
             pad_id: int) -> dict[str, np.ndarray]:
  """Places examples back to back in one row, then padding (see `packing`).

  Args:
    input_ids: one int array [n_k] per example, sum of n_k <= row_length.
    labels: one int array [n_k] per example, aligned with its ids (-100 = no loss).
    row_length: the row's length.
    pad_id: fills `input_ids` past the last example.

  Returns:
    int32 [row_length] arrays: `input_ids`; `attention_mask`, the segment ids (k + 1 on example
    k, 0 on padding); `labels`, the examples' labels with -100 on padding and on the first token
    of every example after the first (the step shifts labels by one, so that token would otherwise
    be the target of the previous example's last token). One example gives the classic padded
    row: mask 1 then 0, labels unchanged.
  """
  out = {
      "input_ids": np.full(row_length, pad_id, np.int32),      # [row_length]
      "labels": np.full(row_length, IGNORE_INDEX, np.int32),   # [row_length]
      "attention_mask": np.zeros(row_length, np.int32),        # [row_length]
  }
  start = 0
  for segment, (ids, target) in enumerate(zip(input_ids, labels), start=1):
    end = start + len(ids)
    if end > row_length:
      raise ValueError(f"examples of {sum(len(i) for i in input_ids)} tokens do not fit a row of "
                       f"{row_length}")
    out["input_ids"][start:end] = ids
    out["labels"][start:end] = target
    out["attention_mask"][start:end] = segment
    if segment > 1:
      out["labels"][start] = IGNORE_INDEX
    start = end
  return out


def encode_sft_example(tokenizer: TextTokenizer, instruction: str, input: str | None,
                       output: str, max_seq_len: int = 512,
                       pad_id: int = 0) -> dict[str, np.ndarray]:
  """One Alpaca example as the paper encodes it.

  Returns:
    `input_ids`, `labels`, `attention_mask`: int32 [max_seq_len], and `truncated`: whether the
    unpadded example was longer than `max_seq_len`.
  """
  source = [tokenizer.bos_id()] + tokenizer.encode(build_prompt(instruction, input))
  target = tokenizer.encode(output) + [tokenizer.eos_id()]
  ids, labels, truncated = combine_sft(source, target, max_seq_len)
  return {**pack_row([ids], [labels], max_seq_len, pad_id), "truncated": truncated}


def encode_documents(tokenizer: TextTokenizer, texts: Sequence[str],
                     num_threads: int = -1) -> list[list[int]]:
  """BOS + ids for each document (no EOS), as HF `LlamaTokenizer(text)` (LLaMA-3's too)."""
  bos = tokenizer.bos_id()
  return [[bos] + ids for ids in tokenizer.encode(list(texts), num_threads=num_threads)]


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic train/validation split of `n` examples.

  `round(n * val_fraction)` examples (at least one if `val_fraction > 0`), chosen by a
  permutation seeded with `seed`, go to validation.

  Returns:
    `(train [n - n_val], validation [n_val])`: sorted int64 example indices.

  Raises:
    ValueError: `val_fraction` outside [0, 1), or no training example would remain.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  n_val = 0 if val_fraction == 0 else max(1, int(round(n * val_fraction)))
  if n - n_val < 1:
    raise ValueError(f"only {n} examples: not enough for a validation fraction of "
                     f"{val_fraction} and at least one training example")
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])
