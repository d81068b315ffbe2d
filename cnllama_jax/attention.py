"""Causal self-attention implementations behind one signature, chosen by the target mesh.

  attention(q, k, v, segment_ids, implementation, mesh, rules) -> out
    q        [batch, length, heads, head_dim]
    k, v     [batch, length, kv_heads, head_dim]   heads % kv_heads == 0 (MHA, GQA, MQA)
    segment_ids [batch, length] int32: 0 = padding, 1, 2, ... = the packed example of each token
    out      [batch, length, heads, head_dim] in q's dtype

Mask (every implementation): a query attends to the keys at or before it with its own segment id.
Real tokens therefore see only real tokens of their example; padding (segment 0) sees only
padding, so no row of the mask is empty and padding never touches a real token.

  xla        materialised [batch, kv, groups, t, s] fp32 scores, the mask a boolean `where`
  blockwise  query x key tiles with an online softmax; tiles above the diagonal are never computed,
             nor the tiles before the first key tile that shares a segment with the query tile in
             any row of the batch (packed rows: per-tile ranges of real segment ids and whether
             the tile holds padding; in the backward, after the last such query tile); a
             custom VJP recomputes each tile's probabilities from the saved log-sum-exp, so
             memory is O(length) rather than O(length^2). Any platform; the CPU default.
  splash     the Pallas TPU kernel (jax.experimental.pallas.ops.tpu.splash_attention) inside
             `shard_map` over the batch and head axes (Mosaic kernels are not auto-partitioned)
  cudnn      jax.nn.dot_product_attention(implementation="cudnn") (GPU, bf16 / fp16)
  auto       splash on TPU, cudnn on GPU in 16-bit, blockwise on CPU, else xla; decided from the
             platform of the mesh's devices (an AOT compile for a TPU topology from a CPU host
             gets splash), falling back to xla when the length is not a multiple of the blocks.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from cnllama_jax import sharding as shd
from cnllama_jax.config import ATTENTION_IMPLEMENTATIONS

Array = jax.Array
NEG_INF = -1e30  # finite: a masked score never makes NaN
BLOCKWISE_BLOCK = 64  # query and key tile of the blockwise kernel (fastest on CPU at 512)
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the length is used


def platform_of(mesh: Mesh | None) -> str:
  """'cpu' / 'gpu' / 'tpu' of the mesh's devices (the default device without a mesh)."""
  device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
  return device.platform


def _splash_block(length: int) -> int | None:
  return next((b for b in SPLASH_BLOCKS if length % b == 0), None)


def choose(requested: str, mesh: Mesh | None, length: int, dtype: Any) -> str:
  """The implementation to run for `requested` on `mesh` at this length; errors name the fix."""
  if requested not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"model.attention={requested!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")
  platform = platform_of(mesh)
  sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if requested == "auto":
    if platform == "tpu" and _splash_block(length):
      return "splash"
    if platform == "gpu" and sixteen_bit:
      return "cudnn"
    if platform == "cpu" and length % BLOCKWISE_BLOCK == 0 and length >= 2 * BLOCKWISE_BLOCK:
      return "blockwise"
    return "xla"
  if requested == "splash":
    if platform != "tpu":
      raise ValueError(f"model.attention='splash' needs a TPU mesh, but the mesh's devices are "
                       f"{platform!r}; use 'auto' or 'xla'")
    if not _splash_block(length):
      raise ValueError(f"model.attention='splash': sequence length {length} is not a multiple "
                       f"of the kernel's blocks {SPLASH_BLOCKS}; pad to a multiple of 128")
  if requested == "cudnn":
    if platform != "gpu":
      raise ValueError(f"model.attention='cudnn' needs a GPU mesh, but the mesh's devices are "
                       f"{platform!r}; use 'auto' or 'xla'")
    if not sixteen_bit:
      raise ValueError(f"model.attention='cudnn' needs model.dtype bfloat16 or float16, not "
                       f"{jnp.dtype(dtype).name}; use 'auto' or 'xla'")
  if requested == "blockwise" and length % BLOCKWISE_BLOCK:
    raise ValueError(f"model.attention='blockwise': sequence length {length} is not a multiple "
                     f"of its block {BLOCKWISE_BLOCK}; pad to a multiple or use 'xla'")
  return requested


