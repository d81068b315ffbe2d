"""Vocabulary extension for byte-level BPE bases (a LLaMA-3 / GPT-2 style ``tokenizer.json``).

* ``train``: a byte-level BPE on Chinese text with the ``tokenizers`` library (all 256 byte
  symbols in the vocabulary, so nothing is ever unknown).
* ``merge``: the base ``tokenizer.json`` extended with the tokens and merges of another byte-level
  BPE. Base ids, base merges and the base's added (special) tokens never move: new tokens get ids
  after the highest id in use (LLaMA-3: after its 256 special tokens, 128,256 on), and their merges
  rank after every base merge. The base's added tokens are also written into the BPE vocabulary
  at their ids (tokenizers would renumber them on load otherwise). Only tokens holding at least
  one non-ASCII byte are appended (and only merges producing one): a merge result that contains
  a non-ASCII byte can never occur inside ASCII text, so ASCII text tokenizes exactly as in the
  base.
  A SentencePiece ``.model`` (the paper's Chinese unigram model) merges too
  (``extend_with_pieces``): each non-ASCII piece, ``▁`` read as a space, becomes the byte-level
  token of its UTF-8 bytes, and merges are derived for it from the base's BPE split of those bytes
  (plus the prefixes the merges pass through); a piece whose merges would not give it back is
  skipped, so every appended piece is reachable. On the demo corpus it gives more tokens per
  Chinese character than a byte-level BPE trained on the same text and merged (0.914 vs 0.808,
  with 6,262 vs 5,543 ids: the unigram pieces were not chosen for BPE, and the merge prefixes
  take ids), so training the Chinese model with ``--model_type bpe`` stays the better choice.
* ``sub_pieces``: the base's BPE split of each appended token (for ``vocab`` row init).

Token strings are in the byte-level alphabet: byte ``b`` is the character ``BYTE_CHAR[b]``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Iterable

from cnllama_jax import paths, tokenizer as tk, tokenizer_hf

logger = logging.getLogger(__name__)


def _byte_chars() -> list[str]:
  """The byte-level alphabet: printable Latin-1 bytes stand for themselves; the other 68
  (controls, space, DEL, NBSP, soft hyphen) map, in byte order, to code points 256, 257, ..."""
  printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
  chars, shifted = [], 0
  for b in range(256):
    if b in printable:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + shifted))
      shifted += 1
  return chars


BYTE_CHAR = _byte_chars()
CHAR_BYTE = {c: b for b, c in enumerate(BYTE_CHAR)}


class UnsupportedTokenizerError(ValueError):
  """A tokenizer file that is neither a SentencePiece model nor a byte-level BPE."""


def token_bytes(token: str) -> bytes:
  """The bytes a byte-level token stands for (``"Ġä¸Ń"`` -> ``" 中".encode()``)."""
  return bytes(CHAR_BYTE[c] for c in token)


def _json_file(path: tk.PathLike) -> str:
  return paths.join(path, "tokenizer.json") if paths.isdir(path) else os.fspath(path)


def _has_byte_level(node) -> bool:
  if isinstance(node, dict):
    return node.get("type") == "ByteLevel" or any(_has_byte_level(v) for v in node.values())
  if isinstance(node, list):
    return any(_has_byte_level(v) for v in node)
  return False


def load_json(path: tk.PathLike) -> dict:
  """A byte-level BPE ``tokenizer.json`` (file or directory) as a dict; one-line errors otherwise."""
  file = _json_file(path)
  try:
    doc = json.loads(paths.read_text(file))
  except OSError as e:
    raise UnsupportedTokenizerError(
        f"{file}: cannot read tokenizer ({e.strerror or 'no such file'})") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UnsupportedTokenizerError(f"{file}: not a tokenizer.json ({e})") from None
  model = doc.get("model") if isinstance(doc, dict) else None
  kind = model.get("type") if isinstance(model, dict) else None
  if kind != "BPE":
    raise UnsupportedTokenizerError(
        f"{file}: tokenizer model type {kind!r}; expected a SentencePiece .model or a byte-level "
        "BPE tokenizer.json (model type 'BPE')")
  if not _has_byte_level(doc.get("pre_tokenizer")):
    pre = (doc.get("pre_tokenizer") or {}).get("type")
    raise UnsupportedTokenizerError(
        f"{file}: a BPE tokenizer but not byte-level (pre-tokenizer {pre!r}); expected a "
        "ByteLevel pre-tokenizer (LLaMA-3 / GPT-2 style)")
  return doc


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
  """tokenizers writes merges as ``[left, right]`` (>= 0.20) or ``"left right"`` (older)."""
  return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def size(doc: dict) -> int:
  """Rows an embedding needs for this tokenizer: the highest id (vocab or added token) + 1."""
  ids = list(doc["model"]["vocab"].values()) + [t["id"] for t in doc.get("added_tokens", [])]
  return max(ids) + 1


def train(inputs: Iterable[tk.PathLike], out_path: tk.PathLike, vocab_size: int = 20000,
          min_frequency: int = 2, progress: bool = True) -> paths.epath.Path:
  """Trains a byte-level BPE ``tokenizer.json`` on UTF-8 files/directories (written atomically).

  GPT-2 pre-tokenization (``ByteLevel``, no prefix space) and decoder; no special tokens (a merge
  keeps the base's). Raises CorpusError on missing, empty or non-UTF-8 input (before training).
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel

  files, n_lines, n_bytes = tk.check_corpus(inputs)
  logger.info("training byte-level BPE, vocab %d, on %d lines (%d bytes) from %d file(s)",
              vocab_size, n_lines, n_bytes, len(files))
  start = time.perf_counter()
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)  # reading dominates: the bar below shows it
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  from cnllama_jax.data import sources  # pylint: disable=import-outside-toplevel
  with tqdm(total=n_bytes, unit="B", unit_scale=True, desc="reading corpus",
            disable=not progress) as bar:
    tokenizer.train_from_iterator(sources.iter_documents(files, on_bytes=bar.update), trainer)
  paths.write_bytes(out_path, tokenizer.to_str().encode("utf-8"))
  logger.info("wrote %s (%d tokens) in %.1fs", out_path, tokenizer.get_vocab_size(),
              time.perf_counter() - start)
  return paths.path(out_path)


