"""Merges LoRAs into a base model and exports it (HF safetensors, PEFT adapters or Meta .pth).

  # The paper's Chinese-Alpaca-Plus: LLaMA + Chinese-LLaMA-Plus LoRA + Chinese-Alpaca-Plus LoRA.
  python launch/convert.py merge --base llama-7b-hf --lora chinese-llama-plus-lora-7b \\
      --lora chinese-alpaca-plus-lora-7b --out alpaca-plus-7b [--format hf|meta] [--dtype float16]
  # Re-export: a base (+ LoRAs merged) as HF or Meta, or one LoRA as a current-PEFT adapter.
  python launch/convert.py export --format meta --checkpoint merged-hf-dir --out meta-dir
  python launch/convert.py export --format peft --checkpoint llama-7b-hf --lora old-lora --out new
  # A training run's newest checkpoint (launch/train.py --workdir): LoRA folded in, or as PEFT.
  python launch/convert.py export --format hf --workdir /tmp/run --out run-hf

LoRAs merge in the order given; the last one's embedding/head (and, unless --tokenizer is given,
the last tokenizer found among the LoRAs, else the base's) win. Every export carries its tokenizer
(tokenizer.model + the HF files, of the exported vocabulary size): a --workdir export the run's
(config.tokenizer, else its base model's), a PEFT export also the base's path in adapter_config.json. Bad input ends with one line
`error: ...` and exit status 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnllama_jax import (  # noqa: E402
    adapters, checkpoint, cli, export, export_meta, hf, lora as lora_lib, paths)

FORMATS = ("hf", "meta", "peft")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  merge = sub.add_parser("merge", help="merge LoRAs (in order) into a HF base and export it")
  merge.add_argument("--base", required=True, help="HF LLaMA directory")
  merge.add_argument("--lora", action="append", required=True, help="PEFT LoRA directory (repeat)")
  merge.add_argument("--format", choices=FORMATS[:2], default="hf")
  conv = sub.add_parser("export", help="export a HF checkpoint (+ LoRAs) as hf, peft or meta")
  source = conv.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint", help="HF LLaMA directory (the base)")
  source.add_argument("--workdir", help="a launch/train.py workdir: its newest checkpoint")
  conv.add_argument("--lora", action="append", default=[],
                    help="PEFT LoRA directory (repeat); merged for hf/meta, exactly one for peft")
  conv.add_argument("--format", choices=FORMATS, required=True)
  for p in (merge, conv):
    p.add_argument("--out", required=True, help="new output directory")
    p.add_argument("--dtype", choices=sorted(export.DTYPES), default="float16",
                   help="dtype of the written hf/meta weights (the paper's releases: float16)")
    p.add_argument("--load_dtype", choices=sorted(export.DTYPES), default="float32",
                   help="dtype the base is loaded and merged in")
    p.add_argument("--tokenizer", default=None, help="directory (or .model) of tokenizer files")
    p.add_argument("--num_shards", type=int, default=None,
                   help="meta: model-parallel files (default by size: 7B 1, 13B 2, 33B 4, 65B 8)")
    p.add_argument("--max_shard_bytes", type=int, default=5 * 10**9, help="hf: bytes per file")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  return parser


def _tokenizer_dir(args) -> str | None:
  if args.tokenizer:
    return args.tokenizer
  for directory in [*reversed(args.lora), args.base]:
    if any(paths.isfile(paths.join(directory, n)) for n in export.TOKENIZER_FILES):
      return directory
  return None


def _from_workdir(workdir: str):
  """(cfg, params with adapters, LoraConfig, trained whole modules, the run's config) of a run's
  newest checkpoint, restored into the plan of the config.json the run saved (its base model and tokenizer paths
  must resolve); no optimizer or train step is built."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from cnllama_jax import build, plan as plan_lib  # pylint: disable=import-outside-toplevel
  path = paths.join(workdir, "config.json")
  if not paths.isfile(path):
    raise FileNotFoundError(f"--workdir {workdir}: no config.json; expected a launch/train.py "
                            "workdir")
  config = ml_collections.ConfigDict(json.loads(paths.read_text(path)))
  plan = plan_lib.plan(config)
  frozen, _ = lora_lib.split(build.load_params(plan), plan.trainable_mask)
  checkpoints = checkpoint.Checkpoints(workdir, plan, frozen, checkpoint.base_source(config, False),
                                       async_save=False)
  try:
    state = checkpoints.restore()
  finally:
    checkpoints.close()
  if state is None:
    raise FileNotFoundError(f"--workdir {workdir}: no checkpoint in {checkpoints.directory}")
  modules = tuple(n for n in ("embed_tokens", "lm_head") if n in state.trainable)
  return plan.cfg, lora_lib.combine(frozen, state.trainable), plan.lora, modules, config


def run_tokenizer(config) -> str | None:
  """The tokenizer a run trained with: config.tokenizer, else its base model's tokenizer files
  (None when neither has one: a random-init run on synthetic data)."""
  for source in (config.tokenizer, config.base_model):
    if source and export.tokenizer_files(source):
      return source
  return None


def _export_workdir(args) -> str:
  if args.lora:
    raise ValueError("--workdir exports the run's own adapters; --lora is for --checkpoint")
  cfg, params, lora, modules, config = _from_workdir(args.workdir)
  tokenizer = args.tokenizer or run_tokenizer(config)
  if tokenizer is None:
    logging.warning("the run names no tokenizer (config.tokenizer, config.base_model): the export "
                    "has none; pass --tokenizer to add one")
  if args.format == "peft":
    return adapters.save_peft(cfg, params, lora, args.out, modules_to_save=modules,
                              base_model_name_or_path=config.base_model or None,
                              tokenizer_dir=tokenizer, overwrite=args.overwrite)
  if args.format == "meta":
    return export_meta.save_meta(cfg, params, args.out, num_shards=args.num_shards,
                                 dtype=args.dtype, lora=lora, tokenizer_dir=tokenizer,
                                 overwrite=args.overwrite)
  return export.save_hf(cfg, params, args.out, dtype=args.dtype, lora=lora,
                        tokenizer_dir=tokenizer, max_shard_bytes=args.max_shard_bytes,
                        overwrite=args.overwrite)


def run(args) -> str:
  if args.command == "export" and args.workdir:
    return _export_workdir(args)
  if args.command == "export":
    args.base = args.checkpoint
  for flag, path in [("--base/--checkpoint", args.base)] + [("--lora", p) for p in args.lora]:
    if not paths.isdir(path):
      raise FileNotFoundError(f"{flag} {paths.missing(path, 'no such directory')}")
  if args.format == "peft" and len(args.lora) != 1:
    raise ValueError(f"--format peft exports one LoRA; got {len(args.lora)} --lora")
  cfg, params = hf.load_hf(args.base, dtype=args.load_dtype)
  tokenizer = _tokenizer_dir(args)
  if args.format == "peft":
    lora, tree, modules = adapters.load_peft(args.lora[0])
    cfg, params = adapters.apply_modules(cfg, params, modules, args.lora[0])
    own = args.tokenizer or (args.lora[0] if export.tokenizer_files(args.lora[0]) else None)
    return adapters.save_peft(cfg, lora_lib.combine(params, tree), lora, args.out,
                              modules_to_save=tuple(modules), base_model_name_or_path=args.base,
                              tokenizer_dir=own, overwrite=args.overwrite)
  cfg, params = adapters.merge_loras(cfg, params, args.lora)
  if args.format == "meta":
    return export_meta.save_meta(cfg, params, args.out, num_shards=args.num_shards,
                                 dtype=args.dtype, tokenizer_dir=tokenizer,
                                 overwrite=args.overwrite)
  return export.save_hf(cfg, params, args.out, dtype=args.dtype, tokenizer_dir=tokenizer,
                        max_shard_bytes=args.max_shard_bytes, overwrite=args.overwrite)


def main(argv=None) -> int:
  return cli.run_reporting_errors(lambda args: print(f"wrote {run(args)}"),
                                  build_parser().parse_args(argv),
                                  (ValueError, OSError, checkpoint.CheckpointError))


if __name__ == "__main__":
  sys.exit(main())
