"""LLaMA in Flax linen: RMSNorm, rotary embeddings (HF rotate-half layout), grouped-query
attention, SwiGLU MLP, scanned decoder layers with remat, optional LoRA on every dense layer.

Param tree (names follow Hugging Face, so conversion and PEFT export are renames and transposes):

  embed_tokens                                [padded_vocab, hidden]        (vocab, embed)
  layers/input_layernorm/scale                [layers, hidden]              (layers, norm)
  layers/self_attn/{q,k,v,o}_proj/kernel      [layers, in, out]             (layers, embed, heads) ...
  layers/post_attention_layernorm/scale       [layers, hidden]
  layers/mlp/{gate,up,down}_proj/kernel       [layers, in, out]             (layers, embed, mlp) ...
  layers/<...>_proj/lora_a, lora_b            [layers, in, r], [layers, r, out]  (with LoRA)
  norm/scale                                  [hidden]
  lm_head                                     [hidden, padded_vocab]        (embed, vocab)

Kernels are [in, out] (the transpose of torch's Linear weight). Layers are stacked on axis 0 and
run under `nn.scan`, so the decoder body is compiled once.

KV cache (for generation): explicit arrays passed in and returned, never module state.

  k, v    [layers, batch, kv_heads, max_len, head_dim]  compute dtype
  mask    [batch, max_len] int32   1 where a slot holds a real token (0: unwritten or padding)
  index   [batch] int32            next slot to write, per row (rows may differ: continuous batching)

A call with `cache=` writes its T tokens into slots index .. index+T-1 of each row, attends over the
first `window` slots (default: the whole buffer; unwritten slots and padding masked) and returns the
updated cache. The slot axis sits next to head_dim, so the scores and the weighted sum are plain
batched matmuls over (batch, kv_heads) with no per-step transpose of the cache. k and v
ride in the layer scan's carry and each layer writes only its new rows, so under a donating jit the
update is in place (scanning them as per-layer inputs/outputs would copy the whole cache per step).
Positions continue from the real tokens already cached (their count + cumsum(mask) - 1), so a
left-padded prompt gets the positions of the unpadded one, in prefill and in every decode step.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnllama_jax import attention as attention_lib
from cnllama_jax import rope
from cnllama_jax import sharding as shd
from cnllama_jax.config import LlamaConfig
from cnllama_jax.lora import LoraConfig, kaiming_uniform_a, lora_for
from cnllama_jax.lora import delta as lora_delta, dropout as lora_dropout
from cnllama_jax.lora import lora_from_params  # noqa: F401  (its old home; defined in lora.py)

Array = jax.Array
_NEG_INF = -1e30  # logit of padded vocabulary rows: finite, never NaN, never sampled

_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class _Module(nn.Module):
  """Holds what every block needs: shapes, LoRA settings and the activation-sharding context."""
  cfg: LlamaConfig
  lora: LoraConfig = LoraConfig()
  mesh: Any = None  # jax.sharding.Mesh or None: activation constraints only when given
  rules: tuple = ()

  def constrain(self, x: Array, axes: tuple) -> Array:
    return shd.constrain(x, axes, self.mesh, self.rules)


class Dense(_Module):
  """y = x W (+ LoRA). W: [in, out] in param_dtype, computed in cfg.dtype."""
  features: int = 0
  axes: tuple[str, str] = ("embed", "mlp")
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dtype = jnp.dtype(self.cfg.dtype)
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), self.axes), (x.shape[-1], self.features),
                        jnp.dtype(self.cfg.param_dtype))
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.lora.applies_to(self.name):
      rank = self.lora.rank
      lora_a = self.param("lora_a", nn.with_logical_partitioning(
          kaiming_uniform_a, (self.axes[0], "lora_rank")), (x.shape[-1], rank), jnp.float32)
      lora_b = self.param("lora_b", nn.with_logical_partitioning(
          nn.initializers.zeros, ("lora_rank", self.axes[1])), (rank, self.features), jnp.float32)
      h = x
      if self.lora.dropout > 0 and not self.deterministic:
        h = lora_dropout(h, self.make_rng("dropout"), self.lora.dropout)
      if x.ndim == 3 and attention_lib.platform_of(self.mesh) == "cpu":  # CPU-friendly backward
        return y + lora_delta(h.astype(dtype), lora_a.astype(dtype), lora_b.astype(dtype),
                              self.lora.scale)
      h = jnp.dot(h.astype(dtype), lora_a.astype(dtype))  # [..., r]
      y = y + jnp.dot(h, lora_b.astype(dtype)) * jnp.asarray(self.lora.scale, dtype)
    return y


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.dtype(self.param_dtype))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # As HF: normalise in fp32, cast back to the compute dtype, then scale.
    return scale.astype(self.dtype) * x32.astype(self.dtype)


def segment_positions(segment_ids: Array) -> Array:
  """Positions [batch, length] int32 that restart at 0 with each packed example.

  segment_ids: [batch, length] int (0 = padding, 1, 2, ... = example). A token's position is the
  number of earlier tokens of its segment since that segment began (padding inside a segment does
  not count); padding gets 0. A one-segment row (1s and 0s, left padding included) thus gets
  cumsum(mask) - 1 on its tokens, as `transformers`' generate() derives positions.
  """
  real = segment_ids > 0
  count = jnp.cumsum(real, axis=-1)  # [batch, length]: real tokens so far
  index = jnp.arange(segment_ids.shape[1])
  last_real = jax.lax.cummax(jnp.where(real, index, -1), axis=1)  # [batch, length]
  before = jnp.concatenate([jnp.full_like(last_real[:, :1], -1), last_real[:, :-1]], axis=1)
  previous = jnp.where(before >= 0, jnp.take_along_axis(segment_ids, jnp.maximum(before, 0), 1), 0)
  starts = real & (segment_ids != previous)  # first token of each segment
  base = jax.lax.cummax(jnp.where(starts, count - 1, 0), axis=1)  # real tokens before the segment
  return jnp.where(real, count - 1 - base, 0).astype(jnp.int32)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
  """x: [batch, length, heads, head_dim]; rotate-half as `transformers`' LLaMA."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def _write_rows(buffer: Array, update: Array, index: Array, layer: Array | None = None) -> Array:
  """update [batch, T] into buffer [batch, max_len] at slots index[b] .. index[b] + T - 1 of each
  row b; or update [batch, T, kv_heads, head_dim] into a cache buffer [layers, batch, kv_heads,
  max_len, head_dim] at `layer` (one scatter, in place under jit)."""
  rows = jnp.arange(update.shape[0])[:, None]  # [batch, 1]
  slots = index[:, None] + jnp.arange(update.shape[1])  # [batch, T]
  # Advanced indices split by a slice: the indexed view is [batch, T, kv_heads, head_dim].
  at = buffer.at[rows, slots] if layer is None else buffer.at[layer, rows, :, slots]
  return at.set(update.astype(buffer.dtype))


