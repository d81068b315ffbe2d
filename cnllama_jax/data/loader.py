"""Deterministic batches: the global batch is a pure function of (seed, step).

The example stream is the concatenation of per-epoch permutations,
`np.random.default_rng([seed, epoch]).permutation(n)` for epoch 0, 1, ...; global batch `s` covers
stream positions [s * B, (s + 1) * B) (a batch may straddle an epoch boundary), and host `i` of
`p` reads only rows [i * B / p, (i + 1) * B / p) of it. Resuming needs only the step; no iterator
state exists.

A source is anything with `__len__` and `__getitem__(i) -> dict` of equal-length 1-D int arrays
(a tfds ArrayRecord data source, or a list of dicts); its `__getitems__(indices)` is used when
present (one batched read). An "example" here is one stored row: with packing (see `packing`) a
row holds several training examples, told apart by segment ids in `attention_mask`. Rows without
`labels` are pre-training blocks: labels = input ids, mask all ones. Labels are aligned with
`input_ids` (not shifted): as in Hugging Face, the loss predicts `labels[:, t + 1]` from position
`t`; -100 is ignored.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from typing import Any, Iterator, Sequence

import numpy as np

def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of epoch `epoch`: a permutation of `range(n)`, int64 [n]."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def collate(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks examples into a batch.

  Args:
    examples: dicts of int [length] arrays; `labels` and `attention_mask` are optional (default:
      the input ids, all ones).

  Returns:
    `input_ids`, `labels`, `attention_mask`: int32 [n, length].
  """
  input_ids = np.stack([np.asarray(e["input_ids"], np.int32) for e in examples])  # [n, length]
  if "labels" in examples[0]:
    labels = np.stack([np.asarray(e["labels"], np.int32) for e in examples])     # [n, length]
  else:
    labels = input_ids.copy()
  if "attention_mask" in examples[0]:
    mask = np.stack([np.asarray(e["attention_mask"], np.int32) for e in examples])  # [n, length]
  else:
    mask = np.ones_like(input_ids)                                               # [n, length]
  return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


class Loader:
  """This host's slice of the global batch at any step.

  Args:
    source: `len(source)` rows, `source[i] -> dict`.
    global_batch_size: rows per step over all hosts (B).
    seed: chooses every epoch's order.
    process_index: this host (`jax.process_index()`).
    process_count: how many hosts (`jax.process_count()`); B must be divisible by it.
  """

  def __init__(self, source: Sequence[dict], global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    n = len(source)
    if n == 0:
      raise ValueError("the data source is empty")
    if global_batch_size < 1:
      raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch_size % process_count:
      raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                       f"process count {process_count}; choose a multiple of {process_count}")
    self.source = source
    self.num_examples = n
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = seed
    self.process_index, self.process_count = process_index, process_count
    self._getitems = getattr(source, "__getitems__", None)
    self._orders: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    """Number of rows in the source (not batches)."""
    return self.num_examples

  @property
  def steps_per_epoch(self) -> int:
    """Whole global batches per epoch, `n // B` (at least 1)."""
    return max(1, self.num_examples // self.global_batch_size)

  def steps_for_epochs(self, num_epochs: float) -> int:
    """Steps to consume `num_epochs` passes over the data: `ceil(epochs * n / B)`."""
    return int(np.ceil(num_epochs * self.num_examples / self.global_batch_size))

  def _order(self, epoch: int) -> np.ndarray:
    with self._lock:  # iterate() calls batch() from a prefetch thread
      if epoch not in self._orders:
        if len(self._orders) >= 2:  # a batch spans at most 2 epochs unless B > n
          self._orders.pop(next(iter(self._orders)))
        self._orders[epoch] = epoch_permutation(self.seed, epoch, self.num_examples)
      return self._orders[epoch]

  def global_indices(self, step: int) -> np.ndarray:
    """Row indices of the whole global batch at `step`, int64 [B]."""
    return self._indices(step * self.global_batch_size, self.global_batch_size)

  def indices(self, step: int) -> np.ndarray:
    """Row indices of this host's slice at `step`, int64 [B / p]."""
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    return self._indices(start, self.local_batch_size)

  def _indices(self, start: int, count: int) -> np.ndarray:
    if start < 0:
      raise ValueError(f"step must be non-negative, got position {start}")
    positions = np.arange(start, start + count, dtype=np.int64)                  # [count]
    epochs, offsets = np.divmod(positions, self.num_examples)                    # [count]
    out = np.empty(count, np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self._order(int(epoch))[offsets[sel]]
    return out

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This host's rows at `step`: `input_ids`, `labels`, `attention_mask`, int32 [B / p, L]."""
    idx = [int(i) for i in self.indices(step)]
    examples = self._getitems(idx) if self._getitems is not None else [self.source[i] for i in idx]
    try:
      return collate(examples)
    except ValueError as err:
      raise ValueError(f"examples at step {step} cannot be stacked ({err}); every example "
                       f"must have the same length") from None

  def iterate(self, start_step: int = 0, num_steps: int | None = None,
              prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Yields `batch(start_step)`, `batch(start_step + 1)`, ... read ahead by a thread."""
    stop = None if num_steps is None else start_step + num_steps
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      pending: collections.deque = collections.deque()
      step = start_step
      while True:
        while len(pending) <= prefetch and (stop is None or step < stop):
          pending.append(pool.submit(self.batch, step))
          step += 1
        if not pending:
          return
        yield pending.popleft().result()


def measure_throughput(loader: Loader, num_steps: int = 20, start_step: int = 0) -> dict:
  """Times `loader.batch` over `num_steps` steps.

  Returns:
    `tokens_per_s` (row slots, padding included), `examples_per_s` (rows), `seconds`, `steps`.
  """
  loader.batch(start_step)  # warm up (opens files)
  t0 = time.perf_counter()
  tokens = 0
  for step in range(start_step + 1, start_step + 1 + num_steps):
    tokens += loader.batch(step)["input_ids"].size
  seconds = time.perf_counter() - t0
  return {"tokens_per_s": tokens / seconds, "examples_per_s": num_steps *
          loader.local_batch_size / seconds, "seconds": seconds, "steps": num_steps}
