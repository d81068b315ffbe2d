"""Chinese vocabulary extension for LLaMA (Cui, Yang & Yao 2023, Sec. 2.3).

* ``train_sentencepiece``: train a SentencePiece model on Chinese text (paper:
  20,000-piece unigram, ``nmt_nfkc``, character coverage 0.9995).
* ``merge``: the paper's protobuf-level merge.  Every piece of the Chinese
  model whose string LLaMA lacks is appended, in the Chinese model's order, as
  a NORMAL piece with score 0 (32,000 + 17,953 = 49,953 pieces); optionally a
  pad piece last (Chinese-Alpaca: ``[PAD]`` = 49,953, NORMAL, score 0, so the
  49,954-piece file is byte-identical to the published one).  LLaMA's trainer and
  normalizer specs are kept, so the result is a LLaMA-style BPE model.
  ``new_piece_scores="ordered"`` gives the appended pieces distinct scores
  above every base score, decreasing in appended order: no BPE ties, so
  Hugging Face ``tokenizers`` (merge rank) agrees with sentencepiece (score,
  then leftmost position), which it does not with score 0.
* ``load_processor``: a SentencePieceProcessor from a model file or directory.

Encoding-efficiency statistics are in ``tokenizer_stats``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

logger = logging.getLogger(__name__)

_Piece = sp_pb2.ModelProto.SentencePiece
NORMAL, UNKNOWN, CONTROL = _Piece.NORMAL, _Piece.UNKNOWN, _Piece.CONTROL
USER_DEFINED, BYTE = _Piece.USER_DEFINED, _Piece.BYTE
SCORE_MODES = ("zero", "ordered")
PAD_TYPES = {"normal": NORMAL, "user_defined": USER_DEFINED}
HF_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PathLike = str | os.PathLike


class CorpusError(ValueError):
  """Training (or statistics) text is missing, empty or not UTF-8."""


class InvalidModelError(ValueError):
  """A file is not a loadable SentencePiece model."""


# ----------------------------------------------------------------------------- training


def list_text_files(inputs: Iterable[PathLike]) -> list[Path]:
  """Expands files and directories: a directory gives its `.txt` files (recursively, sorted,
  hidden entries skipped); a file given by name is taken whatever its suffix."""
  files: list[Path] = []
  for item in inputs:
    path = Path(item)
    if path.is_dir():
      files += [p for p in sorted(path.rglob("*.txt")) if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    elif path.is_file():
      files.append(path)
    else:
      raise CorpusError(f"{path}: no such file or directory")
  return files


def check_utf8(path: PathLike) -> tuple[int, int]:
  """Returns ``(non_blank_lines, size_in_bytes)``; raises CorpusError at the first invalid byte."""
  offset = lines = 0
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        lines += bool(raw.decode("utf-8").strip())
      except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not valid UTF-8 at byte offset {offset + e.start} "
                          f"(line {line_no}): {e.reason}") from None
      offset += len(raw)
  return lines, offset


def read_utf8(path: PathLike) -> str:
  """Reads a text file, raising CorpusError with the position of invalid UTF-8."""
  check_utf8(path)
  return Path(path).read_text(encoding="utf-8")


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
  """Writes ``data`` to a temporary sibling and renames it over ``path``."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return path


def check_corpus(inputs: Iterable[PathLike]) -> tuple[list[Path], int, int]:
  """``(files, non_blank_lines, bytes)`` of training input; CorpusError if missing/empty/bad."""
  files = list_text_files(inputs)
  if not files:
    raise CorpusError("no input files given")
  counts = [check_utf8(path) for path in files]
  n_lines, n_bytes = sum(c[0] for c in counts), sum(c[1] for c in counts)
  if n_lines == 0:
    raise CorpusError(f"empty input: no non-blank line in {', '.join(map(str, files))}")
  return files, n_lines, n_bytes


