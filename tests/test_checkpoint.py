"""Checkpoints: resume bit for bit after SIGKILL, save on SIGTERM, skip damaged checkpoints,
restore onto other meshes, two processes checkpointing to a bucket (the GCS emulator) preempted
together, and one-line errors for bad input.

The run is tests/checkpoint_config.py (tiny LoRA model, synthetic data, 12 steps, a checkpoint
every 3 steps, LoRA dropout on so the rng matters); per-step losses come from metrics.jsonl.
"""
import contextlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnllama_jax import build, checkpoint, plan as plan_lib, sharding as shd, trainer
from cnllama_jax import writers
from tests import checkpoint_config
from tests.multihost import finish, free_port, started

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "tests", "checkpoint_config.py")


def launch(workdir, *overrides, **popen) -> subprocess.Popen:
  """launch/train.py on the tiny run in a subprocess (8 fake CPU devices, from conftest's env)."""
  command = [sys.executable, os.path.join(REPO, "launch", "train.py"), f"--config={CONFIG}",
             *overrides, f"--workdir={workdir}"]
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=REPO, **popen)


def losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, writers.HISTORY), encoding="utf-8") as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


def losses_at(url: str) -> dict[int, float]:
  """losses() of a workdir on a bucket (or anywhere)."""
  return {row["step"]: row["loss"] for row in writers.load_history(url)}


def steps_on_disk(workdir) -> list[int]:
  directory = os.path.join(workdir, checkpoint.SUBDIR)
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def copy_run(src, dst) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def read_until(proc: subprocess.Popen, prefix: str) -> list[str]:
  """Lines of proc's stdout up to and including the first that starts with `prefix`."""
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(prefix):
      return lines
  raise AssertionError(f"no line starting with {prefix!r}; stdout: {''.join(lines)[-2000:]}; "
                       f"stderr: {proc.stderr.read()[-2000:]}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run: its workdir (checkpoints 6, 9, 12) and its per-step losses."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = trainer.train(checkpoint_config.get_config(), workdir)
  assert result["preempted"] is None and steps_on_disk(workdir) == [6, 9, 12]
  return workdir, losses(workdir)


# --- resume --------------------------------------------------------------------------------------

def test_sigkill_at_a_random_step_then_resume_gives_identical_losses(tmp_path, reference):
  kill_after = random.randint(2, 10)
  proc = launch(tmp_path)
  read_until(proc, f"step {kill_after}/")
  proc.kill()
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL, f"killed after step {kill_after}"
  trainer.train(checkpoint_config.get_config(), str(tmp_path))
  assert losses(tmp_path) == reference[1], f"killed after step {kill_after}"


def test_sigterm_saves_the_current_step_and_exits_0(tmp_path):
  proc = launch(tmp_path, "--config.train.steps=400", "--config.train.save_every=0")
  read_until(proc, "step 2/")
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  stopped = int(re.search(r"preempted: saved checkpoint step (\d+) in ", out).group(1))
  assert 2 <= stopped < 400
  assert steps_on_disk(tmp_path) == [stopped]
  assert max(losses(tmp_path)) == stopped


def test_damaged_latest_checkpoints_are_reported_and_the_previous_one_is_used(
    tmp_path, reference, capfd):
  workdir = copy_run(reference[0], tmp_path / "run")
  checkpoints = os.path.join(workdir, checkpoint.SUBDIR)
  for root, _, files in os.walk(os.path.join(checkpoints, "12", "state")):  # truncated files
    for name in files:
      path = os.path.join(root, name)
      os.truncate(path, os.path.getsize(path) // 2)
  shutil.rmtree(os.path.join(checkpoints, "9", "state"))  # a missing directory
  trainer.train(checkpoint_config.get_config(), workdir)
  err = capfd.readouterr().err
  assert re.search(r"warning: checkpoint step 12 in .* is damaged", err), err
  assert re.search(r"warning: checkpoint step 9 in .* is damaged", err), err
  assert losses(workdir) == reference[1]  # resumed from step 6
  assert steps_on_disk(workdir) == [6, 9, 12]
  damaged = sorted(os.listdir(os.path.join(workdir, checkpoint.DAMAGED_SUBDIR)))
  assert [d.split("-")[0] for d in damaged] == ["12", "9"]


# --- another mesh --------------------------------------------------------------------------------

def real_rows(state, vocab=99) -> dict:
  """Saved leaves as numpy, vocabulary leaves cut to the real rows (padding is mesh-dependent)."""
  out = {}
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  for path, x in leaves:
    name, x = checkpoint.leaf_name(path), np.asarray(x)
    axis = checkpoint.VOCAB_AXIS.get(name.rsplit(".", 1)[-1])
    if axis is not None:
      assert not np.take(x, range(vocab, x.shape[axis]), axis).any(), f"{name}: padding not 0"
      x = np.take(x, range(vocab), axis)
    out[name] = x
  return out


def test_a_checkpoint_from_8_devices_restores_onto_4_and_onto_1(tmp_path):
  config = checkpoint_config.get_config()
  config.train.steps = 6
  config.mesh.shape = (2, 2, 2)  # vocabulary 99 padded to 256 here, to 128 on the meshes below
  eight = trainer.train(config, str(tmp_path / "eight"))
  saved = real_rows(eight["state"])

  four = build.build(plan_lib.plan(config, shd.make_mesh((1, -1, 1), jax.devices()[:4])))
  restorer = checkpoint.Checkpoints(str(tmp_path / "eight"), four.plan, four.frozen,
                                    checkpoint.base_source(config, False))
  restored = restorer.restore()
  restorer.close()
  assert int(restored.step) == 6 and restored.trainable["embed_tokens"].shape == (128, 64)
  assert restored.trainable["embed_tokens"].sharding.mesh.size == 4
  four_rows = real_rows(restored)
  for name, value in saved.items():
    np.testing.assert_array_equal(four_rows[name], value, err_msg=name)

  workdir = copy_run(tmp_path / "eight", tmp_path / "one")
  shutil.rmtree(os.path.join(workdir, checkpoint.SUBDIR, "6"))
  one = trainer.train(config, workdir, mesh=shd.single_device_mesh())  # resumes from step 3
  assert one["run"].plan.mesh.size == 1 and len(one["history"]) == 6
  got, want = losses(workdir), losses(tmp_path / "eight")
  np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)], atol=1e-5)


