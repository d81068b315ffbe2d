"""Chinese vocabulary extension for LLaMA (Cui, Yang & Yao 2023, Sec. 2.3).

Three steps, each a pure function plus a thin file-writing wrapper:

* ``train_sentencepiece``: train a SentencePiece model on Chinese text (the
  paper: 20,000-piece unigram, ``nmt_nfkc`` normalisation, character coverage
  0.9995).
* ``merge``: append every piece of the Chinese model whose string the LLaMA
  model lacks, in the Chinese model's order, as a NORMAL piece with score 0
  (the paper's protobuf-level merge; 32,000 + 17,953 = 49,953 pieces), plus
  optionally a pad piece (Chinese-Alpaca: ``[PAD]`` at id 49,953).  The base
  ``trainer_spec``/``normalizer_spec`` are kept, so the result is still a
  LLaMA-style BPE model.  ``new_piece_scores="ordered"`` gives the appended
  pieces distinct scores above every base score (decreasing in appended
  order), which removes BPE ties so that Hugging Face ``tokenizers`` (merge
  rank) and sentencepiece (score, then leftmost position) agree.
* ``tokenizer_stats``: tokens per character/byte, byte-fallback share and
  encode speed of a tokenizer on a text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

logger = logging.getLogger(__name__)

_Piece = sp_pb2.ModelProto.SentencePiece
NORMAL, UNKNOWN, CONTROL = _Piece.NORMAL, _Piece.UNKNOWN, _Piece.CONTROL
USER_DEFINED, BYTE, UNUSED = _Piece.USER_DEFINED, _Piece.BYTE, _Piece.UNUSED
SCORE_MODES = ("zero", "ordered")
HF_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class CorpusError(ValueError):
    """Training text is missing, empty or not UTF-8."""


class InvalidModelError(ValueError):
    """A file is not a loadable SentencePiece model."""


# --------------------------------------------------------------------------- training


def list_text_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expands files and directories (recursively, sorted, hidden entries skipped)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(
                p for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            files.append(path)
        else:
            raise CorpusError(f"{path}: no such file or directory")
    return files


def check_utf8(path: str | os.PathLike) -> tuple[int, int]:
    """Returns ``(non_blank_lines, size_in_bytes)``; raises CorpusError at the first bad byte."""
    offset = lines = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{path}: not valid UTF-8 at byte offset {offset + e.start} (line {line_no}): {e.reason}"
                ) from None
            lines += bool(text.strip())
            offset += len(raw)
    return lines, offset


def iter_lines(files: Sequence[Path], progress: bool = False, total_bytes: int = 0) -> Iterator[str]:
    """Yields the non-blank lines of ``files`` (newline and a leading BOM removed)."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="reading corpus")
    try:
        for path in files:
            with open(path, "rb") as f:
                for i, raw in enumerate(f):
                    if bar is not None:
                        bar.update(len(raw))
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if i == 0:
                        line = line.lstrip("\ufeff")
                    if line.strip():
                        yield line
    finally:
        if bar is not None:
            bar.close()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_sentencepiece(
    inputs: Iterable[str | os.PathLike],
    out_path: str | os.PathLike,
    vocab_size: int = 20000,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    byte_fallback: bool = False,
    split_digits: bool = False,
    normalization: str = "nmt_nfkc",
    add_dummy_prefix: bool = True,
    remove_extra_whitespaces: bool = True,
    allow_whitespace_only_pieces: bool = False,
    hard_vocab_limit: bool = True,
    input_sentence_size: int = 0,
    num_threads: int | None = None,
    progress: bool = True,
    **extra,
) -> Path:
    """Trains a SentencePiece model on UTF-8 text files/directories and writes it atomically.

    Defaults follow the paper's Chinese model; a LLaMA-like base model is
    ``model_type="bpe", byte_fallback=True, split_digits=True,
    normalization="identity", remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True``.  Ids are always unk/bos/eos = 0/1/2,
    no pad.  ``extra`` is passed to ``SentencePieceTrainer.train``.  Returns
    ``out_path``.  Raises CorpusError on missing, empty or non-UTF-8 input.
    """
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise ValueError(f"unknown model_type {model_type!r}")
    files = list_text_files(inputs)
    if not files:
        raise CorpusError("no input files given")
    n_lines = n_bytes = 0
    for path in files:
        lines, size = check_utf8(path)
        n_lines, n_bytes = n_lines + lines, n_bytes + size
    if n_lines == 0:
        raise CorpusError(f"empty input: no non-blank line in {', '.join(map(str, files))}")
    logger.info("training %s model, vocab %d, on %d lines (%d bytes) from %d file(s)",
                model_type, vocab_size, n_lines, n_bytes, len(files))
    buffer = _BytesSink()
    options = dict(
        vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
        byte_fallback=byte_fallback, split_digits=split_digits, normalization_rule_name=normalization,
        add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=remove_extra_whitespaces,
        allow_whitespace_only_pieces=allow_whitespace_only_pieces, hard_vocab_limit=hard_vocab_limit,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=1 if progress else 2,
    )
    options.update(extra)
    start = time.perf_counter()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter_lines(files, progress=progress, total_bytes=n_bytes),
        model_writer=buffer, **options,
    )
    out = Path(out_path)
    _atomic_write_bytes(out, buffer.data)
    logger.info("wrote %s (%d pieces) in %.1fs", out, len(load_model_proto(out).pieces),
                time.perf_counter() - start)
    return out