def _attend_cached(q: Array, k: Array, v: Array, allowed: Array, kv, layer: Array,
                   index: Array) -> tuple[Array, tuple[Array, Array]]:
  """Writes the new k, v [batch, T, kv_heads, head_dim] into this layer's cache slots `index` and
  attends q [batch, T, heads, head_dim] over the first `window` slots; allowed: [batch, T, window]
  bool. Returns (output [batch, T, kv_heads, groups, head_dim], updated (k, v) cache)."""
  kv = (_write_rows(kv[0], k, index, layer), _write_rows(kv[1], v, index, layer))
  batch, length, heads, head_dim = q.shape
  kv_heads, window = k.shape[2], allowed.shape[-1]
  groups = heads // kv_heads
  keys = kv[0][layer, :, :, :window]  # [batch, kv_heads, window, head_dim]
  values = kv[1][layer, :, :, :window]
  # Only the T new queries move (never the cache): [batch, kv_heads, groups * T, head_dim].
  q = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
  q = q.reshape(batch, kv_heads, groups * length, head_dim)
  scores = jnp.einsum("bkqd,bksd->bkqs", q, keys,
                      preferred_element_type=jnp.float32)  # [batch, kv, groups * T, window]
  scores = scores.reshape(batch, kv_heads, groups, length, window) / jnp.sqrt(
      jnp.float32(head_dim))
  scores = jnp.where(allowed[:, None, None], scores, attention_lib.NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
  probs = probs.reshape(batch, kv_heads, groups * length, window)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, values)  # [batch, kv, groups * T, head_dim]
  out = out.reshape(batch, kv_heads, groups, length, head_dim).transpose(0, 3, 1, 2, 4)
  return out, kv


