"""Compiles generation (prefill + one decode step) of a model for a TPU slice on this CPU machine
and reports per-chip memory; exits 1 when it does not fit.

  python launch/aot_inference.py --model=7b --topology=v5e-16 --batch=16 --context=2048
  python launch/aot_inference.py --model=33b --topology=v4-32 --mesh_shape=1,-1,1

Needs libtpu (`pip install -e '.[test]'` or `.[tpu]`); no TPU is used. See cnllama_jax/aot_inference.py.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnllama_jax import cli  # noqa: E402
from cnllama_jax.inference import parse_mesh_shape  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="7b", help="config preset: 7b, 13b, 33b, llama2-7b, ...")
  parser.add_argument("--topology", default="v5e-16", help="v4-N, v5e-N, v5p-N or v6e-N")
  parser.add_argument("--batch", type=int, default=16, help="rows decoded together")
  parser.add_argument("--context", type=int, default=2048, help="KV cache slots per row")
  parser.add_argument("--mesh_shape", default="1,-1,1", help="data,fsdp,tensor; one may be -1")
  parser.add_argument("--dtype", default="bfloat16", help="param and compute dtype")
  return parser


def run(args) -> None:
  from cnllama_jax import aot_inference  # pylint: disable=import-outside-toplevel
  report = aot_inference.compile_inference(
      args.model, args.topology, batch=args.batch, context=args.context,
      mesh_shape=parse_mesh_shape(args.mesh_shape), dtype=args.dtype)
  print("\n".join(report.lines()), flush=True)
  if not report.fits:
    raise RuntimeError(f"{args.model} does not fit on {args.topology} at batch {args.batch}, "
                       f"context {args.context}")


def main(argv=None) -> int:
  return cli.run_reporting_errors(run, build_parser().parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