def _copy_base(base: dict) -> tuple[dict, set[str], int]:
  """(deep copy of ``base`` whose model vocabulary also holds its added tokens, the added tokens'
  strings, the first free id)."""
  merged = json.loads(json.dumps(base))  # deep copy
  vocab = merged["model"]["vocab"]
  # tokenizers gives an added token that the model lacks the id model-vocab-size + k when it
  # loads, ignoring the id written beside it: right for LLaMA-3 (specials right after the BPE
  # vocabulary), wrong once tokens follow them. So the model vocabulary holds them at their ids.
  taken = {i: t for t, i in vocab.items()}
  for token in base.get("added_tokens", []):
    if token["content"] not in vocab:
      if token["id"] in taken:
        raise ValueError(f"added token {token['content']!r} has id {token['id']}, the id of "
                         f"vocabulary token {taken[token['id']]!r}")
      vocab[token["content"]] = token["id"]
  return merged, {t["content"] for t in base.get("added_tokens", [])}, size(base)


def _add_pad(merged: dict, specials: set[str], pad_piece: str | None, next_id: int) -> None:
  """Appends ``pad_piece`` as a special added token with id ``next_id``."""
  if pad_piece is None:
    return
  if pad_piece in merged["model"]["vocab"] or pad_piece in specials:
    raise ValueError(f"pad piece {pad_piece!r} is already in the vocabulary")
  merged.setdefault("added_tokens", []).append(
      {"id": next_id, "content": pad_piece, "single_word": False, "lstrip": False,
       "rstrip": False, "normalized": False, "special": True})