class _BytesSink:
    """Minimal file-like object for ``SentencePieceTrainer.train(model_writer=...)``."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


# --------------------------------------------------------------------------- merging


def parse_model_proto(data: bytes, name: str = "<bytes>") -> sp_pb2.ModelProto:
    """Parses and validates serialized SentencePiece model bytes (loadable by sentencepiece)."""
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


def load_model_proto(path: str | os.PathLike) -> sp_pb2.ModelProto:
    """Reads a ``.model`` file; raises InvalidModelError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidModelError(f"{path}: cannot read SentencePiece model ({e.strerror})") from None
    return parse_model_proto(data, str(path))


def merge_protos(
    base: sp_pb2.ModelProto,
    added: sp_pb2.ModelProto,
    pad_piece: str | None = None,
    new_piece_scores: str = "zero",
) -> sp_pb2.ModelProto:
    """Returns ``base`` extended with the pieces of ``added`` it lacks (inputs untouched).

    As in the paper, every piece of ``added`` (any type) whose string is not a
    base piece is appended in ``added``'s order as a NORMAL piece; its score is
    0 (``"zero"``) or, for ``"ordered"``, ``max_base_score + n - i`` for the
    i-th of n appended pieces (distinct, above every base piece, decreasing).
    ``pad_piece`` is appended last as a USER_DEFINED piece with score 0, so that
    sentencepiece, like Hugging Face (where it is a special token), maps the
    literal string to its id.
    """
    if new_piece_scores not in SCORE_MODES:
        raise ValueError(f"new_piece_scores must be one of {SCORE_MODES}, got {new_piece_scores!r}")
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
        entry = merged.pieces.add()
        entry.piece = piece
        entry.score = 0.0 if new_piece_scores == "zero" else top + len(new) - i
    if pad_piece is not None:
        if pad_piece in seen:
            raise ValueError(f"pad piece {pad_piece!r} is already in the vocabulary")
        entry = merged.pieces.add()
        entry.piece, entry.score, entry.type = pad_piece, 0.0, USER_DEFINED
    return merged


def bpe_merges(proto: sp_pb2.ModelProto) -> list[tuple[str, str]]:
    """Hugging Face BPE merges reproducing sentencepiece's BPE priorities.

    sentencepiece merges the adjacent pair whose concatenation is the NORMAL
    piece with the highest score (ties: leftmost).  A merge ``(l, r)`` is
    listed for every split of a NORMAL piece into two NORMAL pieces, ranked by
    (score descending, id, split point).  Equal scores are the only source of
    disagreement left (rank vs. position).
    """
    ids = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked = []
    for piece, i in ids.items():
        score = proto.pieces[i].score
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _added_token(content: str, special: bool) -> dict:
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def _special_pieces(proto: sp_pb2.ModelProto, pad_piece: str | None) -> dict[int, tuple[str, bool]]:
    """id -> (piece, special) for control, unknown and user-defined pieces."""
    out = {}
    for i, p in enumerate(proto.pieces):
        if p.type in (CONTROL, UNKNOWN) or p.piece == pad_piece:
            out[i] = (p.piece, True)
        elif p.type == USER_DEFINED:
            out[i] = (p.piece, False)
    return out


