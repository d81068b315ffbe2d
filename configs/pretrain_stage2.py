"""Pre-training stage 2 (Cui et al. 2023, Sec. 3.1): LoRA (r 8, alpha 32, dropout 0.05) on
q,k,v,o,gate,up,down plus the embedding and LM head (`modules_to_save`). lr 1e-4, block size 512,
weight decay 0.01, warmup ratio 0.05, cosine, global batch 1024.

Presets: tiny (default, CPU), 7b, 13b, 33b."""
from cnllama_jax import run_config


def get_config(preset: str = "tiny"):
  return run_config.pretrain_stage2(preset)
