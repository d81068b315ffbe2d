"""The paper's pipeline end to end on the data the repository ships, on a laptop CPU:

  python launch/train.py --config=configs/demo.py --workdir=/tmp/cnllama_demo

English base tokenizer + Chinese SentencePiece model -> merge -> stage 0 (a tiny base model
pre-trained from scratch on English, standing in for LLaMA) -> stage 1 (embeddings) -> stage 2
(LoRA + embeddings + head) -> instruction tuning -> a generated answer (cnllama_jax.pipeline).
Stages 1, 2 and SFT use the paper's settings (configs/pretrain_stage1.py, pretrain_stage2.py,
sft.py) with tiny shapes, short sequences and higher learning rates so that a few hundred steps
show progress. A smaller, faster run (the smoke test's): `--config=configs/demo.py:smoke`.
"""
import ml_collections

from cnllama_jax import run_config


def get_config(arg: str = ""):
  if arg not in ("", "smoke"):
    raise ValueError(f"configs/demo.py:{arg}: unknown variant; expected '' or 'smoke'")
  c = ml_collections.ConfigDict()
  c.pipeline = "demo"
  c.seed = 0
  c.dry_run = False
  c.english_text = "data/demo/en_corpus"  # written for this project; one document per line
  c.chinese_text = "data/demo/zh_corpus"  # one document per line
  c.instructions = "data/demo/zh_instructions.json"  # Alpaca JSON
  c.tokenizers = ml_collections.ConfigDict(dict(base_vocab_size=800, chinese_vocab_size=5000))
  # vocab_size is replaced by the base tokenizer's size in stage 0.
  c.model = run_config.model_fields("tiny", vocab_size=800, hidden_size=128,
                                    intermediate_size=352, num_hidden_layers=4,
                                    num_attention_heads=4, max_position_embeddings=256)
  c.mesh_shape = (1, -1, 1)

  # Stage 0: all weights from random init on English text (what LLaMA's pre-training gives).
  c.stage0 = run_config.default()
  c.stage0.train.update(trainable="full", learning_rate=3e-3, steps=200, global_batch_size=16,
                        seq_len=128, log_every=10, eval_every=0, warmup_ratio=0.05,
                        weight_decay=0.01)
  c.stage0.lora.rank = 0
  c.stage0.data.kind = "text"

  c.stage1 = run_config.load("pretrain_stage1")
  c.stage1.train.update(learning_rate=5e-3, steps=60, global_batch_size=16, seq_len=128,
                        log_every=10, eval_every=0, warmup_ratio=0.05)
  # New embedding rows: "normal" (HF's N(0, 0.02^2)), "mean" of the base rows, or "subword_mean"
  # (each the mean of the base rows of the pieces the base tokenizer splits it into); the summary
  # reports the held-out Chinese loss at stage-1 step 0 and after stage 1 for this choice
  # (`--config.stage1.vocab.init=subword_mean`; bench/vocab_init.py --demo compares all three).
  c.stage1.vocab.init = "normal"
  c.stage2 = run_config.load("pretrain_stage2")
  c.stage2.train.update(learning_rate=3e-3, steps=120, global_batch_size=16, seq_len=128,
                        log_every=10, eval_every=0)
  c.stage2.lora.update(rank=16, alpha=32.0)
  c.sft = run_config.load("sft")
  c.sft.train.update(learning_rate=3e-3, steps=120, global_batch_size=16, seq_len=128,
                     log_every=10, eval_every=120)
  c.sft.lora.update(rank=16, alpha=32.0)
  c.generate = ml_collections.ConfigDict(dict(
      instruction="请简单介绍一下长城。", max_new_tokens=48, temperature=0.2,
      repetition_penalty=1.1))
  if arg == "smoke":  # tests/test_demo.py: every stage, tiny sizes, a few steps each
    c.tokenizers.update(base_vocab_size=400, chinese_vocab_size=4000)
    c.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=128)
    for name, steps in (("stage0", 30), ("stage1", 15), ("stage2", 10), ("sft", 10)):
      c[name].train.update(steps=steps, global_batch_size=8, log_every=5,
                           seq_len=128 if name == "sft" else 32,  # the Alpaca prompt needs ~80
                           eval_every=steps if name == "sft" else 0)
    c.generate.max_new_tokens = 8
  return c
