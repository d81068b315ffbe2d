"""HF import: logits equal `transformers` on every layout, attention variant and padding."""
import json
import os
import shutil

import numpy as np
import pytest

import cnllama_jax
from tests import hf_models

TOL = 1e-4


def _batch(vocab, batch=3, length=11, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, vocab, size=(batch, length)).astype(np.int32)


def _max_diff(ours, theirs, mask=None):
  diff = np.abs(np.asarray(ours) - theirs)
  if mask is not None:
    diff = diff[np.asarray(mask, bool)]
  return float(diff.max())


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "bin-sharded"])
def test_logits_match_transformers_for_every_file_layout(tmp_path, layout):
  model = hf_models.make_hf_llama(seed=1, num_key_value_heads=2)
  path = hf_models.save(model, str(tmp_path / layout), layout)
  if layout == "sharded":
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
  cfg, params = cnllama_jax.load_hf(path)
  ids = _batch(99)
  assert cfg.vocab_size == 99 and cfg.num_key_value_heads == 2
  assert _max_diff(cnllama_jax.logits(cfg, params, ids), hf_models.hf_logits(model, ids)) <= TOL


@pytest.mark.parametrize("shape", [
    dict(num_attention_heads=4, num_key_value_heads=4),  # multi-head
    dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64),  # grouped-query
    dict(num_attention_heads=4, num_key_value_heads=1),  # multi-query
    dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48, vocab_size=131,
         rope_theta=500000.0, rms_norm_eps=1e-5, num_hidden_layers=3),
    dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=24,
         tie_word_embeddings=True),  # head_dim != hidden / heads, tied head,
])
def test_logits_match_transformers_across_attention_shapes(tmp_path, shape):
  model = hf_models.make_hf_llama(seed=2, **shape)
  cfg, params = cnllama_jax.load_hf(hf_models.save(model, str(tmp_path / "m"), "safetensors"))
  ids = _batch(cfg.vocab_size, seed=3)
  assert _max_diff(cnllama_jax.logits(cfg, params, ids), hf_models.hf_logits(model, ids)) <= TOL


def test_left_padded_row_gives_the_unpadded_logits(tmp_path):
  model = hf_models.make_hf_llama(seed=4, num_key_value_heads=2)
  cfg, params = cnllama_jax.load_hf(hf_models.save(model, str(tmp_path / "m"), "safetensors"))
  ids = _batch(99, batch=2, length=9, seed=5)
  mask = np.ones_like(ids)
  mask[1, :4] = 0  # row 1 is left-padded by 4
  ids[1, :4] = 0
  ours = np.asarray(cnllama_jax.logits(cfg, params, ids, mask))
  assert _max_diff(ours, hf_models.hf_logits(model, ids, mask), mask) <= TOL
  unpadded = np.asarray(cnllama_jax.logits(cfg, params, ids[1:, 4:]))
  assert np.abs(ours[1, 4:] - unpadded[0]).max() <= 1e-5


def test_padded_vocabulary_rows_are_dropped_and_never_win(tmp_path):
  model = hf_models.make_hf_llama(seed=6)
  cfg, params = cnllama_jax.load_hf(hf_models.save(model, str(tmp_path / "m"), "safetensors"))
  assert cfg.padded_vocab_size == 128 and params["embed_tokens"].shape == (128, 64)
  assert not np.any(np.asarray(params["embed_tokens"])[99:])
  assert cnllama_jax.logits(cfg, params, _batch(99)).shape == (3, 11, 99)


