"""Pre-training stage 1 (Cui et al. 2023, Sec. 3.1): only the input embedding trains, on Chinese
text, to adapt the new vocabulary rows; the transformer is frozen. lr 2e-4, block size 512,
weight decay 0.01, warmup ratio 0.05, cosine, global batch 1024.

Presets: tiny (default, CPU), 7b, 13b, 33b: `--config=configs/pretrain_stage1.py:7b`."""
from cnllama_jax import config as model_config, run_config


def get_config(preset: str = "tiny"):
  c = run_config.default()
  c.train.update(trainable="embeddings", learning_rate=2e-4, weight_decay=0.01,
                 warmup_ratio=0.05, schedule="cosine")
  c.lora.rank = 0
  c.data.kind = "text"
  if preset != "tiny":
    run_config.paper_scale(c, preset, model_config.CHINESE_LLAMA_VOCAB, global_batch=1024)
  return c
