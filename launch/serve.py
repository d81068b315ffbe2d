"""Serves a Hugging Face LLaMA / Alpaca directory over an OpenAI-compatible HTTP API.

  python launch/serve.py --model=DIR [--lora=PLUS_LORA,ALPACA_LORA] [--port=8000]
      [--slots=8] [--context=2048] [--template=alpaca|llama2|llama3] [--mesh_shape=1,-1,1]

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (streaming with `"stream": true`).
Concurrent requests share one running decode batch of --slots rows (continuous batching).
One process serves with all of its local devices (sharded with --mesh_shape). On a multi-host
slice run the same command on every host: process 0 listens and decides, the others follow its
engine (every admission and step is broadcast to them; cnllama_jax/engine.py).
See cnllama_jax/serve.py and cnllama_jax/engine.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--cpu" in sys.argv:
  os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnllama_jax import cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="HF LLaMA directory (config.json + weights)")
  parser.add_argument("--lora", default="", help="comma-separated PEFT LoRA directories, in order")
  parser.add_argument("--merge_lora", default=True, action=argparse.BooleanOptionalAction,
                      help="merge the LoRAs (default) or keep the last one unmerged")
  parser.add_argument("--tokenizer", default=None, help="SentencePiece .model, byte-level BPE "
                      "tokenizer.json or a directory with one (default: tokenizer.model or "
                      "tokenizer.json of the last --lora holding one, else of --model)")
  parser.add_argument("--model_name", default=None, help="model id in the API (default: the "
                      "--model directory's name)")
  parser.add_argument("--template", choices=["alpaca", "llama2", "llama3"], default="alpaca",
                      help="chat template of /v1/chat/completions")
  parser.add_argument("--slots", type=int, default=8, help="rows decoded together")
  parser.add_argument("--context", type=int, default=0, help="prompt + answer tokens per "
                      "request (0: the model's max_position_embeddings)")
  parser.add_argument("--mesh_shape", default="1,1,1", help="data,fsdp,tensor; one may be -1")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--cpu", action="store_true", help="run on the CPU even with accelerators")
  return parser


def tokenizer_path(model: str, loras: list[str], explicit: str | None) -> str:
  from cnllama_jax.data import text_tokenizer  # noqa: E402
  return explicit or text_tokenizer.find([*reversed(loras), model])


def build(args):
  """(app, engine) for the parsed arguments; the engine is started. On a process other than 0
  of a multi-host run: (None, engine), not started (its caller runs `engine.follow()`)."""
  from cnllama_jax import engine as engine_lib, generate as gen, inference, serve  # noqa: E402
  from cnllama_jax.data import text_tokenizer  # noqa: E402
  if args.slots < 1:
    raise ValueError(f"--slots={args.slots}; expected >= 1")
  loras = [p for p in args.lora.split(",") if p]
  tokenizer = text_tokenizer.load(tokenizer_path(args.model, loras, args.tokenizer))
  mesh = inference.build_mesh(inference.parse_mesh_shape(args.mesh_shape))
  cfg, lora, params = inference.load_model(args.model, loras=loras, merge=args.merge_lora,
                                           mesh=mesh, dtype=args.dtype)
  if tokenizer.vocab_size() > cfg.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size()} pieces but the model's "
                     f"vocabulary is {cfg.vocab_size}: pass the model's own tokenizer")
  stop_ids = (gen.tokenizer_stop_ids(cfg, tokenizer.eos_id())
              + gen.template_stop_ids(tokenizer, args.template))
  engine = engine_lib.Engine(cfg, params, slots=args.slots, lora=lora, mesh=mesh,
                             context=args.context or None, eos_id=stop_ids)
  if not engine.leader:
    return None, engine
  engine.start()
  name = args.model_name or Path(args.model).resolve().name
  return serve.create_app(engine, tokenizer, name, args.template), engine


def run(args) -> None:
  import jax  # noqa: E402
  from cnllama_jax import processes, serve  # noqa: E402
  processes.initialize_distributed()
  app, engine = build(args)
  if app is None:  # a process other than 0: run process 0's engine calls until it stops
    print(f"process {jax.process_index()}/{jax.process_count()}: following process 0's engine",
          file=sys.stderr, flush=True)
    engine.follow()
    return
  try:
    serve.run(app, args.host, args.port)
  finally:
    engine.stop()


def main(argv=None) -> int:
  return cli.run_reporting_errors(run, build_parser().parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