def _role_tokens(proto: sp_pb2.ModelProto, pad_piece: str | None) -> dict[str, str | None]:
    spec = proto.trainer_spec

    def piece(i: int) -> str | None:
        return proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None

    return {"bos_token": piece(spec.bos_id), "eos_token": piece(spec.eos_id),
            "unk_token": piece(spec.unk_id), "pad_token": pad_piece}


def hf_tokenizer_json(proto: sp_pb2.ModelProto, pad_piece: str | None = None) -> dict:
    """A ``tokenizers`` BPE description (LLaMA style: Metaspace, byte fallback, BOS prepended)."""
    roles = _role_tokens(proto, pad_piece)
    bos = roles["bos_token"]
    prepend = "first" if proto.normalizer_spec.add_dummy_prefix else "never"
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if proto.normalizer_spec.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, **_added_token(piece, special)}
                         for i, (piece, special) in sorted(_special_pieces(proto, pad_piece).items())],
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": prepend, "split": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [proto.trainer_spec.bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": roles["unk_token"], "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": {p.piece: i for i, p in enumerate(proto.pieces)},
            "merges": [list(m) for m in bpe_merges(proto)],
        },
    }


def hf_tokenizer_config(proto: sp_pb2.ModelProto, pad_piece: str | None = None) -> dict:
    """``tokenizer_config.json`` for ``transformers.AutoTokenizer`` (class LlamaTokenizer)."""
    return {
        "tokenizer_class": "LlamaTokenizer",
        **_role_tokens(proto, pad_piece),
        "add_bos_token": True, "add_eos_token": False,
        "add_prefix_space": bool(proto.normalizer_spec.add_dummy_prefix),
        "legacy": False, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): _added_token(piece, special)
                                 for i, (piece, special) in sorted(_special_pieces(proto, pad_piece).items())},
    }


def merge(base_path, added_path, out_dir, pad_piece=None, new_piece_scores="zero") -> "MergeResult":
    """Merges two ``.model`` files into a new directory ``out_dir``.

    ``out_dir`` receives ``tokenizer.model`` and the Hugging Face files (see
    ``HF_FILES``); it is built in a temporary sibling and renamed into place,
    so it is either complete or absent.  A non-empty existing ``out_dir`` is
    refused (FileExistsError).  The base must be a BPE model (as LLaMA's).
    """
    base, added = load_model_proto(base_path), load_model_proto(added_path)
    if base.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE:
        raise ValueError(f"{base_path}: base model must be BPE (LLaMA-style), got "
                         f"{sp_pb2.TrainerSpec.ModelType.Name(base.trainer_spec.model_type)}")
    norm = base.normalizer_spec
    if norm.name != "identity" or norm.remove_extra_whitespaces:
        logger.warning("%s: normalizer %r is not reproduced by the Hugging Face files", base_path, norm.name)
    merged = merge_protos(base, added, pad_piece, new_piece_scores)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: output exists and is not an empty directory; remove it or choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (tmp / "tokenizer.model").write_bytes(merged.SerializeToString())
        load_model_proto(tmp / "tokenizer.model")  # round-trip check by sentencepiece itself
        documents = {
            "tokenizer.json": hf_tokenizer_json(merged, pad_piece),
            "tokenizer_config.json": hf_tokenizer_config(merged, pad_piece),
            "special_tokens_map.json": {k: v for k, v in _role_tokens(merged, pad_piece).items() if v},
        }
        for name, doc in documents.items():
            (tmp / name).write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = MergeResult(str(out), len(merged.pieces), len(base.pieces),
                         len(merged.pieces) - len(base.pieces) - (pad_piece is not None),
                         len(merged.pieces) - 1 if pad_piece is not None else None)
    logger.info("merged %s + %s -> %s: %d pieces (%d appended)", base_path, added_path, out,
                result.num_pieces, result.num_added)
    return result


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """What ``merge`` wrote: directory, total/base/appended piece counts and pad id."""

    out_dir: str
    num_pieces: int
    num_base: int
    num_added: int
    pad_id: int | None


# --------------------------------------------------------------------------- statistics


