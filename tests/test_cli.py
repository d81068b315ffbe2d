"""Command-line entry points: a problem with the input is one short `error:` line, exit status 1."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_preset_in_a_config_file_is_one_short_line():
  run = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train.py"),
                        "--config=configs/sft.py:70b"], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
  assert run.returncode == 1
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1, run.stderr[-2000:]
  assert lines[0].startswith("error: unknown model preset '70b'; expected one of ['13b', '33b'")
  assert lines[0].endswith("]") and "'7b'" in lines[0] and len(lines[0]) < 300