# --- several processes ---------------------------------------------------------------------------

def test_two_processes_checkpointing_to_a_bucket_resume_on_one_process_with_the_same_losses(
    gcs, tmp_path):
  """Two processes (gloo) with the workdir on gs:// (the emulator), preempted together; resumed as
  one process on 4 devices, the losses equal an uninterrupted run's there within 1e-6."""
  from cnllama_jax import paths, run_data
  steps = 16
  config = checkpoint_config.get_config()
  config.train.update(dict(steps=steps, save_every=0))
  config_json = tmp_path / "config.json"
  config_json.write_text(config.to_json())
  bucket = gcs.bucket()
  workdir = f"{bucket}/two"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the worker sets 2 devices
  port = free_port()
  commands = [[sys.executable, os.path.join(REPO, "tests", "multihost_worker.py"), str(i), "2",
               str(port), str(config_json), workdir] for i in range(2)]
  with started(commands, [env, env], cwd=REPO) as workers:
    read_until(workers[0], "process 0/2: step 2/")  # console lines name their process
    workers[1].send_signal(signal.SIGTERM)  # only one host is told; both must stop together
    outputs = finish(workers)
  stops = [int(re.search(r"finished, preempted=(\d+)", out).group(1)) for out, _ in outputs]
  saved = paths.join(workdir, checkpoint.SUBDIR)
  assert stops[0] == stops[1] < steps
  assert sorted(int(n) for n in paths.listdir(saved) if n.isdigit()) == [stops[0]]
  assert re.search(r"^process 1/2: step 1/", outputs[1][0], re.M), outputs[1][0][-2000:]
  # Each process wrote its own array shards; process 0 alone the shared files.
  state_files = paths.listdir(paths.join(saved, str(stops[0]), "state"))
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(state_files), state_files
  events = [n for n in paths.listdir(paths.join(workdir, "tensorboard")) if "tfevents" in n]
  assert len(events) == 1 and paths.exists(paths.join(workdir, "config.json")), events
  history = losses_at(workdir)
  assert sorted(history) == list(range(1, stops[0] + 1))

  # Resumed on one process (4 devices) and an uninterrupted run there: one build, one compile.
  run = build.build(plan_lib.plan(config, shd.make_mesh((1, -1, 1), jax.devices()[:4])))
  for where in (workdir, str(tmp_path / "uninterrupted")):  # the resumed run first: the
    trainer.prepare_workdir(where, config)  # uninterrupted one consumes run.state (donated)
    data = run_data.datasets(run.plan.data, run.plan.cfg.vocab_size, where)
    with contextlib.closing(writers.for_run(where, steps, progress=False)) as out:
      trainer.fit(run, data, where, out)
  got, want = losses_at(workdir), losses(tmp_path / "uninterrupted")
  assert sorted(got) == list(range(1, steps + 1))
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)],
                             rtol=0, atol=1e-6)


