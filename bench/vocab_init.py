"""Held-out Chinese loss of stage 1 under each new-row init (`normal`, `mean`, `subword_mean`).

  python bench/vocab_init.py --workdir /tmp/vocab_init [--stage0_steps 300 --stage1_steps 60]

Builds a tiny base unless given one: an English SentencePiece base tokenizer (the docstrings of
Python's standard library, as the demo), a Chinese model on data/demo/zh_corpus, their merge, and a
tiny LLaMA pre-trained from scratch on the English text ("stage 0", every weight trains). Then for
each init: the base is resized to the merged tokenizer, the held-out Chinese loss (data/demo
validation split) is measured at stage-1 step 0, stage 1 trains the embeddings only, and the loss
is measured again. Prints one row per init and the ratios against `normal`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # this checkout, not bench/ (module names)
from cnllama_jax import build, pipeline, run_config, run_data, tokenizer as tok_lib  # noqa: E402
from cnllama_jax import trainer  # noqa: E402
from cnllama_jax.data import Loader  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHINESE = REPO / "data" / "demo" / "zh_corpus"
INITS = ("normal", "mean", "subword_mean")


def model_fields(vocab_size: int):
  return run_config.model_fields("tiny", vocab_size=vocab_size, hidden_size=128,
                                 intermediate_size=352, num_hidden_layers=4,
                                 num_attention_heads=4, max_position_embeddings=256)


def tokenizers(workdir: Path, base_vocab: int, chinese_vocab: int) -> dict:
  english = pipeline.stdlib_english(str(workdir / "english.txt"))
  base = tok_lib.train_sentencepiece(
      [english], workdir / "base_tokenizer.model", vocab_size=base_vocab, model_type="bpe",
      byte_fallback=True, split_digits=True, normalization="identity", character_coverage=1.0,
      hard_vocab_limit=False, progress=False)
  chinese = tok_lib.train_sentencepiece(
      [CHINESE], workdir / "chinese_sp.model", vocab_size=chinese_vocab, model_type="unigram",
      hard_vocab_limit=False, progress=False)
  merged = workdir / "merged_tokenizer"
  if not merged.exists():
    tok_lib.merge(base, chinese, merged, new_piece_scores="ordered")
  return {"english": english, "base": str(base), "merged": str(merged)}


def stage0(workdir: Path, toks: dict, steps: int):
  """The tiny base trained from scratch on English text (all weights, no LoRA)."""
  c = run_config.default()
  c.model = model_fields(tok_lib.vocab_size(toks["base"]))
  c.tokenizer, c.data.kind, c.data.path = toks["base"], "text", toks["english"]
  c.lora.rank = 0
  c.train.update(trainable="full", learning_rate=3e-3, steps=steps, global_batch_size=16,
                 seq_len=128, log_every=max(steps // 5, 1), warmup_ratio=0.05)
  result = trainer.train(c, str(workdir / "stage0"))
  return pipeline.trained_params(result), result["history"]


def stage1(workdir: Path, toks: dict, base, init: str, steps: int) -> dict:
  c = run_config.load("pretrain_stage1")
  c.model = model_fields(base[0].vocab_size)
  c.tokenizer, c.data.path = toks["merged"], str(CHINESE)
  c.data.data_dir = str(workdir / "zh_data")  # built once, shared by the three runs
  c.vocab.update(init=init, base_tokenizer=toks["base"])
  c.train.update(learning_rate=5e-3, steps=steps, global_batch_size=16, seq_len=128,
                 log_every=max(steps // 3, 1), eval_every=steps, eval_batches=8,
                 warmup_ratio=0.05)
  run = build.build(c, base=base)  # the resized base, before any stage-1 step
  data = run_data.datasets(run.plan.data, run.cfg.vocab_size, str(workdir / init))
  before = trainer.evaluate(run, run.state, Loader(data["validation"], 16, c.seed), 8)["eval_loss"]
  start = time.perf_counter()
  result = trainer.train(c, str(workdir / init), base=base)
  return {"init": init, "step0_loss": before, "final_loss": result["eval"]["eval_loss"],
          "train_loss_first": result["history"][0]["loss"],
          "train_loss_last": result["history"][-1]["loss"],
          "seconds": time.perf_counter() - start}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--stage0_steps", type=int, default=300)
  parser.add_argument("--stage1_steps", type=int, default=60)
  parser.add_argument("--base_vocab", type=int, default=800)
  parser.add_argument("--chinese_vocab", type=int, default=5000)
  args = parser.parse_args(argv)
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  toks = tokenizers(workdir, args.base_vocab, args.chinese_vocab)
  base, history = stage0(workdir, toks, args.stage0_steps)
  print(f"stage 0 (English, {args.stage0_steps} steps): loss {history[0]['loss']:.3f} -> "
        f"{history[-1]['loss']:.3f}; base vocabulary {base[0].vocab_size}, merged "
        f"{tok_lib.vocab_size(toks['merged'])}", flush=True)
  rows = [stage1(workdir, toks, base, init, args.stage1_steps) for init in INITS]
  print(f"\nheld-out Chinese loss, stage 1 ({args.stage1_steps} steps, embeddings only)")
  print(f"{'init':<14}{'step 0':>10}{'after':>10}{'vs normal (step 0 / after)':>30}")
  ref = rows[0]
  for r in rows:
    print(f"{r['init']:<14}{r['step0_loss']:>10.3f}{r['final_loss']:>10.3f}"
          f"{r['step0_loss'] / ref['step0_loss']:>17.3f} / {r['final_loss'] / ref['final_loss']:.3f}")
  with open(workdir / "vocab_init.json", "w", encoding="utf-8") as f:
    json.dump({"args": vars(args), "stage0": history, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  main()
