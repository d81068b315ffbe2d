"""The paper's pipeline end to end on the data the repository ships, on a laptop CPU:

  python launch/train.py --config=configs/demo.py --workdir=/tmp/cnllama_demo

English base tokenizer + Chinese SentencePiece model -> merge -> tiny base model -> stage 1
(embeddings) -> stage 2 (LoRA + embeddings + head) -> instruction tuning -> a generated answer.
The stage settings are the paper's (configs/pretrain_stage1.py, pretrain_stage2.py, sft.py) with
tiny shapes, short sequences and higher learning rates so that a few hundred steps show progress.
"""
import ml_collections

from cnllama_jax import run_config


def get_config(arg: str = ""):
  del arg
  c = ml_collections.ConfigDict()
  c.pipeline = "demo"
  c.seed = 0
  c.dry_run = False
  c.chinese_text = "data/demo/zh_corpus"  # one document per line
  c.instructions = "data/demo/zh_instructions.json"  # Alpaca JSON
  c.tokenizers = ml_collections.ConfigDict(dict(
      english_text="",  # "" = docstrings of Python's standard library (offline everywhere)
      base_vocab_size=800, chinese_vocab_size=5000))
  c.model = run_config.model_fields("tiny", vocab_size=800, hidden_size=128,
                                    intermediate_size=352, num_hidden_layers=4,
                                    num_attention_heads=4, max_position_embeddings=256)
  c.mesh_shape = (1, -1, 1)

  c.stage1 = run_config.pretrain_stage1()
  c.stage1.train.update(learning_rate=5e-3, steps=60, global_batch_size=16, seq_len=128,
                        log_every=10, eval_every=30, warmup_ratio=0.05)
  c.stage2 = run_config.pretrain_stage2()
  c.stage2.train.update(learning_rate=3e-3, steps=120, global_batch_size=16, seq_len=128,
                        log_every=10, eval_every=60)
  c.stage2.lora.update(rank=16, alpha=32.0)
  c.sft = run_config.sft()
  c.sft.train.update(learning_rate=3e-3, steps=120, global_batch_size=16, seq_len=128,
                     log_every=10, eval_every=60)
  c.sft.lora.update(rank=16, alpha=32.0)
  c.generate = ml_collections.ConfigDict(dict(
      instruction="请简单介绍一下长城。", max_new_tokens=48, temperature=0.2,
      repetition_penalty=1.1))
  return c