def load_processor(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """A SentencePieceProcessor from a ``.model`` file or a directory holding ``tokenizer.model``."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    return spm.SentencePieceProcessor(model_proto=load_model_proto(path).SerializeToString())


def _encode_proto(sp: spm.SentencePieceProcessor, text: str):
    try:
        return sp.encode(text, return_type="proto")
    except (TypeError, ValueError):  # sentencepiece < 0.2.1
        return sp.encode(text, out_type="immutable_proto")


def byte_fallback_chars(sp: spm.SentencePieceProcessor, text: str) -> int:
    """Number of non-whitespace characters of ``text`` encoded (at least partly) as byte pieces.

    sentencepiece reports each piece's span as UTF-8 byte offsets into the
    original text (a character split into bytes: the last byte piece carries
    the character's span); a character counts if a byte piece's span covers it.
    """
    char_at = {}
    offset = 0
    for index, ch in enumerate(text):
        char_at[offset] = index
        offset += len(ch.encode("utf-8"))
    hit: set[int] = set()
    for piece in _encode_proto(sp, text).pieces:
        if sp.is_byte(piece.id):
            hit.update(char_at[b] for b in range(piece.begin, piece.end) if b in char_at)
    return sum(1 for i in hit if not text[i].isspace())


@dataclasses.dataclass(frozen=True)
class TokenizerStats:
    """Statistics of one tokenizer on one text (encoded as a single string, no BOS/EOS).

    ``byte_fallback_share`` = characters encoded with byte pieces / non-whitespace
    characters (both counted in Unicode code points); ``chars_per_second`` is the
    encode throughput of ``SentencePieceProcessor.encode`` (one thread).
    """

    name: str
    num_chars: int
    num_bytes: int
    num_tokens: int
    num_nonspace_chars: int
    num_byte_fallback_chars: int
    chars_per_second: float

    @property
    def tokens_per_char(self) -> float:
        return self.num_tokens / max(self.num_chars, 1)

    @property
    def tokens_per_byte(self) -> float:
        return self.num_tokens / max(self.num_bytes, 1)

    @property
    def byte_fallback_share(self) -> float:
        return self.num_byte_fallback_chars / max(self.num_nonspace_chars, 1)


def tokenizer_stats(sp: spm.SentencePieceProcessor, text: str, name: str = "", min_seconds: float = 0.2) -> TokenizerStats:
    """Computes ``TokenizerStats``; speed is timed over repeated encodes lasting >= ``min_seconds``."""
    num_tokens = len(sp.encode(text))
    repeats, start = 0, time.perf_counter()
    while True:
        sp.encode(text)
        repeats += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            break
    return TokenizerStats(
        name=name, num_chars=len(text), num_bytes=len(text.encode("utf-8")), num_tokens=num_tokens,
        num_nonspace_chars=sum(1 for c in text if not c.isspace()),
        num_byte_fallback_chars=byte_fallback_chars(sp, text),
        chars_per_second=len(text) * repeats / elapsed,
    )


def format_stats_table(stats: Sequence[TokenizerStats]) -> str:
    """A fixed-width text table of ``stats``."""
    header = f"{'tokenizer':<28}{'chars':>9}{'tokens':>9}{'tok/char':>10}{'tok/byte':>10}{'byte-fb %':>11}{'chars/s':>12}"
    rows = [header, "-" * len(header)]
    for s in stats:
        rows.append(f"{s.name[:27]:<28}{s.num_chars:>9}{s.num_tokens:>9}{s.tokens_per_char:>10.3f}"
                    f"{s.tokens_per_byte:>10.3f}{100 * s.byte_fallback_share:>11.2f}{s.chars_per_second:>12.3g}")
    return "\n".join(rows)


def plot_stats(stats: Sequence[TokenizerStats], png_path: str | os.PathLike) -> Path:
    """Saves a 4-panel bar chart of ``stats`` (matplotlib Agg) atomically to ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("tokens / char", [s.tokens_per_char for s in stats]),
              ("tokens / UTF-8 byte", [s.tokens_per_byte for s in stats]),
              ("byte-fallback chars (%)", [100 * s.byte_fallback_share for s in stats]),
              ("encode speed (chars/s)", [s.chars_per_second for s in stats])]
    names = [s.name for s in stats]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, (title, values) in zip(axes, panels):
        ax.bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
        ax.set_xticks(range(len(values)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return out


def read_utf8(path: str | os.PathLike) -> str:
    """Reads a text file, raising CorpusError with the byte offset of invalid UTF-8."""
    check_utf8(path)
    return Path(path).read_text(encoding="utf-8")
