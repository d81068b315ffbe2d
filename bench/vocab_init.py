"""Held-out Chinese loss of stage 1 under each new-row init (`normal`, `mean`, `subword_mean`).

  python bench/vocab_init.py --workdir /tmp/vocab_init [--stage0_steps 300 --stage1_steps 60]
  python bench/vocab_init.py --demo --workdir /tmp/vocab_init_demo

`--demo`: exactly the demo's (configs/demo.py, cnllama_jax/pipeline.py) corpus split, tokenizers,
stage 0 and stage 1; for each init the held-out Chinese loss (the demo's held-out documents, as its
summary measures it) at stage-1 step 0 and after the demo's stage 1, and tokens per character of
held-out Chinese under the SentencePiece merge (the demo's) and byte-level BPE merges (an English
byte-level BPE of the demo's base size extended with a Chinese one of the Chinese model's size, or
with the Chinese SentencePiece model's pieces).
A stage 0 already in `<workdir>/stage0` is resumed (not trained again).

Without `--demo`:

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
from cnllama_jax import bpe, build, pipeline, run_config, run_data  # noqa: E402
from cnllama_jax import tokenizer as tok_lib, tokenizer_stats, trainer  # noqa: E402
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


def demo_tokens_per_char(config, workdir: Path, english: str, chinese: str, heldout: str,
                         sentencepiece: dict) -> dict:
  """Tokens per character of the held-out Chinese text: the demo's SentencePiece base and merge,
  and a byte-level BPE base (English, the demo's base size) merged with a Chinese byte-level BPE
  and, separately, with the demo's Chinese SentencePiece model (its pieces as byte-level tokens)."""
  t = config.tokenizers
  base = bpe.train([english], workdir / "bpe_base.json", vocab_size=t.base_vocab_size,
                   progress=False)
  zh = bpe.train([chinese], workdir / "bpe_chinese.json", vocab_size=t.chinese_vocab_size,
                 progress=False)
  merged = workdir / "bpe_merged_tokenizer"
  if not merged.exists():
    tok_lib.merge(base, zh, merged)
  with_pieces = workdir / "bpe_plus_sentencepiece_tokenizer"
  if not with_pieces.exists():
    tok_lib.merge(base, workdir / "chinese_sp.model", with_pieces)
  text = Path(heldout).read_text(encoding="utf-8")
  out = {f"sentencepiece {k}": v for k, v in sentencepiece.items()}
  for name, path in (("bpe base", base), ("bpe merged", merged),
                     ("bpe + sentencepiece pieces", with_pieces)):
    out[name] = tokenizer_stats.tokenizer_stats(tok_lib.load(path), text, name=name,
                                                min_seconds=0.0).tokens_per_char
  out["sizes"] = {"sentencepiece merged": tok_lib.vocab_size(workdir / "chinese_llama_tokenizer"),
                  "bpe base": tok_lib.vocab_size(base), "bpe merged": tok_lib.vocab_size(merged),
                  "bpe + sentencepiece pieces": tok_lib.vocab_size(with_pieces)}
  return out


def demo(workdir: Path, variant: str = "") -> dict:
  """The demo's stage 0, then its stage 1 once per init; held-out losses as the demo's summary."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  english, _ = pipeline.split_corpus(config.english_text, str(workdir / "english"))
  chinese, heldout = pipeline.split_corpus(config.chinese_text, str(workdir / "chinese"))
  toks = pipeline.build_tokenizers(config, str(workdir), english, chinese, heldout)
  tpc = demo_tokens_per_char(config, workdir, english, chinese, heldout, toks["tokens_per_char"])
  print("tokens/char of held-out Chinese: " + ", ".join(
      f"{k} {v:.3f}" for k, v in tpc.items() if k != "sizes") + f"; sizes {tpc['sizes']}",
      flush=True)
  stage0 = pipeline.stage_config(config, "stage0", toks["base"], english)
  start = time.perf_counter()
  result = trainer.train(stage0, str(workdir / "stage0"))
  base = pipeline.trained_params(result)
  history = result["history"]
  print(f"stage 0 ({stage0.train.steps} steps, {time.perf_counter() - start:.0f} s): "
        f"{len(history)} steps logged this run", flush=True)
  rows = []
  for init in INITS:
    stage = pipeline.stage_config(config, "stage1", toks["chinese_llama"], chinese, toks["base"])
    stage.vocab.init = init
    start = time.perf_counter()
    before = pipeline.heldout_loss(stage, *pipeline.start_params(stage, base), heldout)
    out = trainer.train(stage, str(workdir / f"stage1_{init}"), base=base)
    after = pipeline.heldout_loss(stage, *pipeline.trained_params(out), heldout)
    rows.append({"init": init, "step0_loss": before, "final_loss": after,
                 "train_loss_first": out["history"][0]["loss"] if out["history"] else None,
                 "train_loss_last": out["history"][-1]["loss"] if out["history"] else None,
                 "seconds": time.perf_counter() - start})
    print(f"{init}: held-out {before:.3f} -> {after:.3f} ({rows[-1]['seconds']:.0f} s)",
          flush=True)
  return {"steps": {"stage0": stage0.train.steps, "stage1": config.stage1.train.steps},
          "tokens_per_char": tpc, "stage0": history, "rows": rows}


def print_rows(rows: list[dict], title: str) -> None:
  print(f"\n{title}")
  print(f"{'init':<14}{'step 0':>10}{'after':>10}{'vs normal (step 0 / after)':>30}")
  ref = rows[0]
  for r in rows:
    ratios = f"{r['step0_loss'] / ref['step0_loss']:.3f} / {r['final_loss'] / ref['final_loss']:.3f}"
    print(f"{r['init']:<14}{r['step0_loss']:>10.3f}{r['final_loss']:>10.3f}{ratios:>30}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--demo", action="store_true",
                      help="the demo's tokenizers, stage 0 and stage 1 (configs/demo.py)")
  parser.add_argument("--demo_variant", default="", help="configs/demo.py variant ('smoke')")
  parser.add_argument("--stage0_steps", type=int, default=300)
  parser.add_argument("--stage1_steps", type=int, default=60)
  parser.add_argument("--base_vocab", type=int, default=800)
  parser.add_argument("--chinese_vocab", type=int, default=5000)
  args = parser.parse_args(argv)
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if args.demo:
    result = demo(workdir, args.demo_variant)
    print_rows(result["rows"], f"held-out Chinese loss (demo held-out documents), the demo's stage "
               f"1 ({result['steps']['stage1']} steps, embeddings only) on its stage-0 base")
    with open(workdir / "vocab_init_demo.json", "w", encoding="utf-8") as f:
      json.dump({"args": vars(args), **result}, f, indent=1)
    return
  toks = tokenizers(workdir, args.base_vocab, args.chinese_vocab)
  base, history = stage0(workdir, toks, args.stage0_steps)
  print(f"stage 0 (English, {args.stage0_steps} steps): loss {history[0]['loss']:.3f} -> "
        f"{history[-1]['loss']:.3f}; base vocabulary {base[0].vocab_size}, merged "
        f"{tok_lib.vocab_size(toks['merged'])}", flush=True)
  rows = [stage1(workdir, toks, base, init, args.stage1_steps) for init in INITS]
  print_rows(rows, f"held-out Chinese loss, stage 1 ({args.stage1_steps} steps, embeddings only)")
  with open(workdir / "vocab_init.json", "w", encoding="utf-8") as f:
    json.dump({"args": vars(args), "stage0": history, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  main()
