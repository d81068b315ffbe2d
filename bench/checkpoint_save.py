"""How long a checkpoint save holds up training: blocking vs asynchronous, tiny and mid models.

    python bench/checkpoint_save.py [--repeats 3] [--devices 8]

Models (stage lora+embeddings, LoRA r 8 on all seven modules, fp32 AdamW state):
  tiny  the test shapes (hidden 64, 2 layers, vocabulary 99);
  mid   the "mid" preset: hidden 512, 4 layers, 8 heads, FFN 1376, vocabulary 49,954.
The optimizer moments are filled with noise first (fresh zero moments would compress unlike a
real run's). Each save is one `cnllama_jax.checkpoint.Checkpoints.save` of the run's state into a
fresh directory (meta checksums included):
  blocking  enable_async_checkpointing=False: save() returns when the files are written;
  async     save() returns once the arrays are copied off the devices (what the training loop
            waits for); `+ background` is the time until the files are complete (wait()).
Median of the repeats, after one warm-up save (tracing, Orbax setup).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (fsdp mesh)")
ARGS = parser.parse_args()

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={ARGS.devices}").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cnllama_jax import build, checkpoint, run_config  # noqa: E402


def config(name: str):
  c = run_config.default()
  c.train.trainable = "lora+embeddings"
  c.lora.update(dict(rank=8, alpha=32.0, dropout=0.0))
  c.train.keep_checkpoints = ARGS.repeats + 2
  if name == "mid":
    run_config.with_preset(c, "mid", 49954)
  return c


def noisy_moments(run):
  """The run's state with N(0, 1e-3) optimizer moments, in the same shardings."""
  def fill(opt_state):
    leaves, tree = jax.tree_util.tree_flatten(opt_state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [
        1e-3 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
        else x for k, x in zip(keys, leaves)])
  opt_state = jax.jit(fill, out_shardings=run.plan.state_shardings.opt_state)(run.state.opt_state)
  return run.state.replace(opt_state=opt_state)


def measure(name: str, async_save: bool, run, state, workdir: str) -> tuple[float, float]:
  """Median (seconds in save(), seconds until the files are complete) over the repeats."""
  del name
  shutil.rmtree(workdir, ignore_errors=True)
  saves = checkpoint.Checkpoints(workdir, run.plan, run.frozen, "bench", async_save=async_save)
  blocked, total = [], []
  for step in range(ARGS.repeats + 1):
    start = time.perf_counter()
    saves.save(step, state)
    returned = time.perf_counter()
    saves.wait()
    done = time.perf_counter()
    if step:  # step 0 warms up
      blocked.append(returned - start)
      total.append(done - start)
  saves.close()
  return statistics.median(blocked), statistics.median(total)


def main() -> None:
  print(f"jax {jax.__version__}, {jax.device_count()} CPU devices, mesh (1, -1, 1); "
        f"median of {ARGS.repeats} saves")
  with tempfile.TemporaryDirectory() as tmp:
    for name in ("tiny", "mid"):
      run = build.build(config(name))
      state = noisy_moments(run)
      size = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
      start = time.perf_counter()
      checkpoint.checksums(state, run.plan.mesh)
      start = time.perf_counter()
      checkpoint.checksums(state, run.plan.mesh)
      sums = time.perf_counter() - start
      block_b, _ = measure(name, False, run, state, os.path.join(tmp, name + "-blocking"))
      block_a, total_a = measure(name, True, run, state, os.path.join(tmp, name + "-async"))
      print(f"{name:4s} {size / 2**20:8.1f} MiB saved (trainable + AdamW)  "
            f"blocking {block_b:6.3f} s | async: save() returns after {block_a:6.3f} s, "
            f"+ background until written {total_a - block_a:6.3f} s | checksums {sums:.3f} s",
            flush=True)
      del run, state


if __name__ == "__main__":
  main()
