"""The one tokenizer interface of the data pipeline, for either kind of tokenizer.

The builders, staging, `encode` and perplexity call only what `TextTokenizer` lists:
`encode(text | texts)` (ids, no special tokens), `bos_id()`, `eos_id()` (-1 when undefined),
`vocab_size()` (embedding rows the ids need; staging stores uint16 when it is <= 2**16) and
`decode(ids)`. A `sentencepiece.SentencePieceProcessor` has exactly these methods; `BpeTokenizer`
gives a byte-level BPE `tokenizer.json` (LLaMA-3 style, or a merge made by `cnllama_jax.bpe`) the
same ones, its BOS / EOS / pad tokens named by the `tokenizer_config.json` (or
`special_tokens_map.json`) beside it, as `transformers.AutoTokenizer` reads them.

  load(path)      -> TextTokenizer   (a .model, a tokenizer.json, or a directory; local or gs://)
  find(directories) -> str           (the first directory's tokenizer.model, else tokenizer.json)
  pad_id(tokenizer) -> int           (the pad token: [PAD] / pad_token; 0 without one)
"""
from __future__ import annotations

import json
import os
from typing import Protocol, Sequence

from cnllama_jax import paths
from cnllama_jax import tokenizer as tokenizer_lib

ROLES = ("bos_token", "eos_token", "pad_token")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
FILES = ("tokenizer.model", "tokenizer.json")  # what `find` looks for in a directory, in order


class TextTokenizer(Protocol):
  """What the data pipeline calls (the SentencePieceProcessor method names)."""

  def encode(self, text: str | Sequence[str], num_threads: int = -1):
    """ids [n] of one text, or one list per text; no BOS/EOS added."""

  def bos_id(self) -> int: ...

  def eos_id(self) -> int: ...

  def vocab_size(self) -> int: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class BpeTokenizer:
  """A byte-level BPE ``tokenizers.Tokenizer`` with SentencePieceProcessor's method names.

  Args:
    tokenizer: the loaded tokenizer.json.
    size: embedding rows its ids need (highest id + 1, ``bpe.size``).
    roles: {"bos_token" / "eos_token" / "pad_token": token string} (missing roles: -1 / None).
    name: the file, for errors.
  """

  def __init__(self, tokenizer, size: int, roles: dict[str, str], name: str):
    self.tokenizer, self.size, self.name = tokenizer, size, name
    self.ids = {}
    for role, token in roles.items():
      token_id = tokenizer.token_to_id(token)
      if token_id is None:
        raise ValueError(f"{name}: {role} {token!r} (from its tokenizer_config.json) is not a "
                         "token of the tokenizer")
      self.ids[role] = token_id

  def encode(self, text: str | Sequence[str], num_threads: int = -1):
    del num_threads  # tokenizers parallelises encode_batch itself
    if isinstance(text, str):
      return self.tokenizer.encode(text, add_special_tokens=False).ids
    return [e.ids for e in self.tokenizer.encode_batch(list(text), add_special_tokens=False)]

  def bos_id(self) -> int:
    return self.ids.get("bos_token", -1)

  def eos_id(self) -> int:
    return self.ids.get("eos_token", -1)

  def pad_token_id(self) -> int | None:
    return self.ids.get("pad_token")

  def vocab_size(self) -> int:
    return self.size

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` without special tokens (BOS, EOS, pad, <|eot_id|>, ...), as SentencePiece's
    decode drops its control pieces."""
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _role_tokens(directory: str) -> dict[str, str]:
  """bos/eos/pad token strings from the HF config files of ``directory`` (first file wins)."""
  roles: dict[str, str] = {}
  for name in CONFIG_FILES:
    file = paths.join(directory, name)
    if not paths.isfile(file):
      continue
    try:
      config = json.loads(paths.read_text(file))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{file}: not valid JSON ({e})") from None
    for role in ROLES:
      value = config.get(role)
      value = value.get("content") if isinstance(value, dict) else value
      if isinstance(value, str) and role not in roles:
        roles[role] = value
  return roles


def load(path: str | os.PathLike) -> TextTokenizer:
  """A SentencePieceProcessor (``.model`` or a directory with ``tokenizer.model``) or a
  `BpeTokenizer` (a byte-level ``tokenizer.json`` or a directory with only that)."""
  if tokenizer_lib.base_kind(path) == "sentencepiece":
    return tokenizer_lib.load_processor(path)
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

  from cnllama_jax import bpe  # pylint: disable=import-outside-toplevel
  doc = bpe.load_json(path)
  directory = os.fspath(path) if paths.isdir(path) else os.fspath(paths.path(path).parent)
  name = paths.join(directory, "tokenizer.json") if paths.isdir(path) else os.fspath(path)
  return BpeTokenizer(Tokenizer.from_str(json.dumps(doc)), bpe.size(doc), _role_tokens(directory),
                      name)


def find(directories: Sequence[str | os.PathLike]) -> str:
  """The tokenizer file of the first directory holding one: its ``tokenizer.model`` (as
  `tokenizer.base_kind`, SentencePiece wins when both are there), else its ``tokenizer.json`` when
  that is a byte-level BPE. Another ``tokenizer.json`` (e.g. the Unigram or SentencePiece-style
  fast tokenizer a LoRA directory may carry) is passed over for the next directory."""
  from cnllama_jax import bpe  # pylint: disable=import-outside-toplevel
  passed_over = []
  for directory in directories:
    model, json_file = (paths.join(directory, name) for name in FILES)
    if paths.isfile(model):
      return model
    if paths.isfile(json_file):
      try:
        bpe.load_json(json_file)
        return json_file
      except bpe.UnsupportedTokenizerError as e:
        passed_over.append(str(e))
  raise FileNotFoundError(f"no {' or '.join(FILES)} in {[os.fspath(d) for d in directories]}"
                          + (f" that this code reads ({'; '.join(passed_over)})" if passed_over
                             else "") + "; pass --tokenizer")


def pad_id(tokenizer: TextTokenizer) -> int:
  """The pad id: a BPE's ``pad_token``, a SentencePiece model's ``[PAD]`` piece (the Alpaca
  tokenizer's last id), else 0 (padding is masked out of attention and loss either way)."""
  if isinstance(tokenizer, BpeTokenizer):
    pad = tokenizer.pad_token_id()
    return 0 if pad is None else pad
  pad = tokenizer.piece_to_id("[PAD]")
  return pad if pad != tokenizer.unk_id() else 0
