"""tfds builders for local corpora, written as ArrayRecord for random access.

Layout: `<data_dir>/<builder>/<config>/1.0.0/` where `<builder>` is `cnllama_pretrain_text` or
`cnllama_sft`, and `<config>` (e.g. `len512_3f9a0c1d2b4e5f60`) is a hash of everything the bytes
depend on: source paths with their sizes and mtimes, the tokenizer file's SHA-256 (a BPE's also
its tokenizer_config.json's), the length, pad id, packing, validation fraction and split seed, and
`FORMAT_VERSION`. A changed input therefore builds into a new config directory and an unchanged
one is found prepared and read back without tokenising.

Features (all int32 [length], stored as raw bytes):
  `PretrainText`: `input_ids`; packed (`pack=True`), also `labels` and `attention_mask` holding
    one segment per document (`packing.document_segments`).
  `SftInstructions`: `input_ids`, `labels`, `attention_mask`; a row holds one example, or with
    `pack=True` several (segment ids, `encode.pack_row`).

Records keep generation order (`disable_shuffling`): record `k` of a split is its `k`-th row; the
loader shuffles. The builders only write what `staging` has already tokenised and validated (see
`datasets.py`); constructed without `staged` they can only read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils import py_utils

from cnllama_jax import paths
from cnllama_jax.data import encode, packing, sources, text_tokenizer
from cnllama_jax.data.staging import Staged

FORMAT_VERSION = 1  # bump whenever the encoding of an example changes


@dataclasses.dataclass(eq=False)
class TokenDataConfig(tfds.core.BuilderConfig):
  """Identity of one build: `name` is the fingerprint hash, the rest shapes the features."""
  length: int = 512
  pad_id: int = 0
  pack: bool = False


def tokenizer_file(path: str | os.PathLike) -> str:
  """The file a tokenizer path (or URL) names: the file, or `<dir>/tokenizer.model` (else, for a
  byte-level BPE, `<dir>/tokenizer.json`)."""
  if not paths.isdir(path):
    return os.fspath(path)
  model = paths.join(path, "tokenizer.model")
  return model if paths.exists(model) else paths.join(path, "tokenizer.json")


def file_sha256(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file's bytes (a local path or a URL)."""
  digest = hashlib.sha256()
  with sources.open_binary(path) as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def tokenizer_identity(path: str | os.PathLike) -> dict:
  """What a build depends on in a tokenizer: its file's SHA-256 and, for a byte-level BPE
  `tokenizer.json`, those of the `tokenizer_config.json` / `special_tokens_map.json` beside it
  (they name its BOS / EOS / pad tokens)."""
  file = tokenizer_file(path)
  identity = {"tokenizer_sha256": file_sha256(file)}
  if file.endswith(".json"):
    for name in text_tokenizer.CONFIG_FILES:
      beside = paths.join(os.path.dirname(file), name)
      if paths.exists(beside):
        identity[f"{name}_sha256"] = file_sha256(beside)
  return identity


def file_identity(path: str | os.PathLike) -> list:
  """[absolute path or URL, size, version]: a local file's mtime in ns, an object's content hash
  (`paths.file_version`)."""
  if paths.is_local(path):
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
  return [os.fspath(path), *paths.file_version(path)]


def fingerprint(kind: str, files: Sequence[str | os.PathLike],
                tokenizer_path: str | os.PathLike, *, length: int, **params) -> tuple[str, dict]:
  """Names a build by a hash of everything its bytes depend on.

  Sources are identified by resolved path, size and `mtime_ns` (cheap for large corpora; touching
  a file rebuilds), objects in a bucket by URL, size and content hash; the tokenizer (a `.model`
  file or a directory holding `tokenizer.model`) by
  its content.

  Returns:
    `(config_name, inputs)`: e.g. `len512_3f9a0c1d2b4e5f60`, and the dict that was hashed.
  """
  inputs = {
      "kind": kind,
      "format_version": FORMAT_VERSION,
      "files": [file_identity(f) for f in files],
      **tokenizer_identity(tokenizer_path),
      "length": length,
      **params,
  }
  digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
  return f"len{length}_{digest}", inputs


