"""Trains a stage of the paper: `python launch/train.py --config=configs/<x>.py[:preset]
--config.a.b=value --workdir=DIR`.

The story of a run (cnllama_jax.trainer.fit): mesh -> base model (HF import or random init) ->
vocabulary resized to the tokenizer -> LoRA adapters -> frozen/trainable split -> sharded state ->
data -> steps, logging loss, tokens/s and MFU, TensorBoard scalars in the workdir, evaluation every
`train.eval_every` steps. `--config.dry_run=True` only reports sizes, allocating nothing.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from cnllama_jax import experiment, pipeline, trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config: configs/<x>.py[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for logs, config and checkpoints.")


def maybe_initialize_distributed() -> None:
  """Joins the other hosts when launched on several (a coordinator address or a TPU pod slice)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()


def print_dry_run(config) -> None:
  report = experiment.dry_run(config)
  print(f"params: total={report['total']} trainable={report['trainable']} "
        f"({report['percent']:.2f}%)")
  print(f"bytes per device ({report['devices']} devices): params="
        f"{report['param_bytes_per_device'] / 2**30:.2f} GiB optimizer="
        f"{report['opt_bytes_per_device'] / 2**30:.2f} GiB")


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  if config.dry_run and "pipeline" not in config:
    print_dry_run(config)
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (logs, config and checkpoints go there)")
  maybe_initialize_distributed()
  if "pipeline" in config:  # configs/demo.py: every stage of the paper in one run
    pipeline.run(config, _WORKDIR.value)
  else:
    trainer.fit(config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
