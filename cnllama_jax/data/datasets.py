"""Build once, read back many times: the trainer's entry points to tfds data.

`build_pretrain_dataset` / `build_sft_dataset` return

    {"train": source, "validation": source | None, "stats": dict, "path": str}

where a source is a tfds ArrayRecord data source (`len(ds)`, `ds[i] -> dict` of int32 arrays
[length]) ready for `Loader`. The build is cached under `data_dir` by a fingerprint of its inputs
(`builders.fingerprint`): the same files, tokenizer and settings are read back without tokenising
(`stats["reused"] is True`).

A build is all-or-nothing: every file is read, validated and tokenised into a local staging
directory first (errors name file and line / example); only then does tfds write, into its own
`incomplete.*` directory renamed into place at the end. A failed build therefore never touches an
earlier build.

Packing (`pack=True`, see `packing`) happens here, once per build, after the train/validation
split (so both splits hold the same examples packed or not); the rows are stored as they train.

Sources and tokenizer may be local paths or URLs (`gs://...`). A `data_dir` in a bucket is built
once, by process 0, published there and read by every host from a local copy
(`shared_cache`); a local `data_dir` is built by each host that does not find it prepared.
"""
from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from cnllama_jax import paths
from cnllama_jax.data import (builders, encode, packing, shared_cache, sources, staging,
                              text_tokenizer)

logger = logging.getLogger(__name__)
PathLike = str | os.PathLike
# (tokenizer, staging dir) -> (staged corpus, stats, number of examples or blocks)
StageFn = Callable[..., tuple[staging.Staged, dict, int]]
# (staged corpus, sorted indices of one split) -> that split's rows
RowsFn = Callable[[staging.Staged, np.ndarray], Sequence]


def _read_back(builder: builders._TokenBuilder) -> dict:
  stats = dict(builder.info.metadata.get("stats", {}))
  splits = builder.info.splits
  with builders.quiet_tfds():
    train = builder.as_data_source(split="train")
    validation = builder.as_data_source(split="validation") if "validation" in splits else None
  return {"train": train, "validation": validation, "stats": stats, "path": str(builder.data_dir)}


