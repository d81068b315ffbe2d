"""Mesh construction, logical rules, and sharded forward passes equal to one device."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import cnllama_jax
from cnllama_jax import sharding as shd
from tests import hf_models


def test_minus_one_takes_the_remaining_devices():
  assert shd.mesh_shape((2, -1, 1), 8) == (2, 4, 1)
  assert shd.mesh_shape((1, 1, -1), 8) == (1, 1, 8)
  mesh = shd.make_mesh((2, 2, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("requested, message", [
    ((3, -1, 1), r"mesh shape \[3, -1, 1\] does not divide the 8 devices"),
    ((2, 2, 1), r"uses 4 devices but there are 8"),
    ((-1, -1, 1), r"at most one -1"),
    ((2, 2), r"must have 3 entries"),
])
def test_mesh_that_does_not_divide_the_devices_is_an_error(requested, message):
  with pytest.raises(ValueError, match=message):
    shd.mesh_shape(requested, 8)


def test_rules_drop_axes_that_do_not_divide_or_repeat():
  mesh = shd.make_mesh((2, 2, 2))
  rules = shd.DEFAULT_RULES
  assert shd.logical_to_spec(("layers", "embed", "mlp"), rules, mesh, (2, 64, 176)) == \
      P(None, "fsdp", "tensor")
  assert shd.logical_to_spec(("embed", "kv_heads"), rules, mesh, (64, 3)) == P("fsdp", None)
  assert shd.logical_to_spec(shd.BATCH, rules, mesh, (4, 7)) == P(("data", "fsdp"), None)
  assert shd.logical_to_spec(shd.BATCH, rules, mesh, (2, 7)) == P("data", None)


def test_every_param_is_sharded_by_its_logical_names():
  from cnllama_jax import config, model
  cfg = config.preset("tiny", vocab_size=99)
  mesh = shd.make_mesh((2, 2, 2))
  specs = shd.param_shardings(model.abstract_params(cfg), mesh, shd.DEFAULT_RULES)
  assert specs["embed_tokens"].spec == P("tensor", "fsdp")
  assert specs["lm_head"].spec == P("fsdp", "tensor")
  assert specs["layers"]["self_attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert specs["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")


def test_sharded_logits_equal_one_device(tmp_path):
  model = hf_models.make_hf_llama(seed=11, num_attention_heads=8, num_key_value_heads=2)
  path = hf_models.save(model, str(tmp_path / "m"), "sharded")
  cfg1, params1 = cnllama_jax.load_hf(path)
  mesh = shd.make_mesh((2, 2, 2))
  cfg8, params8 = cnllama_jax.load_hf(path, mesh=mesh)
  q = params8["layers"]["self_attn"]["q_proj"]["kernel"]
  assert len(q.sharding.device_set) == 8 and q.sharding.spec == P(None, "fsdp", "tensor")
  assert cfg8.padded_vocab_size % 256 == 0  # 128 x the tensor axis that shards the vocabulary
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 99, size=(4, 13)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[2, :5] = 0
  ids_sharded = jax.device_put(ids, shd.batch_sharding(mesh, shd.DEFAULT_RULES, ids.shape))
  one = np.asarray(cnllama_jax.logits(cfg1, params1, ids, mask))
  eight = np.asarray(cnllama_jax.logits(cfg8, params8, ids_sharded, mask))
  assert np.abs(one - eight).max() <= 1e-5
