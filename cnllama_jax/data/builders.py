"""tfds builders for local corpora, written as ArrayRecord for random access.

Layout: ``<data_dir>/<builder>/<config>/1.0.0/`` where ``<builder>`` is
``cnllama_pretrain_text`` or ``cnllama_sft``, and ``<config>`` (e.g.
``len512_3f9a0c1d2b4e5f60``) is a hash of everything the bytes depend on:
source paths with their sizes and mtimes, the tokenizer file's SHA-256, the
length, pad id, validation fraction and split seed, and ``FORMAT_VERSION``.  A
changed input therefore builds into a new config directory and an unchanged one
is found prepared and read back without tokenising.

Features (all int32, stored as raw bytes):

* ``PretrainText``: ``input_ids [block_size]``.
* ``SftInstructions``: ``input_ids``, ``labels``, ``attention_mask`` ``[max_seq_len]``.

Records keep generation order (``disable_shuffling``): record ``k`` of a split is
the ``k``-th index of that split (blocks in corpus order); the loader shuffles.
The builders only write what ``staging`` has already tokenised and validated
(see ``datasets.py``); constructed without ``staged`` they can only read.
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

from cnllama_jax.data import encode
from cnllama_jax.data.staging import Staged

FORMAT_VERSION = 1  # bump whenever the encoding of an example changes


@dataclasses.dataclass(eq=False)
class TokenDataConfig(tfds.core.BuilderConfig):
  """Identity of one build: ``name`` is the fingerprint hash, the rest shapes the features."""
  length: int = 512
  pad_id: int = 0


def file_sha256(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def fingerprint(kind: str, files: Sequence[Path], tokenizer_path: str | os.PathLike, *,
                length: int, **params) -> tuple[str, dict]:
  """Returns ``(config_name, inputs)``: a short hash naming the build and what it hashes.

  Sources are identified by resolved path, size and ``mtime_ns`` (cheap for
  large corpora; touching a file rebuilds); the tokenizer by its content.
  """
  inputs = {
      "kind": kind,
      "format_version": FORMAT_VERSION,
      "files": [[str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns]
                for f in files],
      "tokenizer_sha256": file_sha256(tokenizer_path),
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
  """Shared plumbing: writes the index splits of an already staged corpus."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  FEATURE_KEYS: tuple[str, ...] = ()
  DESCRIPTION = ""
  # tfds finds a builder's files via importlib.resources on the top-level
  # package, which raises for a namespace package (e.g. a stale editable
  # install); we ship no checksums or metadata files, so point it here.
  pkg_dir_path = epath.Path(__file__).parent

  @py_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, staged: Staged | None = None,
               splits: dict[str, np.ndarray] | None = None,
               metadata: dict | None = None, **kwargs):
    """``staged``/``splits`` (split name -> example indices) are needed only to write."""
    self._staged, self._splits, self._extra_metadata = staged, splits, metadata or {}
    with quiet_tfds():
      super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    length = self.builder_config.length
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({k: _int_tensor(length) for k in self.FEATURE_KEYS}),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    if self._staged is None or self._splits is None:
      raise RuntimeError(f"{self.name}/{self.builder_config.name} is not built; build it with "
                         f"build_pretrain_dataset / build_sft_dataset")
    self.info.metadata.update(self._extra_metadata)
    return {name: self._generate_examples(indices) for name, indices in self._splits.items()
            if len(indices)}

  def _generate_examples(self, indices: np.ndarray):
    raise NotImplementedError


class PretrainText(_TokenBuilder, skip_registration=True):
  """Pre-training text packed into blocks: ``input_ids`` int32 ``[block_size]``."""

  name = "cnllama_pretrain_text"
  FEATURE_KEYS = ("input_ids",)
  DESCRIPTION = "One document per line, BOS-prefixed, concatenated and cut into blocks."

  def _generate_examples(self, indices: np.ndarray):
    length = self.builder_config.length
    tokens = self._staged.tokens()                                       # [n_tokens]
    for key, block in enumerate(indices):
      start = int(block) * length
      yield key, {"input_ids": np.asarray(tokens[start:start + length], np.int32)}


class SftInstructions(_TokenBuilder, skip_registration=True):
  """Alpaca examples: ``input_ids``, ``labels`` (prompt = -100), ``attention_mask`` ``[max_seq_len]``."""

  name = "cnllama_sft"
  FEATURE_KEYS = ("input_ids", "labels", "attention_mask")
  DESCRIPTION = "Alpaca instruction data in the Chinese-Alpaca prompt template."

  def _generate_examples(self, indices: np.ndarray):
    cfg = self.builder_config
    tokens = self._staged.tokens()                                       # [n_tokens]
    lengths, n_source = self._staged.lengths, self._staged.n_source      # [n], [n]
    offsets = np.concatenate([[0], np.cumsum(lengths)])                  # [n + 1]
    for key, i in enumerate(indices):
      ids = np.asarray(tokens[offsets[i]:offsets[i + 1]], np.int32)    # [lengths[i]]
      labels = ids.copy()
      labels[:n_source[i]] = encode.IGNORE_INDEX
      yield key, encode.pad_sft(ids, labels, cfg.length, cfg.pad_id)


def make_builder(cls: type[_TokenBuilder], name: str, data_dir: str | os.PathLike, *,
                 length: int, pad_id: int = 0, description: str = "",
                 **write_kwargs) -> _TokenBuilder:
  """A builder for config ``name`` under ``data_dir`` (pass ``staged``/``splits`` to write)."""
  config = TokenDataConfig(name=name, length=length, pad_id=pad_id, description=description)
  return cls(config=config, data_dir=str(data_dir), file_format="array_record", **write_kwargs)
