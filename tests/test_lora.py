"""LoRA: adapters reproduce the base when fresh, PEFT's init, merge, target and partition errors."""
import jax
import numpy as np
import pytest

from cnllama_jax import config as model_config
from cnllama_jax import lora as lora_lib, model
from tests.runs import flat


# --- LoRA ----------------------------------------------------------------------------------------

def test_fresh_lora_reproduces_the_base_logits():
  cfg = model_config.preset("tiny", vocab_size=99)
  base = model.init_params(cfg, jax.random.key(0))
  lora = lora_lib.LoraConfig(rank=4, alpha=8.0)
  with_adapters = lora_lib.combine(base, lora_lib.init_adapters(cfg, lora, jax.random.key(1)))
  assert lora_lib.check_adapters(with_adapters, cfg.num_hidden_layers, lora) == 2 * 7
  ids = np.arange(1, 21, dtype=np.int32).reshape(2, 10)
  np.testing.assert_array_equal(model.logits(cfg, base, ids),
                                model.logits(cfg, with_adapters, ids, lora=lora))


def test_lora_a_follows_peft_kaiming_uniform_and_b_is_zero():
  cfg = model_config.preset("tiny", vocab_size=99)
  adapters = flat(lora_lib.init_adapters(cfg, lora_lib.LoraConfig(rank=8), jax.random.key(0)))
  a = adapters["layers/mlp/down_proj/lora_a"]  # [layers, in=176, r]
  bound = 1 / np.sqrt(176)
  assert a.shape == (2, 176, 8) and np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
  assert not adapters["layers/mlp/down_proj/lora_b"].any()


def test_merged_lora_equals_the_adapted_forward():
  cfg = model_config.preset("tiny-gqa", vocab_size=99)
  lora = lora_lib.LoraConfig(rank=4, alpha=16.0)
  params = model.init_params(cfg, jax.random.key(0), lora)
  params = jax.tree_util.tree_map_with_path(  # non-zero B, so the adapters matter
      lambda p, x: x + 0.05 if str(p[-1].key) == "lora_b" else x, params)
  ids = np.arange(1, 25, dtype=np.int32).reshape(2, 12)
  adapted = np.asarray(model.logits(cfg, params, ids, lora=lora))
  merged = lora_lib.merge(params, lora)
  assert not any(k.endswith("lora_a") for k in flat(merged))
  is_adapter = jax.tree_util.tree_map_with_path(lambda p, _: "lora" in str(p[-1].key), params)
  base = lora_lib.split(params, is_adapter)[0]
  assert np.abs(adapted - np.asarray(model.logits(cfg, base, ids))).max() > 1e-3
  assert np.abs(adapted - np.asarray(model.logits(cfg, merged, ids))).max() <= 1e-5


def test_adapter_on_a_missing_target_is_an_error():
  cfg = model_config.preset("tiny", vocab_size=99)
  params = model.init_params(cfg, jax.random.key(0), lora_lib.LoraConfig(rank=2, targets=("q_proj",)))
  with pytest.raises(ValueError, match=r"missing \['v_proj'\]"):
    lora_lib.check_adapters(params, 2, lora_lib.LoraConfig(rank=2, targets=("q_proj", "v_proj")))


def test_unknown_param_matches_no_partition_rule():
  with pytest.raises(ValueError, match=r"param 'layers/self_attn/q_proj/bias' matches no partition"):
    lora_lib.param_group("layers/self_attn/q_proj/bias")


def test_lora_dropout_zeroes_the_rate_scales_the_rest_and_is_a_function_of_its_key():
  x = np.ones((4, 32, 128), np.float32)  # 16,384 elements
  key = jax.random.key(0)
  out = np.asarray(lora_lib.dropout(x, key, 0.25))
  dropped = out == 0
  assert set(np.unique(out)) == {0.0, np.float32(1 / 0.75)}
  assert abs(dropped.mean() - 0.25) < 0.015  # binomial sd 0.0034
  # no structure along rows or features: the drop rates of the 128 features and of the 128 rows
  # spread as a binomial's of 128 draws (sd 0.038), neither constant nor all-or-nothing
  assert 0.025 < dropped.reshape(-1, 128).mean(0).std() < 0.06
  assert 0.025 < dropped.reshape(-1, 128).mean(1).std() < 0.06
  np.testing.assert_array_equal(np.asarray(lora_lib.dropout(x, key, 0.25)), out)
  # the mask depends on the flattened row and the feature only: a reshaped input drops the same
  np.testing.assert_array_equal(np.asarray(lora_lib.dropout(x.reshape(128, 128), key, 0.25)),
                                out.reshape(128, 128))
  # another key (another module, layer or step) draws an independent mask: both drop ~1/16
  other = np.asarray(lora_lib.dropout(x, jax.random.fold_in(key, 1), 0.25)) == 0
  assert abs((dropped & other).mean() - 0.0625) < 0.012
  assert lora_lib.dropout(x, key, 0.0) is x


def test_adapter_delta_with_its_cpu_backward_equals_autodiff():
  """lora.delta (the CPU's hand-written backward): the same output as (x a) b * scale and the
  same gradients of x, a and b as autodiff, for a cotangent that is not all ones."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x, a, b, cotangent = (jnp.asarray(rng.normal(size=s), jnp.float32)
                        for s in ((2, 5, 12), (12, 4), (4, 9), (2, 5, 9)))
  plain = lambda x, a, b: jnp.dot(jnp.dot(x, a), b) * 4.0  # noqa: E731
  fused = lambda x, a, b: lora_lib.delta(x, a, b, 4.0)  # noqa: E731
  want, want_back = jax.vjp(plain, x, a, b)
  got, got_back = jax.vjp(jax.jit(fused), x, a, b)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for g, ref in zip(got_back(cotangent), want_back(cotangent)):
    assert g.shape == ref.shape
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5, atol=1e-5)
