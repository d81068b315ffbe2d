"""The tiny run of tests/test_checkpoint.py, for in-process `trainer.fit` and for
`launch/train.py --config=tests/checkpoint_config.py`: synthetic data, 12 steps, a checkpoint every
3, a loss line every step, LoRA dropout on (so resuming must restore the rng)."""
from cnllama_jax import run_config


def get_config(arg: str = ""):
  del arg
  c = run_config.default()
  c.data.kind = "synthetic"
  c.train.update(dict(global_batch_size=8, seq_len=16, steps=12, learning_rate=1e-2,
                      warmup_ratio=0.0, weight_decay=0.01, log_every=1, save_every=3,
                      keep_checkpoints=3, eval_every=0))
  c.lora.update(dict(rank=4, alpha=8.0, dropout=0.1))
  return c
