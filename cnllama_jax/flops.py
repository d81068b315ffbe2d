"""Analytic model FLOPs (LoRA-aware) and peak-FLOPs tables for MFU.

XLA's cost analysis counts a scanned layer body once, so FLOPs are counted here by hand:
a matmul of [n, k] x [k, m] costs 2nkm. Per token of a training step:
  forward            2 (N_layers + N_head) + attention + LoRA
  backward (inputs)  the same again (activation gradients flow through every frozen layer)
  backward (weights) 2 x the matmul params that train (+ LoRA's), nothing for frozen weights
Attention scores and the weighted sum cost 4 K H d_head per layer and token, K the keys a query
attends: causal, the mean over a row of T tokens is (T + 1) / 2 (what a causal model needs; the
blockwise kernel computes whole diagonal tiles, (T + block) / 2, and xla all T, but their extra
work is masked away and not counted). Packed rows attend less (keys within the segment only);
MFU does not count that saving, so on packed rows it reads as if each row were one sequence.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from cnllama_jax.config import LlamaConfig
from cnllama_jax import lora as lora_lib
from cnllama_jax.lora import LoraConfig

# Dense bf16 peak FLOP/s per chip.
PEAK_FLOPS = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
    "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12,
    "a100": 312e12, "h100": 989e12, "h200": 989e12,
}


def layer_matmul_params(cfg: LlamaConfig) -> dict[str, int]:
  """Weights of each dense module of one layer, by PEFT module name."""
  return {name.split("/")[1]: i * o for name, (i, o) in lora_lib.module_shapes(cfg).items()}


def _lora_params(cfg: LlamaConfig, lora: LoraConfig) -> int:
  """Adapter weights of one layer: r (in + out) per target module."""
  return sum(lora.rank * (i + o) for name, (i, o) in lora_lib.module_shapes(cfg).items()
             if lora.applies_to(name.split("/")[1]))


def train_flops_per_token(cfg: LlamaConfig, seq_len: int, lora: LoraConfig,
                          trainable_groups: frozenset[str]) -> float:
  """Model FLOPs of one training token in a causal row of `seq_len` tokens. trainable_groups:
  from `lora.STAGES`."""
  layers = cfg.num_hidden_layers
  base = layers * sum(layer_matmul_params(cfg).values())
  head = cfg.hidden_size * cfg.padded_vocab_size
  adapters = layers * _lora_params(cfg, lora)
  mean_keys = (seq_len + 1) / 2  # causal: query t attends keys 0..t
  attention = 4 * layers * mean_keys * cfg.num_attention_heads * cfg.head_dim
  forward = 2 * (base + head + adapters) + attention
  backward_inputs = 2 * (base + head + adapters) + 2 * attention
  trained = (base if "base" in trainable_groups else 0) + (head if "head" in trainable_groups else 0)
  trained += adapters if "lora" in trainable_groups else 0
  return float(forward + backward_inputs + 2 * trained)


def peak_flops_per_device(device=None) -> float | None:
  """The table's dense bf16 peak for an accelerator, or None when unknown (e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind.lower()
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name in kind:
      return flops
  return None


def measure_matmul_flops(size: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
  """Measured FLOP/s of a [size, size] matmul on the default device (the CPU's practical peak)."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best
