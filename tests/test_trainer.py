"""The loop of one stage returns its final state and reports only through the writers it is given;
the writers: console lines, the metrics.jsonl history rewritten from the resumed step, TensorBoard."""
import json
import os

import numpy as np
import pytest

from cnllama_jax import paths, run_data, sharding as shd, trainer, writers
from tests.runs import build_on, tiny_config


class Recorder:
  def __init__(self):
    self.scalars, self.lines = [], []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))

  def write_text(self, line):
    self.lines.append(line)

  def close(self):
    pass


def test_fit_returns_the_final_state_and_reports_through_its_writers(tmp_path):
  config = tiny_config(steps=4, log_every=2, eval_every=4, save_every=0)
  run = build_on(config, shd.single_device_mesh())
  data = run_data.datasets(run.plan.data, run.cfg.vocab_size, str(tmp_path))
  for example in data["train"]:  # the last 4 of each row's 16 tokens are padding
    example["attention_mask"] = (np.arange(16) < 12).astype(np.int32)
  recorder = Recorder()
  result = trainer.fit(run, data, str(tmp_path), recorder)
  assert int(result["state"].step) == 4 and result["preempted"] is None
  assert [step for step, s in recorder.scalars if "loss" in s] == [2, 4]
  assert [step for step, s in recorder.scalars if "eval_loss" in s] == [4]
  assert [row["step"] for row in result["history"]] == [2, 4]
  for row in result["history"]:
    assert row["real_token_fraction"] == 0.75
    assert row["real_tokens_per_s"] == pytest.approx(0.75 * row["tokens_per_s"])
  assert recorder.lines[0] == f"training from step 0 (no checkpoint in {tmp_path}/checkpoints)"
  assert recorder.lines[1].startswith("MFU against peak ") and "measured fp32 matmul" in (
      recorder.lines[1])
  assert len(recorder.lines) == 2
  assert sorted(os.listdir(tmp_path)) == ["checkpoints"]  # no metrics, TensorBoard or config


def _row(step):
  return {"loss": 1.0 / step, "accuracy": 0.5, "learning_rate": 1e-3, "grad_norm": 1.0,
          "tokens_per_s": 1000.0, "real_tokens_per_s": 250.0, "mfu": 0.01, "step": step}


def test_jsonl_history_is_rewritten_from_the_first_step_a_resumed_run_writes(tmp_path):
  first = writers.JsonlWriter(str(tmp_path))
  for step in range(1, 7):
    first.write_scalars(step, _row(step))
  first.write_scalars(6, {"eval_loss": 2.0})  # evaluations are not part of the history
  resumed = writers.JsonlWriter(str(tmp_path))  # resumed from the checkpoint of step 3
  resumed.write_scalars(4, _row(4))
  with open(tmp_path / writers.HISTORY, encoding="utf-8") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
  assert [r["step"] for r in writers.load_history(str(tmp_path), 2)] == [1, 2]


def test_console_prints_a_line_per_logged_step_and_evaluation(capsys):
  console = writers.ConsoleWriter(total_steps=20, progress=False)
  console.write_scalars(5, _row(5))
  console.write_scalars(20, {"eval_loss": 2.0, "eval_perplexity": 7.389, "eval_accuracy": 0.25})
  console.write_text("preempted")
  console.close()
  assert capsys.readouterr().out.splitlines() == [
      "step 5/20 loss 0.2000 acc 0.500 lr 1.00e-03 grad_norm 1.000 tokens/s 1,000 real 250 "
      "MFU 1.0%",
      "step 20 eval loss 2.0000 ppl 7.39 acc 0.250",
      "preempted"]


def _event_tags(directory) -> list[str]:
  """Scalar tags in TensorBoard event files (TFRecord framing: length, crc, event, crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  tags = []
  for name in os.listdir(directory):
    data = (directory / name).read_bytes()
    offset = 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      tags += [(v.tag, event.step) for v in event.summary.value]
      offset += 16 + length
  return sorted(tags)


def test_tensorboard_scalars_are_under_train_and_eval(tmp_path):
  board = writers.TensorBoardWriter(str(tmp_path))
  board.write_scalars(5, {"loss": 0.5})
  board.write_scalars(5, {"eval_loss": 0.7})
  board.close()
  assert _event_tags(tmp_path / "tensorboard") == [("eval/eval_loss", 5), ("train/loss", 5)]


def test_tensorboard_on_a_bucket_uploads_its_events_and_leaves_no_local_copy(gcs, tmp_path):
  url = gcs.bucket() + "/run"
  board = writers.TensorBoardWriter(url)
  board.write_scalars(3, {"loss": 0.25})
  board.close()
  assert not os.path.exists(board.local)
  names = paths.listdir(f"{url}/tensorboard")
  assert len(names) == 1 and names[0].startswith("events.out")
  paths.copy_tree(f"{url}/tensorboard", str(tmp_path))
  assert _event_tags(tmp_path) == [("train/loss", 3)]
