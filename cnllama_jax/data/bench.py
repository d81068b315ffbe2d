"""Data pipeline throughput: build tokens/s and loader tokens/s.

    python -m cnllama_jax.data.bench --tokenizer path/to/tokenizer.model \\
        [--text DIR_OR_FILES ...] [--megabytes 20] [--block_size 512] [--batch 64] [--steps 50]

Without `--text` a synthetic mixed Chinese/English corpus of `--megabytes` is written to a
temporary directory. Prints the build throughput (read + tokenise + write ArrayRecord), then
`Loader.batch` throughput (random-access reads of one host's batch) with and without a prefetch
thread.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from cnllama_jax.data.datasets import build_pretrain_dataset
from cnllama_jax.data.loader import Loader, measure_throughput

_WORDS_EN = ("the river market garden morning train station library window bread teacher "
             "walks opens crosses writes reads quietly slowly every small old new").split()
_WORDS_ZH = list("春夏秋冬山水河桥书店老师学生早上下午市场面包窗户图书馆安静慢慢每天小旧新的了在是和")


def synthetic_corpus(directory: Path, megabytes: float, seed: int = 0) -> Path:
  """Writes `megabytes` MB of random mixed-language lines to `directory/synthetic.txt`."""
  rng = np.random.default_rng(seed)
  path = directory / "synthetic.txt"
  written, target = 0, int(megabytes * 1e6)
  with open(path, "w", encoding="utf-8") as f:
    while written < target:
      en = " ".join(rng.choice(_WORDS_EN, rng.integers(8, 40)))
      zh = "".join(rng.choice(_WORDS_ZH, rng.integers(20, 120)))
      line = f"{en}。{zh}\n" if rng.random() < 0.5 else f"{zh} {en}.\n"
      f.write(line)
      written += len(line.encode())
  return path


def main(argv: list[str] | None = None) -> dict:
  """Runs the benchmark; returns the three throughputs in tokens/s."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokenizer", required=True)
  parser.add_argument("--text", nargs="*", default=None)
  parser.add_argument("--megabytes", type=float, default=20.0)
  parser.add_argument("--block_size", type=int, default=512)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=50)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  with tempfile.TemporaryDirectory() as tmp:
    text = args.text or [synthetic_corpus(Path(tmp), args.megabytes)]
    start = time.perf_counter()
    out = build_pretrain_dataset(text, args.tokenizer, Path(tmp) / "tfds", args.block_size,
                                 val_fraction=0.0, progress=False)
    build_s = time.perf_counter() - start
    stats = out["stats"]
    print(f"build: {stats['tokens']:,} tokens from {stats['documents']:,} documents in "
          f"{build_s:.2f} s = {stats['tokens'] / build_s:,.0f} tokens/s "
          f"({stats['blocks']:,} blocks of {args.block_size})")
    loader = Loader(out["train"], args.batch, seed=0)
    plain = measure_throughput(loader, num_steps=args.steps)
    print(f"Loader.batch: {plain['tokens_per_s']:,.0f} tokens/s "
          f"({plain['examples_per_s']:,.0f} examples/s, batch {args.batch})")
    start = time.perf_counter()
    n_tokens = sum(b["input_ids"].size for b in loader.iterate(0, num_steps=args.steps))
    prefetched = n_tokens / (time.perf_counter() - start)
    print(f"Loader.iterate (prefetch 2): {prefetched:,.0f} tokens/s")
  return {"build_tokens_per_s": stats["tokens"] / build_s,
          "loader_tokens_per_s": plain["tokens_per_s"], "iterate_tokens_per_s": prefetched}


if __name__ == "__main__":
  main()
