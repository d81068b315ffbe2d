"""Encoding efficiency of tokenizers (the paper's motivation for the vocabulary extension):
tokens per character and per byte, the share of characters that fall back to byte pieces, and
encode speed, as a table and a PNG bar chart. A tokenizer is a SentencePieceProcessor or a
byte-level BPE ``tokenizers.Tokenizer`` (``tokenizer.load`` opens either), side by side.
"""

from __future__ import annotations

import dataclasses
import io
import time
from typing import Sequence

import sentencepiece as spm

from cnllama_jax import paths
from cnllama_jax.paths import PathLike


def _byte_level_split_chars(tok, text: str) -> int:
  """Non-whitespace characters of ``text`` covered by a byte-level token that is not whole UTF-8
  (a character split across tokens: the byte-level analogue of byte fallback)."""
  from cnllama_jax.bpe import token_bytes  # pylint: disable=import-outside-toplevel

  encoding = tok.encode(text, add_special_tokens=False)
  hit = set()
  for token, (begin, end) in zip(encoding.tokens, encoding.offsets):
    try:
      token_bytes(token).decode("utf-8")
    except UnicodeDecodeError:
      hit.update(range(begin, end))
  return sum(1 for i in hit if i < len(text) and not text[i].isspace())


def _num_tokens(tok, text: str) -> int:
  if isinstance(tok, spm.SentencePieceProcessor):
    return len(tok.encode(text))
  return len(tok.encode(text, add_special_tokens=False).ids)


def byte_fallback_chars(sp, text: str) -> int:
  """Number of non-whitespace characters of ``text`` encoded (at least partly) as byte pieces.

  sentencepiece gives every piece's span as UTF-8 byte offsets into the
  original text (for a character split into bytes, the last byte piece carries
  the character's span); a character counts if a byte piece's span covers it.
  A byte-level BPE ``tokenizers.Tokenizer``: characters split across tokens.
  """
  if not isinstance(sp, spm.SentencePieceProcessor):
    return _byte_level_split_chars(sp, text)
  char_at, offset = {}, 0
  for index, ch in enumerate(text):
    char_at[offset] = index
    offset += len(ch.encode("utf-8"))
  try:
    pieces = sp.encode(text, return_type="proto").pieces
  except (TypeError, ValueError):  # sentencepiece < 0.2.1
    pieces = sp.encode(text, out_type="immutable_proto").pieces
  hit = {char_at[b] for p in pieces if sp.is_byte(p.id)
         for b in range(p.begin, p.end) if b in char_at}
  return sum(1 for i in hit if not text[i].isspace())


@dataclasses.dataclass(frozen=True)
class TokenizerStats:
  """One tokenizer on one text, encoded as a single string without BOS/EOS.

  Characters are Unicode code points.  ``byte_fallback_share`` = characters
  encoded with byte pieces (byte-level BPE: split across tokens) / non-whitespace characters.
  ``chars_per_second`` is the throughput of the tokenizer's ``encode``.
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


def tokenizer_stats(sp, text: str, name: str = "",
                    min_seconds: float = 0.2) -> TokenizerStats:
  """Computes ``TokenizerStats``; speed is timed over repeated encodes for >= ``min_seconds``."""
  repeats, start = 0, time.perf_counter()
  while (elapsed := time.perf_counter() - start) < min_seconds or repeats == 0:
    num_tokens = _num_tokens(sp, text)
    repeats += 1
  return TokenizerStats(name=name, num_chars=len(text), num_bytes=len(text.encode("utf-8")),
                        num_tokens=num_tokens,
                        num_nonspace_chars=sum(not c.isspace() for c in text),
                        num_byte_fallback_chars=byte_fallback_chars(sp, text),
                        chars_per_second=len(text) * repeats / elapsed)


def format_stats_table(stats: Sequence[TokenizerStats]) -> str:
  """A fixed-width text table of ``stats``."""
  rows = [f"{'tokenizer':<28}{'chars':>9}{'tokens':>9}{'tok/char':>10}{'tok/byte':>10}"
          f"{'byte-fb %':>11}{'chars/s':>12}"]
  rows.append("-" * len(rows[0]))
  rows += [f"{s.name[:27]:<28}{s.num_chars:>9}{s.num_tokens:>9}{s.tokens_per_char:>10.3f}"
           f"{s.tokens_per_byte:>10.3f}{100 * s.byte_fallback_share:>11.2f}"
           f"{s.chars_per_second:>12.3g}" for s in stats]
  return "\n".join(rows)


def plot_stats(stats: Sequence[TokenizerStats], png_path: PathLike):
  """Saves a 4-panel bar chart of ``stats`` to ``png_path`` (Agg canvas, no pyplot state);
  returns its ``epath.Path``."""
  from matplotlib.figure import Figure

  panels = [("tokens / char", [s.tokens_per_char for s in stats]),
            ("tokens / UTF-8 byte", [s.tokens_per_byte for s in stats]),
            ("byte-fallback chars (%)", [100 * s.byte_fallback_share for s in stats]),
            ("encode speed (chars/s)", [s.chars_per_second for s in stats])]
  fig = Figure(figsize=(4 * len(panels), 3.5))
  for ax, (title, values) in zip(fig.subplots(1, len(panels)), panels):
    ax.bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
    ax.set_xticks(range(len(values)), [s.name for s in stats], rotation=20, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  paths.write_bytes(png_path, buffer.getvalue())
  return paths.path(png_path)
