"""The training loop of one stage: `fit(config, workdir)` builds the run, resumes from the latest
checkpoint in the workdir, reads the data, steps, logs (step, loss, tokens/s, MFU) to stdout,
TensorBoard and `metrics.jsonl`, evaluates every N steps and saves checkpoints.

`launch/train.py` calls it for a single stage; `cnllama_jax.pipeline` calls it once per stage.
Resuming needs only the step (a batch is a pure function of (seed, step); the rng is in the state),
so a resumed run's losses equal an uninterrupted run's bit for bit on the same mesh.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time

import jax
import numpy as np

from cnllama_jax import checkpoint, experiment, flops, lora as lora_lib, paths
from cnllama_jax import preemption as preemption_lib, sharding as shd
from cnllama_jax.data import Loader

HISTORY = "metrics.jsonl"  # one JSON object per logged step, rewritten on resume


class DivergedError(RuntimeError):
  """The loss or gradient norm became NaN or infinite; the message names the step."""


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


class _TensorBoard:
  """tensorboardX events in <workdir>/tensorboard. On a bucket the events are written to a local
  temp dir and copied up on flush (at most every `sync_seconds`) and on close: tensorboardX's own
  gs:// writer needs google-cloud-storage, and an object cannot be appended to."""

  def __init__(self, workdir: str, sync_seconds: float = 60.0):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self.remote = paths.join(workdir, "tensorboard")
    self.local = self.remote if paths.is_local(self.remote) else tempfile.mkdtemp(
        prefix="cnllama-tensorboard-")
    self.writer = SummaryWriter(self.local)
    self.sync_seconds, self._synced = sync_seconds, time.monotonic()

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self.writer.add_scalar(tag, value, step)

  def flush(self, force: bool = False) -> None:
    if self.local == self.remote:
      return
    if force or time.monotonic() - self._synced >= self.sync_seconds:
      self.writer.flush()
      paths.copy_tree(self.local, self.remote)
      self._synced = time.monotonic()

  def close(self) -> None:
    self.writer.close()
    self.flush(force=True)


def _writer(workdir: str):
  return _TensorBoard(workdir) if paths.is_writer() else None


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir (local or gs://) and proves it is writable (a one-line CheckpointError
  if not; a missing bucket is never created)."""
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


def check_paths(config) -> None:
  """Every path the config names exists (checked before anything is built)."""
  named = [("base_model", config.base_model), ("tokenizer", config.tokenizer)]
  if config.data.kind in ("text", "sft"):
    named.append(("data.path", config.data.path))
  for key, value in named:
    for path in [value] if isinstance(value, (str, os.PathLike)) else list(value or ()):
      if path and not paths.exists(path):
        raise FileNotFoundError(f"config.{key}={paths.missing(path)}")


def load_history(workdir: str, up_to_step: int) -> list[dict]:
  """The logged metrics of steps <= up_to_step (a resumed run drops the lines of lost steps)."""
  path = paths.join(workdir, HISTORY)
  if not paths.exists(path):
    return []
  rows = [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]
  return [r for r in rows if r.get("step", 0) <= up_to_step]


def _write_history(workdir: str, rows: list[dict]) -> None:
  """Rewrites metrics.jsonl whole (objects cannot be appended to; the file is small)."""
  if paths.is_writer():
    paths.write_text(paths.join(workdir, HISTORY), "".join(json.dumps(r) + "\n" for r in rows))


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


def fit(config, workdir: str, mesh=None, base=None) -> dict:
  """Trains one stage, resuming from `<workdir>/checkpoints` when it holds a checkpoint.

  Returns {'run': Run, 'history': [metrics per logged step, earlier runs' included], 'eval': ...,
  'preempted': the step it stopped at after SIGTERM, or None}.
  base: (cfg, params) to start from, e.g. the previous stage's merged model (see
  experiment.build); None loads `config.base_model` or initialises randomly.
  """
  with preemption_lib.Preemption() as preemption:  # SIGTERM from here on saves and stops
    check_paths(config)
    prepare_workdir(workdir)
    if paths.is_writer():
      paths.write_text(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    run = experiment.build(config, mesh, base)
    logging.info("mesh %s; model %s; LoRA %s; trainable %s", dict(run.mesh.shape), run.cfg,
                 run.lora, config.train.trainable)
    with checkpoint.opened(workdir, config, run,
                           checkpoint.base_source(config, base is not None)) as checkpoints:
      return _train(config, workdir, run, checkpoints, preemption)


def _train(config, workdir: str, run: experiment.Run, checkpoints: checkpoint.Checkpoints,
           preemption: preemption_lib.Preemption) -> dict:
  state = run.state = checkpoints.restore() or run.state  # drops the fresh state when resuming
  start = int(state.step)
  history = load_history(workdir, start)
  _write_history(workdir, history)
  if jax.process_index() == 0:
    print(f"resuming from checkpoint step {start} in {checkpoints.directory}" if start else
          f"training from step 0 (no checkpoint in {checkpoints.directory})", flush=True)
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

  total, save_every = config.train.steps, config.train.save_every
  finite = _FiniteCheck(checkpoints)
  result, preempted = {}, None
  window_start, window_tokens = time.perf_counter(), 0
  try:
    for step in range(start, total):
      batch = shd.host_to_global(train_loader.batch(step), run.batch_sharding)
      state, metrics = run.train_step(state, batch)
      done = step + 1
      finite.add(done, metrics)
      window_tokens += config.train.global_batch_size * config.train.seq_len
      if done % config.train.log_every == 0 or done == total:
        finite.check()
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        tokens_per_s = window_tokens / (time.perf_counter() - window_start)
        metrics.update(step=done, tokens_per_s=tokens_per_s,
                       mfu=tokens_per_s * flops_per_token / peak)
        history.append(metrics)
        _write_history(workdir, history)
        print(f"step {done}/{total} loss {metrics['loss']:.4f} "
              f"acc {metrics['accuracy']:.3f} lr {metrics['learning_rate']:.2e} "
              f"grad_norm {metrics['grad_norm']:.3f} tokens/s {tokens_per_s:,.0f} "
              f"MFU {100 * metrics['mfu']:.1f}%", flush=True)
        if writer:
          for key, value in metrics.items():
            writer.add_scalar(f"train/{key}", value, done)
          writer.flush()
        window_start, window_tokens = time.perf_counter(), 0
      stop = preemption.reached(done)
      if (save_every and done % save_every == 0) or done == total or stop:
        finite.check()  # never save a state that came from a NaN / inf step
        checkpoints.save(done, state)
      if stop:
        checkpoints.wait()
        preempted = done
        if jax.process_index() == 0:
          print(f"preempted: saved checkpoint step {done} in {checkpoints.directory}; rerun with "
                f"the same workdir to resume", flush=True)
        break
      if eval_loader and (done % config.train.eval_every == 0 or done == total):
        run.state = state
        result = evaluate(run, eval_loader, config.train.eval_batches)
        print(f"step {done} eval loss {result['eval_loss']:.4f} "
              f"ppl {result['eval_perplexity']:.2f} acc {result['eval_accuracy']:.3f}", flush=True)
        if writer:
          for key, value in result.items():
            writer.add_scalar(f"eval/{key}", value, done)
        window_start, window_tokens = time.perf_counter(), 0  # keep evaluation out of tokens/s
    checkpoints.wait()
  finally:
    if writer:
      writer.close()
  run.state = state
  if paths.is_writer():
    paths.write_text(paths.join(workdir, "metrics.json"),
                     json.dumps({"history": history, "eval": result}, indent=1))
  return {"run": run, "history": history, "eval": result, "preempted": preempted}
