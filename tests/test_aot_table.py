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


def test_a_cell_whose_program_is_unchanged_is_kept_without_a_compile(table_script, tmp_path,
                                                                     monkeypatch):
  """Source files changed (another `code`): the cell is lowered again; the same program hash keeps
  it (marked current, verified at this commit), another one recompiles it."""
  module, compiled = table_script
  lowered = []
  monkeypatch.setattr(module, "program_hash",
                      lambda key, micro: lowered.append((key, micro)) or f"hash-of-{key}")
  results = tmp_path / "cells.json"
  old = {"micro_batches": 4, "fits": True, "total_gib": 9.0, "oom": "", **VERSION,
         "code": "older", "commit": "old1"}
  results.write_text(json.dumps({
      "7b:sft:v5e-16": {**old, "program_hash": "hash-of-7b:sft:v5e-16"},
      "13b:sft:v4-32": {**old, "program_hash": "another program"},
      "7b:sft:v4-32": {**old, "program_hash": "hash-of-7b:sft:v4-32", "libtpu": "0.0.1"}}))
  module.main(["--cells", "7b:sft:v5e-16,13b:sft:v4-32,7b:sft:v4-32", "--results", str(results)])
  assert sorted(lowered) == [("13b:sft:v4-32", 4), ("7b:sft:v5e-16", 4)]  # not the other libtpu
  assert compiled == ["7b:sft:v4-32", "13b:sft:v4-32"]
  kept = json.loads(results.read_text())["7b:sft:v5e-16"]
  assert (kept["code"], kept["verified_at"], kept["commit"], kept["total_gib"]) == (
      "c0de", "abc123", "old1", 9.0)


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
  assert rows["| 33B | sft"].startswith("| 33B | sft | does not fit at accum 2 (Ran out) |")
  assert ("at commit abc123 (jax 0.10.2, libtpu 0.0.52): 2 of 27 cells compiled from this code "
          "(at abc123)") in text


def test_long_context_cells_start_at_16k_tokens_per_chip_and_show_their_commit(table_script,
                                                                               tmp_path):
  """Five-part patterns select the long-context cells (`*` stays the paper's 27); the search
  starts at 16,384 tokens per chip per micro-batch; the README's long table shows every stored
  figure with its commit, even from older code, and an interrupted compile as not compiled."""
  module, compiled = table_script
  assert len(module.selected("*")) == 27
  assert module.selected("7b:pretrain_stage2:v5e-16:*:xla") == [
      "7b:pretrain_stage2:v5e-16:4096:xla", "7b:pretrain_stage2:v5e-16:16384:xla"]
  config = module.stage_config("pretrain_stage2", "7b")  # 1024 rows
  first = {(t, n): module.long_overrides(config, t, n, "auto")["first_micro_batches"]
           for t in ("v5e-16", "v5p-64") for n in (4096, 16384)}
  # 1024 rows x 4096 / 16 chips / 16 = 16,384 tokens per chip (v5p-64: 32 chips)
  assert first == {("v5e-16", 4096): 16, ("v5e-16", 16384): 64, ("v5p-64", 4096): 8,
                   ("v5p-64", 16384): 32}
  results = tmp_path / "cells.json"
  cell = {"micro_batches": 16, "fits": True, "total_gib": 9.55, "oom": "", "compile_seconds": 540,
          **VERSION}
  results.write_text(json.dumps({
      "7b:pretrain_stage2:v5e-16:4096:auto": cell,
      "7b:pretrain_stage2:v5e-16:4096:xla": {**cell, "code": "older", "commit": "def456",
                                             "fits": False, "oom": "Ran out of memory on HBM, "
                                             "the total memory required (40G) exceeds 15.75G"},
      "7b:pretrain_stage2:v5p-64:4096:auto": {"started": "2026-11-30 00:40 UTC", **VERSION}}))
  readme = tmp_path / "README.md"
  readme.write_text("<!-- aot_table:begin -->\n<!-- aot_table:end -->\n"
                    "<!-- aot_long:begin -->\nold\n<!-- aot_long:end -->\n")
  module.main(["--table_only", "--write_readme", "--readme", str(readme),
               "--results", str(results)])
  rows = [line for line in readme.read_text().splitlines() if line.startswith("| 4,096")]
  assert rows == [
      "| 4,096 | auto | 9.55 GiB, accum 16, fits [9 min, abc123] | not compiled: started "
      "2026-11-30 00:40 UTC at abc123, no result (stopped or still running) |",
      "| 4,096 | xla | does not fit at accum 16 (total memory required (40G) exceeds 15.75G) "
      "[9 min, def456, code changed since] | not compiled |"]
  compiled.clear()
  with pytest.raises(TypeError):  # the stub takes three parts: the marker is stored first
    module.main(["--cells", "7b:pretrain_stage2:v5p-64:16384:xla", "--results", str(results)])
  marker = json.loads(results.read_text())["7b:pretrain_stage2:v5p-64:16384:xla"]
  assert marker["commit"] == "abc123" and "started" in marker and "total_gib" not in marker
