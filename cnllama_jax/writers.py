"""Where a training loop reports: writers injected by `launch/` (the loop itself writes nothing).

A writer has `write_scalars(step, scalars)` (a logged train step has `loss`; an evaluation has
`eval_loss`), `write_text(line)` for events (resumed, preempted) and `close()`. Implementations:
the console (a tqdm bar per stage and a line per log step or evaluation), TensorBoard
(tensorboardX) and a JSON-lines metrics history. Shared files are written by process 0 only:
`for_run` gives the other processes the console writer alone.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from typing import Protocol

from cnllama_jax import paths, processes

HISTORY = "metrics.jsonl"  # one JSON object per logged step, rewritten on resume


class Writer(Protocol):
  def write_scalars(self, step: int, scalars: dict[str, float]) -> None: ...
  def write_text(self, line: str) -> None: ...
  def close(self) -> None: ...


class Writers:
  """Several writers as one."""

  def __init__(self, writers=()):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_text(self, line: str) -> None:
    for w in self.writers:
      w.write_text(line)

  def close(self) -> None:
    for w in self.writers:
      w.close()


class ConsoleWriter:
  """A progress bar over the stage's steps (step, loss, tokens/s) on stderr, and one line per
  logged step or evaluation on stdout (`step 5/20 loss ...`, `step 20 eval loss ...`; prefixed
  with `process i/n: ` when the run spans several processes). `tokens/s` counts every row slot
  computed, `real` only the non-padding tokens (segment id > 0)."""

  def __init__(self, total_steps: int, description: str = "train", progress: bool = True):
    self.total, self.description, self.progress = total_steps, description, progress
    self.bar = None
    import jax  # pylint: disable=import-outside-toplevel
    self.tag = processes.process_tag() if jax.process_count() > 1 else ""  # 'process 1/8: step ...'

  def _bar(self):
    if self.bar is None and self.progress:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self.bar = tqdm(total=self.total, desc=self.description, dynamic_ncols=True, leave=False)
    return self.bar

  def _print(self, line: str) -> None:
    if self.tag:
      line = f"{self.tag}: {line}"
    if self.bar is not None:
      self.bar.write(line)
    else:
      print(line, flush=True)

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if "loss" in scalars:
      s = scalars
      line = (f"step {step}/{self.total} loss {s['loss']:.4f} acc {s['accuracy']:.3f} "
              f"lr {s['learning_rate']:.2e} grad_norm {s['grad_norm']:.3f} "
              f"tokens/s {s['tokens_per_s']:,.0f} real {s['real_tokens_per_s']:,.0f} "
              f"MFU {100 * s['mfu']:.1f}%")
      bar = self._bar()
      if bar is not None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{s['loss']:.4f}", tokens_per_s=f"{s['tokens_per_s']:,.0f}",
                        real_tokens_per_s=f"{s['real_tokens_per_s']:,.0f}")
      self._print(line)
    if "eval_loss" in scalars:
      s = scalars
      self._print(f"step {step} eval loss {s['eval_loss']:.4f} ppl {s['eval_perplexity']:.2f} "
                  f"acc {s['eval_accuracy']:.3f}")

  def write_text(self, line: str) -> None:
    self._print(line)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None


class TensorBoardWriter:
  """Scalars under `train/<name>` and `eval/<name>` in `<workdir>/tensorboard`. On a bucket the
  events are written to a local temp dir and copied up after each write (at most every
  `sync_seconds`) and on close: tensorboardX's own gs:// writer needs google-cloud-storage, and an
  object cannot be appended to."""

  def __init__(self, workdir: str, sync_seconds: float = 60.0):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self.remote = paths.join(workdir, "tensorboard")
    self.local = self.remote if paths.is_local(self.remote) else tempfile.mkdtemp(
        prefix="cnllama-tensorboard-")
    self.writer = SummaryWriter(self.local)
    self.sync_seconds, self._synced = sync_seconds, time.monotonic()

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    for key, value in scalars.items():
      self.writer.add_scalar(f"eval/{key}" if key.startswith("eval_") else f"train/{key}", value,
                             step)
    self._sync()

  def _sync(self, force: bool = False) -> None:
    if self.local == self.remote:
      return
    if force or time.monotonic() - self._synced >= self.sync_seconds:
      self.writer.flush()
      paths.copy_tree(self.local, self.remote)
      self._synced = time.monotonic()

  def write_text(self, line: str) -> None:
    del line

  def close(self) -> None:
    self.writer.close()
    self._sync(force=True)
    if self.local != self.remote:  # everything is in the bucket now; the local copy goes
      shutil.rmtree(self.local, ignore_errors=True)


class JsonlWriter:
  """The metrics history: `<workdir>/metrics.jsonl`, one JSON object per logged train step, and on
  close `<workdir>/metrics.json` ({'history': those rows, 'eval': the last evaluation}).

  The first write of a run drops the lines of that step and later ones: a resumed run rewrites
  the steps lost with the checkpoints after the one it resumed from. The file is rewritten whole
  on each write (an object in a bucket cannot be appended to; the file is small)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.rows: list[dict] | None = None
    self.eval: dict = {}

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if "loss" not in scalars:
      self.eval = {k: v for k, v in scalars.items() if k.startswith("eval_")} or self.eval
      return
    if self.rows is None:
      self.rows = load_history(self.workdir, step - 1)
    self.rows.append({**scalars, "step": step})
    paths.write_text(paths.join(self.workdir, HISTORY),
                     "".join(json.dumps(r) + "\n" for r in self.rows))

  def write_text(self, line: str) -> None:
    del line

  def close(self) -> None:
    rows = load_history(self.workdir) if self.rows is None else self.rows
    paths.write_text(paths.join(self.workdir, "metrics.json"),
                     json.dumps({"history": rows, "eval": self.eval}, indent=1))


def load_history(workdir: str, up_to_step: int | None = None) -> list[dict]:
  """The logged train metrics in `<workdir>/metrics.jsonl` (of steps <= up_to_step if given)."""
  path = paths.join(workdir, HISTORY)
  if not paths.exists(path):
    return []
  rows = [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]
  return [r for r in rows if up_to_step is None or r.get("step", 0) <= up_to_step]


def for_run(workdir: str, total_steps: int, description: str = "train",
            progress: bool = True) -> Writers:
  """The console on every process; on the writing process (0) also TensorBoard and
  metrics.jsonl (local or gs://)."""
  writers = [ConsoleWriter(total_steps, description, progress)]
  if processes.is_writer():
    writers += [TensorBoardWriter(workdir), JsonlWriter(workdir)]
  return Writers(writers)
