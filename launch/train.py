"""Trains a stage of the paper: `python launch/train.py --config=configs/<x>.py[:preset]
--config.a.b=value --workdir=DIR`.

The story of a run, top to bottom in `_main`: config -> plan (abstract: model after the tokenizer
resize, LoRA, trainable mask, shardings; cnllama_jax.plan) -> dry run (`--config.dry_run=True`
reports sizes, allocating nothing) -> build (base import or random init, vocabulary resize,
adapters, state on the mesh) -> data -> writers (console progress, TensorBoard and metrics.jsonl
in the workdir) -> fit (steps, evaluation every `train.eval_every` steps, checkpoints) -> summary.

Rerunning with the same --workdir resumes from its latest complete checkpoint; SIGTERM saves and
exits 0. A known problem (bad config or flag, missing path, unwritable workdir, diverged loss, a
checkpoint of another base) prints one line `error: ...` to stderr and exits 1 (the traceback is
logged at --verbosity=1).
"""
from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnllama_jax import build, checkpoint, cli, paths, pipeline, plan as plan_lib  # noqa: E402
from cnllama_jax import processes, run_data, trainer, writers as writers_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config: configs/<x>.py[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for logs, config and checkpoints.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show third-party INFO logs (absl, Orbax, tfds, "
                             "JAX) and tfds progress bars; the demo prints every stage's log.")


def configure_logging(verbose: bool) -> None:
  """Third-party INFO logs and tfds' progress bars off unless --verbose (warnings still show)."""
  if verbose:
    return
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # absl, and through it Orbax and tfds
  for name in ("jax", "orbax", "tensorflow_datasets", "absl"):
    std_logging.getLogger(name).setLevel(std_logging.WARNING)
  tfds.disable_progress_bar()


def print_dry_run(plan: plan_lib.Plan) -> None:
  report = plan_lib.dry_run(plan)
  print(f"params: total={report['total']} trainable={report['trainable']} "
        f"({report['percent']:.2f}%)")
  print(f"bytes per device ({report['devices']} devices): params="
        f"{report['param_bytes_per_device'] / 2**30:.2f} GiB optimizer="
        f"{report['opt_bytes_per_device'] / 2**30:.2f} GiB")


# Problems with the input or the environment: reported in one line, exit 1, no traceback.
KNOWN_ERRORS = (checkpoint.CheckpointError, trainer.DivergedError, ValueError, OSError, KeyError)


def _config_file_error(err: BaseException) -> BaseException | None:
  """What a config file's get_config() raised (e.g. an unknown preset), or None. ml_collections
  re-raises it as "Error whilst parsing config file:" + its whole traceback, and absl wraps that
  in "flag --config=...: ..."; the original is the wrapper's __context__."""
  wrapper = err.__context__
  if wrapper is not None and str(wrapper).startswith("Error whilst parsing config file"):
    return wrapper.__context__
  return None


def parse_flags(argv):
  """absl flag parsing with an unknown `--config.a.b` key reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    cli.fail(cli.one_line(_config_file_error(err) or err))
  except (KeyError, AttributeError) as err:  # ml_collections: an override of a missing field
    cause = err
    while isinstance(cause.__context__, (KeyError, AttributeError)):
      cause = cause.__context__
    hint = ""
    for candidate in (err.__context__, err):
      if isinstance(candidate, KeyError) and "Did you mean" in str(candidate.args[0]):
        hint = " (" + str(candidate.args[0]).split("\n", 1)[-1].strip() + ")"
    key = str(cause.args[0]).strip("'\"") if cause.args else "?"
    flagged = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.") and
               key in a.split("=", 1)[0].split(".")]
    cli.fail(f"unknown config key {key!r}" + (f" in {flagged[0]}" if flagged else "") + hint)


def _quiet_closed_loop_hook(previous):
  """sys.unraisablehook that drops 'Event loop is closed': after a failed async save (a full
  disk), TensorStore callbacks of Orbax's other in-flight writes land on a finished event loop and
  print that traceback; the failure itself is reported as one `error:` line."""
  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(
        unraisable.exc_value) == "Event loop is closed":
      logging.debug("ignored after a failed save: %s", unraisable.exc_value)
      return
    previous(unraisable)
  return hook


def main(argv) -> None:
  configure_logging(_VERBOSE.value)
  checkpoint.one_line_orbax_errors()
  sys.unraisablehook = _quiet_closed_loop_hook(sys.unraisablehook)
  try:
    _main(argv)
  except KNOWN_ERRORS as err:
    logging.debug("traceback of the error below", exc_info=True)
    cli.fail(cli.one_line(err))


def print_summary(result: dict) -> None:
  """The last logged step and evaluation (all of them are in <workdir>/metrics.json)."""
  if result["history"]:
    last = result["history"][-1]
    print(f"finished at step {last['step']}: loss {last['loss']:.4f}", flush=True)
  if result["eval"]:
    print(f"eval loss {result['eval']['eval_loss']:.4f} "
          f"ppl {result['eval']['eval_perplexity']:.2f}", flush=True)


def _main(argv) -> None:
  del argv
  config = _CONFIG.value
  if "pipeline" in config:  # configs/demo.py: every stage of the paper in one run
    workdir = _require_workdir()
    processes.initialize_distributed()
    processes.tag_logs_with_process()
    pipeline.run(config, workdir, verbose=_VERBOSE.value)
    return
  workdir = "" if config.dry_run else _require_workdir()
  trainer.check_paths(config)
  if not config.dry_run:
    processes.initialize_distributed()
    processes.tag_logs_with_process()
  plan = plan_lib.plan(config)  # abstract: nothing allocated yet
  if config.dry_run:
    print_dry_run(plan)
    return
  trainer.prepare_workdir(workdir, config)  # writable, and config.json written
  logging.info("mesh %s; model %s; LoRA %s; trainable %s", dict(plan.mesh.shape), plan.cfg,
               plan.lora, plan.stage)
  run = build.build(plan)
  data = run_data.datasets(plan.data, plan.cfg.vocab_size, workdir)
  writers = writers_lib.for_run(workdir, config.train.steps)
  try:
    result = trainer.fit(run, data, workdir, writers)
  finally:
    writers.close()
  print_summary(result)


def _require_workdir() -> str:
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (logs, config and checkpoints go there)")
  return _WORKDIR.value


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=parse_flags)