class Attention(_Module):
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, kv=None, layer=None,
               index=None):
    """mask: without a cache, segment ids [batch, length] (cnllama_jax.attention); with one, the
    boolean [batch, length, window] of the cache slots each token may attend to.
    kv: None, or the cache (k, v) [layers, batch, kv_heads, max_len, head_dim]: this layer's
    slice gets the new k/v at slots `index` [batch] and its first `window` slots are attended
    over (`_attend_cached`).
    Returns (output, updated kv or None)."""
    cfg = self.cfg
    batch, length, _ = x.shape
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dense = lambda name, features, axes: Dense(  # noqa: E731
        cfg, self.lora, self.mesh, self.rules, features=features, axes=axes,
        deterministic=self.deterministic, name=name)
    q = dense("q_proj", heads * head_dim, ("embed", "q_heads"))(x)
    k = dense("k_proj", kv_heads * head_dim, ("embed", "kv_heads"))(x)
    v = dense("v_proj", kv_heads * head_dim, ("embed", "kv_heads"))(x)
    q = q.reshape(batch, length, heads, head_dim)  # [batch, length, heads, head_dim]
    k = k.reshape(batch, length, kv_heads, head_dim)  # [batch, length, kv_heads, head_dim]
    v = v.reshape(batch, length, kv_heads, head_dim)
    q = self.constrain(apply_rotary(q, cos, sin), shd.ACT_HEADS)
    k = self.constrain(apply_rotary(k, cos, sin), shd.ACT_HEADS)
    v = self.constrain(v, shd.ACT_HEADS)
    if kv is not None:  # decoding with the KV cache
      out, kv = _attend_cached(q, k, v, mask, kv, layer, index)
    else:
      out = attention_lib.attention(q, k, v, mask, cfg.attention, self.mesh,
                                    self.rules or shd.DEFAULT_RULES)
    out = out.reshape(batch, length, heads * head_dim)
    return dense("o_proj", cfg.hidden_size, ("q_heads", "embed"))(out), kv


class MLP(_Module):
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    dense = lambda name, features, axes: Dense(  # noqa: E731
        cfg, self.lora, self.mesh, self.rules, features=features, axes=axes,
        deterministic=self.deterministic, name=name)
    gate = dense("gate_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
    up = dense("up_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
    hidden = self.constrain(nn.silu(gate) * up, shd.ACT_MLP)  # [batch, length, intermediate]
    return dense("down_proj", cfg.hidden_size, ("mlp", "embed"))(hidden)


class DecoderLayer(_Module):
  deterministic: bool = True

  @nn.compact
  def __call__(self, carry, cos: Array, sin: Array, mask: Array, layer=None, index=None):
    """carry: (x [batch, length, hidden], kv cache or None); layer: this layer's number."""
    x, kv = carry
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)  # noqa
    sub = dict(cfg=cfg, lora=self.lora, mesh=self.mesh, rules=self.rules,
               deterministic=self.deterministic)
    h, kv = Attention(**sub, name="self_attn")(norm("input_layernorm")(x), cos, sin, mask, kv,
                                               layer, index)
    x = x + h
    x = x + MLP(**sub, name="mlp")(norm("post_attention_layernorm")(x))
    return (self.constrain(x, shd.ACT_EMBED), kv), None


class Llama(_Module):
  """The causal LM. `__call__(input_ids, attention_mask) -> logits [batch, length, padded_vocab]`;
  with `cache=` (see `init_cache`) -> (logits, updated cache). `last_only`: logits of the last
  position only, [batch, 1, padded_vocab] (the next token of every row of a left-padded batch).

  `attention_mask` holds segment ids: 0 = padding, 1, 2, ... = the packed example a token belongs
  to (1s and 0s: one example per row). Tokens attend within their segment, causally; positions
  restart at 0 with each segment (`segment_positions`), so a left-padded row gets the positions of
  the unpadded one, as `transformers`' generate() derives them. With a cache the mask is 1/0.

  Logits of padded vocabulary rows are set to a large negative number, so they never enter the
  softmax and are never sampled. `return_hidden`: (final-norm hidden [batch, length, hidden],
  LM head [hidden, padded_vocab]) instead of logits, for a chunked head + loss.
  """
  deterministic: bool = True

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None, cache=None,
               last_only: bool = False, return_hidden: bool = False,
               window: int | None = None):
    cfg = self.cfg
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    attention_mask = attention_mask.astype(jnp.int32)
    length = input_ids.shape[1]
    if cache is None:
      index, kv, layers, mask = None, None, None, attention_mask
      positions = segment_positions(attention_mask)  # [batch, length]
    else:
      seen = jnp.sum(cache["mask"], axis=-1, keepdims=True)  # [batch, 1]
      positions = jnp.maximum(seen + jnp.cumsum(attention_mask, axis=-1) - 1, 0)  # [batch, t]
      index, kv = cache["index"], (cache["k"], cache["v"])
      layers = jnp.arange(cfg.num_hidden_layers)
      keys_mask = _write_rows(cache["mask"], attention_mask, index)  # [batch, max_len]
      slot = index[:, None] + jnp.arange(length)  # [batch, t]: the slot each new token fills
      window = keys_mask.shape[1] if window is None else window  # cache slots attended over
      causal = jnp.arange(window)[None, None, :] <= slot[:, :, None]  # [batch, t, window]
      mask = causal & (keys_mask[:, None, :window] > 0)  # [batch, t, window]
    cos, sin = rope.rotary_tables(positions, cfg)

    embed = self.param("embed_tokens", nn.with_logical_partitioning(
        _vocab_init(cfg.vocab_size, 0), ("vocab", "embed")), (cfg.padded_vocab_size, cfg.hidden_size),
                       jnp.dtype(cfg.param_dtype))
    # FSDP: gather the table's hidden axis before the lookup (the batch takes the fsdp axis).
    table = self.constrain(embed, ("vocab", None))
    x = jnp.take(table, input_ids, axis=0).astype(cfg.dtype)  # [batch, length, hidden]
    x = self.constrain(x, shd.ACT_EMBED)

    layer = DecoderLayer
    if cfg.remat_policy != "none":
      layer = nn.remat(layer, policy=_REMAT[cfg.remat_policy], prevent_cse=False)
    stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                    length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    (x, kv), _ = stack(cfg, self.lora, self.mesh, self.rules, deterministic=self.deterministic,
                       name="layers")((x, kv), cos, sin, mask, layers, index)
    if last_only:
      x = x[:, -1:]  # [batch, 1, hidden]
    x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(x)

    if cfg.tie_word_embeddings:
      head = embed.T
    else:
      head = self.param("lm_head", nn.with_logical_partitioning(
          _vocab_init(cfg.vocab_size, 1), ("embed", "vocab")), (cfg.hidden_size, cfg.padded_vocab_size),
                        jnp.dtype(cfg.param_dtype))
    if return_hidden:
      return x, head
    logits = jnp.dot(x, head.astype(cfg.dtype), preferred_element_type=jnp.float32)
    logits = self.constrain(logits, shd.ACT_VOCAB)  # [batch, length, padded_vocab]
    logits = mask_padded_vocab(logits, cfg.vocab_size)
    if cache is None:
      return logits
    return logits, dict(k=kv[0], v=kv[1], mask=keys_mask, index=index + length)


