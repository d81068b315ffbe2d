"""bench/aot_table.py: the README memory table, regenerated cell by cell and resumable (the compiler
is replaced by a stub here; tests/test_aot.py compiles for real)."""
import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = {"commit": "abc123", "code": "c0de", "jax": "0.10.2", "libtpu": "0.0.52"}


@pytest.fixture()
def table_script(monkeypatch):
  spec = importlib.util.spec_from_file_location("aot_table", os.path.join(REPO, "bench",
                                                                          "aot_table.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  monkeypatch.setattr(module, "code_version", lambda: dict(VERSION))
  compiled = []

  def compile_cell(model, stage, topology):
    compiled.append(f"{model}:{stage}:{topology}")
    if topology == "v5p-64" and model == "33b":
      raise RuntimeError("interrupted")
    return {"micro_batches": 2, "fits": True, "total_gib": 9.39 + len(compiled),
            "argument_gib": 0.92, "temp_gib": 8.47, "output_gib": 0.5, "hbm_gib": 16.0,
            "oom": "", "rejected": [{"micro_batches": 1, "why": "Ran out of memory"}],
            "compile_seconds": 1.0, "date": "2025-01-01"}
  monkeypatch.setattr(module, "compile_cell", compile_cell)
  return module, compiled


def test_cells_are_stored_one_by_one_and_skipped_on_rerun(table_script, tmp_path):
  module, compiled = table_script
  results = tmp_path / "cells.json"
  stale = {"micro_batches": 1, "fits": True, "total_gib": 15.26, "oom": "", **VERSION,
           "code": "older"}
  results.write_text(json.dumps({"13b:sft:v4-32": stale}))
  with pytest.raises(RuntimeError, match="interrupted"):  # the third cell fails
    module.main(["--cells", "13b:sft:v4-32,7b:sft:v5e-16,33b:sft:v5p-64",
                 "--results", str(results)])
  assert compiled == ["7b:sft:v5e-16", "13b:sft:v4-32", "33b:sft:v5p-64"]  # stale cell redone
  stored = json.loads(results.read_text())
  assert sorted(stored) == ["13b:sft:v4-32", "7b:sft:v5e-16"]  # finished before the failure
  assert stored["13b:sft:v4-32"]["total_gib"] == 11.39 and stored["13b:sft:v4-32"]["code"] == "c0de"
  compiled.clear()
  module.main(["--cells", "13b:sft:v4-32,7b:sft:v5e-16", "--results", str(results)])
  assert compiled == []  # both current: nothing compiled again


def test_readme_table_shows_only_cells_of_the_current_code(table_script, tmp_path):
  module, _ = table_script
  results = tmp_path / "cells.json"
  cell = {"micro_batches": 2, "fits": True, "total_gib": 9.39, "oom": "", **VERSION}
  results.write_text(json.dumps({"7b:pretrain_stage1:v5e-16": cell,
                                 "7b:sft:v5e-16": {**cell, "code": "older", "total_gib": 10.7},
                                 "33b:sft:v5e-16": {**cell, "fits": False, "oom": "Ran out"}}))
  readme = tmp_path / "README.md"
  readme.write_text("intro\n<!-- aot_table:begin -->\nold table\n<!-- aot_table:end -->\nrest\n")
  module.main(["--table_only", "--write_readme", "--readme", str(readme),
               "--results", str(results)])
  text = readme.read_text()
  assert text.startswith("intro\n<!-- aot_table:begin -->\n| model | stage | v5e-16 | v4-32 |")
  assert text.endswith("\n<!-- aot_table:end -->\nrest\n") and "old table" not in text
  rows = {line.split(" | ")[0] + " | " + line.split(" | ")[1]: line for line in text.splitlines()
          if line.startswith("| 7B") or line.startswith("| 33B")}
  assert rows["| 7B | pretrain_stage1"] == (
      "| 7B | pretrain_stage1 | 9.39 GiB, accum 2, fits | not regenerated | not regenerated |")
  assert rows["| 7B | sft"].startswith(  # made from other code: never shown as current
      "| 7B | sft | not regenerated (was 10.70 GiB, accum 2 at abc123) |")
  assert rows["| 33B | sft"].startswith("| 33B | sft | does not fit (accum 2) |")
  assert ("at commit abc123 (jax 0.10.2, libtpu 0.0.52): 2 of 27 cells compiled from this code "
          "(at abc123)") in text
