"""The Colab quickstart runs top to bottom offline on CPU and leaves the values it promises.

Code cells run in one namespace, each from a fresh temporary working directory; shell (`!`) and
magic (`%`) lines are skipped, as no Jupyter kernel is involved.
"""
import json
import math
import os
import shutil

import numpy as np
import pytest

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "notebooks", "colab_quickstart.ipynb")


def _code_cells() -> list[str]:
  with open(NOTEBOOK, encoding="utf-8") as f:
    notebook = json.load(f)
  cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
  return ["".join(line for line in "".join(c["source"]).splitlines(keepends=True)
                  if not line.lstrip().startswith(("!", "%"))) for c in cells]


def test_notebook_is_nbformat_4_with_no_stored_outputs():
  with open(NOTEBOOK, encoding="utf-8") as f:
    notebook = json.load(f)
  assert notebook["nbformat"] == 4
  kinds = [c["cell_type"] for c in notebook["cells"]]
  assert set(kinds) == {"markdown", "code"} and kinds[0] == "markdown"
  for c in notebook["cells"]:
    if c["cell_type"] == "code":
      assert c["outputs"] == [] and c["execution_count"] is None


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
  """The notebook's globals after running every code cell once (shared by the tests below)."""
  ns = {"__name__": "__main__"}
  with pytest.MonkeyPatch.context() as monkeypatch:
    for index, source in enumerate(_code_cells()):
      monkeypatch.chdir(tmp_path_factory.mktemp(f"cell{index}"))
      exec(compile(source, f"{NOTEBOOK}:code cell {index}", "exec"), ns)  # pylint: disable=exec-used
  yield ns
  shutil.rmtree(ns["workdir"], ignore_errors=True)  # the notebook's tempfile.mkdtemp()


def test_loaded_model_gives_logits_of_the_tiny_shape(namespace):
  assert np.asarray(namespace["base_logits"]).shape == (1, 8, 99)
  if namespace["hf_model"] is not None:
    assert namespace["hf_diff"] < 1e-4  # JAX import vs transformers on the same weights


def test_greedy_generation_gives_the_requested_tokens(namespace):
  generated = namespace["generated"]
  assert len(generated) == 1 and len(generated[0]) == 8
  assert all(0 <= t < 99 for t in generated[0])


def test_lora_fine_tuning_losses_are_finite_and_fall(namespace):
  losses = namespace["losses"]
  assert len(losses) == 6  # 12 steps, logged every 2
  assert all(math.isfinite(x) for x in losses)
  assert losses[-1] < losses[0]


def test_merged_export_reloads_with_the_same_logits(namespace):
  assert namespace["merge_diff"] <= 1e-4
  assert namespace["export_diff"] <= 1e-4
  reloaded, merged = namespace["reloaded_logits"], namespace["merged_logits"]
  np.testing.assert_allclose(np.asarray(reloaded), np.asarray(merged), atol=1e-4, rtol=0)
  # Training moved the weights: the export is not the base model.
  assert np.max(np.abs(np.asarray(merged) - np.asarray(namespace["base_logits"]))) > 1e-3


def test_exports_hold_hf_and_peft_files(namespace):
  assert {"config.json", "model.safetensors"} <= set(os.listdir(namespace["hf_dir"]))
  assert {"adapter_config.json", "adapter_model.safetensors"} <= set(
      os.listdir(namespace["peft_dir"]))
