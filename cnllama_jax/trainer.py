"""The training loop of one stage: `fit(config, workdir)` builds the run, reads the data, steps,
logs (step, loss, tokens/s, MFU) to stdout and TensorBoard and evaluates every N steps.

`launch/train.py` calls it for a single stage; `cnllama_jax.pipeline` calls it once per stage.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np

from cnllama_jax import experiment, flops, lora as lora_lib, sharding as shd
from cnllama_jax.data import Loader


def peak_flops() -> tuple[float, str]:
  """Peak FLOP/s of all devices: the accelerator table, or a measured matmul on CPU."""
  peak = flops.peak_flops_per_device()
  if peak is not None:
    return peak * jax.device_count(), "table"
  return flops.measure_matmul_flops(), "measured fp32 matmul"


def evaluate(run: experiment.Run, loader: Loader, num_batches: int) -> dict:
  """Token-weighted loss, accuracy and perplexity over the first `num_batches` batches."""
  sums = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
  for step in range(min(num_batches, max(loader.steps_per_epoch, 1))):
    out = run.eval_step(run.state, shd.host_to_global(loader.batch(step), run.batch_sharding))
    sums = {k: sums[k] + float(v) for k, v in out.items()}
  tokens = max(sums["tokens"], 1.0)
  loss = sums["loss_sum"] / tokens
  return {"eval_loss": loss, "eval_accuracy": sums["correct"] / tokens,
          "eval_perplexity": float(np.exp(min(loss, 50.0)))}


def _writer(workdir: str):
  if jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


def fit(config, workdir: str, mesh=None, base=None) -> dict:
  """Trains one stage; returns {'run': Run, 'history': [metrics per logged step], 'eval': ...}.

  base: (cfg, params) to start from, e.g. the previous stage's merged model; None loads
  `config.base_model` or initialises randomly.
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  run = experiment.build(config, mesh, base)
  logging.info("mesh %s; model %s; LoRA %s; trainable %s", dict(run.mesh.shape), run.cfg,
               run.lora, config.train.trainable)
  datasets = experiment.datasets(config, run.cfg, workdir)
  hosts = (jax.process_index(), jax.process_count())
  train_loader = Loader(datasets["train"], config.train.global_batch_size, config.seed, *hosts)
  eval_loader = None
  if config.train.eval_every and datasets.get("validation"):
    eval_loader = Loader(datasets["validation"], config.train.global_batch_size, config.seed,
                         *hosts)
  writer = _writer(workdir)
  peak, peak_source = peak_flops()
  flops_per_token = flops.train_flops_per_token(
      run.cfg, config.train.seq_len, run.lora, lora_lib.STAGES[config.train.trainable])
  logging.info("MFU against %.3g FLOP/s (%s); %.3g model FLOPs per token", peak, peak_source,
               flops_per_token)

  state, history, result = run.state, [], {}
  window_start, window_tokens = time.perf_counter(), 0
  for step in range(int(state.step), config.train.steps):
    batch = shd.host_to_global(train_loader.batch(step), run.batch_sharding)
    state, metrics = run.train_step(state, batch)
    window_tokens += config.train.global_batch_size * config.train.seq_len
    last = step + 1 == config.train.steps
    if (step + 1) % config.train.log_every == 0 or last:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      tokens_per_s = window_tokens / (time.perf_counter() - window_start)
      metrics.update(step=step + 1, tokens_per_s=tokens_per_s,
                     mfu=tokens_per_s * flops_per_token / peak)
      history.append(metrics)
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
      result = evaluate(run, eval_loader, config.train.eval_batches)
      print(f"step {step + 1} eval loss {result['eval_loss']:.4f} "
            f"ppl {result['eval_perplexity']:.2f} acc {result['eval_accuracy']:.3f}", flush=True)
      if writer:
        for key, value in result.items():
          writer.add_scalar(f"eval/{key}", value, step + 1)
      window_start, window_tokens = time.perf_counter(), 0  # keep evaluation out of tokens/s
  run.state = state
  if writer:
    writer.close()
  with open(os.path.join(workdir, "metrics.json"), "w", encoding="utf-8") as f:
    json.dump({"history": history, "eval": result}, f, indent=1)
  return {"run": run, "history": history, "eval": result}
