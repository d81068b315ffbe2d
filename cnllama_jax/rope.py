"""Rotary position embeddings with scaling: the inverse frequencies and cos/sin scale of each
`RopeScaling.rope_type`, following the formulas of `transformers` (modeling_rope_utils.py) so
converted models give the same logits.

  default   inv_freq[i] = theta^(-2i/dim)
  linear    inv_freq / factor (position interpolation: positions squeezed by `factor`)
  dynamic   theta' = theta * (factor * L / max_pos - (factor - 1))^(dim / (dim - 2)), where L is the
            batch's longest position + 1 once it exceeds max_pos (NTK-aware; unchanged below)
  yarn      per frequency band a blend of inv_freq (extrapolation, fast bands) and inv_freq / factor
            (interpolation, slow bands) with a linear ramp between the dimensions where a band turns
            beta_fast and beta_slow times over the original context; cos and sin scaled by
            attention_factor (default 0.1 ln(factor) + 1)
  llama3    wavelengths above original / low_freq_factor divided by factor, below original /
            high_freq_factor kept, a smooth blend between
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cnllama_jax.config import LlamaConfig, RopeScaling

Array = jax.Array


def _base_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  """[head_dim / 2] float64: theta^(-2i / head_dim)."""
  return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def _yarn(head_dim: int, theta: float, scaling: RopeScaling, max_pos: int) -> tuple[np.ndarray,
                                                                                     float]:
  factor = scaling.factor
  original = scaling.original_max_position_embeddings or max_pos

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention_factor = scaling.attention_factor
  if attention_factor is None:
    if scaling.mscale and scaling.mscale_all_dim:
      attention_factor = mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
    else:
      attention_factor = mscale(factor)

  def dimension_of(rotations):  # the dimension whose wavelength turns `rotations` times
    return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = dimension_of(scaling.beta_fast), dimension_of(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  extrapolated = _base_inv_freq(head_dim, theta)
  interpolated = extrapolated / factor
  keep = 1 - ramp  # 1: the original frequency (fast bands), 0: interpolated (slow bands)
  return interpolated * (1 - keep) + extrapolated * keep, float(attention_factor)


def _llama3(head_dim: int, theta: float, scaling: RopeScaling, max_pos: int) -> np.ndarray:
  inv_freq = _base_inv_freq(head_dim, theta)
  original = scaling.original_max_position_embeddings or max_pos
  low_wavelen = original / scaling.low_freq_factor
  high_wavelen = original / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (original / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, blended, scaled)


def inverse_frequencies(cfg: LlamaConfig, positions: Array) -> tuple[Array, float]:
  """(inv_freq, cos/sin scale) of cfg's rotary embedding.

  positions: [batch, length] int (only `dynamic` reads them: its base depends on the longest).
  Returns inv_freq as [head_dim / 2] fp32 (or [1, head_dim / 2] for `dynamic`).
  """
  scaling, head_dim, theta = cfg.rope_scaling, cfg.head_dim, cfg.rope_theta
  kind = scaling.rope_type
  if kind == "default":
    return jnp.asarray(_base_inv_freq(head_dim, theta), jnp.float32), 1.0
  if kind == "linear":
    return jnp.asarray(_base_inv_freq(head_dim, theta) / scaling.factor, jnp.float32), 1.0
  if kind == "dynamic":
    max_pos = cfg.max_position_embeddings
    longest = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)  # []
    base = theta * (scaling.factor * longest / max_pos - (scaling.factor - 1)) ** (
        head_dim / (head_dim - 2))
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim  # [head_dim / 2]
    return (1.0 / base ** exponents)[None], 1.0
  if kind == "yarn":
    inv_freq, attention_factor = _yarn(head_dim, theta, scaling, cfg.max_position_embeddings)
    return jnp.asarray(inv_freq, jnp.float32), attention_factor
  if kind == "llama3":
    inv_freq = _llama3(head_dim, theta, scaling, cfg.max_position_embeddings)
    return jnp.asarray(inv_freq, jnp.float32), 1.0
  raise ValueError(f"model.rope_scaling.rope_type={kind!r}; expected one of default, linear, "
                   "dynamic, yarn, llama3")


def rotary_tables(positions: Array, cfg: LlamaConfig) -> tuple[Array, Array]:
  """cos, sin: [batch, length, head_dim] fp32, HF layout (frequencies repeated, not interleaved).

  positions: [batch, length] int.
  """
  inv_freq, scale = inverse_frequencies(cfg, positions)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, head_dim / 2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [batch, length, head_dim]
  if scale == 1.0:
    return jnp.cos(emb), jnp.sin(emb)
  return jnp.cos(emb) * scale, jnp.sin(emb) * scale