def test_bf16_checkpoint_loads_bitwise_into_requested_dtype_in_small_read_jobs(tmp_path,
                                                                              monkeypatch):
  import torch
  from cnllama_jax import hf
  model = hf_models.make_hf_llama(seed=7).to(torch.bfloat16)
  path = hf_models.save(model, str(tmp_path / "m"), "safetensors")
  # 1000-byte jobs: 3 rows of 64 fp32 each, so every tensor is many jobs on several threads and
  # every transpose ends in a partial tile.
  monkeypatch.setattr(hf, "_BLOCK_BYTES", 1000)
  cfg, params = cnllama_jax.load_hf(path, dtype="float32")
  hf_weights = {k: v.float().numpy() for k, v in model.state_dict().items()}  # [out, in]
  layers = params["layers"]
  for i in range(2):
    assert np.array_equal(np.asarray(layers["mlp"]["up_proj"]["kernel"][i]),
                          hf_weights[f"model.layers.{i}.mlp.up_proj.weight"].T)  # [64, 176]
    assert np.array_equal(np.asarray(layers["mlp"]["down_proj"]["kernel"][i]),
                          hf_weights[f"model.layers.{i}.mlp.down_proj.weight"].T)  # [176, 64]
    assert np.array_equal(np.asarray(layers["input_layernorm"]["scale"][i]),
                          hf_weights[f"model.layers.{i}.input_layernorm.weight"])  # [64]
  embed, head = np.asarray(params["embed_tokens"]), np.asarray(params["lm_head"])
  assert embed.shape == (128, 64) and head.shape == (64, 128)
  assert np.array_equal(embed[:99], hf_weights["model.embed_tokens.weight"]) and not embed[99:].any()
  assert np.array_equal(head[:, :99], hf_weights["lm_head.weight"].T) and not head[:, 99:].any()
  cfg, params = cnllama_jax.load_hf(path, dtype="bfloat16")
  assert params["embed_tokens"].dtype == np.dtype("bfloat16")


def test_transpose_into_a_strided_destination_equals_the_transpose():
  from cnllama_jax import hf
  block = np.arange(37 * 4100, dtype=np.float32).reshape(37, 4100)  # partial tiles both ways
  dest = np.zeros((4100, 50), np.float32)
  hf._transpose_into(block, dest[:, 5:42])
  assert np.array_equal(dest[:, 5:42], block.T)
  assert not dest[:, :5].any() and not dest[:, 42:].any()


# --- errors ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ok") / "m")
  return hf_models.save(hf_models.make_hf_llama(seed=8), path, "safetensors")


def _copy(saved, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(saved, dst)
  return dst


def _rewrite_weights(path, edit):
  from safetensors.numpy import load_file, save_file
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file)


def test_missing_config_json_is_named(saved, tmp_path):
  path = _copy(saved, tmp_path)
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(FileNotFoundError, match=r"config\.json.*no config\.json"):
    cnllama_jax.load_hf(path)


def test_non_llama_architecture_is_named(saved, tmp_path):
  path = _copy(saved, tmp_path)
  file = os.path.join(path, "config.json")
  hf = json.load(open(file))
  hf.update(model_type="mistral", architectures=["MistralForCausalLM"])
  json.dump(hf, open(file, "w"))
  with pytest.raises(ValueError, match=r"model_type='mistral'.*expected a LLaMA model"):
    cnllama_jax.load_hf(path)


def test_missing_keys_are_listed(saved, tmp_path):
  path = _copy(saved, tmp_path)
  _rewrite_weights(path, lambda t: [t.pop("model.layers.1.mlp.up_proj.weight"),
                                    t.pop("model.norm.weight")])
  with pytest.raises(ValueError, match=r"missing keys \(2\): model\.layers\.1\.mlp\.up_proj\.weight, "
                                       r"model\.norm\.weight"):
    cnllama_jax.load_hf(path)


def test_unexpected_keys_are_listed(saved, tmp_path):
  path = _copy(saved, tmp_path)
  _rewrite_weights(path, lambda t: t.update({"model.layers.2.mlp.up_proj.weight":
                                             np.zeros((176, 64), np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected keys \(1\): model\.layers\.2\.mlp\.up_proj\.weight"):
    cnllama_jax.load_hf(path)


def test_shape_mismatch_names_key_found_and_expected(saved, tmp_path):
  path = _copy(saved, tmp_path)
  _rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                             np.zeros((32, 64), np.float32)}))
  with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight in "
                                       r"model\.safetensors has shape \(32, 64\), expected \(64, 64\)"):
    cnllama_jax.load_hf(path)


def test_missing_weights_and_truncated_file_are_named(saved, tmp_path):
  path = _copy(saved, tmp_path)
  file = os.path.join(path, "model.safetensors")
  with open(file, "r+b") as f:
    f.truncate(os.path.getsize(file) - 100)
  with pytest.raises(ValueError, match=r"model\.safetensors: truncated"):
    cnllama_jax.load_hf(path)
  os.remove(file)
  with pytest.raises(FileNotFoundError, match=r"no weights found; expected one of"):
    cnllama_jax.load_hf(path)
