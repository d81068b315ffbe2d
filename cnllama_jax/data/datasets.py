"""Build once, read back many times: the trainer's entry points to tfds data.

``build_pretrain_dataset`` / ``build_sft_dataset`` return::

    {"train": source, "validation": source | None, "stats": dict, "path": str}

where a source is a tfds ArrayRecord data source (``len(ds)``, ``ds[i] -> dict``
of int32 arrays ``[length]``) ready for ``Loader``.  The build is cached under
``data_dir`` by a fingerprint of its inputs (``builders.fingerprint``): the same
files, tokenizer and settings are read back without tokenising
(``stats["reused"] is True``).

A build is all-or-nothing: every file is read, validated and tokenised into a
local staging directory first (errors name file and line / example); only then
does tfds write, into its own ``incomplete.*`` directory renamed into place at
the end.  A failed build therefore never touches an earlier build.

Multi-host: build on one host (or ahead of time) into shared storage, then call
the same function everywhere; a prepared build is only read.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import tensorflow_datasets as tfds

from cnllama_jax.data import builders, encode, sources, staging

logger = logging.getLogger(__name__)
PathLike = str | os.PathLike


def _read_back(builder: builders._TokenBuilder) -> dict:
  stats = dict(builder.info.metadata.get("stats", {}))
  splits = builder.info.splits
  with builders.quiet_tfds():
    train = builder.as_data_source(split="train")
    validation = builder.as_data_source(split="validation") if "validation" in splits else None
  return {"train": train, "validation": validation, "stats": stats, "path": str(builder.data_dir)}


def _build(cls: type[builders._TokenBuilder], kind: str, files: list[Path], tokenizer_path: PathLike,
           data_dir: PathLike, length: int, pad_id: int, val_fraction: float, split_seed: int,
           skip_bad_lines: bool, stage_fn, staging_dir: PathLike | None, progress: bool) -> dict:
  """Finds or builds the config for these inputs; ``stage_fn(tokenizer, tmp) -> (staged, stats, n)``."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  name, inputs = builders.fingerprint(kind, files, tokenizer_path, length=length, pad_id=pad_id,
                                      val_fraction=val_fraction, split_seed=split_seed,
                                      skip_bad_lines=skip_bad_lines)
  builder = builders.make_builder(cls, name, data_dir, length=length, pad_id=pad_id)
  with builders.quiet_tfds():
    prepared = builder.is_prepared()
  if prepared:
    logger.info("reusing %s (inputs unchanged)", builder.data_dir)
    out = _read_back(builder)
    out["stats"]["reused"] = True
    return out

  start = time.time()
  tokenizer = encode.load_tokenizer(tokenizer_path)
  Path(staging_dir or tempfile.gettempdir()).mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="cnllama-staging-", dir=staging_dir) as tmp:
    staged, stats, n = stage_fn(tokenizer, Path(tmp))
    train, validation = encode.split_indices(n, val_fraction, split_seed)
    stats.update(train_examples=len(train), validation_examples=len(validation),
                 config=name, build_seconds=round(time.time() - start, 3))
    builder = builders.make_builder(
        cls, name, data_dir, length=length, pad_id=pad_id,
        description=f"inputs: {inputs}", staged=staged,
        splits={"train": train, "validation": validation},
        metadata={"stats": stats, "inputs": inputs})
    with builders.quiet_tfds():
      builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"))
  stats["build_seconds"] = round(time.time() - start, 3)
  logger.info("built %s: %s", builder.data_dir, stats)
  out = _read_back(builder)
  out["stats"] = {**stats, "reused": False}
  return out


def build_pretrain_dataset(files_or_dir: PathLike | Sequence[PathLike], tokenizer_path: PathLike,
                           data_dir: PathLike, block_size: int = 512, val_fraction: float = 0.01, *,
                           skip_bad_lines: bool = False, split_seed: int = 0,
                           staging_dir: PathLike | None = None, progress: bool = True) -> dict:
  """Pre-training blocks from ``.txt`` files (one document per line).

  Stats: ``files, documents, tokens, blocks, dropped_tokens`` (tail shorter than
  a block), ``skipped_empty_lines, skipped_bad_lines, train_examples,
  validation_examples, config, build_seconds, reused``.  The validation split
  is ``round(blocks * val_fraction)`` blocks chosen by ``split_seed``
  (``encode.split_indices``); ``val_fraction=0`` gives ``validation=None``.
  """
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}")
  files = sources.list_files(files_or_dir, sources.TEXT_SUFFIXES)

  def stage(tokenizer, tmp):
    staged, stats = staging.stage_pretrain(files, tokenizer, tmp, skip_bad_lines=skip_bad_lines,
                                           progress=progress)
    n_blocks = staged.n_tokens // block_size
    if n_blocks == 0:
      raise ValueError(f"corpus too small: {staged.n_tokens} tokens in {len(files)} file(s), "
                       f"fewer than one block of {block_size}")
    stats.update(blocks=n_blocks, dropped_tokens=staged.n_tokens - n_blocks * block_size)
    return staged, stats, n_blocks

  return _build(builders.PretrainText, "pretrain", files, tokenizer_path, data_dir, block_size, 0,
                val_fraction, split_seed, skip_bad_lines, stage, staging_dir, progress)


def build_sft_dataset(json_path_or_dir: PathLike | Sequence[PathLike], tokenizer_path: PathLike,
                      data_dir: PathLike, max_seq_len: int = 512, *, pad_id: int,
                      val_fraction: float = 0.01, skip_bad_lines: bool = False,
                      split_seed: int = 0, staging_dir: PathLike | None = None,
                      progress: bool = True) -> dict:
  """Instruction examples from Alpaca ``.json`` lists or ``.jsonl`` files.

  ``pad_id`` fills ``input_ids`` past the end of an example (Chinese-Alpaca:
  the ``[PAD]`` id).  Stats: ``files, examples, tokens, supervised_tokens,
  truncated, fully_masked, skipped_bad_lines, train_examples,
  validation_examples, config, build_seconds, reused``.
  """
  if max_seq_len < 2:
    raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
  files = sources.list_files(json_path_or_dir, sources.INSTRUCTION_SUFFIXES)

  def stage(tokenizer, tmp):
    staged, stats = staging.stage_sft(files, tokenizer, tmp, max_seq_len,
                                      skip_bad_lines=skip_bad_lines, progress=progress)
    return staged, stats, stats["examples"]

  return _build(builders.SftInstructions, "sft", files, tokenizer_path, data_dir, max_seq_len,
                pad_id, val_fraction, split_seed, skip_bad_lines, stage, staging_dir, progress)


def load_built(path: PathLike) -> dict:
  """Reads a finished build directory (``result["path"]``) without its sources or tokenizer."""
  with builders.quiet_tfds():
    builder = tfds.builder_from_directory(str(path))
  return _read_back(builder)