def train_sentencepiece(
    inputs: Iterable[PathLike], out_path: PathLike, vocab_size: int = 20000,
    model_type: str = "unigram", character_coverage: float = 0.9995, byte_fallback: bool = False,
    split_digits: bool = False, normalization: str = "nmt_nfkc", add_dummy_prefix: bool = True,
    remove_extra_whitespaces: bool = True, allow_whitespace_only_pieces: bool = False,
    hard_vocab_limit: bool = True, input_sentence_size: int = 0, num_threads: int | None = None,
    progress: bool = True, **extra,
) -> Path:
  """Trains a SentencePiece model on UTF-8 files/directories; writes ``out_path`` atomically.

  Defaults are the paper's Chinese model.  A LLaMA-like base model is
  ``model_type="bpe", byte_fallback=True, split_digits=True, normalization="identity",
  remove_extra_whitespaces=False, allow_whitespace_only_pieces=True``.  Ids are
  unk/bos/eos = 0/1/2, no pad; ``extra`` goes to ``SentencePieceTrainer.train``.
  Raises CorpusError on missing, empty or non-UTF-8 input (before training).
  """
  if model_type not in ("unigram", "bpe", "char", "word"):
    raise ValueError(f"unknown model_type {model_type!r}")
  files, n_lines, n_bytes = check_corpus(inputs)
  logger.info("training %s model, vocab %d, on %d lines (%d bytes) from %d file(s)",
              model_type, vocab_size, n_lines, n_bytes, len(files))
  options = dict(
      vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
      byte_fallback=byte_fallback, split_digits=split_digits, normalization_rule_name=normalization,
      add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=remove_extra_whitespaces,
      allow_whitespace_only_pieces=allow_whitespace_only_pieces, hard_vocab_limit=hard_vocab_limit,
      input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
      num_threads=num_threads or os.cpu_count() or 1,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=0 if progress else 2,
  )
  options.update(extra)
  start, buffer = time.perf_counter(), io.BytesIO()
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from cnllama_jax.data import sources  # pylint: disable=import-outside-toplevel
  with tqdm(total=n_bytes, unit="B", unit_scale=True, desc="reading corpus",
            disable=not progress) as bar:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sources.iter_documents(files, on_bytes=bar.update),
        model_writer=buffer, **options)
  proto = parse_model_proto(buffer.getvalue(), "trained model")
  out = atomic_write_bytes(out_path, buffer.getvalue())
  logger.info("wrote %s (%d pieces) in %.1fs", out, len(proto.pieces), time.perf_counter() - start)
  return out


# ----------------------------------------------------------------------------- merging


def parse_model_proto(data: bytes, name: str = "<bytes>") -> sp_pb2.ModelProto:
  """Parses serialized model bytes and checks that sentencepiece can load them."""
  proto = sp_pb2.ModelProto()
  try:
    proto.ParseFromString(data)
    if not proto.pieces:
      raise ValueError("it has no pieces")
    spm.SentencePieceProcessor(model_proto=data)
  except Exception as e:  # protobuf DecodeError, sentencepiece RuntimeError, ...
    detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    raise InvalidModelError(f"{name}: not a valid SentencePiece model ({detail})") from None
  return proto


def load_model_proto(path: PathLike) -> sp_pb2.ModelProto:
  """Reads a ``.model`` file (or ``<dir>/tokenizer.model``); errors name the file."""
  path = Path(path)
  path = path / "tokenizer.model" if path.is_dir() else path
  try:
    data = path.read_bytes()
  except OSError as e:
    raise InvalidModelError(f"{path}: cannot read SentencePiece model ({e.strerror})") from None
  return parse_model_proto(data, str(path))


def merge_protos(base: sp_pb2.ModelProto, added: sp_pb2.ModelProto, pad_piece: str | None = None,
                 new_piece_scores: str = "zero", pad_type: str = "normal") -> sp_pb2.ModelProto:
  """Returns a copy of ``base`` extended with the pieces of ``added`` it lacks.

  As in the paper, every piece of ``added`` (whatever its type) whose string
  is not in ``base`` is appended in ``added``'s order with the default NORMAL
  type and score 0 (``"zero"``) or, for ``"ordered"``, ``max_base_score + n - i``
  for the i-th of n appended pieces.  ``pad_piece`` is appended last with score
  0 and type ``pad_type``: ``"normal"`` as the published Chinese-Alpaca
  tokenizer.model (sentencepiece spells the literal string "[PAD]" out in
  ordinary pieces), or ``"user_defined"`` (sentencepiece maps the literal
  string to its id, as Hugging Face does for its pad special token).
  """
  if new_piece_scores not in SCORE_MODES:
    raise ValueError(f"new_piece_scores must be one of {SCORE_MODES}, got {new_piece_scores!r}")
  if pad_type not in PAD_TYPES:
    raise ValueError(f"pad_type must be one of {sorted(PAD_TYPES)}, got {pad_type!r}")
  merged = sp_pb2.ModelProto()
  merged.CopyFrom(base)
  seen = {p.piece for p in base.pieces}
  new = []
  for p in added.pieces:
    if p.piece not in seen:
      seen.add(p.piece)
      new.append(p.piece)
  top = max(p.score for p in base.pieces)
  for i, piece in enumerate(new):
    merged.pieces.add(piece=piece, score=0.0 if new_piece_scores == "zero" else top + len(new) - i)
  if pad_piece is not None:
    if pad_piece in seen:
      raise ValueError(f"pad piece {pad_piece!r} is already in the vocabulary")
    if PAD_TYPES[pad_type] == NORMAL:
      merged.pieces.add(piece=pad_piece, score=0.0)  # type and score left at their defaults
    else:
      merged.pieces.add(piece=pad_piece, score=0.0, type=USER_DEFINED)
  return merged