def attention(q: Array, k: Array, v: Array, segment_ids: Array, implementation: str = "auto",
              mesh: Mesh | None = None, rules=shd.DEFAULT_RULES) -> Array:
  """Causal attention within segments (see the module docstring for shapes and the mask)."""
  kind = choose(implementation, mesh, q.shape[1], q.dtype)
  if kind == "xla":
    return xla_attention(q, k, v, segment_mask(segment_ids))
  if kind == "blockwise":
    return blockwise_attention(q, k, v, segment_ids, BLOCKWISE_BLOCK)
  if kind == "splash":
    return splash_attention(q, k, v, segment_ids, mesh, rules)
  return cudnn_attention(q, k, v, segment_ids)


def segment_mask(segment_ids: Array) -> Array:
  """[batch, t, s] bool: key s at or before query t and in its segment. segment_ids [batch, T]."""
  length = segment_ids.shape[1]
  causal = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]  # [t, s]
  return causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


def xla_attention(q: Array, k: Array, v: Array, allowed: Array) -> Array:
  """Materialised attention. allowed: [batch, t, s] bool (s may differ from t: a KV cache).

  q [batch, t, heads, head_dim], k/v [batch, s, kv_heads, head_dim] -> [batch, t, heads, head_dim].
  """
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                      preferred_element_type=jnp.float32)  # [batch, kv, groups, t, s]
  scores = scores / jnp.sqrt(jnp.float32(head_dim))
  scores = jnp.where(allowed[:, None, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # [batch, t, kv, groups, head_dim]
  return out.reshape(batch, length, heads, head_dim)


# --- blockwise (any platform) --------------------------------------------------------------------

def _tiles(q, k, v, segment_ids, block):
  """q -> [n, batch, kv, groups, block, d]; k, v -> [n, batch, kv, block, d]; ids -> [n, batch,
  block] (n = length / block tiles, leading so loops index them)."""
  batch, length, heads, d = q.shape
  kv_heads, n = k.shape[2], length // block
  q = q.reshape(batch, n, block, kv_heads, heads // kv_heads, d).transpose(1, 0, 3, 4, 2, 5)
  k = k.reshape(batch, n, block, kv_heads, d).transpose(1, 0, 3, 2, 4)
  v = v.reshape(batch, n, block, kv_heads, d).transpose(1, 0, 3, 2, 4)
  return q, k, v, segment_ids.reshape(batch, n, block).transpose(1, 0, 2)


def _tiles_meet(ids):
  """[n, n] bool: whether query tile i and key tile j share a segment id in any row of the batch,
  from per-tile ranges of real ids and whether a tile holds padding (a necessary condition for any
  allowed score: equal real ids lie in both ranges; padding meets only padding). ids [n, batch,
  block]."""
  real = ids > 0
  low = jnp.min(jnp.where(real, ids, jnp.iinfo(ids.dtype).max), axis=-1)  # [n, batch]
  high = jnp.max(jnp.where(real, ids, 0), axis=-1)  # [n, batch]; an empty range never meets
  padding = jnp.any(~real, axis=-1)  # [n, batch]
  meet = (low[:, None] <= high[None, :]) & (low[None, :] <= high[:, None])  # [n, n, batch]
  return jnp.any(meet | (padding[:, None] & padding[None, :]), axis=-1)


def _tile_ranges(ids):
  """The tiles the kernel visits: query tile i against key tiles first_key[i] .. i, key tile j
  against query tiles j .. last_query[j] (int32 [n] each): the span of the causal tile pairs whose
  segments meet. For rows whose segment ids never decrease but for trailing padding (packed and
  right-padded rows) the pairs that meet are exactly those spans; otherwise a span may include
  pairs that do not meet, whose scores are all masked and add exactly 0. ids [n, batch, block]."""
  n = ids.shape[0]
  causal = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]  # [i, j]
  meet = _tiles_meet(ids) & causal  # the diagonal always meets
  first_key = jnp.argmax(meet, axis=1).astype(jnp.int32)  # [n]
  last_query = (n - 1 - jnp.argmax(meet[::-1], axis=0)).astype(jnp.int32)  # [n]
  return first_key, last_query


@functools.partial(jax.jit, static_argnums=1)
def tiles_computed(segment_ids: Array, block: int) -> Array:
  """[n, n] bool: the (query tile, key tile) pairs the blockwise kernel's forward computes for
  this batch. segment_ids [batch, length]."""
  n = segment_ids.shape[1] // block
  ids = segment_ids.reshape(segment_ids.shape[0], n, block).transpose(1, 0, 2)  # [n, batch, block]
  first_key, _ = _tile_ranges(ids)
  j, i = jnp.arange(n)[None, :], jnp.arange(n)[:, None]
  return (first_key[:, None] <= j) & (j <= i)


def _tile_scores(q_tile, k_tile, ids_q, ids_k, i, j, block, scale):
  """Masked scores of query tile i against key tile j: [batch, kv, groups, block, block] fp32."""
  s = jnp.einsum("bkgqd,bksd->bkgqs", q_tile, k_tile, preferred_element_type=jnp.float32) * scale
  rows = i * block + jnp.arange(block)[:, None]
  cols = j * block + jnp.arange(block)[None, :]
  allowed = (rows >= cols)[None] & (ids_q[:, :, None] == ids_k[:, None, :])  # [batch, bq, bk]
  return jnp.where(allowed[:, None, None], s, NEG_INF)


def _blockwise_forward(q, k, v, segment_ids, block):
  """(out [batch, length, heads, d], log-sum-exp [n, batch, kv, groups, block] fp32)."""
  batch, length, heads, d = q.shape
  scale = 1.0 / math.sqrt(d)
  qt, kt, vt, ids = _tiles(q, k, v, segment_ids, block)
  first_key, _ = _tile_ranges(ids)  # [n]

  def query_tile(_, inputs):
    i, q_tile, ids_q = inputs
    shape = q_tile.shape[:-1]  # [batch, kv, groups, block]

    def key_tile(j, carry):
      m, l, acc = carry
      s = _tile_scores(q_tile, kt[j], ids_q, ids[j], i, j, block, scale)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.exp(s - m_new[..., None])
      correction = jnp.exp(m - m_new)
      l = l * correction + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vt.dtype), vt[j],
                      preferred_element_type=jnp.float32)
      return m_new, l, acc * correction[..., None] + pv

    init = (jnp.full(shape, NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(q_tile.shape, jnp.float32))
    # tiles j > i (causality) and j < first_key[i] (no shared segment) are fully masked: skipped
    m, l, acc = jax.lax.fori_loop(first_key[i], i + 1, key_tile, init)
    return None, ((acc / l[..., None]).astype(q.dtype), m + jnp.log(l))

  n = length // block
  _, (out, lse) = jax.lax.scan(query_tile, None, (jnp.arange(n), qt, ids))
  # out: [n, batch, kv, groups, block, d] -> [batch, length, heads, d]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, length, heads, d)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def blockwise_attention(q: Array, k: Array, v: Array, segment_ids: Array, block: int) -> Array:
  """Memory-efficient causal attention within segments; length must be a multiple of `block`."""
  return _blockwise_forward(q, k, v, segment_ids, block)[0]


def _blockwise_fwd(q, k, v, segment_ids, block):
  out, lse = _blockwise_forward(q, k, v, segment_ids, block)
  return out, (q, k, v, segment_ids, out, lse)


def _blockwise_bwd(block, residuals, d_out):
  q, k, v, segment_ids, out, lse = residuals
  batch, length, heads, d = q.shape
  kv_heads, n = k.shape[2], length // block
  scale = 1.0 / math.sqrt(d)
  qt, kt, vt, ids = _tiles(q, k, v, segment_ids, block)
  _, last_query = _tile_ranges(ids)  # [n]
  dot = _tiles(d_out, k, v, segment_ids, block)[0]  # [n, batch, kv, groups, block, d]
  delta = jnp.sum(dot.astype(jnp.float32) * _tiles(out, k, v, segment_ids, block)[0].astype(
      jnp.float32), axis=-1)  # [n, batch, kv, groups, block]: rowsum(dO * O)

  def key_tile(dq, inputs):
    j, k_tile, v_tile, ids_k = inputs

    def query_tile(i, carry):
      dq, dk, dv = carry
      s = _tile_scores(qt[i], k_tile, ids[i], ids_k, i, j, block, scale)
      p = jnp.exp(s - lse[i][..., None])  # [batch, kv, groups, bq, bk]
      dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(dot.dtype), dot[i],
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkgqd,bksd->bkgqs", dot[i], v_tile, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta[i][..., None]) * scale).astype(q.dtype)
      dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds, qt[i], preferred_element_type=jnp.float32)
      dq = dq.at[i].add(jnp.einsum("bkgqs,bksd->bkgqd", ds, k_tile,
                                   preferred_element_type=jnp.float32))
      return dq, dk, dv

    zeros = jnp.zeros(k_tile.shape, jnp.float32)
    # tiles i < j (causality) and i > last_query[j] (no shared segment) skipped
    dq, dk, dv = jax.lax.fori_loop(j, last_query[j] + 1, query_tile, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(key_tile, jnp.zeros(qt.shape, jnp.float32),
                              (jnp.arange(n), kt, vt, ids))
  dq = dq.transpose(1, 0, 4, 2, 3, 5).reshape(batch, length, heads, d).astype(q.dtype)
  # dk, dv: [n, batch, kv, block, d] -> [batch, length, kv, d]
  dk = dk.transpose(1, 0, 3, 2, 4).reshape(batch, length, kv_heads, d).astype(k.dtype)
  dv = dv.transpose(1, 0, 3, 2, 4).reshape(batch, length, kv_heads, d).astype(v.dtype)
  return dq, dk, dv, None


blockwise_attention.defvjp(_blockwise_fwd, _blockwise_bwd)


# --- splash (TPU) --------------------------------------------------------------------------------

def _head_axes(mesh: Mesh, rules, heads: int, kv_heads: int):
  """Mesh axes the heads are split over inside shard_map (None when they do not divide both the
  query and the key/value heads, so every shard keeps whole GQA groups)."""
  spec = shd.logical_to_spec(("activation_heads",), rules, mesh, (math.gcd(heads, kv_heads),))
  return spec[0]


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, mesh: Mesh | None,
                     rules=shd.DEFAULT_RULES, interpret: bool = False) -> Array:
  """The Pallas splash kernel per (batch row, local heads), under shard_map over `mesh`.

  interpret=True runs the kernel's reference interpreter (any platform; tests)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
      splash_attention_kernel as splash, splash_attention_mask as splash_mask)
  batch, length, heads, d = q.shape
  kv_heads = k.shape[2]
  block = _splash_block(length)
  if block is None:
    raise ValueError(f"splash attention: sequence length {length} is not a multiple of the "
                     f"kernel's blocks {SPLASH_BLOCKS}")
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)

  def local(q, k, v, segment_ids):  # [b, t, h, d] per shard
    local_heads = q.shape[2]
    kernel = splash.make_splash_mha(
        mask=splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * local_heads),
        block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    q = (q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)).transpose(0, 2, 1, 3)  # [b, h, t, d]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, t, d]
    row = lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(ids, ids))  # noqa
    return jax.vmap(row)(q, k, v, segment_ids).transpose(0, 2, 1, 3)  # [b, t, h, d]

  if mesh is None:
    return local(q, k, v, segment_ids)
  batch_axes = shd.logical_to_spec(("activation_batch",), rules, mesh, (batch,))[0]
  head_axes = _head_axes(mesh, rules, heads, kv_heads)
  qkv_spec = PartitionSpec(batch_axes, None, head_axes, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec,
                                                   PartitionSpec(batch_axes, None)),
                       out_specs=qkv_spec, check_vma=False)(q, k, v, segment_ids)


# --- cuDNN (GPU) ---------------------------------------------------------------------------------

def cudnn_attention(q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
  """cuDNN fused attention (causal, plus a same-segment boolean mask [batch, 1, t, s])."""
  same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True, implementation="cudnn")