class _QuietTfds(logging.Filter):
  """Drops tfds' expected warnings about our hash-named configs."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = str(record.msg)
    return not (msg.startswith("Using custom data configuration") or
                msg.startswith("Variant folder"))


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
  """Silences tfds' "custom data configuration" / "no dataset_info.json" warnings."""
  absl_logger, quiet = logging.getLogger("absl"), _QuietTfds()
  absl_logger.addFilter(quiet)
  try:
    yield
  finally:
    absl_logger.removeFilter(quiet)


def _int_tensor(length: int) -> tfds.features.Tensor:
  return tfds.features.Tensor(shape=(length,), dtype=np.int32,
                              encoding=tfds.features.Encoding.BYTES)


class _TokenBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared plumbing: writes the rows of an already staged corpus, split by split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  DESCRIPTION = ""
  # tfds finds a builder's files via importlib.resources on the top-level package, which raises
  # for a namespace package (e.g. a stale editable install); we ship no checksums or metadata
  # files, so point it here.
  pkg_dir_path = epath.Path(__file__).parent

  @py_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, staged: Staged | None = None, splits: dict[str, Sequence] | None = None,
               metadata: dict | None = None, **kwargs):
    """`staged` and `splits` (split name -> its rows) are needed only to write."""
    self._staged, self._splits, self._extra_metadata = staged, splits, metadata or {}
    with quiet_tfds():
      super().__init__(**kwargs)

  def feature_keys(self) -> tuple[str, ...]:
    return ("input_ids", "labels", "attention_mask")

  def _info(self) -> tfds.core.DatasetInfo:
    length = self.builder_config.length
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({k: _int_tensor(length) for k in self.feature_keys()}),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    if self._staged is None or self._splits is None:
      raise RuntimeError(f"{self.name}/{self.builder_config.name} is not built; build it with "
                         f"build_pretrain_dataset / build_sft_dataset")
    self.info.metadata.update(self._extra_metadata)
    return {name: self._generate_examples(rows) for name, rows in self._splits.items()
            if len(rows)}

  def _generate_examples(self, rows: Sequence):
    raise NotImplementedError


class PretrainText(_TokenBuilder, skip_registration=True):
  """Pre-training text cut into blocks; a split's rows are block indices."""

  name = "cnllama_pretrain_text"
  DESCRIPTION = "One document per line, BOS-prefixed, concatenated and cut into blocks."

  def feature_keys(self) -> tuple[str, ...]:
    return super().feature_keys() if self.builder_config.pack else ("input_ids",)

  def _generate_examples(self, rows: Sequence):
    length, pack = self.builder_config.length, self.builder_config.pack
    tokens = self._staged.tokens()                                              # [n_tokens]
    for key, block in enumerate(rows):
      start = int(block) * length
      ids = np.asarray(tokens[start:start + length], np.int32)                  # [length]
      if not pack:
        yield key, {"input_ids": ids}
        continue
      segments, labels = packing.document_segments(ids, self._staged.bos_id)    # [length] x 2
      yield key, {"input_ids": ids, "labels": labels, "attention_mask": segments}


class SftInstructions(_TokenBuilder, skip_registration=True):
  """Alpaca examples, prompt labels -100; a split's rows are arrays of example indices."""

  name = "cnllama_sft"
  DESCRIPTION = "Alpaca instruction data in the Chinese-Alpaca prompt template."

  def _generate_examples(self, rows: Sequence):
    cfg = self.builder_config
    tokens = self._staged.tokens()                                              # [n_tokens]
    lengths, n_source = self._staged.lengths, self._staged.n_source             # [n], [n]
    offsets = np.concatenate([[0], np.cumsum(lengths)])                         # [n + 1]
    for key, row in enumerate(rows):
      ids, labels = [], []
      for i in row:
        example = np.asarray(tokens[offsets[i]:offsets[i + 1]], np.int32)      # [lengths[i]]
        target = example.copy()
        target[:n_source[i]] = encode.IGNORE_INDEX
        ids.append(example)
        labels.append(target)
      yield key, encode.pack_row(ids, labels, cfg.length, cfg.pad_id)


def make_builder(cls: type[_TokenBuilder], name: str, data_dir: str | os.PathLike, *,
                 length: int, pad_id: int = 0, pack: bool = False, description: str = "",
                 **write_kwargs) -> _TokenBuilder:
  """A builder for config `name` under `data_dir` (pass `staged` and `splits` to write)."""
  config = TokenDataConfig(name=name, length=length, pad_id=pad_id, pack=pack,
                           description=description)
  return cls(config=config, data_dir=str(data_dir), file_format="array_record", **write_kwargs)
