"""README command (1), smaller: `launch/train.py --config=configs/demo.py:smoke` runs every stage
of the pipeline (tokenizers, merge, stage 0, stage 1, stage 2, SFT, an answer) end to end."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 40  # README promises a readable run of well under 60 lines


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one CPU device: fastest here
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "train.py"), "--config=configs/demo.py:smoke",
       f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, timeout=900, check=False)
  output = (proc.stdout + proc.stderr).decode("utf-8", errors="replace")  # keeps bars' "\r"
  assert proc.returncode == 0, output[-3000:]
  with open(workdir / "demo_summary.json", encoding="utf-8") as f:
    return {"summary": json.load(f), "output": output, "workdir": workdir}


def test_output_is_short_and_free_of_third_party_info_logs(demo):
  # A progress bar redraws itself with "\r" on one line; keep each line's final state.
  lines = [line.split("\r")[-1] for line in demo["output"].split("\n") if line.strip()]
  assert 8 <= len(lines) <= MAX_LINES, "\n".join(lines)
  assert not [line for line in lines if re.match(r"[IW]\d{4} ", line)], demo["output"]
  assert "Downloading and preparing" not in demo["output"]
  for name in ("stage0", "stage1", "stage2", "sft"):  # one progress bar per stage
    assert sum(bool(re.match(rf"{name}\s.*\d+/\d+ \[", line)) for line in lines) == 1, name
  assert "held-out loss" in demo["output"] and "answer:" in demo["output"]


def test_summary_numbers_are_finite(demo):
  summary = demo["summary"]
  numbers = list(summary["tokens_per_char"].values())
  for stage in summary["stages"].values():
    assert stage["history"], stage
    numbers += [loss for _, loss in stage["history"]]
    numbers += [v for v in (stage["heldout_before"], stage["heldout_after"], stage["eval_loss"])
                if v is not None]
  assert numbers and all(math.isfinite(x) for x in numbers), numbers
  assert summary["stages"]["sft"]["history"][-1][1] > 0.0  # the responses fit the sequence length


def test_merge_needs_fewer_tokens_per_character(demo):
  tpc = demo["summary"]["tokens_per_char"]
  assert tpc["chinese_llama"] < 0.5 * tpc["base"], tpc


@pytest.mark.parametrize("name", ["stage0", "stage1"])
def test_stage_loss_falls(demo, name):
  stage = demo["summary"]["stages"][name]
  assert stage["heldout_after"] < stage["heldout_before"] - 0.05, stage
  assert stage["history"][-1][1] < stage["history"][0][1], stage["history"]


def test_stage0_starts_from_a_random_model(demo):
  stage0 = demo["summary"]["stages"]["stage0"]
  vocab = demo["summary"]["pieces"]["base"]
  assert abs(stage0["heldout_before"] - math.log(vocab)) < 0.5, (stage0, vocab)


def test_loss_plot_is_written(demo):
  path = demo["workdir"] / "loss.png"
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(path) > 10_000
