"""The datasets of a run, from its plan's data spec: synthetic rows, or text / SFT corpora built
once into tfds and read back without tokenising again."""
from __future__ import annotations

import numpy as np

from cnllama_jax import paths
from cnllama_jax.plan import DataSpec


def synthetic_examples(num: int, seq_len: int, vocab_size: int, seed: int) -> list[dict]:
  """Random token rows (for benchmarks and smoke runs): labels = input_ids, no padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab_size, size=(num, seq_len), dtype=np.int32)
  return [{"input_ids": row, "labels": row, "attention_mask": np.ones_like(row)} for row in ids]


def pad_id(tokenizer_path: str) -> int:
  """The tokenizer's pad id (`text_tokenizer.pad_id`: [PAD] / pad_token, else 0)."""
  from cnllama_jax.data import text_tokenizer  # pylint: disable=import-outside-toplevel
  return text_tokenizer.pad_id(text_tokenizer.load(tokenizer_path))


def datasets(spec: DataSpec, vocab_size: int, workdir: str) -> dict:
  """{'train': source, 'validation': source or None, 'stats': ...}; a source has len() and
  [i] -> example of int32 [seq_len] arrays. Text and SFT data are built once into
  spec.data_dir (default <workdir>/data) and read back without tokenising again; every path may be
  a URL (a data_dir in a bucket is built by process 0 and read by all: data/shared_cache.py)."""
  from cnllama_jax import data  # pylint: disable=import-outside-toplevel
  kind, length = spec.kind, spec.seq_len
  if kind == "synthetic":
    examples = synthetic_examples(4 * spec.global_batch_size, length, vocab_size, spec.seed)
    return {"train": examples, "validation": examples[: spec.global_batch_size]}
  if kind not in ("text", "sft"):
    raise ValueError(f"data.kind={kind!r}; expected synthetic, text or sft")
  if not spec.tokenizer or not spec.path:
    raise ValueError(f"data.kind={kind!r} needs config.tokenizer and config.data.path "
                     f"(got tokenizer={spec.tokenizer!r}, data.path={spec.path!r})")
  data_dir = spec.data_dir or paths.join(workdir, "data")
  tokenizer = spec.tokenizer  # a .model, a tokenizer.json or a directory (text_tokenizer.load)
  if kind == "text":
    return data.build_pretrain_dataset(spec.path, tokenizer, data_dir, block_size=length,
                                       val_fraction=spec.val_fraction, pack=spec.pack)
  pad = spec.pad_id if spec.pad_id >= 0 else pad_id(tokenizer)
  return data.build_sft_dataset(spec.path, tokenizer, data_dir, max_seq_len=length, pad_id=pad,
                                val_fraction=spec.val_fraction, pack=spec.pack)