def bpe_merges(proto: sp_pb2.ModelProto, pad_piece: str | None = None) -> list[tuple[str, str]]:
  """Hugging Face BPE merges following sentencepiece's BPE priorities.

  sentencepiece repeatedly merges the adjacent pair whose concatenation is the
  NORMAL piece with the highest score (ties: leftmost pair).  Every split of a
  NORMAL piece into two NORMAL pieces becomes a merge, ranked by (score
  descending, piece id, split point); only equal scores can still disagree.
  (transformers' own conversion ranks merges by id alone, ignoring scores.)
  A NORMAL ``pad_piece`` is a special token for Hugging Face, never a merge result.
  """
  ids = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == NORMAL and p.piece != pad_piece}
  ranked = sorted((-proto.pieces[i].score, i, cut, piece[:cut], piece[cut:])
                  for piece, i in ids.items() for cut in range(1, len(piece))
                  if piece[:cut] in ids and piece[cut:] in ids)
  return [(left, right) for *_, left, right in ranked]


def _added_tokens(proto: sp_pb2.ModelProto, pad_piece: str | None) -> dict[int, dict]:
  """id -> tokenizers AddedToken fields, for control/unknown (special) and user-defined pieces."""
  return {i: {"content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": p.type != USER_DEFINED or p.piece == pad_piece}
          for i, p in enumerate(proto.pieces)
          if p.type in (CONTROL, UNKNOWN, USER_DEFINED) or p.piece == pad_piece}


def _role_tokens(proto: sp_pb2.ModelProto, pad_piece: str | None) -> dict[str, str | None]:
  spec, n = proto.trainer_spec, len(proto.pieces)
  role = {"bos_token": spec.bos_id, "eos_token": spec.eos_id, "unk_token": spec.unk_id}
  tokens = {k: proto.pieces[i].piece if 0 <= i < n else None for k, i in role.items()}
  return tokens | {"pad_token": pad_piece}


