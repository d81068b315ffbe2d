"""How `pytest -n 2` deals tests out to its workers (the `pytest_xdist_make_scheduler` hook in
conftest.py): the longest work first, and the tests of a module that share a module-scoped
fixture on one worker.

xdist's default `load` scheduling sends runs of consecutive tests to each worker in collection
order. On two workers that (1) builds a module-scoped fixture (the demo run, a trained workdir)
once on each worker when its tests straddle two runs, and (2) can leave a two-minute test to
start last while the other worker idles. Here every test is its own unit of work except the
tests that use (directly or through other fixtures) a module-scoped fixture of their module,
which form one unit per module; a free worker takes the unit with the largest estimated cost
(ESTIMATE_S: seconds measured under `-n 2`; tests not listed count 1 s), ties in collection order.
Estimates steer only the order: a stale table costs time, never correctness.
"""
from __future__ import annotations

import ast
import collections
import functools
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_S = 1.0
# test (file::name, without parameters; each parameter case counts this much) -> seconds,
# setup included, from `pytest -n 2 --durations` of the whole suite.
ESTIMATE_S = {
    "tests/test_checkpoint.py::test_two_processes_checkpointing_to_a_bucket_resume_on_one_"
    "process_with_the_same_losses": 138,
    "tests/test_demo.py::test_output_is_short_and_free_of_third_party_info_logs": 113,
    "tests/test_storage.py::test_sigkill_with_the_workdir_on_a_bucket_then_resume_gives_"
    "identical_losses": 101,
    "tests/test_checkpoint.py::test_a_checkpoint_from_8_devices_restores_onto_4_and_onto_1": 98,
    "tests/test_export.py::test_convert_exports_a_training_workdir": 92,
    "tests/test_train.py::test_three_steps_on_a_2x2x2_mesh_match_one_device": 80,
    "tests/test_storage_run.py::test_three_stage_run_with_every_path_in_a_bucket_equals_the_"
    "local_run": 75,
    "tests/test_checkpoint.py::test_sigkill_at_a_random_step_then_resume_gives_identical_"
    "losses": 127,
    "tests/test_checkpoint.py::test_full_disk_is_one_line_error_and_keeps_the_checkpoints": 63,
    "tests/test_train.py::test_each_stage_trains_exactly_its_leaves": 45,
    "tests/test_bpe.py::test_stage1_then_sft_on_a_llama3_shaped_base": 52,
    "tests/test_train.py::test_loss_falls_on_a_tiny_corpus": 45,
    "tests/test_train.py::test_gradient_accumulation_equals_one_large_batch": 42,
    "tests/test_checkpoint.py::test_bad_input_is_one_line_error_and_keeps_the_checkpoints": 20,
    "tests/test_attention.py::test_model_with_blockwise_attention_matches_xla_logits_and_"
    "gradients": 36,
    "tests/test_checkpoint.py::test_sigterm_saves_the_current_step_and_exits_0": 35,
    "tests/test_checkpoint.py::test_nan_loss_stops_with_the_step_and_keeps_the_last_good_"
    "checkpoint": 35,
    "tests/test_notebook.py::test_loaded_model_gives_logits_of_the_tiny_shape": 32,
    "tests/test_checkpoint.py::test_damaged_latest_checkpoints_are_reported_and_the_previous_"
    "one_is_used": 31,
    "tests/test_aot.py::test_launch_exits_1_when_the_step_does_not_fit": 29,
    "tests/test_aot.py::test_tiny_stage2_compiles_and_fits_on_v5e_8": 24,
    "tests/test_generate.py::test_padded_vocabulary_is_never_sampled": 22,
    "tests/test_generate.py::test_base_plus_unmerged_adapter_sharded_equals_one_device": 20,
    "tests/test_trainer.py::test_fit_returns_the_final_state_and_reports_through_its_writers": 20,
    "tests/test_attention.py::test_blockwise_matches_xla_outputs_and_gradients": 9,
    "tests/test_bpe.py::test_cli_bpe_train_merge_stats": 17,
}


def _fixture_scope(decorator: ast.expr) -> str | None:
  """'module' for `@pytest.fixture(scope="module")`, 'function' for a plain `@pytest.fixture`,
  None for anything else."""
  call = decorator if isinstance(decorator, ast.Call) else None
  target = call.func if call else decorator
  if not (isinstance(target, ast.Attribute) and target.attr == "fixture"):
    return None
  for keyword in call.keywords if call else ():
    if keyword.arg == "scope" and isinstance(keyword.value, ast.Constant):
      return str(keyword.value.value)
  return "function"


@functools.lru_cache(maxsize=None)
def module_fixture_users(path: str) -> frozenset[str]:
  """Names of the test functions in the file at `path` (relative to the repository) that use a
  fixture of module, package or class scope defined in that file, directly or through other
  fixtures of the file."""
  try:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
      tree = ast.parse(f.read())
  except (OSError, SyntaxError, ValueError):
    return frozenset()
  functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
  shared = {name for name, node in functions.items()
            if any(_fixture_scope(d) in ("module", "package", "class")
                   for d in node.decorator_list)}
  fixtures = {name for name, node in functions.items()
              if any(_fixture_scope(d) for d in node.decorator_list)}

  @functools.lru_cache(maxsize=None)
  def needs_shared(name: str) -> bool:
    if name in shared:
      return True
    node = functions[name]
    return any(arg.arg in fixtures and arg.arg != name and needs_shared(arg.arg)
               for arg in node.args.args)

  return frozenset(name for name in functions
                   if name.startswith("test") and name not in fixtures and needs_shared(name))


def unit_of(nodeid: str) -> str:
  """The unit of work of a test id ('tests/test_x.py::test_y[case]'): its module for a test that
  shares a module-scoped fixture, else the test itself."""
  path, _, rest = nodeid.partition("::")
  name = rest.split("::")[-1].split("[")[0]
  return f"{path}::<module fixtures>" if name in module_fixture_users(path) else nodeid


def estimate_s(nodeid: str) -> float:
  path, _, rest = nodeid.partition("::")
  return ESTIMATE_S.get(f"{path}::{rest.split('::')[-1].split('[')[0]}", DEFAULT_S)


def make_scheduler(config, log):
  """A xdist LoadScopeScheduling whose units are `unit_of` and whose queue pops the unit of the
  largest estimated cost first; None (xdist's own scheduling) where its internals differ."""
  try:
    from xdist.scheduler import LoadScopeScheduling
  except ImportError:
    return None

  class CostQueue(collections.OrderedDict):
    """The work queue: `popitem(last=False)`, xdist's way to take the next unit, takes the
    costliest (the first of equals)."""

    def popitem(self, last=True):
      if last:
        return super().popitem(last=True)
      best = max(self, key=lambda unit: (sum(estimate_s(t) for t in self[unit]), -order[unit]))
      return best, self.pop(best)

  order = {}

  class LongestFirstScheduling(LoadScopeScheduling):

    def __init__(self, config, log=None):
      super().__init__(config, log)
      self.workqueue = CostQueue()

    def _split_scope(self, nodeid: str) -> str:
      unit = unit_of(nodeid)
      order.setdefault(unit, len(order))
      return unit

  scheduler = LongestFirstScheduling(config, log)
  if not isinstance(getattr(scheduler, "workqueue", None), CostQueue):
    return None
  return scheduler
