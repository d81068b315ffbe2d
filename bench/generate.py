"""Decode speed of cnllama_jax.generate vs `transformers` generate() on the same weights (CPU).

    python bench/generate.py [--new_tokens 128] [--models tiny,mid] [--repeats 3]

For each model (random weights, fp32, the paper's sampling settings): batch-1 decode tokens/s of
ours and of transformers (median time between streamed tokens, compile excluded); per-token time
at context 64 vs 448 in one fixed 512-slot cache; and batch --batch (default 16) throughput in
tokens/s (all rows' new tokens over the wall time of the whole generate call, prefill included).
--threads 1 (default) runs both single-threaded (XLA without its Eigen pool, torch with one thread):
on a shared machine, multi-threaded torch slows down several-fold under contention.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

SHAPES = {
    "tiny": dict(vocab_size=99, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4),
    "mid": dict(vocab_size=49954, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                num_attention_heads=8),
}
SAMPLING = dict(temperature=0.2, top_k=40, top_p=0.9, repetition_penalty=1.1)


def hf_model(shape: dict):
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.LlamaConfig(max_position_embeddings=2048, **shape)
  return transformers.LlamaForCausalLM(config).eval()


def ours_step_times(cfg, params, prompt, new_tokens, max_len=None) -> list[float]:
  from cnllama_jax.generate import generate
  stamps = []
  generate(cfg, params, [prompt], max_new_tokens=new_tokens, eos_id=-1, max_len=max_len,
           on_token=lambda _: stamps.append(time.perf_counter()), **SAMPLING)
  return list(np.diff(stamps))


def hf_step_times(model, prompt, new_tokens) -> list[float]:
  import torch
  from transformers.generation.streamers import BaseStreamer

  class Stamps(BaseStreamer):
    def __init__(self):
      self.times = []

    def put(self, value):
      self.times.append(time.perf_counter())

    def end(self):
      pass

  streamer = Stamps()
  with torch.no_grad():
    ids = torch.tensor([prompt])
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                   streamer=streamer, **SAMPLING)
  return list(np.diff(streamer.times[1:]))  # the first put() is the prompt


def batch_throughput(cfg, params, model, prompts, new_tokens) -> tuple[float, float]:
  """(ours, transformers) tokens/s generating new_tokens for every prompt (equal lengths)."""
  import torch
  from cnllama_jax.generate import generate
  start = time.perf_counter()
  generate(cfg, params, prompts, max_new_tokens=new_tokens, eos_id=-1, **SAMPLING)
  ours = len(prompts) * new_tokens / (time.perf_counter() - start)
  ids = torch.tensor(prompts)
  start = time.perf_counter()
  with torch.no_grad():
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                   **SAMPLING)
  return ours, len(prompts) * new_tokens / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--models", default="tiny,mid")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=1, help="0: each library's default")
  parser.add_argument("--batch", type=int, default=16, help="rows of the throughput run")
  args = parser.parse_args()
  if args.threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false").strip()

  import jax
  import torch
  from cnllama_jax.hf import load_hf
  if args.threads:
    torch.set_num_threads(args.threads)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); fp32, batch 1, {args.new_tokens} new tokens, "
        f"sampling {SAMPLING}")
  rng = np.random.default_rng(0)
  for name in args.models.split(","):
    model = hf_model(SHAPES[name])
    with tempfile.TemporaryDirectory() as tmp:
      model.save_pretrained(tmp)
      cfg, params = load_hf(tmp)
    prompt = [1] + rng.integers(3, cfg.vocab_size, 63).tolist()
    ours_step_times(cfg, params, prompt, 4)  # compile
    hf_step_times(model, prompt, 4)  # warm up
    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits both
      ours += ours_step_times(cfg, params, prompt, args.new_tokens)
      theirs += hf_step_times(model, prompt, args.new_tokens)
    ours, theirs = np.median(ours), np.median(theirs)
    print(f"{name:5s} decode  ours {1 / ours:8.1f} tok/s ({ours * 1e3:6.2f} ms/token)   "
          f"transformers {1 / theirs:8.1f} tok/s ({theirs * 1e3:6.2f} ms/token)   "
          f"ratio ours/transformers {theirs / ours:5.2f}x")

    long_prompt = [1] + rng.integers(3, cfg.vocab_size, 447).tolist()
    times = {(who, n): [] for who in ("ours", "hf") for n in (64, 448)}
    ours_step_times(cfg, params, long_prompt, 4, max_len=512)  # compile (the step is shared)
    for _ in range(args.repeats):
      for context, p in ((64, prompt), (448, long_prompt)):
        times["ours", context] += ours_step_times(cfg, params, p, 32, max_len=512)
        times["hf", context] += hf_step_times(model, p, 32)
    (o64, h64, o448, h448) = (np.median(times[k]) for k in (("ours", 64), ("hf", 64),
                                                              ("ours", 448), ("hf", 448)))
    print(f"{name:5s} per-token at context 64 / 448:  ours {o64 * 1e3:.2f} / {o448 * 1e3:.2f} ms "
          f"(x{o448 / o64:.2f})   transformers {h64 * 1e3:.2f} / {h448 * 1e3:.2f} ms "
          f"(x{h448 / h64:.2f})")

    prompts = [[1] + rng.integers(3, cfg.vocab_size, 63).tolist() for _ in range(args.batch)]
    new = 64
    batch_throughput(cfg, params, model, prompts, 4)  # compile / warm up
    ours_tps, hf_tps = [], []
    for _ in range(args.repeats):
      o, h = batch_throughput(cfg, params, model, prompts, new)
      ours_tps.append(o)
      hf_tps.append(h)
    o, h = np.median(ours_tps), np.median(hf_tps)
    print(f"{name:5s} batch {args.batch} x {new} new tokens:  ours {o:8.1f} tok/s   "
          f"transformers {h:8.1f} tok/s   ratio {o / h:5.2f}x")


if __name__ == "__main__":
  main()
