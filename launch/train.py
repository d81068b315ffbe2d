"""Trains a stage of the paper: `python launch/train.py --config=configs/<x>.py[:preset]
--config.a.b=value --workdir=DIR`.

The story of a run: mesh -> base model (HF import or random init) -> vocabulary resized to the
tokenizer -> LoRA adapters -> frozen/trainable split -> sharded state -> data -> steps, with a log
line every `train.log_every` steps (loss, tokens/s, MFU), TensorBoard scalars in the workdir and an
evaluation every `train.eval_every` steps.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cnllama_jax import experiment, flops, lora as lora_lib, sharding as shd  # noqa: E402
from cnllama_jax.data import Loader  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config: configs/<x>.py[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for logs, config and checkpoints.")


def maybe_initialize_distributed() -> None:
  """Joins the other hosts when launched on several (TPU pods or JAX_COORDINATOR_ADDRESS set)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","):
    jax.distributed.initialize()


def print_dry_run(config) -> None:
  report = experiment.dry_run(config)
  print(f"params: total={report['total']} trainable={report['trainable']} "
        f"({report['percent']:.2f}%)")
  print(f"bytes per device ({report['devices']} devices): params="
        f"{report['param_bytes_per_device'] / 2**30:.2f} GiB optimizer="
        f"{report['opt_bytes_per_device'] / 2**30:.2f} GiB")


def peak_flops() -> tuple[float, str]:
  peak = flops.peak_flops_per_device()
  if peak is not None:
    return peak * jax.device_count(), "table"
  return flops.measure_matmul_flops(), "measured fp32 matmul"


def evaluate(run, loader, config) -> dict:
  sums = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
  for step in range(config.train.eval_batches):
    out = run.eval_step(run.state, shd.host_to_global(loader.batch(step), run.batch_sharding))
    sums = {k: sums[k] + float(v) for k, v in out.items()}
  tokens = max(sums["tokens"], 1.0)
  loss = sums["loss_sum"] / tokens
  return {"eval_loss": loss, "eval_accuracy": sums["correct"] / tokens,
          "eval_perplexity": float(np.exp(min(loss, 50.0)))}


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  if config.dry_run:
    print_dry_run(config)
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (logs, config and checkpoints go there)")
  maybe_initialize_distributed()
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))

  run = experiment.build(config)
  logging.info("mesh %s; model %s; LoRA %s; trainable %s", dict(run.mesh.shape), run.cfg, run.lora,
               config.train.trainable)
  datasets = experiment.datasets(config, run.cfg, workdir)
  train_loader = Loader(datasets["train"], config.train.global_batch_size, config.seed,
                                   jax.process_index(), jax.process_count())
  eval_loader = (Loader(datasets["validation"], config.train.global_batch_size,
                                   config.seed, jax.process_index(), jax.process_count())
                 if config.train.eval_every and datasets.get("validation") else None)

  writer = None
  if jax.process_index() == 0:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  peak, peak_source = peak_flops()
  flops_per_token = flops.train_flops_per_token(
      run.cfg, config.train.seq_len, run.lora, lora_lib.STAGES[config.train.trainable])
  logging.info("MFU against %.3g FLOP/s (%s); %.3g model FLOPs per token", peak, peak_source,
               flops_per_token)

  state = run.state
  start = int(state.step)
  window_start, window_tokens = time.perf_counter(), 0
  for step in range(start, config.train.steps):
    batch = shd.host_to_global(train_loader.batch(step), run.batch_sharding)
    state, metrics = run.train_step(state, batch)
    window_tokens += config.train.global_batch_size * config.train.seq_len
    last = step + 1 == config.train.steps
    if (step + 1) % config.train.log_every == 0 or last:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      elapsed = time.perf_counter() - window_start
      tokens_per_s = window_tokens / elapsed
      metrics.update(tokens_per_s=tokens_per_s, mfu=tokens_per_s * flops_per_token / peak)
      print(f"step {step + 1}/{config.train.steps} loss {metrics['loss']:.4f} "
            f"acc {metrics['accuracy']:.3f} lr {metrics['learning_rate']:.2e} "
            f"grad_norm {metrics['grad_norm']:.3f} tokens/s {tokens_per_s:,.0f} "
            f"MFU {100 * metrics['mfu']:.1f}%", flush=True)
      if writer:
        for key, value in metrics.items():
          writer.add_scalar(f"train/{key}", value, step + 1)
      window_start, window_tokens = time.perf_counter(), 0
    if eval_loader and ((step + 1) % config.train.eval_every == 0 or last):
      run.state = state
      result = evaluate(run, eval_loader, config)
      print(f"step {step + 1} eval loss {result['eval_loss']:.4f} "
            f"ppl {result['eval_perplexity']:.2f} acc {result['eval_accuracy']:.3f}", flush=True)
      if writer:
        for key, value in result.items():
          writer.add_scalar(f"eval/{key}", value, step + 1)
      window_start, window_tokens = time.perf_counter(), 0  # keep evaluation out of tokens/s
  run.state = state
  if writer:
    writer.close()
  with open(os.path.join(workdir, "final_metrics.json"), "w", encoding="utf-8") as f:
    json.dump({"step": int(state.step)}, f)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
