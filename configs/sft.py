"""Instruction tuning (Cui et al. 2023, Sec. 3.2): Alpaca template, loss on the response only;
LoRA r 8, alpha 32, dropout 0.05 on all seven modules plus embedding and LM head; lr 1e-4,
warmup ratio 0.03, weight decay 0, max length 512, global batch 512; the Chinese-Alpaca vocabulary
(49,954 with [PAD]). The "Plus" variant: `--config.lora.rank=64 --config.lora.alpha=128`.

Presets: tiny (default, CPU), 7b, 13b, 33b."""
from cnllama_jax import run_config


def get_config(preset: str = "tiny"):
  return run_config.sft(preset)
