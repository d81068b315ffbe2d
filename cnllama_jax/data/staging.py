"""Tokenise a whole corpus into a staging file before anything is written by tfds.

Staging reads and validates every input first, so a bad file fails the build before the tfds data
directory is touched; it also tells the builder the exact number of blocks or examples, which the
train/validation split and packing need.

The staging file is a flat token stream [n_tokens] (uint16 when the vocabulary fits, else int32).
For SFT it holds each (truncated, unpadded) example back to back, with `lengths` [n] and
`n_source` [n] (masked prompt tokens) kept in memory.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from cnllama_jax.data import encode, sources
from cnllama_jax.data.text_tokenizer import TextTokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Staged:
  """A tokenised corpus on local disk."""
  path: Path
  dtype: np.dtype
  n_tokens: int
  bos_id: int = 1
  lengths: np.ndarray | None = None    # [n_examples] int64, SFT only
  n_source: np.ndarray | None = None   # [n_examples] int64, SFT only

  def tokens(self) -> np.ndarray:
    """The token stream [n_tokens] (memory-mapped)."""
    if self.n_tokens == 0:
      return np.zeros(0, self.dtype)
    return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))


class _TokenWriter:
  """Appends token ids to a flat binary file."""

  def __init__(self, path: Path, dtype: np.dtype):
    self.path, self.dtype, self.n_tokens = path, dtype, 0
    self._file = open(path, "wb")  # pylint: disable=consider-using-with

  def write(self, ids: Sequence[int] | np.ndarray) -> None:
    arr = np.asarray(ids, self.dtype)
    self._file.write(arr.tobytes())
    self.n_tokens += len(arr)

  def close(self) -> None:
    self._file.close()


def _token_dtype(tokenizer: TextTokenizer) -> np.dtype:
  return np.dtype(np.uint16 if tokenizer.vocab_size() <= 2**16 else np.int32)


def _progress(files: Sequence[Path], desc: str, enabled: bool) -> tqdm:
  return tqdm(total=sources.total_bytes(files), unit="B", unit_scale=True, desc=desc,
              disable=not enabled)


def _describe(files: Sequence[Path]) -> str:
  names = ", ".join(str(f) for f in files[:3])
  return names + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def stage_pretrain(files: Sequence[Path], tokenizer: TextTokenizer, staging_dir: Path,
                   *, skip_bad_lines: bool = False, batch_size: int = 1024,
                   progress: bool = True) -> tuple[Staged, dict]:
  """Tokenises one document per non-blank line (BOS + ids) into a token stream.

  Returns:
    The staged stream and stats: `files, documents, tokens, skipped_empty_lines,
    skipped_bad_lines`.

  Raises:
    ValueError: non-UTF-8 input (unless `skip_bad_lines`) or an empty corpus.
  """
  stats = {"files": len(files), "documents": 0, "tokens": 0, "skipped_empty_lines": 0,
           "skipped_bad_lines": 0}
  writer = _TokenWriter(Path(staging_dir) / "pretrain.tokens", _token_dtype(tokenizer))
  batch: list[str] = []

  def flush() -> None:
    for ids in encode.encode_documents(tokenizer, batch):
      writer.write(ids)
    stats["documents"] += len(batch)
    batch.clear()

  try:
    with _progress(files, "tokenising text", progress) as bar:
      for document in sources.iter_documents(files, skip_bad_lines=skip_bad_lines, stats=stats,
                                             on_bytes=bar.update):
        batch.append(document)
        if len(batch) >= batch_size:
          flush()
      flush()
  finally:
    writer.close()
  if stats["documents"] == 0:
    raise ValueError(f"empty corpus: no non-empty lines in {_describe(files)}")
  stats["tokens"] = writer.n_tokens
  logger.info("tokenised %d documents into %d tokens (%d empty and %d bad lines skipped)",
              stats["documents"], stats["tokens"], stats["skipped_empty_lines"],
              stats["skipped_bad_lines"])
  return Staged(writer.path, writer.dtype, writer.n_tokens, tokenizer.bos_id()), stats


def stage_sft(files: Sequence[Path], tokenizer: TextTokenizer, staging_dir: Path,
              max_seq_len: int, *, skip_bad_lines: bool = False, batch_size: int = 1024,
              progress: bool = True) -> tuple[Staged, dict]:
  """Tokenises Alpaca examples (BOS + prompt | output + EOS), truncated to `max_seq_len`.

  Returns:
    The staged examples and stats: `files, examples, tokens, supervised_tokens, truncated`
    (longer than `max_seq_len` before truncation), `fully_masked` (the prompt alone fills
    `max_seq_len`: no supervised token left) and `skipped_bad_lines`.

  Raises:
    ValueError: malformed or non-UTF-8 input (naming file and line or example), or no examples.
  """
  stats = {"files": len(files), "examples": 0, "tokens": 0, "supervised_tokens": 0,
           "truncated": 0, "fully_masked": 0, "skipped_bad_lines": 0}
  writer = _TokenWriter(Path(staging_dir) / "sft.tokens", _token_dtype(tokenizer))
  lengths: list[int] = []
  n_source: list[int] = []
  batch: list[dict] = []
  bos, eos = tokenizer.bos_id(), tokenizer.eos_id()

  def flush() -> None:
    if not batch:
      return
    prompts = tokenizer.encode([encode.build_prompt(r["instruction"], r["input"]) for r in batch],
                               num_threads=-1)
    outputs = tokenizer.encode([r["output"] for r in batch], num_threads=-1)
    for prompt, output in zip(prompts, outputs):
      source = [bos] + prompt
      ids, _, truncated = encode.combine_sft(source, output + [eos], max_seq_len)
      writer.write(ids)
      lengths.append(len(ids))
      n_source.append(min(len(source), len(ids)))
      stats["truncated"] += int(truncated)
      stats["fully_masked"] += int(len(source) >= len(ids))
    batch.clear()

  try:
    with _progress(files, "tokenising instructions", progress) as bar:
      for path in files:
        for _, record, n_bytes in sources.iter_instruction_records(
            path, skip_bad_lines=skip_bad_lines, stats=stats):
          bar.update(n_bytes)
          batch.append(record)
          if len(batch) >= batch_size:
            flush()
      flush()
  finally:
    writer.close()
  if not lengths:
    raise ValueError(f"empty corpus: no instruction examples in {_describe(files)}")
  lengths_arr, n_source_arr = np.asarray(lengths, np.int64), np.asarray(n_source, np.int64)
  stats["examples"] = len(lengths)
  stats["tokens"] = int(lengths_arr.sum())
  stats["supervised_tokens"] = int((lengths_arr - n_source_arr).sum())
  logger.info("tokenised %d examples (%d truncated to %d tokens, %d bad lines skipped)",
              stats["examples"], stats["truncated"], max_seq_len, stats["skipped_bad_lines"])
  return Staged(writer.path, writer.dtype, writer.n_tokens, bos, lengths_arr, n_source_arr), stats