def extend(base: dict, added: dict, pad_piece: str | None = None) -> tuple[dict, list[str]]:
  """Returns (merged tokenizer.json dict, appended tokens in id order); see the module docstring.

  Added merges are taken in ``added``'s rank order; a merge is kept when its result has a
  non-ASCII byte, both its parts are in the merged vocabulary and the base lacks it; its result is
  appended unless already present. ``pad_piece`` becomes a special added token after the rest.
  """
  merged, specials, next_id = _copy_base(base)
  vocab, model = merged["model"]["vocab"], merged["model"]
  base_merges = set(_merge_pairs(model["merges"]))
  as_list = not model["merges"] or isinstance(model["merges"][0], list)
  appended, skipped = [], 0
  for left, right in _merge_pairs(added["model"]["merges"]):
    result = left + right
    if (left, right) in base_merges or max(token_bytes(result)) < 0x80 or result in specials:
      continue
    if left not in vocab or right not in vocab:
      skipped += 1  # a part the base lacks and that is not appended (ASCII-only)
      continue
    model["merges"].append([left, right] if as_list else f"{left} {right}")
    base_merges.add((left, right))
    if result not in vocab:
      vocab[result] = next_id
      next_id += 1
      appended.append(result)
  if skipped:
    logger.info("skipped %d merges whose parts are ASCII-only tokens the base lacks", skipped)
  _add_pad(merged, specials, pad_piece, next_id)
  return merged, appended


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
  """BPE as tokenizers applies it to one pre-token: merge the adjacent pair of lowest rank
  (leftmost on ties) until none is left."""
  symbols = list(symbols)
  while len(symbols) > 1:
    pairs = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
    if not pairs:
      break
    _, i = min(pairs)
    symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
  return symbols


def extend_with_pieces(base: dict, pieces: list[str], pad_piece: str | None = None,
                       pre_tokenizer=None) -> tuple[dict, list[str], dict]:
  """A byte-level BPE ``base`` extended with SentencePiece pieces (``▁`` read as a space).

  Each piece's text becomes a byte-level token, reachable through merges derived here: pieces are
  taken shortest first; the current tokenizer's BPE (base merges, then those added so far) splits
  the piece into parts, and merges joining the parts left to right are appended (with the
  intermediate tokens they make). A piece is kept only if the resulting merges give it back from
  its bytes (checked; otherwise its merges are dropped). Skipped: pieces of ASCII text only (ASCII
  text tokenizes as in the base), pieces ``pre_tokenizer`` (the base's, a tokenizers
  PreTokenizer) splits into several pre-tokens (never one BPE word), and pieces already present.

  Returns:
    (merged tokenizer.json dict, appended tokens in id order, counts: ``pieces`` (appended piece
    tokens), ``intermediate`` (other appended tokens), ``ascii``, ``split_by_pre_tokenizer``,
    ``present``, ``unreachable``).
  """
  merged, specials, next_id = _copy_base(base)
  vocab, model = merged["model"]["vocab"], merged["model"]
  pairs = _merge_pairs(model["merges"])
  ranks = {pair: rank for rank, pair in reversed(list(enumerate(pairs)))}  # first rank wins
  next_rank = len(pairs)
  as_list = not model["merges"] or isinstance(model["merges"][0], list)
  counts = dict.fromkeys(("pieces", "intermediate", "ascii", "split_by_pre_tokenizer", "present",
                          "unreachable"), 0)
  appended = []
  texts = sorted(dict.fromkeys(p.replace("\u2581", " ") for p in pieces if p), key=len)
  for text in texts:
    token = "".join(BYTE_CHAR[b] for b in text.encode("utf-8"))
    if text.isascii():
      counts["ascii"] += 1
      continue
    if token in vocab or token in specials:
      counts["present"] += 1
      continue
    if pre_tokenizer is not None and len(pre_tokenizer.pre_tokenize_str(text)) != 1:
      counts["split_by_pre_tokenizer"] += 1
      continue
    parts = _apply_merges([c for c in token], ranks)
    if any(part not in vocab for part in parts):
      counts["unreachable"] += 1  # a byte the base lacks
      continue
    new_pairs, new_tokens, left = [], [], parts[0]
    for right in parts[1:]:
      if (left, right) not in ranks:
        new_pairs.append((left, right))
      if left + right not in vocab:
        new_tokens.append(left + right)
      left += right
    for rank, pair in enumerate(new_pairs, start=next_rank):
      ranks[pair] = rank
    if _apply_merges(list(token), ranks) != [token]:
      for pair in new_pairs:  # a merge of lower rank took the bytes another way
        del ranks[pair]
      counts["unreachable"] += 1
      continue
    model["merges"] += [list(p) if as_list else f"{p[0]} {p[1]}" for p in new_pairs]
    next_rank += len(new_pairs)
    for new in new_tokens:
      vocab[new] = next_id
      next_id += 1
      appended.append(new)
    counts["pieces"] += 1
    counts["intermediate"] += len(new_tokens) - 1
  _add_pad(merged, specials, pad_piece, next_id)
  return merged, appended, counts


