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
* ``load`` / ``vocab_size`` / ``sub_pieces``: either kind (SentencePiece ``.model`` or byte-level
  BPE ``tokenizer.json``, see ``bpe``).

Every path may be local or a URL (``gs://bucket/dir``): reads and writes go through ``paths``.
The Hugging Face files written beside a model are made by ``tokenizer_hf``; encoding-efficiency
statistics are in ``tokenizer_stats``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import time
from typing import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from cnllama_jax import paths, tokenizer_hf

logger = logging.getLogger(__name__)

_Piece = sp_pb2.ModelProto.SentencePiece
NORMAL, UNKNOWN, CONTROL = _Piece.NORMAL, _Piece.UNKNOWN, _Piece.CONTROL
USER_DEFINED, BYTE = _Piece.USER_DEFINED, _Piece.BYTE
SCORE_MODES = ("zero", "ordered")
PAD_TYPES = {"normal": NORMAL, "user_defined": USER_DEFINED}
PathLike = str | os.PathLike


class CorpusError(ValueError):
  """Training (or statistics) text is missing, empty or not UTF-8."""


class InvalidModelError(ValueError):
  """A file is not a loadable SentencePiece model."""


# ----------------------------------------------------------------------------- training


def check_corpus(inputs: Iterable[PathLike]) -> tuple[list, int, int]:
  """``(files, non_blank_lines, bytes)`` of training input (files and directories of ``.txt``
  files, as ``data.sources.list_files``); CorpusError if missing, empty or not UTF-8."""
  from cnllama_jax.data import sources  # pylint: disable=import-outside-toplevel
  n_bytes = 0

  def count(size: int) -> None:
    nonlocal n_bytes
    n_bytes += size
  try:
    one = isinstance(inputs, (str, os.PathLike))
    files = sources.list_files(inputs if one else list(inputs), sources.TEXT_SUFFIXES)
    n_lines = sum(1 for _ in sources.iter_documents(files, on_bytes=count))
  except (FileNotFoundError, ValueError) as e:
    raise CorpusError(str(e)) from None
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
) -> paths.epath.Path:
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
  paths.write_bytes(out_path, buffer.getvalue())
  logger.info("wrote %s (%d pieces) in %.1fs", out_path, len(proto.pieces),
              time.perf_counter() - start)
  return paths.path(out_path)


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
  """Reads a ``.model`` file (or ``<dir>/tokenizer.model``, local or a URL); errors name it."""
  path = paths.join(path, "tokenizer.model") if paths.isdir(path) else os.fspath(path)
  try:
    data = paths.read_bytes(path)
  except OSError as e:
    raise InvalidModelError(f"{path}: cannot read SentencePiece model "
                            f"({e.strerror or 'no such file'})") from None
  return parse_model_proto(data, path)


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


@dataclasses.dataclass(frozen=True)
class MergeResult:
  """What ``merge`` wrote: directory, total/base/appended piece counts and pad id."""

  out_dir: str
  num_pieces: int
  num_base: int
  num_added: int
  pad_id: int | None


def check_output_dir(out: PathLike) -> None:
  """A merge writes a new directory: a non-empty existing one is refused (FileExistsError)."""
  if paths.exists(out) and (not paths.isdir(out) or paths.listdir(out)):
    raise FileExistsError(
        f"{out}: output exists and is not an empty directory; remove it or choose another")


def publish_dir(out: PathLike, files: dict[str, bytes]) -> str:
  """Writes ``files`` ({name: bytes}) as the new directory ``out`` (``paths.publish_dir``: a
  local ``out`` is complete or absent; on a bucket it is marked incomplete until done)."""
  check_output_dir(out)
  with paths.publish_dir(out, overwrite=True) as tmp:  # overwrite: an empty directory only
    for name, data in files.items():
      paths.write_bytes(paths.join(tmp, name), data)
  return os.fspath(out)


def base_kind(path: PathLike) -> str:
  """``"sentencepiece"`` for a ``.model`` file or a directory holding ``tokenizer.model``;
  ``"bpe"`` for a ``tokenizer.json`` file or a directory with only ``tokenizer.json``."""
  if paths.isdir(path):
    return "bpe" if not paths.exists(paths.join(path, "tokenizer.model")) and paths.exists(
        paths.join(path, "tokenizer.json")) else "sentencepiece"
  return "bpe" if os.fspath(path).endswith(".json") else "sentencepiece"


def merge(base_path: PathLike, added_path: PathLike, out_dir: PathLike,
          pad_piece: str | None = None, new_piece_scores: str = "zero",
          pad_type: str = "normal") -> MergeResult:
  """Merges two ``.model`` files (see ``merge_protos``) into the new directory ``out_dir``.

  ``out_dir`` gets ``tokenizer_hf.HF_FILES``; it is built in a temporary sibling and renamed
  into place, so it is either complete or absent.  A non-empty existing
  ``out_dir`` is refused (FileExistsError).  The base must be BPE (as LLaMA's).
  A byte-level BPE base (a ``tokenizer.json``, LLaMA-3 style) goes to ``bpe.merge``
  (``added_path`` then a byte-level BPE ``tokenizer.json`` or a SentencePiece ``.model`` whose
  pieces become byte-level tokens; scores and pad type unused).
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
  out = os.fspath(out_dir)
  check_output_dir(out)
  data = merged.SerializeToString()
  parse_model_proto(data, paths.join(out, "tokenizer.model"))  # sentencepiece must load it
  publish_dir(out, {"tokenizer.model": data, **tokenizer_hf.hf_files(merged, pad_piece)})
  pad_id = len(merged.pieces) - 1 if pad_piece is not None else None
  result = MergeResult(out, len(merged.pieces), len(base.pieces),
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
