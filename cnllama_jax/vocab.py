"""Vocabulary surgery: resize the input embedding and LM head to a (larger) tokenizer.

Layout (see model.py): `embed_tokens` [padded_vocab, hidden] (vocab, embed) and, when untied,
`lm_head` [hidden, padded_vocab] (embed, vocab). Ids < vocab_size are real; the rest are padding
(zero rows here; the model masks their logits, so they never enter the softmax).

Model/tokenizer pairs of the paper (LLaMA 32,000; Chinese-LLaMA 49,953; Chinese-Alpaca 49,954 =
49,953 + [PAD]): a trained model needs exactly its own tokenizer, and the original LLaMA (32,000) is
resized to the tokenizer of the LoRA about to be applied (the paper's merge/inference scripts do
`resize_token_embeddings(len(tokenizer))`; the LoRA's saved embed/lm_head then replace all rows).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from cnllama_jax.config import CHINESE_ALPACA_VOCAB, CHINESE_LLAMA_VOCAB, LLAMA_VOCAB, LlamaConfig
from cnllama_jax.sharding import mesh_axes

KNOWN_VOCABS = {LLAMA_VOCAB: "LLaMA", CHINESE_LLAMA_VOCAB: "Chinese-LLaMA",
                CHINESE_ALPACA_VOCAB: "Chinese-Alpaca"}
# (model vocabulary, tokenizer pieces) accepted with strict=True when both sizes are known ones.
ACCEPTED_PAIRS = frozenset({
    (LLAMA_VOCAB, LLAMA_VOCAB),
    (LLAMA_VOCAB, CHINESE_LLAMA_VOCAB),   # LLaMA + Chinese-LLaMA LoRA (merge, inference, PT)
    (LLAMA_VOCAB, CHINESE_ALPACA_VOCAB),  # LLaMA + Chinese-Alpaca LoRA (the paper's Alpaca merge)
    (CHINESE_LLAMA_VOCAB, CHINESE_LLAMA_VOCAB),
    (CHINESE_ALPACA_VOCAB, CHINESE_ALPACA_VOCAB),
})
_MIX_HINT = (f"the Chinese-LLaMA tokenizer ({CHINESE_LLAMA_VOCAB} pieces) goes with Chinese-LLaMA "
             f"models/LoRAs and the Chinese-Alpaca tokenizer ({CHINESE_ALPACA_VOCAB}, with [PAD]) "
             "with Chinese-Alpaca ones")


def check_pair(model_vocab: int, tokenizer_vocab: int, *, strict: bool = True) -> None:
  """Raises ValueError (one line, naming both sizes) for a model/tokenizer pair that cannot work.

  Rules: (1) with strict=True and both sizes among 32000/49953/49954, the pair must be in
  ACCEPTED_PAIRS; the only known-size pair this rejects beyond rule 2 is (49953 model, 49954
  tokenizer), a Chinese-LLaMA model with the Alpaca tokenizer, users' most reported mistake (and
  (49954, 49953) gets the same explanation). strict=False allows it, for instruction-tuning
  Chinese-LLaMA with the Alpaca tokenizer (the paper's SFT script resizes 49953 -> 49954).
  (2) Always: the tokenizer may not be smaller than the model. Other sizes: tokenizer >= model.
  """
  pair = (int(model_vocab), int(tokenizer_vocab))
  both_known = pair[0] in KNOWN_VOCABS and pair[1] in KNOWN_VOCABS
  if set(pair) == {CHINESE_LLAMA_VOCAB, CHINESE_ALPACA_VOCAB} and (strict or pair[1] < pair[0]):
    raise ValueError(
        f"the model's vocabulary is {pair[0]} ({KNOWN_VOCABS[pair[0]]}) but the tokenizer has "
        f"{pair[1]} pieces ({KNOWN_VOCABS[pair[1]]}): {_MIX_HINT}"
        + ("; pass strict=False only to resize Chinese-LLaMA for Alpaca-style instruction tuning"
           if pair[1] > pair[0] else ""))
  if pair[1] < pair[0]:
    raise ValueError(f"tokenizer has {pair[1]} pieces but the model's vocabulary is {pair[0]}; "
                     "a vocabulary can only grow: use the tokenizer the model was trained with")
  if strict and both_known and pair not in ACCEPTED_PAIRS:  # reached only if the table is narrowed
    raise ValueError(f"model vocabulary {pair[0]} with a {pair[1]}-piece tokenizer is not a pair "
                     f"of the paper ({sorted(ACCEPTED_PAIRS)}); pass strict=False to resize anyway")


def vocab_row_mask(cfg: LlamaConfig) -> np.ndarray:
  """bool [padded_vocab]: True for real ids (id < cfg.vocab_size), False for padding rows."""
  return np.arange(cfg.padded_vocab_size) < cfg.vocab_size


def new_rows_mask(old_vocab: int, cfg: LlamaConfig) -> np.ndarray:
  """bool [padded_vocab]: True for appended rows, old_vocab <= id < cfg.vocab_size.

  For the `lora+new_rows` stage: multiply the embedding gradient by mask[:, None] and the lm_head
  gradient by mask[None, :] so only the appended rows train.
  """
  if not 0 <= old_vocab <= cfg.vocab_size:
    raise ValueError(f"old_vocab={old_vocab} must be in [0, vocab_size={cfg.vocab_size}]")
  ids = np.arange(cfg.padded_vocab_size)
  return (ids >= old_vocab) & (ids < cfg.vocab_size)


def mesh_vocab_multiple(mesh, rules, base: int = 128) -> int:
  """base x the product of the mesh axes the `vocab` logical axis maps to (DESIGN decision 2)."""
  return base * math.prod(mesh.shape[a] for a in mesh_axes(rules, "vocab") if a in mesh.shape)


def _vocab_shards(x: Any, axis: int) -> int:
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, NamedSharding) or axis >= len(sharding.spec):
    return 1
  entry = sharding.spec[axis]
  names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(sharding.mesh.shape[n] for n in names)


INITS = ("normal", "mean", "subword_mean")


def sub_piece_segments(sub_pieces: Sequence[Sequence[int]], old: int, new: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Flattens per-new-row base ids for a segment mean: (ids int32 [total], row int32 [total],
  count int32 [new - old]); checks there is one list per new row and every id is a base id."""
  if len(sub_pieces) != new - old:
    raise ValueError(f"sub_pieces has {len(sub_pieces)} entries; expected one per new row "
                     f"({new - old} = {new} - {old})")
  ids = np.asarray([i for piece in sub_pieces for i in piece], np.int64)
  bad = ids[(ids < 0) | (ids >= old)]
  if bad.size:
    raise ValueError(f"sub_pieces holds id {int(bad[0])}, not a base id (base vocabulary {old})")
  count = np.asarray([len(piece) for piece in sub_pieces], np.int32)
  return ids.astype(np.int32), np.repeat(np.arange(new - old, dtype=np.int32), count), count


def _resize_leaf(x, axis: int, old: int, new: int, padded: int, init: str, noise_std: float, key,
                 segments=None):
  """x: [padded_old, hidden] (axis 0) or [hidden, padded_old] (axis 1) -> same with `padded`.

  Jax arrays: built under jit with out_shardings = x.sharding (a NamedSharding keeps its spec; other
  shardings are passed through as-is). numpy in -> numpy out. dtype is kept.
  segments: `sub_piece_segments(...)` for init="subword_mean".
  """
  def build(x, key, segments):
    keep = jax.lax.slice_in_dim(x, 0, old, axis=axis)  # old real rows, bit-identical
    other = x.shape[1 - axis]
    shape = lambda n: (n, other) if axis == 0 else (other, n)  # noqa: E731
    noise = lambda: jax.random.normal(key, shape(new - old), jnp.float32)  # noqa: E731
    if init == "normal":  # as HF `_init_weights`: N(0, initializer_range=0.02)
      return finish(keep, 0.02 * noise())
    # mean of the old real rows, computed in fp32
    mean = jnp.mean(keep.astype(jnp.float32), axis=axis, keepdims=True)  # [1, hidden] / [hidden, 1]
    rows = jnp.broadcast_to(mean, shape(new - old))
    if init == "subword_mean":  # each row: the mean of its sub-pieces' rows (none: `mean`)
      ids, row, count = segments
      gathered = jnp.take(keep, ids, axis=axis).astype(jnp.float32)  # [total, hidden] (axis 0)
      gathered = gathered if axis == 0 else gathered.T  # [total, hidden]
      sums = jax.ops.segment_sum(gathered, row, num_segments=new - old)  # [new - old, hidden]
      means = sums / jnp.maximum(count, 1)[:, None].astype(jnp.float32)
      rows = jnp.where((count > 0)[:, None] if axis == 0 else (count > 0)[None, :],
                       means if axis == 0 else means.T, rows)
    return finish(keep, rows + noise_std * noise() if noise_std else rows)

  def finish(keep, rows):
    pad = jnp.zeros((padded - new, x.shape[1]) if axis == 0 else (x.shape[0], padded - new),
                    x.dtype)
    return jnp.concatenate([keep, rows.astype(x.dtype), pad], axis=axis)

  if segments is None:
    segments = tuple(np.zeros(n, np.int32) for n in (0, 0, new - old))
  if isinstance(x, jax.Array):
    shards = _vocab_shards(x, axis)
    if padded % shards:
      raise ValueError(f"padded vocabulary {padded} is not divisible by the {shards} shards of "
                       f"the vocab axis ({x.sharding.spec}); use a vocab_multiple that is a "
                       f"multiple of {shards} (see mesh_vocab_multiple)")
    return jax.jit(build, out_shardings=x.sharding)(x, key, segments)
  return np.asarray(jax.jit(build)(jnp.asarray(x), key, segments))


def resize_vocab(cfg: LlamaConfig, params: Any, new_vocab_size: int, *, init: str = "normal",
                 rng=None, noise_std: float = 0.0, vocab_multiple: int | None = None,
                 strict: bool = True, sub_pieces: Sequence[Sequence[int]] | None = None
                 ) -> tuple[LlamaConfig, Any]:
  """Resizes embed_tokens [P, hidden] and lm_head [hidden, P] (if untied) to the tokenizer.

  P = cfg.padded_vocab_size -> P' = new_cfg.padded_vocab_size (a multiple of `vocab_multiple`,
  default cfg.vocab_multiple; it must be divisible by the shards of the vocab axis). Rows (ids):
    [0, cfg.vocab_size)               copied bit-identically;
    [cfg.vocab_size, new_vocab_size)  init="normal": N(0, 0.02^2) (HF `_init_weights`), or
                                      init="mean": mean of the old real rows + N(0, noise_std^2);
                                      init="subword_mean": row i is the mean of the old rows
                                      sub_pieces[i - cfg.vocab_size] (the base ids the base
                                      tokenizer splits that piece into; see
                                      tokenizer.sub_pieces) + N(0, noise_std^2); an empty list
                                      gives the "mean" row. Embedding and LM head alike.
    [new_vocab_size, P')              zeros.
  rng: a jax PRNG key, needed for "normal" or noise_std > 0 (embed and head use split keys).
  strict: see `check_pair` (strict=False allows resizing Chinese-LLaMA 49953 -> 49954 for SFT).
  Sharded jax leaves keep their sharding (same NamedSharding spec); numpy leaves stay numpy;
  dtypes (float32 / bfloat16) are kept. Other params are shared, not copied.
  Returns (new_cfg, new_params); new_cfg.pad_token_id is left as it was.
  """
  if init not in INITS:
    raise ValueError(f"init={init!r}; expected 'normal' or 'mean' or 'subword_mean'")
  check_pair(cfg.vocab_size, new_vocab_size, strict=strict)
  segments = None
  if init == "subword_mean":
    if sub_pieces is None:
      raise ValueError("init='subword_mean' needs sub_pieces (the base tokenizer's split of each "
                       "new piece; set vocab.base_tokenizer in the run config)")
    segments = sub_piece_segments(sub_pieces, cfg.vocab_size, int(new_vocab_size))
  if rng is None and (init == "normal" or noise_std):
    raise ValueError(f"init={init!r} with noise_std={noise_std} needs an rng key")
  new_cfg = cfg.replace(vocab_size=int(new_vocab_size),
                        vocab_multiple=int(vocab_multiple or cfg.vocab_multiple))
  key_embed, key_head = jax.random.split(jax.random.key(0) if rng is None else rng)
  leaves = [("embed_tokens", 0, key_embed)]
  if not cfg.tie_word_embeddings:
    leaves.append(("lm_head", 1, key_head))
  new_params = dict(params)
  for name, axis, key in leaves:
    if name not in params:
      raise ValueError(f"params have no {name!r} (keys: {sorted(params)})")
    x = params[name]
    want = [cfg.hidden_size] * 2
    want[axis] = cfg.padded_vocab_size
    if tuple(x.shape) != tuple(want):
      raise ValueError(f"{name} has shape {tuple(x.shape)}; cfg expects {tuple(want)}")
    new_params[name] = _resize_leaf(x, axis, cfg.vocab_size, new_cfg.vocab_size,
                                    new_cfg.padded_vocab_size, init, float(noise_std), key,
                                    segments)
  return new_cfg, type(params)(new_params) if type(params) is not dict else new_params
