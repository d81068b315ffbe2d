"""Instruction tuning (Cui et al. 2023, Sec. 3.2): Alpaca template, loss on the response only;
LoRA r 8, alpha 32, dropout 0.05 on all seven modules plus embedding and LM head; lr 1e-4,
warmup ratio 0.03, weight decay 0, max length 512, global batch 512; the Chinese-Alpaca vocabulary
(49,954 with [PAD]). The "Plus" variant: `--config.lora.rank=64 --config.lora.alpha=128`.

Presets: tiny (default, CPU), 7b, 13b, 33b."""
from cnllama_jax import config as model_config, run_config


def get_config(preset: str = "tiny"):
  c = run_config.default()
  c.train.update(trainable="lora+embeddings", learning_rate=1e-4, weight_decay=0.0,
                 warmup_ratio=0.03, schedule="cosine")
  c.lora.update(rank=8, alpha=32.0, dropout=0.05)
  c.data.kind = "sft"
  c.data.pack = True  # short examples share rows instead of padding (issue 14)
  c.vocab.strict = False  # Chinese-LLaMA (49,953) is resized to the Alpaca tokenizer (49,954)
  if preset != "tiny":
    run_config.paper_scale(c, preset, model_config.CHINESE_ALPACA_VOCAB, global_batch=512)
  return c