# Logical axes of the cache's k / v: rows follow the batch, kv heads follow the tensor axis.
CACHE_AXES = (None, "activation_batch", "activation_heads", None, None)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int) -> dict:
  """An empty KV cache (see the module docstring) for `batch` rows of up to `max_len` tokens."""
  shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
  return dict(k=jnp.zeros(shape, cfg.dtype), v=jnp.zeros(shape, cfg.dtype),
              mask=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((batch,), jnp.int32))


def _vocab_init(vocab_size: int, axis: int):
  """normal(0.02) on real vocabulary rows, zeros on the padding rows (as HF import pads).

  The real rows are drawn at their own shape, so they do not depend on the padding (the mesh).
  """
  def init(key, shape, dtype):
    real = list(shape)
    real[axis] = vocab_size
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, shape[axis] - vocab_size)
    return jnp.pad(nn.initializers.normal(0.02)(key, tuple(real), dtype), pad)
  return init


def mask_padded_vocab(logits: Array, vocab_size: int) -> Array:
  """Sets logits of ids >= vocab_size to a large negative number. logits: [..., padded_vocab]."""
  if logits.shape[-1] == vocab_size:
    return logits
  ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  return jnp.where(ids < vocab_size, logits, jnp.asarray(_NEG_INF, logits.dtype))


def abstract_params(cfg: LlamaConfig, lora: LoraConfig = LoraConfig()) -> Any:
  """Shapes, dtypes and logical axis names of the params, allocating nothing.

  Returns a tree of `nn.LogicallyPartitioned` boxes around `jax.ShapeDtypeStruct`s.
  """
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  cfg = cfg.replace(attention="xla")  # shapes do not depend on it; kernels may not take length 1
  return jax.eval_shape(Llama(cfg, lora).init, jax.random.key(0), ids)["params"]


def init_params(cfg: LlamaConfig, rng: Array, lora: LoraConfig = LoraConfig()) -> Any:
  """Random params (plain arrays, boxes removed), as `transformers` initialises (normal 0.02)."""
  ids = jnp.zeros((1, 1), jnp.int32)
  cfg = cfg.replace(attention="xla")  # shapes do not depend on it; kernels may not take length 1
  return nn.meta.unbox(Llama(cfg, lora).init(rng, ids)["params"])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(cfg: LlamaConfig, lora: LoraConfig, params, input_ids, attention_mask):
  return Llama(cfg, lora).apply({"params": params}, input_ids, attention_mask)


def logits(cfg: LlamaConfig, params: Any, input_ids, attention_mask=None,
           lora: LoraConfig | None = None) -> Array:
  """Next-token logits [batch, length, cfg.vocab_size] (padded vocabulary rows dropped), fp32.

  input_ids, attention_mask: [batch, length] numpy or jax int arrays (mask 1 = token, 0 = pad).
  Params holding LoRA adapters need `lora` (their alpha is not stored in the params).
  """
  lora = lora_for(params, lora)
  input_ids = jnp.asarray(input_ids, jnp.int32)
  mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask,
                                                                              jnp.int32)
  out = _forward(cfg, lora, params, input_ids, mask)
  return out[..., :cfg.vocab_size]