def merge(base_path: tk.PathLike, added_path: tk.PathLike, out_dir: tk.PathLike,
          pad_piece: str | None = None) -> tk.MergeResult:
  """Writes ``out_dir`` (tokenizer.json, tokenizer_config.json [, special_tokens_map.json]) for
  ``AutoTokenizer.from_pretrained``: the base extended with a byte-level BPE ``added_path`` as
  ``extend`` says, or with the pieces of a SentencePiece ``.model`` as ``extend_with_pieces``
  says. The base's tokenizer_config.json and special_tokens_map.json (when the base is a
  directory) are kept."""
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

  base = load_json(base_path)
  out = os.fspath(out_dir)
  tk.check_output_dir(out)
  if tk.base_kind(added_path) == "sentencepiece":
    try:
      proto = tk.load_model_proto(added_path)
    except tk.InvalidModelError as e:
      detail = str(e).split(": ", 1)[-1]
      raise UnsupportedTokenizerError(
          f"{os.fspath(added_path)}: neither a byte-level BPE tokenizer.json nor a SentencePiece "
          f"model ({detail})") from None
    pieces = [p.piece for p in proto.pieces if p.type in (tk.NORMAL, tk.USER_DEFINED)]
    pre_tokenizer = Tokenizer.from_str(json.dumps(base)).pre_tokenizer
    merged, appended, counts = extend_with_pieces(base, pieces, pad_piece, pre_tokenizer)
    logger.info("%s: SentencePiece pieces into byte-level tokens: %s", added_path, counts)
  else:
    merged, appended = extend(base, load_json(added_path), pad_piece)
  data = json.dumps(merged, ensure_ascii=False).encode("utf-8")
  Tokenizer.from_str(data.decode("utf-8"))  # tokenizers must load the result
  tk.publish_dir(out, {"tokenizer.json": data,
                      **tokenizer_hf.bpe_configs(base_path, merged, pad_piece)})
  num_base, total = size(base), size(merged)
  result = tk.MergeResult(out, total, num_base, len(appended),
                          total - 1 if pad_piece is not None else None)
  logger.info("merged %s + %s -> %s: %d tokens (%d appended)", base_path, added_path, out, total,
              len(appended))
  return result


def sub_pieces(base_path: tk.PathLike, merged_path: tk.PathLike, old_vocab: int) -> list[list[int]]:
  """For each id in [old_vocab, size(merged)): the base ids its token splits into under the
  base's BPE (``[]`` for an id without a model token, e.g. an added pad)."""
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

  base_doc, merged_doc = load_json(base_path), load_json(merged_path)
  base_vocab, merged_vocab = base_doc["model"]["vocab"], merged_doc["model"]["vocab"]
  if size(base_doc) != old_vocab:
    raise ValueError(f"{_json_file(base_path)}: base tokenizer has {size(base_doc)} ids but the "
                     f"base model's embedding has {old_vocab} rows; pass the model's own tokenizer")
  moved = [t for t, i in base_vocab.items() if merged_vocab.get(t) != i]
  if moved:
    raise ValueError(f"{_json_file(merged_path)}: not an extension of {_json_file(base_path)} "
                     f"({len(moved)} base tokens missing or renumbered, e.g. {moved[0]!r})")
  base = Tokenizer.from_str(json.dumps(base_doc))
  token_of = {i: t for t, i in merged_vocab.items() if i >= old_vocab}
  return [[t.id for t in base.model.tokenize(token_of[i])] if i in token_of else []
          for i in range(old_vocab, size(merged_doc))]
