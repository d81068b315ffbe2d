"""RoPE scaling: logits equal `transformers` for every scaling type past the original context;
HF config.json round trip (transformers 4 `rope_scaling` and 5 `rope_parameters`); presets;
one-line errors."""
import json

import numpy as np
import pytest

import cnllama_jax
from cnllama_jax import config as model_config
from tests import hf_models

TOL = 1e-4
ORIGINAL = 32  # the tiny models' (original) context; the batches run to 80 positions

SCALINGS = {
    "linear": dict(rope_type="linear", factor=4.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL,
                 beta_fast=32.0, beta_slow=1.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=ORIGINAL),
}


@pytest.mark.parametrize("kind", SCALINGS)
def test_scaled_rope_logits_match_transformers_past_the_original_context(tmp_path, kind):
  max_pos = ORIGINAL if kind in ("linear", "dynamic") else 4 * ORIGINAL
  model = hf_models.make_hf_llama(seed=11, num_key_value_heads=2, max_position_embeddings=max_pos,
                                  rope_scaling=dict(SCALINGS[kind]))
  cfg, params = cnllama_jax.load_hf(hf_models.save(model, str(tmp_path / kind), "safetensors"))
  assert cfg.rope_scaling.rope_type == kind
  rng = np.random.default_rng(12)
  ids = rng.integers(0, 99, size=(2, 80)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :9] = 0  # left padding: row 1's positions run to 70
  ours = np.asarray(cnllama_jax.logits(cfg, params, ids, mask))
  theirs = hf_models.hf_logits(model, ids, mask)
  assert float(np.abs(ours - theirs)[mask.astype(bool)].max()) <= TOL


def test_scaling_changes_the_logits_past_the_original_context(tmp_path):
  """The parity above is not vacuous: plain rotary embeddings give other logits there."""
  model = hf_models.make_hf_llama(seed=11, max_position_embeddings=ORIGINAL,
                                  rope_scaling=dict(SCALINGS["linear"]))
  cfg, params = cnllama_jax.load_hf(hf_models.save(model, str(tmp_path / "m"), "safetensors"))
  ids = np.random.default_rng(12).integers(0, 99, size=(1, 80)).astype(np.int32)
  plain = cfg.replace(rope_scaling=model_config.RopeScaling())
  diff = np.abs(np.asarray(cnllama_jax.logits(cfg, params, ids)) -
                np.asarray(cnllama_jax.logits(plain, params, ids)))
  assert float(diff[0, 40:].max()) > 10 * TOL  # random tiny weights: small logits


@pytest.mark.parametrize("kind", SCALINGS)
def test_rope_scaling_round_trips_through_hf_config_json(tmp_path, kind):
  import transformers  # pylint: disable=import-outside-toplevel
  cfg = model_config.preset("tiny", vocab_size=99, rope_scaling=SCALINGS[kind])
  hf = model_config.to_hf_dict(cfg)
  assert hf["rope_scaling"]["rope_type"] == kind == hf["rope_parameters"]["rope_type"]
  (tmp_path / "config.json").write_text(json.dumps(hf))
  assert model_config.load_hf_config(str(tmp_path)) == cfg
  # transformers reads the same parameters back (5.x: rope_parameters; 4.x: rope_scaling).
  theirs = transformers.LlamaConfig.from_pretrained(str(tmp_path)).rope_parameters
  assert theirs["rope_type"] == kind and theirs["factor"] == SCALINGS[kind]["factor"]
  for key, value in SCALINGS[kind].items():
    assert theirs[key] == value
  # and a transformers-written config.json reads back to the same config
  transformers.LlamaConfig.from_pretrained(str(tmp_path)).save_pretrained(str(tmp_path / "hf"))
  assert model_config.load_hf_config(str(tmp_path / "hf")).rope_scaling == cfg.rope_scaling


def test_plain_rope_writes_no_scaling():
  hf = model_config.to_hf_dict(model_config.preset("tiny", vocab_size=99))
  assert hf["rope_scaling"] is None
  assert hf["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}


def test_chinese_llama2_presets():
  base = model_config.preset("chinese-llama2-7b")
  assert (base.vocab_size, base.max_position_embeddings, base.rms_norm_eps) == (55296, 4096, 1e-5)
  assert base.rope_scaling.rope_type == "default"
  long = model_config.preset("chinese-llama2-7b-16k")
  assert long.vocab_size == 55296 and long.max_position_embeddings == 4096
  assert (long.rope_scaling.rope_type, long.rope_scaling.factor) == ("linear", 4.0)
  assert model_config.preset("chinese-llama2-13b-16k").hidden_size == 5120
  assert model_config.preset("chinese-llama2-7b", vocab_size=55297).vocab_size == 55297


def test_rope_scaling_from_a_run_config_dict():
  fields = model_config.preset("tiny", vocab_size=99).to_dict()
  fields["rope_scaling"] = {**fields["rope_scaling"], "rope_type": "linear", "factor": 2.0}
  assert model_config.LlamaConfig.from_dict(fields).rope_scaling.factor == 2.0


@pytest.mark.parametrize("hf_rope,message", [
    ({"type": "longrope", "factor": 2.0}, "rope type 'longrope' is not supported"),
    ({"rope_type": "linear"}, "rope type 'linear' needs a 'factor'"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 3}, "rope keys \\['beta_fast'\\]"),
])
def test_bad_hf_rope_is_a_one_line_error(hf_rope, message):
  hf = model_config.to_hf_dict(model_config.preset("tiny", vocab_size=99))
  hf["rope_scaling"] = hf_rope
  with pytest.raises(ValueError, match=message) as err:
    model_config.from_hf_dict(hf, source="m/config.json")
  assert "\n" not in str(err.value) and "m/config.json" in str(err.value)


def test_unknown_rope_type_in_the_model_config_is_a_one_line_error():
  with pytest.raises(ValueError, match=r"model.rope_scaling.rope_type='ntk'; expected one of"):
    model_config.preset("tiny", rope_scaling={"rope_type": "ntk", "factor": 2.0})
