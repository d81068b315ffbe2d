"""cnllama_jax: Chinese-LLaMA-Alpaca (Cui, Yang, Yao 2023) in JAX/Flax.

Stable entry points for notebooks and scripts:
  load_hf(path, *, mesh=None, dtype=None) -> (cfg, params)
  logits(cfg, params, input_ids, attention_mask=None) -> [batch, length, cfg.vocab_size]
"""
from cnllama_jax.config import LlamaConfig, preset
from cnllama_jax.hf import load_hf
from cnllama_jax.model import logits

__all__ = ["LlamaConfig", "load_hf", "logits", "preset"]
