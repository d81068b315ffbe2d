"""AOT compilation for TPU topologies on a CPU host (cnllama_jax/aot.py, launch/aot_compile.py).

The topology names need nothing; the compile tests need libtpu (in the test extras) and are
skipped only when it cannot be imported. Tiny shapes keep each TPU compile to seconds.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

from cnllama_jax import aot, run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[test]')")

# Tiny model, batch so large that the attention scores alone (batch/chip x heads x 512 x 512 fp32
# per layer) exceed a v5e chip's 16 GiB.
HUGE_BATCH = dict(global_batch_size=32768, seq_len=512)


@pytest.mark.parametrize("name, generation, topology, chips", [
    ("v4-32", "v4", "v4:2x2x4", 16),  # v4 and v5p names count TensorCores: 2 per chip
    ("v4-8", "v4", "v4:2x2x1", 4),
    ("v5e-16", "v5e", "v5e:4x4", 16),  # v5e and v6e names count chips
    ("v5e-8", "v5e", "v5e:2x4", 8),
    ("v5p-64", "v5p", "v5p:2x4x4", 32),
    ("v6e-8", "v6e", "v6e:2x4", 8),
])
def test_topology_description(name, generation, topology, chips):
  assert aot.topology_description(name) == (generation, topology, chips)


@pytest.mark.parametrize("name, message", [
    ("v3-8", "expected <v4|v5e|v5p|v6e>-<size>"),
    ("v4", "expected <v4|v5e|v5p|v6e>-<size>"),
    ("tpu-v4-32", "expected <v4|v5e|v5p|v6e>-<size>"),
    ("v4-33", "33 is not a v4 slice size"),  # odd core count
    ("v4-6", "6 is not a v4 slice size"),  # 3 chips: no such slice
    ("v5e-7", "7 is not a v5e slice size"),
    ("v6e-2", "2 is not a v6e slice size"),
])
def test_topology_description_rejects_bad_names(name, message):
  with pytest.raises(ValueError, match=message):
    aot.topology_description(name)


@needs_libtpu
def test_tiny_stage2_compiles_and_fits_on_v5e_8():
  config = run_config.load("pretrain_stage2")  # tiny model, LoRA + embeddings, batch 8 x 64
  report = aot.compile_report(config, "v5e-8")
  assert (report.topology, report.chips, report.micro_batches) == ("v5e-8", 8, 1)
  assert report.argument_bytes > 0 and report.output_bytes > 0 and report.temp_bytes > 0
  assert report.alias_bytes > 0  # the donated state is updated in place
  assert 0 < report.total_bytes < report.hbm_bytes == 16 * aot.GiB
  assert report.flops_per_step > 0 and report.step_seconds_at_peak > 0
  assert report.fits and not report.oom
  assert "fits" in "\n".join(report.lines())


@needs_libtpu
def test_tiny_inference_programs_compile_for_v5e_8():
  """launch/aot_inference.py's path: generate's prefill and decode (stop ids and all) lowered and
  compiled for a TPU topology; the decode step updates its cache in place."""
  from cnllama_jax import aot_inference  # pylint: disable=import-outside-toplevel
  report = aot_inference.compile_inference("tiny", "v5e-8", batch=8, context=128, vocab_size=512)
  assert [p.name for p in report.programs] == ["prefill", "decode"]
  for program in report.programs:
    assert not program.oom and program.argument_bytes > 0 and program.temp_bytes > 0
  assert report.programs[1].alias_bytes > 0  # the donated decode state


@needs_libtpu
def test_launch_exits_1_when_the_step_does_not_fit():
  """A batch too large for a v5e chip: the compiler's out-of-memory becomes fits=False, printed
  as DOES NOT FIT with the compiler's figures, and the launcher exits 1."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # no fake CPU devices needed
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "aot_compile.py"),
       "--config=" + os.path.join(REPO, "configs", "pretrain_stage2.py"), "--topology=v5e-8",
       *[f"--config.train.{k}={v}" for k, v in HUGE_BATCH.items()]],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=600, check=False)
  assert out.returncode == 1, out.stdout + out.stderr[-3000:]
  assert "topology v5e-8: 8 chips, micro_batches=1" in out.stdout
  assert "DOES NOT FIT: Ran out of memory" in out.stdout
  assert "exceeds available HBM" in out.stdout  # the whole sentence, not cut at a decimal point


def test_launch_rejects_a_bad_topology_by_message():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "aot_compile.py"),
       "--config=" + os.path.join(REPO, "configs", "pretrain_stage2.py"), "--topology=v5e-7"],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
  assert out.returncode == 1
  assert "7 is not a v5e slice size" in out.stderr