def hf_tokenizer_json(proto: sp_pb2.ModelProto, pad_piece: str | None = None) -> dict:
  """``tokenizer.json``: LLaMA-style BPE (Metaspace, byte fallback, BOS prepended)."""
  bos, bos_id = _role_tokens(proto, pad_piece)["bos_token"], proto.trainer_spec.bos_id
  dummy = proto.normalizer_spec.add_dummy_prefix
  decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
              {"type": "ByteFallback"}, {"type": "Fuse"}]
  decoders += [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if dummy else []
  first = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
  second = [{"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}]
  return {
      "version": "1.0", "truncation": None, "padding": None,
      "added_tokens": [{"id": i, **t} for i, t in _added_tokens(proto, pad_piece).items()],
      "normalizer": None,
      "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                        "prepend_scheme": "first" if dummy else "never", "split": False},
      "post_processor": {"type": "TemplateProcessing", "single": first, "pair": first + second,
                         "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}},
      "decoder": {"type": "Sequence", "decoders": decoders},
      "model": {"type": "BPE", "dropout": None, "unk_token": _role_tokens(proto, None)["unk_token"],
                "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                "byte_fallback": True, "ignore_merges": False,
                "vocab": {p.piece: i for i, p in enumerate(proto.pieces)},
                "merges": [list(m) for m in bpe_merges(proto, pad_piece)]},
  }


def hf_tokenizer_config(proto: sp_pb2.ModelProto, pad_piece: str | None = None) -> dict:
  """``tokenizer_config.json`` for ``transformers.AutoTokenizer`` (LlamaTokenizer)."""
  return {"tokenizer_class": "LlamaTokenizer", **_role_tokens(proto, pad_piece),
          "add_bos_token": True, "add_eos_token": False,
          "add_prefix_space": bool(proto.normalizer_spec.add_dummy_prefix), "legacy": False,
          "clean_up_tokenization_spaces": False,
          "added_tokens_decoder": {str(i): t for i, t in _added_tokens(proto, pad_piece).items()}}


@dataclasses.dataclass(frozen=True)
class MergeResult:
  """What ``merge`` wrote: directory, total/base/appended piece counts and pad id."""

  out_dir: str
  num_pieces: int
  num_base: int
  num_added: int
  pad_id: int | None


def json_bytes(doc: dict, indent: int | None = 2) -> bytes:
  return (json.dumps(doc, ensure_ascii=False, indent=indent) + "\n").encode("utf-8")


def hf_files(proto: sp_pb2.ModelProto, pad_piece: str | None = None) -> dict[str, bytes]:
  """The Hugging Face files of a model beside its ``tokenizer.model``: {name: UTF-8 bytes} of
  ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
  roles = {k: v for k, v in _role_tokens(proto, pad_piece).items() if v}
  return {"tokenizer.json": json_bytes(hf_tokenizer_json(proto, pad_piece), None),
          "tokenizer_config.json": json_bytes(hf_tokenizer_config(proto, pad_piece)),
          "special_tokens_map.json": json_bytes(roles)}


def check_output_dir(out: Path) -> None:
  """A merge writes a new directory: a non-empty existing one is refused (FileExistsError)."""
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(
        f"{out}: output exists and is not an empty directory; remove it or choose another")


def publish_dir(out: Path, files: dict[str, bytes]) -> Path:
  """Writes ``files`` into a temporary sibling of ``out`` and renames it into place, so ``out``
  is either complete or absent."""
  check_output_dir(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
  try:
    tmp.chmod(0o755)  # mkdtemp creates 0700
    for name, data in files.items():
      (tmp / name).write_bytes(data)
    if out.exists():
      out.rmdir()
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def base_kind(path: PathLike) -> str:
  """``"sentencepiece"`` for a ``.model`` file or a directory holding ``tokenizer.model``;
  ``"bpe"`` for a ``tokenizer.json`` file or a directory with only ``tokenizer.json``."""
  path = Path(path)
  if path.is_dir():
    return "bpe" if not (path / "tokenizer.model").exists() and (
        path / "tokenizer.json").exists() else "sentencepiece"
  return "bpe" if path.suffix == ".json" else "sentencepiece"


def merge(base_path: PathLike, added_path: PathLike, out_dir: PathLike,
          pad_piece: str | None = None, new_piece_scores: str = "zero",
          pad_type: str = "normal") -> MergeResult:
  """Merges two ``.model`` files (see ``merge_protos``) into the new directory ``out_dir``.

  ``out_dir`` gets ``HF_FILES``; it is built in a temporary sibling and renamed
  into place, so it is either complete or absent.  A non-empty existing
  ``out_dir`` is refused (FileExistsError).  The base must be BPE (as LLaMA's).
  A byte-level BPE base (a ``tokenizer.json``, LLaMA-3 style) goes to ``bpe.merge``
  (``added_path`` then a byte-level BPE ``tokenizer.json`` too; scores and pad type unused).
  """
  if base_kind(base_path) == "bpe":
    from cnllama_jax import bpe  # pylint: disable=import-outside-toplevel  (bpe imports this module)
    return bpe.merge(base_path, added_path, out_dir, pad_piece=pad_piece)
  base, added = load_model_proto(base_path), load_model_proto(added_path)
  if base.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
    kind = sp_pb2.TrainerSpec.ModelType.Name(base.trainer_spec.model_type)
    raise ValueError(f"{base_path}: base model must be BPE (LLaMA-style), got {kind}")
  norm = base.normalizer_spec
  if norm.name != "identity" or norm.remove_extra_whitespaces:
    logger.warning("%s: normalizer %r is not reproduced by the Hugging Face files",
                   base_path, norm.name)
  merged = merge_protos(base, added, pad_piece, new_piece_scores, pad_type)
  out = Path(out_dir)
  check_output_dir(out)
  data = merged.SerializeToString()
  parse_model_proto(data, str(out / "tokenizer.model"))  # sentencepiece must load the result
  publish_dir(out, {"tokenizer.model": data, **hf_files(merged, pad_piece)})
  pad_id = len(merged.pieces) - 1 if pad_piece is not None else None
  result = MergeResult(str(out), len(merged.pieces), len(base.pieces),
                       len(merged.pieces) - len(base.pieces) - (pad_id is not None), pad_id)
  logger.info("merged %s + %s -> %s: %d pieces (%d appended)", base_path, added_path, out,
              result.num_pieces, result.num_added)
  return result


def load_processor(path: PathLike) -> spm.SentencePieceProcessor:
  """A SentencePieceProcessor from a ``.model`` file or a directory holding ``tokenizer.model``."""
  return spm.SentencePieceProcessor(model_proto=load_model_proto(path).SerializeToString())


# ----------------------------------------------------------------------------- either kind


def vocab_size(path: PathLike) -> int:
  """Embedding rows a tokenizer needs: SentencePiece pieces, or a tokenizer.json's highest id + 1."""
  if base_kind(path) == "bpe":
    from cnllama_jax import bpe  # pylint: disable=import-outside-toplevel
    return bpe.size(bpe.load_json(path))
  return len(load_model_proto(path).pieces)


def load(path: PathLike):
  """A SentencePieceProcessor or, for a byte-level BPE, a ``tokenizers.Tokenizer``."""
  if base_kind(path) == "bpe":
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

    from cnllama_jax import bpe  # pylint: disable=import-outside-toplevel
    return Tokenizer.from_str(json.dumps(bpe.load_json(path)))
  return load_processor(path)


def sub_pieces(base_path: PathLike, merged_path: PathLike, old_vocab: int) -> list[list[int]]:
  """For each id in [old_vocab, vocab_size(merged_path)): the base ids the base tokenizer splits
  that piece's text into (for the ``subword_mean`` row init of ``vocab.resize_vocab``).

  SentencePiece: the piece's text (``▁`` read as a space) encoded by the base model without its
  dummy prefix, so ``▁中国`` -> the base pieces of " 中国" (byte pieces for unknown characters).
  Byte-level BPE: the base's BPE applied to the token's bytes (see ``bpe.sub_pieces``).
  Raises ValueError if the base does not have ``old_vocab`` pieces, if the merged tokenizer does
  not start with the base's pieces, or if the two are not the same kind.
  """
  kinds = (base_kind(base_path), base_kind(merged_path))
  if kinds[0] != kinds[1]:
    raise ValueError(f"base tokenizer {base_path} is {kinds[0]} but {merged_path} is {kinds[1]}; "
                     "pass the tokenizer the merge started from")
  if kinds[0] == "bpe":
    from cnllama_jax import bpe  # pylint: disable=import-outside-toplevel
    return bpe.sub_pieces(base_path, merged_path, old_vocab)
  base, merged = load_model_proto(base_path), load_model_proto(merged_path)
  if len(base.pieces) != old_vocab:
    raise ValueError(f"{base_path}: base tokenizer has {len(base.pieces)} pieces but the base "
                     f"model's embedding has {old_vocab} rows; pass the model's own tokenizer")
  if [p.piece for p in merged.pieces[:old_vocab]] != [p.piece for p in base.pieces]:
    raise ValueError(f"{merged_path}: its first {old_vocab} pieces are not those of {base_path}; "
                     "pass the tokenizer the merge started from")
  base.normalizer_spec.add_dummy_prefix = False
  sp = spm.SentencePieceProcessor(model_proto=base.SerializeToString())
  return [sp.encode(p.piece.replace("\u2581", " ")) for p in merged.pieces[old_vocab:]]


def config_sub_pieces(config, old_vocab: int) -> list[list[int]] | None:
  """``sub_pieces(config.vocab.base_tokenizer, config.tokenizer, old_vocab)`` when the run config
  asks for ``vocab.init="subword_mean"``, else None."""
  if config.vocab.init != "subword_mean":
    return None
  base = config.vocab.get("base_tokenizer", "")
  if not base:
    raise ValueError("vocab.init='subword_mean' needs vocab.base_tokenizer: the base model's own "
                     "tokenizer (.model, tokenizer.json or a directory)")
  return sub_pieces(base, config.tokenizer, old_vocab)
