"""Hugging Face import (cnllama_jax.load_hf) vs reading the same safetensors files raw: seconds,
throughput and peak RSS, each method in a fresh subprocess.

    python bench/hf_import.py [--rounds 3] [--dir /tmp/hf_mid] [--keep]

The model: LLaMA shapes hidden 1024, FFN 2816, 8 layers, 16 heads, vocabulary 49,954, fp32
(204 M params, 0.82 GB), random weights from `transformers`, written with
save_pretrained(max_shard_size="250MB") -> 4 shards plus an index. The files are read once before
timing, so every method reads from the page cache.

Methods (one subprocess each, interleaved over rounds; the best round of each counts):
  file.read        open + read() of every shard into a bytes object, one shard at a time
  load_file        safetensors.numpy.load_file of every shard, one shard at a time (dropped)
  load_file (all)  the same, keeping every tensor (what a naive loader holds)
  load_hf          cnllama_jax.load_hf(dir) onto the CPU device: params [in, out], stacked layers,
                   padded vocabulary, as jax arrays (kept: they are the result)
  gs read          the same shards from a GCS emulator on loopback (fake-gcs-server, memory
                   backend; tests/gcs_emulator.py), read raw in 16 MB ranged reads (dropped)
  load_hf gs://    cnllama_jax.load_hf("gs://bucket/model") from that emulator

Peak RSS = VmHWM after the method - RSS after imports and backend start (the high-water mark
is reset there through /proc/self/clear_refs, so the imports' own peak does not hide the method's). For load_hf
the result itself (0.82 GB of params) is resident at the end, so the import's own overhead is
`peak - result`: what the import needs beyond the params it returns. Targets (issue 13): beyond the
params <= 1.2x the largest shard file (local) and <= 1.2x the largest tensor slice (gs://), at
>= 50% of the raw read speed of the same storage.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHAPE = dict(vocab_size=49954, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16)
METHODS = ("file.read", "load_file", "load_file (all)", "load_hf", "gs read", "load_hf gs://")
GS_CHUNK = 16 << 20
MB = 1e6


def make_model(directory: str, shard_size: str) -> None:
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.LlamaConfig(max_position_embeddings=2048, **SHAPE)
  model = transformers.LlamaForCausalLM(config).float()
  model.save_pretrained(directory, max_shard_size=shard_size, safe_serialization=True)


def shards(directory: str) -> list[str]:
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f.endswith(".safetensors"))


def rss_now() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss() -> int:
  """The peak RSS since the last reset (VmHWM; getrusage's ru_maxrss is never reset)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(method: str, directory: str) -> dict:
  """Runs one method in this (fresh) process; returns seconds, peak and final RSS deltas."""
  import numpy as np
  import jax
  import safetensors.numpy
  from cnllama_jax import load_hf
  jax.devices()  # start the backend before the baseline
  if "gs" in method:  # and the gs:// client (gcsfs, its event loop and HTTP session)
    from cnllama_jax import paths
    paths.listdir(os.environ["BENCH_GS_MODEL"])
  np.zeros(1)
  # Imports leave a high-water mark above the current RSS; reset it (Linux: "5" > clear_refs
  # resets the peak RSS to the current one) so ru_maxrss measures the method alone.
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  baseline = base_now = rss_now()
  files = shards(directory)
  kept = []
  start = time.perf_counter()
  if method == "file.read":
    for path in files:
      with open(path, "rb") as f:
        data = f.read()
      del data
  elif method == "load_file":
    for path in files:
      tensors = safetensors.numpy.load_file(path)
      del tensors
  elif method == "load_file (all)":
    for path in files:
      kept.append(safetensors.numpy.load_file(path))
  elif method == "load_hf":
    _, params = load_hf(directory)
    jax.block_until_ready(params)
    kept.append(params)
  elif method == "gs read":
    from cnllama_jax import paths
    url = os.environ["BENCH_GS_MODEL"]
    for name in paths.listdir(url):
      if name.endswith(".safetensors"):
        size = paths.size(f"{url}/{name}")
        for offset in range(0, size, GS_CHUNK):
          data = paths.read_range(f"{url}/{name}", offset, min(GS_CHUNK, size - offset))
          del data
  elif method == "load_hf gs://":
    _, params = load_hf(os.environ["BENCH_GS_MODEL"])
    jax.block_until_ready(params)
    kept.append(params)
  else:
    raise ValueError(method)
  seconds = time.perf_counter() - start
  gc.collect()
  return {"seconds": seconds, "peak": max_rss() - baseline, "final": rss_now() - base_now}


def run_child(method: str, directory: str) -> dict:
  out = subprocess.run([sys.executable, __file__, "--child", method, "--dir", directory],
                       capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"{method} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--dir", default="/tmp/cnllama_hf_import_bench")
  parser.add_argument("--shard_size", default="250MB")
  parser.add_argument("--keep", action="store_true", help="keep the model directory")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.child, args.dir)))
    return

  if not os.path.isfile(os.path.join(args.dir, "config.json")):
    os.makedirs(args.dir, exist_ok=True)
    make_model(args.dir, args.shard_size)
  files = shards(args.dir)
  sizes = [os.path.getsize(p) for p in files]
  total, largest = sum(sizes), max(sizes)
  for path in files:  # warm the page cache: every method reads from memory
    with open(path, "rb") as f:
      while f.read(1 << 26):
        pass
  from cnllama_jax import config as config_lib, paths  # pylint: disable=import-outside-toplevel
  from tests import gcs_emulator  # pylint: disable=import-outside-toplevel
  cfg = config_lib.load_hf_config(args.dir)
  # One device: a param's slice is the whole (stacked, padded) param; the largest is the embedding.
  largest_slice = max(cfg.padded_vocab_size * cfg.hidden_size,
                      cfg.num_hidden_layers * cfg.hidden_size * cfg.intermediate_size) * 4
  emulator = gcs_emulator.Emulator().start()
  os.environ.update(emulator.env())
  os.environ["BENCH_GS_MODEL"] = emulator.bucket("bench") + "/model"
  paths.copy_tree(args.dir, os.environ["BENCH_GS_MODEL"])
  print(f"model {SHAPE}, fp32: {len(files)} shards, {total / MB:.0f} MB, largest "
        f"{largest / MB:.0f} MB, largest tensor slice {largest_slice / MB:.0f} MB; load average "
        f"{os.getloadavg()[0]:.1f}")

  best: dict = {}
  try:
    for r in range(args.rounds):
      for method in METHODS:
        result = run_child(method, args.dir)
        print(f"round {r} {method:18s} {result['seconds']:6.2f} s  peak +"
              f"{result['peak'] / MB:6.0f} MB  final +{result['final'] / MB:6.0f} MB", flush=True)
        old = best.get(method)
        best[method] = result if old is None else {
            k: min(old[k], result[k]) for k in ("seconds", "peak", "final")}
  finally:
    emulator.stop()

  print(f"\n{'method':18s} {'seconds':>8s} {'MB/s':>8s} {'peak RSS':>10s} {'x largest':>10s}")
  for method in METHODS:
    b = best[method]
    print(f"{method:18s} {b['seconds']:8.2f} {total / MB / b['seconds']:8.0f} "
          f"{b['peak'] / MB:8.0f} MB {b['peak'] / largest:9.2f}x")
  ours, raw = best["load_hf"], best["load_file"]
  overhead = ours["peak"] - total
  print(f"\nlocal: load_hf speed = {raw['seconds'] / ours['seconds']:.0%} of load_file, "
        f"{best['file.read']['seconds'] / ours['seconds']:.0%} of file.read (target >= 50%)")
  print(f"local: load_hf peak RSS {ours['peak'] / MB:.0f} MB; beyond the {total / MB:.0f} MB of "
        f"params it returns: {overhead / MB:.0f} MB = {overhead / largest:.2f}x the largest shard "
        "(target <= 1.2x)")
  gs, gs_raw = best["load_hf gs://"], best["gs read"]
  print(f"gs://: load_hf speed = {gs_raw['seconds'] / gs['seconds']:.0%} of raw ranged reads "
        f"(target >= 50%); beyond the params: {(gs['peak'] - total) / MB:.0f} MB = "
        f"{(gs['peak'] - total) / largest_slice:.2f}x the largest tensor slice (target <= 1.2x)")
  if not args.keep:
    import shutil
    shutil.rmtree(args.dir)


if __name__ == "__main__":
  main()
