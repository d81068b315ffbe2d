"""The plan of a run: the dry run, the AOT compile's inputs and a built run agree on every shape,
dtype and sharding, for each stage config; the configs hold the paper's settings."""
import math

import jax
import numpy as np
import pytest

from cnllama_jax import aot, build, plan as plan_lib, sharding as shd
from tests.runs import load_config, sentencepiece_model

STAGES = ("pretrain_stage1", "pretrain_stage2", "sft")
TOKENIZER_PIECES = 300  # larger than the tiny base's 99: the vocabulary is resized to it


def _described(tree):
  """{path: (shape, dtype)} of a tree of arrays or ShapeDtypeStructs."""
  return {jax.tree_util.keystr(p): (tuple(x.shape), np.dtype(x.dtype))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shardings(tree):
  return {jax.tree_util.keystr(p): x.sharding
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same_shardings(got, want):
  assert got.keys() == want.keys()
  for key, sharding in want.items():
    assert got[key] == sharding, f"{key}: {got[key]} != {sharding}"


def _real_count(tree, vocab):
  """Elements of a param tree, counting `vocab` rows of the embedding and LM head."""
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = list(x.shape)
    name = path[0].key
    if name in ("embed_tokens", "lm_head"):
      shape[0 if name == "embed_tokens" else 1] = vocab
    total += math.prod(shape)
  return total


def _bytes_on_first_device(tree):
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return sentencepiece_model(tmp_path_factory.mktemp("tok"), TOKENIZER_PIECES)


@pytest.mark.parametrize("name", STAGES)
def test_dry_run_aot_and_built_run_agree_after_a_tokenizer_resize(name, tokenizer):
  config = load_config(name)
  config.tokenizer = tokenizer
  mesh = shd.make_mesh((2, 2, 2))  # the vocabulary pads to a multiple of 256 here
  run = build.build(plan_lib.plan(config, mesh))
  plan = plan_lib.plan(config, mesh)  # planned again, independently of the built run
  assert (plan.cfg.vocab_size, plan.cfg.padded_vocab_size) == (300, 512)
  assert run.frozen["layers"]["mlp"]["down_proj"]["kernel"].shape == (2, 176, 64)

  # The AOT path lowers the plan's abstract trees: they are the built run's arrays exactly.
  lowered = aot.lower(plan)
  (frozen_info, state_info, batch_info), _ = lowered.args_info
  assert _described(frozen_info) == _described(plan.frozen) == _described(run.frozen)
  assert _described(state_info) == _described(plan.state) == _described(run.state)
  assert _described(batch_info) == _described(plan.batch)
  assert all(i.donated for i in jax.tree_util.tree_leaves(state_info))
  assert not any(i.donated for i in jax.tree_util.tree_leaves(frozen_info))
  _assert_same_shardings(_shardings(plan.frozen), _shardings(run.frozen))
  _assert_same_shardings(_shardings(plan.state), _shardings(run.state))

  # The dry run's figures are those of the built arrays.
  report = plan_lib.dry_run(plan)
  trainable = _real_count(run.state.trainable, TOKENIZER_PIECES)
  assert report["total"] == _real_count(run.frozen, TOKENIZER_PIECES) + trainable
  assert report["trainable"] == trainable
  assert report["param_bytes_per_device"] == _bytes_on_first_device((run.frozen,
                                                                     run.state.trainable))
  assert report["opt_bytes_per_device"] == _bytes_on_first_device(run.state.opt_state)
  assert report["devices"] == 8


def test_lora_new_rows_trains_the_rows_the_tokenizer_added(tokenizer):
  config = load_config("sft")
  config.tokenizer = tokenizer
  config.train.trainable = "lora+new_rows"
  assert plan_lib.plan(config, shd.make_mesh((1, -1, 1))).new_rows == (99, TOKENIZER_PIECES)


@pytest.mark.parametrize("name, preset, total, trainable", [
    ("pretrain_stage1", "7b", 6885486592, 204607488),
    ("pretrain_stage2", "7b", 6905475072, 429203456),
    ("sft", "7b", 6905483264, 429211648),
    ("sft", "13b", 13231006720, 542822400),
])
def test_paper_scale_plans_agree_with_their_aot_inputs(name, preset, total, trainable):
  """Abstract only: nothing of 7B / 13B is allocated or compiled."""
  plan = plan_lib.plan(load_config(name, preset), shd.make_mesh((1, -1, 1)))
  report = plan_lib.dry_run(plan)
  assert (report["total"], report["trainable"]) == (total, trainable)
  (frozen_info, state_info, batch_info), _ = aot.lower(plan).args_info
  assert _described(frozen_info) == _described(plan.frozen)
  assert _described(state_info) == _described(plan.state)
  assert _described(batch_info) == {f"['{k}']": ((plan.config.train.global_batch_size, 512),
                                                  np.dtype(np.int32)) for k in plan_lib.BATCH_KEYS}
  embed = plan.params["embed_tokens"]
  assert embed.sharding.shard_shape(embed.shape)[1] * 8 == plan.cfg.hidden_size  # fsdp: 8 ways


def test_batch_not_divisible_by_data_parallel_size_is_an_error():
  with pytest.raises(ValueError, match=r"global_batch_size=6 .* not divisible by the "
                                       r"data-parallel size 4"):
    plan_lib.check_batch(6, 1, shd.make_mesh((2, 2, 2)), shd.DEFAULT_RULES)


# --- the paper's configs ---------------------------------------------------------------------

@pytest.mark.parametrize("name, preset, percent", [
    ("sft", "7b", "6.22%"), ("sft", "13b", "4.10%"), ("sft", "33b", "2.21%")])
def test_dry_run_reports_the_papers_trainable_share(name, preset, percent):
  report = plan_lib.dry_run(plan_lib.plan(load_config(name, preset), shd.single_device_mesh()))
  assert f"{report['percent']:.2f}%" == percent


def test_paper_hyperparameters_in_configs():
  s1, s2, sft = (load_config(n, "7b") for n in ("pretrain_stage1", "pretrain_stage2", "sft"))
  assert (s1.train.trainable, s1.train.learning_rate, s1.train.global_batch_size) == (
      "embeddings", 2e-4, 1024)
  assert (s2.lora.rank, s2.lora.alpha, s2.lora.dropout, s2.train.learning_rate) == (8, 32, 0.05, 1e-4)
  assert (sft.train.warmup_ratio, sft.train.weight_decay, sft.train.global_batch_size,
          sft.model.vocab_size, sft.train.seq_len) == (0.03, 0.0, 512, 49954, 512)
  assert s2.train.weight_decay == 0.01 and s2.train.warmup_ratio == 0.05
