"""SFT on the embedded instructions, packed against unpacked: real tokens/s and the loss curve.

    nice python bench/sft_packing.py [--tokenizer PATH] [--seq_len 512] [--epochs 1]

Data: data/demo/zh_instructions.json (the Chinese instructions the repository ships), tokenised by
the Chinese SentencePiece fixture (default `$CNLLAMA_FIXTURES/tokenizers/chinese_sp.model`), Alpaca
template, loss on the response only, rows of `--seq_len` tokens, the same validation examples.

  unpacked  one example per row, padded (`data.pack=False`), `--batch` rows per step
  packed    several examples per row with segment ids (`data.pack=True`, best-fit decreasing),
            `--batch` / (examples per packed row) rows per step, so each step holds about as
            many real tokens as an unpacked step and the two loss curves compare step by step

Both train configs/sft.py (LoRA r 8 + embeddings + head, dropout 0.05, attention `auto` = the
blockwise kernel on the CPU) at small shapes (`--hidden`, `--layers`) for `--epochs` epochs,
through `trainer.fit`, one log line per step. Reported per side: real (non-padding) tokens/s over
the steps after the first two (compilation excluded), the raw row-slot tokens/s, the real-token
fraction, the training loss against real tokens seen, and the final loss on the validation
examples, unpacked for both (token-weighted over the supervised tokens); then the ratio packed /
unpacked of real tokens/s, measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTIONS = os.path.join(REPO, "data", "demo", "zh_instructions.json")


class Recorder:
  """A writer keeping what the loop reports."""

  def __init__(self):
    self.rows = []

  def write_scalars(self, step, scalars):
    if "loss" in scalars:
      self.rows.append(dict(scalars, step=step))
      print(f"  step {step} loss {scalars['loss']:.4f} tokens/s {scalars['tokens_per_s']:,.0f} "
            f"real {scalars['real_tokens_per_s']:,.0f}", flush=True)

  def write_text(self, line):
    print(f"  {line}", flush=True)

  def close(self):
    pass


def sft_config(args, pack: bool, batch: int, steps: int):
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import sft  # pylint: disable=import-outside-toplevel
  c = sft.get_config("tiny")
  c.model.update(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                 num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                 num_key_value_heads=args.hidden // 32)
  c.tokenizer = args.tokenizer
  c.data.update(path=INSTRUCTIONS, pack=pack, pad_id=0, val_fraction=args.val_fraction)
  c.train.update(global_batch_size=batch, seq_len=args.seq_len, steps=steps, log_every=1,
                 eval_every=0, save_every=0, learning_rate=args.learning_rate)
  return c


def validation_loss(run, state, examples, batch: int) -> float:
  """Token-weighted loss of `examples` (rows of one example each), `batch` rows at a time."""
  from cnllama_jax.data.loader import collate  # pylint: disable=import-outside-toplevel
  loss_sum = tokens = 0.0
  for start in range(0, len(examples), batch):
    rows = [examples[i] for i in range(start, min(start + batch, len(examples)))]
    rows += [dict(rows[0], labels=np.full_like(rows[0]["labels"], -100))] * (batch - len(rows))
    out = run.eval_step(run.frozen, state, collate(rows))
    loss_sum, tokens = loss_sum + float(out["loss_sum"]), tokens + float(out["tokens"])
  return loss_sum / tokens


def train_side(args, pack: bool, batch: int, workdir: str, unpacked_validation=None) -> dict:
  # pylint: disable=import-outside-toplevel
  from cnllama_jax import build, plan as plan_lib, run_data, trainer
  config = sft_config(args, pack, batch, steps=1)
  plan = plan_lib.plan(config)
  data = run_data.datasets(plan.data, plan.cfg.vocab_size, workdir)
  steps = int(args.epochs * len(data["train"]) // batch)
  config = sft_config(args, pack, batch, steps)
  run = build.build(plan_lib.plan(config))
  recorder = Recorder()
  start = time.perf_counter()
  result = trainer.fit(run, data, workdir, recorder)
  wall = time.perf_counter() - start
  rows = recorder.rows
  slots = batch * args.seq_len
  steady = rows[2:]  # one step per row; the first two include compilation
  seconds = sum(slots / r["tokens_per_s"] for r in steady)
  real = sum(r["real_token_fraction"] * slots for r in steady)
  seen = np.cumsum([r["real_token_fraction"] * slots for r in rows])
  validation = unpacked_validation if unpacked_validation is not None else data["validation"]
  return {"rows": len(data["train"]), "batch": batch, "steps": steps, "wall_s": wall,
          "real_tokens_per_s": real / seconds, "tokens_per_s": len(steady) * slots / seconds,
          "real_token_fraction": real / (len(steady) * slots),
          "curve": [(int(s), r["loss"]) for s, r in zip(seen, rows)],
          "validation_loss": validation_loss(run, result["state"], validation, batch),
          "validation": data["validation"]}


def loss_at(curve, low: float, high: float) -> float:
  """Mean training loss of the steps that ended between `low` and `high` real tokens seen."""
  losses = [loss for seen, loss in curve if low < seen <= high]
  return float(np.mean(losses)) if losses else float("nan")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  fixtures = os.environ.get("CNLLAMA_FIXTURES", os.path.join(REPO, "..", "shared", "fixtures"))
  parser.add_argument("--tokenizer", default=os.path.join(fixtures, "tokenizers",
                                                          "chinese_sp.model"))
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--batch", type=int, default=8, help="unpacked rows per step")
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--epochs", type=float, default=1.0)
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  parser.add_argument("--val_fraction", type=float, default=0.05)
  args = parser.parse_args(argv)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  tfds.disable_progress_bar()
  if not os.path.exists(args.tokenizer):
    sys.exit(f"--tokenizer {args.tokenizer} does not exist; pass a SentencePiece .model")
  with tempfile.TemporaryDirectory(prefix="sft-packing-") as tmp:
    print("unpacked:", flush=True)
    plain = train_side(args, False, args.batch, os.path.join(tmp, "unpacked"))
    per_row = args.seq_len * plain["real_token_fraction"]  # real tokens per unpacked row
    # packed rows per step: as many real tokens per step as an unpacked step (at least one row)
    print("packed:", flush=True)
    probe = sft_config(args, True, 1, 1)
    from cnllama_jax import plan as plan_lib, run_data  # pylint: disable=import-outside-toplevel
    packed_rows = run_data.datasets(plan_lib.plan(probe).data, plan_lib.plan(probe).cfg.vocab_size,
                                    os.path.join(tmp, "packed"))["stats"]["real_token_fraction"]
    batch = max(1, round(args.batch * per_row / (args.seq_len * packed_rows)))
    packed = train_side(args, True, batch, os.path.join(tmp, "packed"), plain["validation"])
  print(f"\nSFT on {os.path.relpath(INSTRUCTIONS, REPO)}, tokenizer "
        f"{os.path.basename(args.tokenizer)}, rows of {args.seq_len}, hidden {args.hidden}, "
        f"{args.layers} layers, {args.epochs:g} epoch(s)")
  print("| side | train rows | rows/step | steps | real-token fraction | tokens/s (slots) "
        "| real tokens/s | validation loss |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for name, side in (("unpacked", plain), ("packed", packed)):
    print(f"| {name} | {side['rows']} | {side['batch']} | {side['steps']} | "
          f"{side['real_token_fraction']:.3f} | {side['tokens_per_s']:,.0f} | "
          f"{side['real_tokens_per_s']:,.0f} | {side['validation_loss']:.4f} |")
  print(f"\npacked / unpacked real tokens/s: "
        f"{packed['real_tokens_per_s'] / plain['real_tokens_per_s']:.2f}x")
  total = max(plain["curve"][-1][0], packed["curve"][-1][0])
  print("mean training loss of the steps in each quarter of the real tokens seen:")
  for quarter in range(4):
    low, high = quarter * total / 4, (quarter + 1) * total / 4
    print(f"  {low:>9,.0f} - {high:>9,.0f} tokens: "
          f"unpacked {loss_at(plain['curve'], low, high):.4f}  packed {loss_at(packed['curve'], low, high):.4f}")

if __name__ == "__main__":
  main()
