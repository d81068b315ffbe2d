"""Pre-training stage 2 (Cui et al. 2023, Sec. 3.1): LoRA (r 8, alpha 32, dropout 0.05) on
q,k,v,o,gate,up,down plus the embedding and LM head (`modules_to_save`). lr 1e-4, block size 512,
weight decay 0.01, warmup ratio 0.05, cosine, global batch 1024.

Presets: tiny (default, CPU), 7b, 13b, 33b."""
from cnllama_jax import config as model_config, run_config


def get_config(preset: str = "tiny"):
  c = run_config.default()
  c.train.update(trainable="lora+embeddings", learning_rate=1e-4, weight_decay=0.01,
                 warmup_ratio=0.05, schedule="cosine")
  c.lora.update(rank=8, alpha=32.0, dropout=0.05)
  c.data.kind = "text"
  if preset != "tiny":
    run_config.paper_scale(c, preset, model_config.CHINESE_LLAMA_VOCAB, global_batch=1024)
  return c