def _build(cls: type[builders._TokenBuilder], kind: str, files: list[sources.FilePath],
           tokenizer_path: PathLike, data_dir: PathLike, *, length: int, pad_id: int, pack: bool,
           val_fraction: float, split_seed: int, skip_bad_lines: bool, stage_fn: StageFn,
           rows_fn: RowsFn, staging_dir: PathLike | None) -> dict:
  """Finds the build of these inputs, or stages, splits, groups into rows and writes it."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  name, inputs = builders.fingerprint(kind, files, tokenizer_path, length=length, pad_id=pad_id,
                                      pack=pack, val_fraction=val_fraction,
                                      split_seed=split_seed, skip_bad_lines=skip_bad_lines)
  if not paths.is_local(data_dir):  # process 0 builds and publishes; every host reads a copy
    remote = paths.join(data_dir, cls.name, name, str(cls.VERSION))
    local_root = shared_cache.mirror_dir(os.fspath(data_dir))
    build_local = functools.partial(
        _build, cls, kind, files, tokenizer_path, length=length, pad_id=pad_id, pack=pack,
        val_fraction=val_fraction, split_seed=split_seed, skip_bad_lines=skip_bad_lines,
        stage_fn=stage_fn, rows_fn=rows_fn, staging_dir=staging_dir)
    out = shared_cache.build_once(remote, local_root, os.path.join(local_root, cls.name, name,
                                                                   str(cls.VERSION)),
                                  build_local)
    return {**out, "path": remote}
  builder = builders.make_builder(cls, name, data_dir, length=length, pad_id=pad_id, pack=pack)
  with builders.quiet_tfds():
    prepared = builder.is_prepared()
  if prepared:
    logger.info("reusing %s (inputs unchanged)", builder.data_dir)
    out = _read_back(builder)
    out["stats"]["reused"] = True
    return out

  start = time.time()
  tokenizer = text_tokenizer.load(tokenizer_path)
  encode.check_bos_eos(tokenizer, tokenizer_path)
  Path(staging_dir or tempfile.gettempdir()).mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="cnllama-staging-", dir=staging_dir) as tmp:
    staged, stats, n = stage_fn(tokenizer, Path(tmp))
    train, validation = encode.split_indices(n, val_fraction, split_seed)
    splits = {"train": rows_fn(staged, train), "validation": rows_fn(staged, validation)}
    stats.update(train_examples=len(train), validation_examples=len(validation),
                 train_rows=len(splits["train"]), validation_rows=len(splits["validation"]),
                 packed=pack, config=name, build_seconds=round(time.time() - start, 3))
    if staged.lengths is not None:
      stats.update(packing.packing_stats([*splits["train"], *splits["validation"]],
                                         staged.lengths, length))
    builder = builders.make_builder(
        cls, name, data_dir, length=length, pad_id=pad_id, pack=pack,
        description=f"inputs: {inputs}", staged=staged, splits=splits,
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
                           pack: bool = False, skip_bad_lines: bool = False, split_seed: int = 0,
                           staging_dir: PathLike | None = None, progress: bool = True) -> dict:
  """Pre-training blocks from `.txt` files (one document per line).

  Args:
    files_or_dir: text files or directories of them (`sources.list_files`).
    tokenizer_path: a SentencePiece `.model`, a byte-level BPE `tokenizer.json`, or a directory
      holding one (`text_tokenizer.load`).
    data_dir: where builds live (one subdirectory per fingerprint).
    block_size: tokens per block; the corpus tail shorter than a block is dropped.
    val_fraction: `round(blocks * val_fraction)` blocks chosen by `split_seed`
      (`encode.split_indices`) form the validation split; 0 gives `validation=None`.
    pack: store one segment per document in each block (`packing.document_segments`): attention
      stops at document ends. False (the paper's `group_texts`): labels = input ids, mask all 1.
    skip_bad_lines: skip (and count) non-UTF-8 lines instead of failing.
    split_seed: seeds the validation choice.
    staging_dir: where the token stream is staged (default: the system temp directory).
    progress: show tqdm bars.

  Returns:
    `{"train", "validation", "stats", "path"}`; stats: `files, documents, tokens, blocks,
    dropped_tokens` (tail shorter than a block), `skipped_empty_lines, skipped_bad_lines,
    train_examples, validation_examples, train_rows, validation_rows, packed, config,
    build_seconds, reused`.
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

  return _build(builders.PretrainText, "pretrain", files, tokenizer_path, data_dir,
                length=block_size, pad_id=0, pack=pack, val_fraction=val_fraction,
                split_seed=split_seed, skip_bad_lines=skip_bad_lines, stage_fn=stage,
                rows_fn=lambda staged, blocks: blocks, staging_dir=staging_dir)


def build_sft_dataset(json_path_or_dir: PathLike | Sequence[PathLike], tokenizer_path: PathLike,
                      data_dir: PathLike, max_seq_len: int = 512, *, pad_id: int,
                      pack: bool = False, val_fraction: float = 0.01,
                      skip_bad_lines: bool = False, split_seed: int = 0,
                      staging_dir: PathLike | None = None, progress: bool = True) -> dict:
  """Instruction examples from Alpaca `.json` lists or `.jsonl` files.

  Args:
    json_path_or_dir: instruction files or directories of them.
    tokenizer_path: a SentencePiece `.model`, a byte-level BPE `tokenizer.json`, or a directory
      holding one (`text_tokenizer.load`).
    data_dir: where builds live (one subdirectory per fingerprint).
    max_seq_len: row length; longer examples are right-truncated (as the paper), so no example
      is ever split across rows.
    pad_id: fills `input_ids` past the end of a row (Chinese-Alpaca: the `[PAD]` id).
    pack: several examples per row (`packing.best_fit_decreasing` within each split, segment
      ids in `attention_mask`); False: one example per row.
    val_fraction, skip_bad_lines, split_seed, staging_dir, progress: as `build_pretrain_dataset`
      (the validation split is chosen among examples, before packing).

  Returns:
    `{"train", "validation", "stats", "path"}`; stats: `files, examples, tokens,
    supervised_tokens, truncated, fully_masked, skipped_bad_lines, train_examples,
    validation_examples, train_rows, validation_rows, rows, examples_per_row,
    real_token_fraction, packed, config, build_seconds, reused`.
  """
  if max_seq_len < 2:
    raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
  files = sources.list_files(json_path_or_dir, sources.INSTRUCTION_SUFFIXES)

  def stage(tokenizer, tmp):
    staged, stats = staging.stage_sft(files, tokenizer, tmp, max_seq_len,
                                      skip_bad_lines=skip_bad_lines, progress=progress)
    return staged, stats, stats["examples"]

  def rows(staged: staging.Staged, indices: np.ndarray) -> list[np.ndarray]:
    if not pack:
      return [indices[k:k + 1] for k in range(len(indices))]
    return [indices[r] for r in packing.best_fit_decreasing(staged.lengths[indices], max_seq_len)]

  return _build(builders.SftInstructions, "sft", files, tokenizer_path, data_dir,
                length=max_seq_len, pad_id=pad_id, pack=pack, val_fraction=val_fraction,
                split_seed=split_seed, skip_bad_lines=skip_bad_lines, stage_fn=stage,
                rows_fn=rows, staging_dir=staging_dir)


def load_built(path: PathLike) -> dict:
  """Reads a finished build directory (`result["path"]`) without its sources or tokenizer; one in
  a bucket is first copied to this host's mirror (`shared_cache`)."""
  if not paths.is_local(path):
    path = shared_cache.download(os.fspath(path), shared_cache.mirror_dir(os.fspath(path)))
  with builders.quiet_tfds():
    builder = tfds.builder_from_directory(str(path))
  return _read_back(builder)
