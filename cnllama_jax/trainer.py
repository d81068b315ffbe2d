"""The training loop of one stage: `fit(run, data, workdir, writers)` resumes from the latest
checkpoint in the workdir, steps, reports (step, loss, tokens/s, MFU) through the writers it is
given (tokens/s counts every row slot the step computes, real tokens/s only the non-padding
tokens, segment id > 0, so packed and padded data compare), evaluates every N steps, saves
checkpoints, and returns the final state.

`train(config, workdir)` is the same story as launch/train.py for programs and tests: plan ->
build -> data -> fit. Resuming needs only the step (a batch is a pure function of (seed, step); the
rng is in the state), so a resumed run's losses equal an uninterrupted run's bit for bit on the
same mesh.
"""
from __future__ import annotations

import math
import os
import time

import jax
import numpy as np

from cnllama_jax import build as build_lib, checkpoint, flops, lora as lora_lib, paths
from cnllama_jax import plan as plan_lib, preemption as preemption_lib, processes, run_data
from cnllama_jax import sharding as shd, writers as writers_lib
from cnllama_jax.data import Loader


class DivergedError(RuntimeError):
  """The loss or gradient norm became NaN or infinite; the message names the step."""


def peak_flops() -> tuple[float, str]:
  """Peak FLOP/s of all devices: the accelerator table, or a measured matmul on CPU."""
  peak = flops.peak_flops_per_device()
  if peak is not None:
    return peak * jax.device_count(), "table"
  return flops.measure_matmul_flops(), "measured fp32 matmul"


def evaluate(run: build_lib.Run, state, loader: Loader, num_batches: int) -> dict:
  """Token-weighted loss, accuracy and perplexity over the first `num_batches` batches."""
  sums = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
  for step in range(min(num_batches, max(loader.steps_per_epoch, 1))):
    batch = shd.host_to_global(loader.batch(step), run.plan.batch_shardings)
    out = run.eval_step(run.frozen, state, batch)
    sums = {k: sums[k] + float(v) for k, v in out.items()}
  tokens = max(sums["tokens"], 1.0)
  loss = sums["loss_sum"] / tokens
  return {"eval_loss": loss, "eval_accuracy": sums["correct"] / tokens,
          "eval_perplexity": float(np.exp(min(loss, 50.0)))}


def prepare_workdir(workdir: str, config) -> None:
  """Creates the workdir (local or gs://), proves it is writable (a one-line CheckpointError if
  not; a missing bucket is never created) and writes the run's config.json there (one process)."""
  probe = paths.join(workdir, f".write_test.{jax.process_index()}.{os.getpid()}")
  if not paths.is_local(workdir) and not paths.exists(f"{workdir.split('://')[0]}://"
                                                      f"{paths.bucket_of(workdir)}"):
    raise checkpoint.CheckpointError(str(paths.missing(workdir, "cannot use it as the workdir")))
  try:
    paths.makedirs(workdir)
    paths.write_text(probe, "ok")
    paths.path(probe).unlink()
  except OSError as err:
    raise checkpoint.CheckpointError(f"workdir {workdir} is not writable: "
                                     f"{' '.join(str(err.strerror or err).split())}") from None
  if processes.is_writer():
    paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


def check_paths(config) -> None:
  """Every path the config names exists (checked before anything is built)."""
  named = [("base_model", config.base_model), ("tokenizer", config.tokenizer)]
  if config.data.kind in ("text", "sft"):
    named.append(("data.path", config.data.path))
  for key, value in named:
    for path in [value] if isinstance(value, (str, os.PathLike)) else list(value or ()):
      if path and not paths.exists(path):
        raise FileNotFoundError(f"config.{key}={paths.missing(path)}")


class _FiniteCheck:
  """Loss and gradient norm of the steps since the last check, fetched together (no sync per
  step); raises DivergedError naming the first step whose loss or gradient norm is not finite."""

  def __init__(self, checkpoints: checkpoint.Checkpoints):
    self.pending: list = []
    self.checkpoints = checkpoints

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics["loss"], metrics["grad_norm"]))

  def check(self) -> None:
    values = jax.device_get([(loss, norm) for _, loss, norm in self.pending])
    for (step, _, _), (loss, norm) in zip(self.pending, values):
      if not (math.isfinite(float(loss)) and math.isfinite(float(norm))):
        last = self.checkpoints.last_step
        kept = (f"the last good checkpoint is step {last} in {self.checkpoints.directory}"
                if last is not None else "no checkpoint was saved")
        raise DivergedError(f"training diverged at step {step}: loss {float(loss):.6g}, grad norm "
                            f"{float(norm):.6g}; stopped without saving that state; {kept}")
    self.pending.clear()