# --- bad input -----------------------------------------------------------------------------------

BAD_INPUT = {
    "mesh not dividing the devices": (
        ["--config.mesh.shape=(3,1,1)"], r"mesh shape \[3, 1, 1\] does not divide the 8 devices"),
    "batch not divisible by data parallelism": (
        ["--config.train.global_batch_size=6"],
        r"train.global_batch_size=6 .* not divisible by the data-parallel size 8"),
    "unknown config key": (
        ["--config.train.learning_rat=0.1"], r"unknown config key 'learning_rat' in "
                                             r"--config.train.learning_rat"),
    "missing base model": (
        ["--config.base_model=/nonexistent/llama-7b"],
        r"config.base_model=/nonexistent/llama-7b: no such file or directory"),
    "missing tokenizer": (
        ["--config.tokenizer=/nonexistent/tokenizer.model"],
        r"config.tokenizer=/nonexistent/tokenizer.model: no such file or directory"),
    "missing data": (
        ["--config.data.kind=text", "--config.data.path=/nonexistent/corpus.txt"],
        r"config.data.path=/nonexistent/corpus.txt: no such file or directory"),
    "another base model": (
        ["--config.seed=1"], r"checkpoint step 12 in .* was trained on a different frozen base "
                             r"\(random init seed 0 .*\) than this run \(random init seed 1 "),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_error_and_keeps_the_checkpoints(case, tmp_path, reference):
  overrides, message = BAD_INPUT[case]
  workdir = copy_run(reference[0], tmp_path / "run")
  proc = launch(workdir, *overrides)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1
  assert re.fullmatch(r"error: " + message + r".*", err.strip().splitlines()[-1]), err[-3000:]
  assert "Traceback" not in err
  assert steps_on_disk(workdir) == [6, 9, 12]


def test_unwritable_workdir_is_one_line_error(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  proc = launch(tmp_path / "file" / "run")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1
  assert re.search(r"^error: workdir .*/file/run is not writable: Not a directory$", err, re.M), err


def checkpoint_files(workdir) -> dict[str, int]:
  """{path: size} of the files of the complete checkpoints."""
  directory = os.path.join(workdir, checkpoint.SUBDIR)
  return {os.path.relpath(os.path.join(r, f), directory): os.path.getsize(os.path.join(r, f))
          for r, _, files in os.walk(directory) for f in files if ".orbax-checkpoint-tmp" not in r}


def _limit_file_size():  # a full disk: writes beyond 16 KiB fail with EFBIG
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # preexec_fn; the child execs at once
def test_full_disk_is_one_line_error_and_keeps_the_checkpoints(tmp_path, reference):
  workdir = copy_run(reference[0], tmp_path / "run")
  before = checkpoint_files(workdir)
  proc = launch(workdir, "--config.train.steps=15", preexec_fn=_limit_file_size)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1, err[-3000:]
  assert re.search(r"^error: saving checkpoint step 15 in .* failed: File too large \(errno 27\)",
                   err, re.M), err[-3000:]
  assert "Traceback" not in err
  assert steps_on_disk(workdir) == [6, 9, 12]
  after = checkpoint_files(workdir)
  assert {p: s for p, s in after.items() if p in before} == before


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  proc = launch(tmp_path, "--config.train.learning_rate=1e30", "--config.train.save_every=1")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1
  assert re.search(r"^error: training diverged at step 2: loss [\d.]+, grad norm nan; stopped "
                   r"without saving that state; the last good checkpoint is step 1 in ", err,
                   re.M), err[-3000:]
  assert steps_on_disk(tmp_path) == [1]
