"""Evaluates a Hugging Face LLaMA directory: perplexity on a text file, or C-Eval.

  python launch/evaluate.py perplexity --model DIR --text FILE [--tokenizer FILE] [--block_size 512]
      [--mesh_shape 1,-1,1] [--lora LORA_DIR,...]
  python launch/evaluate.py ceval --model DIR --data CEVAL_DIR --shots 5 --split val --out DIR \
      [--subjects logic,law] [--option_rule context|paper|logits]

The tokenizer defaults to DIR/tokenizer.model (else a byte-level BPE DIR/tokenizer.json). ceval
writes summary.json, submission.json (C-Eval's format) and predictions.jsonl to --out (published
whole: a temp dir renamed into place, or under an _INCOMPLETE marker in a bucket). Every path may
be a gs:// URL. See cnllama_jax/evaluate.py for the windows and cnllama_jax/ceval.py for the
prompt and the scoring.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from cnllama_jax import ceval, ceval_scoring, cli  # noqa: E402
from cnllama_jax import evaluate as ev  # noqa: E402
from cnllama_jax import inference, paths, processes  # noqa: E402
from cnllama_jax.data import text_tokenizer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--model", required=True, help="HF LLaMA directory (config.json + weights)")
  common.add_argument("--tokenizer", default=None, help="SentencePiece .model, byte-level BPE "
                      "tokenizer.json or a directory with one (default: MODEL's)")
  common.add_argument("--batch_size", type=int, default=8)
  common.add_argument("--dtype", default=None, help="param dtype, e.g. bfloat16 (default: float32)")
  common.add_argument("--mesh_shape", "--mesh", dest="mesh", default="1,-1,1",
                      help="data,fsdp,tensor sizes; one may be -1 (all devices); 1,1,1: one device")
  common.add_argument("--lora", default="", help="comma-separated PEFT LoRA directories merged "
                      "into --model in order")

  ppl = sub.add_parser("perplexity", parents=[common], help="perplexity of a text file")
  ppl.add_argument("--text", required=True, help="UTF-8 text, one document per line")
  ppl.add_argument("--block_size", type=int, default=512, help="non-overlapping window length")

  cev = sub.add_parser("ceval", parents=[common], help="C-Eval multiple choice")
  cev.add_argument("--data", required=True, help="C-Eval directory with dev/, val/, test/")
  cev.add_argument("--shots", type=int, default=5, help="dev questions in the prompt (0 or 5)")
  cev.add_argument("--split", choices=["val", "test"], default="val")
  cev.add_argument("--out", required=True, help="output directory (local or gs://), published "
                   "whole when scoring is done")
  cev.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  cev.add_argument("--subjects", default=None, help="comma-separated subset (default: all found)")
  cev.add_argument("--max_length", type=int, default=None,
                     help="prompt token limit (default: the model's max_position_embeddings)")
  cev.add_argument("--option_rule", choices=ceval.OPTION_RULES, default="context")
  cev.add_argument("--header_subject", choices=["zh", "key"], default="zh",
                     help="subject in the header: Chinese name, or the English key as the scripts")
  cev.add_argument("--zero_shot_header", action="store_true",
                     help="also put the header in front of zero-shot prompts")
  return parser


def _tokenizer(args):
  return text_tokenizer.load(args.tokenizer or args.model)  # a .model / tokenizer.json / a dir


def _load_model(args, tokenizer):
  """(cfg, params, mesh) on the --mesh_shape mesh."""
  if not paths.isfile(paths.join(args.model, "config.json")):
    raise FileNotFoundError(f"{args.model}: not a Hugging Face model directory (no config.json)")
  try:
    sizes = inference.parse_mesh_shape(args.mesh)
  except ValueError:
    raise ValueError(f"--mesh_shape {args.mesh}: expected three integers, e.g. 1,-1,1") from None
  mesh = inference.build_mesh(sizes)
  print(f"process {jax.process_index()}/{jax.process_count()}: mesh "
        f"{dict(mesh.shape)} over {mesh.size} devices", file=sys.stderr, flush=True)
  cfg, _, params = inference.load_model(args.model, loras=[p for p in args.lora.split(",") if p],
                                        mesh=mesh, dtype=args.dtype)
  if tokenizer.vocab_size() > cfg.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size()} pieces but the model's vocabulary "
                     f"is {cfg.vocab_size}: use the tokenizer the model was trained with")
  if tokenizer.vocab_size() < cfg.vocab_size:
    logging.warning("tokenizer has %d pieces, the model %d", tokenizer.vocab_size(),
                    cfg.vocab_size)
  return cfg, params, mesh


def _pct(group: dict, key: str = "accuracy") -> str:
  return "-" if group.get(key) is None else f"{100 * group[key]:.1f}"


def _print_ceval(summary: dict) -> None:
  for name, s in summary["subjects"].items():
    print(f"{name:42s} {s['num']:5d} {_pct(s)}")
  for name, g in [*summary["categories"].items(), ("Average", summary["average"])]:
    print(f"{name:42s} {g['num']:5d} {_pct(g)} (by question {_pct(g, 'accuracy_by_question')})")


def run(args: argparse.Namespace) -> None:
  processes.initialize_distributed()  # every host of a slice runs this same command
  if args.batch_size < 1:
    raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
  if not paths.isdir(args.model):
    raise FileNotFoundError(f"{args.model}: model directory not found")
  if args.command == "perplexity":
    if not paths.isfile(args.text):
      raise FileNotFoundError(f"{args.text}: text file not found")
    tokenizer = _tokenizer(args)
    cfg, params, mesh = _load_model(args, tokenizer)
    print(json.dumps(ev.perplexity(cfg, params, tokenizer, args.text, block_size=args.block_size,
                                   batch_size=args.batch_size,
                                   mesh=None if mesh.size == 1 else mesh)))
    return
  if not args.overwrite and paths.exists(args.out) and (
      not paths.isdir(args.out) or paths.listdir(args.out)):  # checked before scoring
    raise FileExistsError(f"{args.out}: already exists and is not empty; choose a new --out or "
                          "pass --overwrite")
  subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
  data = ceval.load_ceval(args.data, args.split, args.shots, subjects)  # all files checked first
  tokenizer = _tokenizer(args)
  cfg, params, mesh = _load_model(args, tokenizer)
  scorer = ceval_scoring.model_scorer(cfg, params, mesh=None if mesh.size == 1 else mesh)
  result = ceval.evaluate_ceval(
      scorer, tokenizer, data, split=args.split, shots=args.shots,
      max_length=args.max_length or cfg.max_position_embeddings, batch_size=args.batch_size,
      option_rule=args.option_rule, header_subject=args.header_subject,
      zero_shot_header=args.zero_shot_header)
  if jax.process_index() != 0:  # every process scored; one writes
    return
  written = ceval.write_ceval(args.out, result, overwrite=args.overwrite)
  _print_ceval(result.summary)
  print(f"prompts: {result.summary['prompts']}")
  print("wrote " + ", ".join(str(p) for p in written.values()))


def main(argv: list[str] | None = None) -> int:
  return cli.run_reporting_errors(run, build_parser().parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
