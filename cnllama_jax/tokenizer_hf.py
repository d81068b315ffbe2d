"""The Hugging Face files of a tokenizer: ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json`` (what ``transformers.AutoTokenizer.from_pretrained`` reads).

* ``hf_files(proto, pad_piece)``: the three files of a SentencePiece BPE model (LLaMA style:
  Metaspace, byte fallback, BOS prepended), merges ranked as sentencepiece ranks them
  (``bpe_merges``).
* ``bpe_configs(base_path, merged, pad_piece)``: the two config files of a merged byte-level BPE
  ``tokenizer.json``: the base's own (when the base is a directory holding them), else minimal.

Everything is returned as ``{file name: UTF-8 bytes}``; writing is the caller's.
"""

from __future__ import annotations

import json

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from cnllama_jax import paths

_Piece = sp_pb2.ModelProto.SentencePiece
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = (_Piece.NORMAL, _Piece.UNKNOWN, _Piece.CONTROL,
                                          _Piece.USER_DEFINED)
HF_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def json_bytes(doc: dict, indent: int | None = 2) -> bytes:
  return (json.dumps(doc, ensure_ascii=False, indent=indent) + "\n").encode("utf-8")


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


def hf_files(proto: sp_pb2.ModelProto, pad_piece: str | None = None) -> dict[str, bytes]:
  """The Hugging Face files of a model beside its ``tokenizer.model``: {name: UTF-8 bytes} of
  ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
  roles = {k: v for k, v in _role_tokens(proto, pad_piece).items() if v}
  return {"tokenizer.json": json_bytes(hf_tokenizer_json(proto, pad_piece), None),
          "tokenizer_config.json": json_bytes(hf_tokenizer_config(proto, pad_piece)),
          "special_tokens_map.json": json_bytes(roles)}


def bpe_configs(base_path: paths.PathLike, merged: dict,
                pad_piece: str | None) -> dict[str, bytes]:
  """tokenizer_config.json / special_tokens_map.json of a merged byte-level BPE: the base's (when
  ``base_path`` is a directory holding them), else a minimal PreTrainedTokenizerFast config; every
  added token of ``merged`` (a tokenizer.json dict) is in ``added_tokens_decoder``."""
  out = {}
  if paths.isdir(base_path):
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
      file = paths.join(base_path, name)
      if paths.isfile(file):
        try:
          out[name] = json.loads(paths.read_text(file))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
          raise ValueError(f"{file}: not valid JSON ({e})") from None
  config = out.setdefault("tokenizer_config.json",
                          {"tokenizer_class": "PreTrainedTokenizerFast",
                           "clean_up_tokenization_spaces": False})
  decoder = config.setdefault("added_tokens_decoder", {})
  for token in merged.get("added_tokens", []):
    decoder.setdefault(str(token["id"]), {k: v for k, v in token.items() if k != "id"})
  if pad_piece is not None:
    config["pad_token"] = pad_piece
    out.setdefault("special_tokens_map.json", {})["pad_token"] = pad_piece
  return {name: json_bytes(doc) for name, doc in out.items()}