def train(config, workdir: str, *, mesh=None, base=None, writers=None) -> dict:
  """One stage from its config: plan -> build -> data -> fit (see launch/train.py).

  base: (cfg, params) to start from, e.g. the previous stage's merged model; None loads
  `config.base_model` or initialises randomly. writers: default `writers.for_run(workdir)`.
  Returns fit's result with the built 'run'.
  """
  check_paths(config)
  prepare_workdir(workdir, config)
  plan = plan_lib.plan(config, mesh, base_cfg=None if base is None else base[0])
  run = build_lib.build(plan, base)
  data = run_data.datasets(plan.data, plan.cfg.vocab_size, workdir)
  writers = writers or writers_lib.for_run(workdir, config.train.steps)
  try:
    return {**fit(run, data, workdir, writers), "run": run}
  finally:
    writers.close()


def fit(run: build_lib.Run, data: dict, workdir: str, writers=None) -> dict:
  """Trains one stage, resuming from `<workdir>/checkpoints` when it holds a checkpoint.

  data: {'train': source, 'validation': source or None} (see run_data.datasets).
  Returns {'state': the final TrainState, 'history': [metrics per logged step, earlier runs'
  included], 'eval': the last evaluation, 'preempted': the step it stopped at after SIGTERM, or
  None}. SIGTERM from the start of the loop on saves and stops.
  """
  writers = writers or writers_lib.Writers()
  with preemption_lib.Preemption() as preemption, checkpoint.opened(
      workdir, run.plan, run.frozen, run.base_source) as checkpoints:
    return _loop(run, data, workdir, writers, checkpoints, preemption)


def _loop(run: build_lib.Run, data: dict, workdir: str, writers,
          checkpoints: checkpoint.Checkpoints, preemption: preemption_lib.Preemption) -> dict:
  config, plan = run.plan.config, run.plan
  state = checkpoints.restore() or run.state
  start = int(state.step)
  history = writers_lib.load_history(workdir, start)
  writers.write_text(f"resuming from checkpoint step {start} in {checkpoints.directory}" if start
                     else f"training from step 0 (no checkpoint in {checkpoints.directory})")
  hosts = (jax.process_index(), jax.process_count())
  train_loader = Loader(data["train"], config.train.global_batch_size, config.seed, *hosts)
  eval_loader = None
  if config.train.eval_every and data.get("validation"):
    eval_loader = Loader(data["validation"], config.train.global_batch_size, config.seed, *hosts)
  peak, peak_source = peak_flops()
  flops_per_token = flops.train_flops_per_token(plan.cfg, config.train.seq_len, plan.lora,
                                                lora_lib.STAGES[plan.stage])
  writers.write_text(f"MFU against peak {peak:.3g} FLOP/s ({peak_source}, {jax.device_count()} "
                     f"devices); {flops_per_token:.4g} model FLOPs per token")

  total, save_every = config.train.steps, config.train.save_every
  finite = _FiniteCheck(checkpoints)
  result, preempted = {}, None
  window_start, window_tokens, window_real = time.perf_counter(), 0, []
  for step in range(start, total):
    batch = shd.host_to_global(train_loader.batch(step), plan.batch_shardings)
    state, metrics = run.train_step(run.frozen, state, batch)
    done = step + 1
    finite.add(done, metrics)
    window_tokens += config.train.global_batch_size * config.train.seq_len
    window_real.append(metrics.pop("real_tokens"))  # on device; fetched at the next log step
    if done % config.train.log_every == 0 or done == total:
      finite.check()
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      seconds = time.perf_counter() - window_start
      real_tokens = float(sum(jax.device_get(window_real)))
      tokens_per_s = window_tokens / seconds
      metrics.update(step=done, tokens_per_s=tokens_per_s, real_tokens_per_s=real_tokens / seconds,
                     real_token_fraction=real_tokens / window_tokens,
                     mfu=tokens_per_s * flops_per_token / peak)
      history.append(metrics)
      writers.write_scalars(done, metrics)
      window_start, window_tokens, window_real = time.perf_counter(), 0, []
    stop = preemption.reached(done)
    if (save_every and done % save_every == 0) or done == total or stop:
      finite.check()  # never save a state that came from a NaN / inf step
      checkpoints.save(done, state)
    if stop:
      checkpoints.wait()
      preempted = done
      writers.write_text(f"preempted: saved checkpoint step {done} in {checkpoints.directory}; "
                         "rerun with the same workdir to resume")
      break
    if eval_loader and (done % config.train.eval_every == 0 or done == total):
      result = evaluate(run, state, eval_loader, config.train.eval_batches)
      writers.write_scalars(done, result)
      # keep evaluation out of tokens/s
      window_start, window_tokens, window_real = time.perf_counter(), 0, []
  checkpoints.wait()
  return {"state": state, "history": history, "eval": result, "preempted": preempted}
