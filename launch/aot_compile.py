"""Compiles a config's exact train step for a TPU pod slice on this (CPU) machine and reports
per-chip memory, HBM headroom and model FLOPs; exits 1 when the step does not fit.

  python launch/aot_compile.py --config=configs/pretrain_stage2.py:7b --topology=v5e-16
  python launch/aot_compile.py --config=configs/sft.py:33b --topology=v4-32 --auto_accumulate

Needs libtpu (`pip install -e '.[test]'` or `.[tpu]`); no TPU is used.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cnllama_jax import aot  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<x>.py[:preset]",
                                          lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", "v4-32", "v4-N, v5e-N, v5p-N or v6e-N")
_AUTO = flags.DEFINE_bool("auto_accumulate", False,
                          "double train.micro_batches until the step fits (same global batch)")


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  try:
    if _AUTO.value:
      def attempt(r):
        if not r.fits:
          print(f"micro_batches={r.micro_batches}: " + r.lines()[1], flush=True)
      report = aot.fit_accumulation(config, _TOPOLOGY.value, on_report=attempt)
    else:
      report = aot.compile_report(config, _TOPOLOGY.value)
  except (ValueError, ImportError, RuntimeError) as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    sys.exit(1)
  print("\n".join(report.lines()), flush=True)
  sys.exit(0 if report.fits else 1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
