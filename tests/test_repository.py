"""The repository stands alone: no tracked file names a path of one machine or outside the clone."""
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Built from pieces so this file does not match itself.
OUTSIDE = re.compile("|".join([
    "/" + "work/",  # a path of the machine the project was written on
    r"/home/[a-z]", "/" + "Users/",  # someone's home directory
    r"\.\./" + r"shared(?!/fixtures)",  # a sibling of the clone, but the fixtures tests document
]))


def _tracked_text_files() -> list[str]:
  run = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True)
  if run.returncode:
    pytest.skip(f"not a git checkout: {run.stderr.strip()[:200]}")
  names = run.stdout.split("\0")
  return [n for n in names if n and os.path.isfile(os.path.join(REPO, n))]


def test_no_tracked_file_names_a_path_outside_the_repository():
  found = []
  for name in _tracked_text_files():
    with open(os.path.join(REPO, name), "rb") as f:
      data = f.read()
    if b"\0" in data:  # binary
      continue
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
      if OUTSIDE.search(line):
        found.append(f"{name}:{number}: {line.strip()[:120]}")
  assert not found, "paths outside the repository:\n" + "\n".join(found)


def test_the_pattern_catches_what_it_is_for():
  assert OUTSIDE.search("/" + "work/venv/bin/python bench/train_step.py")
  assert OUTSIDE.search("[design](../" + "shared/DESIGN.md)")
  assert not OUTSIDE.search("../" + "shared/fixtures/tokenizers/llama_tokenizer.model")
  assert not OUTSIDE.search("python launch/train.py --workdir=/tmp/run")
