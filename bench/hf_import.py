"""Hugging Face import (cnllama_jax.load_hf) vs reading the same safetensors files raw: seconds,
throughput and peak RSS, each method in a fresh subprocess.

    /work/venv/bin/python bench/hf_import.py [--rounds 3] [--dir /tmp/hf_mid] [--keep]

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
  load_hf (proposed)  the same with `proposed_read_shard` below patched in (a proposed change to
                   cnllama_jax/hf.py: one copy per tensor, mapped pages released after each)

Peak RSS = ru_maxrss after the method - RSS after imports and backend start (the high-water mark
is reset there through /proc/self/clear_refs, so the imports' own peak does not hide the method's). For load_hf
the result itself (0.82 GB of params) is resident at the end, so the import's own overhead is
`peak - result`: what the import needs beyond the params it returns.
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
METHODS = ("file.read", "load_file", "load_file (all)", "load_hf", "load_hf (proposed)")
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
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


_CHUNK_BYTES = 32 << 20


def proposed_read_shard(source, leaf, cfg, shape, index, dtype):
  """Prototype of a proposed change to `hf._read_shard` (bench-only, patched in for the method
  `load_hf (proposed)`): allocate the destination slice once, in the HF (untransposed) layout
  (np.zeros: padding rows are never touched), copy each HF tensor into it in blocks of ~32 MB of
  rows (contiguous copies, cast on the way), drop each block's mapped pages after the copy
  (madvise MADV_DONTNEED; the page cache keeps them), and return a transposed *view*:
  `jax.device_put` transposes far faster than a strided numpy copy (as today's np.stack of .T
  views also leaves to it). The RSS grows by the params plus one destination, never by the
  checkpoint's size."""
  import mmap
  import numpy as np
  bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
  layers, inner = ([None], bounds)
  if leaf.stacked:
    layers, inner = range(*bounds[0]), bounds[1:]
  real = list(inner)
  if leaf.vocab_axis is not None:
    lo, hi = inner[leaf.vocab_axis]
    real[leaf.vocab_axis] = (min(lo, cfg.vocab_size), min(hi, cfg.vocab_size))
  theirs = [slice(lo, hi) for lo, hi in real]
  inner_shape = [hi - lo for lo, hi in inner]
  if leaf.transpose:
    theirs, inner_shape = theirs[::-1], inner_shape[::-1]
  out = np.zeros(([len(layers)] if leaf.stacked else []) + inner_shape, dtype)  # HF layout
  page = mmap.PAGESIZE
  for i, layer in enumerate(layers):
    key = leaf.hf_key if layer is None else leaf.hf_key.format(layer=layer)
    file = source._files[source.file_of(key)]  # pylint: disable=protected-access
    tensor = file.array(key)  # the whole HF tensor, a view of the memory map
    dest = out if layer is None else out[i]
    if tensor.ndim == 1:  # norm scales: small
      dest[...] = tensor[tuple(theirs)]
      continue
    rows = theirs[0].indices(tensor.shape[0])[:2]
    step = max(1, _CHUNK_BYTES // max(1, tensor[0].nbytes))
    raw = getattr(getattr(file, "_mmap", None), "_mmap", None)
    for r0 in range(rows[0], rows[1], step):
      r1 = min(r0 + step, rows[1])
      block = tensor[(slice(r0, r1), *theirs[1:])]
      dest[r0 - rows[0]:r1 - rows[0], :block.shape[1]] = block
      if raw is not None:
        begin = tensor[r0:r1].__array_interface__["data"][0] - file._mmap.__array_interface__["data"][0]
        start = begin // page * page
        end = begin + tensor[r0:r1].nbytes
        if end > start:
          raw.madvise(mmap.MADV_DONTNEED, start, end - start)
  return np.swapaxes(out, -1, -2) if leaf.transpose else out


def child(method: str, directory: str) -> dict:
  """Runs one method in this (fresh) process; returns seconds, peak and final RSS deltas."""
  import numpy as np
  import jax
  import safetensors.numpy
  from cnllama_jax import load_hf
  jax.devices()  # start the backend before the baseline
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
  elif method in ("load_hf", "load_hf (proposed)"):
    if method == "load_hf (proposed)":
      from cnllama_jax import hf
      hf._read_shard = proposed_read_shard  # pylint: disable=protected-access
    _, params = load_hf(directory)
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
  print(f"model {SHAPE}, fp32: {len(files)} shards, {total / MB:.0f} MB, largest "
        f"{largest / MB:.0f} MB; load average {os.getloadavg()[0]:.1f}")

  best: dict = {}
  for r in range(args.rounds):
    for method in METHODS:
      result = run_child(method, args.dir)
      print(f"round {r} {method:18s} {result['seconds']:6.2f} s  peak +{result['peak'] / MB:6.0f} MB"
            f"  final +{result['final'] / MB:6.0f} MB", flush=True)
      old = best.get(method)
      best[method] = result if old is None else {
          "seconds": min(old["seconds"], result["seconds"]), "peak": min(old["peak"], result["peak"]),
          "final": min(old["final"], result["final"])}

  print(f"\n{'method':18s} {'seconds':>8s} {'MB/s':>8s} {'peak RSS':>10s} {'x largest':>10s}")
  for method in METHODS:
    b = best[method]
    print(f"{method:18s} {b['seconds']:8.2f} {total / MB / b['seconds']:8.0f} "
          f"{b['peak'] / MB:8.0f} MB {b['peak'] / largest:9.2f}x")
  ours, raw = best["load_hf"], best["load_file"]
  overhead = ours["peak"] - total
  print(f"\nload_hf speed = {raw['seconds'] / ours['seconds']:.0%} of load_file, "
        f"{best['file.read']['seconds'] / ours['seconds']:.0%} of file.read (target >= 50%)")
  print(f"load_hf peak RSS {ours['peak'] / MB:.0f} MB = {ours['peak'] / largest:.2f}x the largest "
        f"shard; beyond the {total / MB:.0f} MB of params it returns: {overhead / MB:.0f} MB = "
        f"{overhead / largest:.2f}x the largest shard (target <= 1.2x)")
  prop = best["load_hf (proposed)"]
  print(f"load_hf (proposed): {raw['seconds'] / prop['seconds']:.0%} of load_file's speed; peak "
        f"{prop['peak'] / MB:.0f} MB, beyond the params {(prop['peak'] - total) / MB:.0f} MB = "
        f"{(prop['peak'] - total) / largest:.2f}x the largest shard")
  if not args.keep:
    import shutil
    shutil.rmtree(args.dir)


if __name__ == "__main__":
  main()
