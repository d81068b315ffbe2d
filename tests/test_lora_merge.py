"""One LoRA merge, one adapter check, one module table (issue 12): every path that folds adapters
into kernels forms the same delta, every entry point names a missing LoRA config in the same words,
and the (in, out) table is the model's."""
import os

import jax
import numpy as np
import pytest

import cnllama_jax
from cnllama_jax import adapters, export, export_meta, flops, generate, tensor_files
from cnllama_jax import lora as lora_lib
from cnllama_jax import model as model_lib
from cnllama_jax.config import LlamaConfig

CFG = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "o_proj", "down_proj"))


def _with_adapters(cfg=CFG, lora=LORA, seed=0):
  """Random params with adapters whose B is non-zero (a fresh B is zero: no delta to see)."""
  params = model_lib.init_params(cfg, jax.random.key(seed))
  tree = lora_lib.init_adapters(cfg, lora, jax.random.key(seed + 1))
  tree = jax.tree_util.tree_map_with_path(
      lambda p, x: 0.3 * jax.random.normal(jax.random.key(seed + 2), x.shape)
      if p[-1].key == "lora_b" else x, tree)
  return params, lora_lib.combine(params, tree)


def _kernels(params) -> dict[str, np.ndarray]:
  """{'self_attn/q_proj': [layers, in, out], ...} of every dense module."""
  return {name: np.asarray(params["layers"][name.split("/")[0]][name.split("/")[1]]["kernel"])
          for name in lora_lib.module_shapes(CFG)}


def _hf_kernels(directory) -> dict[str, np.ndarray]:
  source = tensor_files.open_weights(directory)
  return {name: np.stack([source.read(f"model.layers.{i}.{name.replace('/', '.')}.weight").T
                          for i in range(CFG.num_hidden_layers)])
          for name in lora_lib.module_shapes(CFG)}


def test_every_merge_path_folds_the_same_delta_as_a_float64_reference(tmp_path):
  base, with_adapters = _with_adapters()
  expected = {}  # W + (alpha / r) A B in float64, rounded once to float32
  for name, kernel in _kernels(base).items():
    node = with_adapters["layers"][name.split("/")[0]][name.split("/")[1]]
    if "lora_a" in node:
      a, b = (np.asarray(node[k], np.float64) for k in ("lora_a", "lora_b"))
      kernel = (kernel.astype(np.float64) + LORA.scale * a @ b).astype(np.float32)
    expected[name] = kernel
  merged = _kernels(lora_lib.merge(with_adapters, LORA))
  exported = _hf_kernels(export.save_hf(CFG, with_adapters, str(tmp_path / "hf"), lora=LORA))
  peft_dir = adapters.save_peft(CFG, with_adapters, LORA, str(tmp_path / "peft"),
                                modules_to_save=())
  _, from_peft = adapters.merge_loras(CFG, base, [peft_dir])
  _, meta = export_meta.load_meta(export_meta.save_meta(
      CFG, with_adapters, str(tmp_path / "meta"), lora=LORA, dtype="float32", num_shards=2))
  paths = {"lora.merge": merged, "save_hf": exported, "merge_loras": _kernels(from_peft),
           "save_meta": _kernels(meta)}
  for name, want in expected.items():
    adapted = LORA.applies_to(name.split("/")[1])
    assert np.array_equal(want, _kernels(base)[name]) != adapted  # the delta is there to see
    for path, kernels in paths.items():
      diff = float(np.abs(kernels[name] - want).max())
      assert diff <= 2e-7 * max(1.0, float(np.abs(want).max())), (path, name, diff)
      np.testing.assert_array_equal(kernels[name], merged[name], err_msg=f"{path} {name}")


def test_merged_kernel_keeps_the_kernel_dtype_and_sums_in_float32():
  kernel = np.full((2, 3), 1.0, np.float32).astype(jax.numpy.bfloat16)  # [in, out]
  a = np.full((2, 1), 2.0**-5, np.float32)  # [in, r]
  b = np.full((1, 3), 2.0**-5, np.float32)  # [r, out]
  out = lora_lib.merged_kernel(kernel, a, b, np.float32(1.0))
  assert out.dtype == jax.numpy.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.full((2, 3), 1.0, np.float32))
  out32 = lora_lib.merged_kernel(kernel.astype(np.float32), a, b, np.float32(1.0))
  np.testing.assert_array_equal(np.asarray(out32), np.full((2, 3), 1.0 + 2.0**-10, np.float32))


def test_every_entry_point_names_missing_adapter_config_in_the_same_words(tmp_path):
  base, with_adapters = _with_adapters()
  message = ("params hold LoRA adapters of rank 4 on ['down_proj', 'k_proj', 'o_proj', 'q_proj'] "
             "but no lora was given; pass lora=LoraConfig(rank, alpha, ...) matching them, or "
             "merge them first (lora.merge)")
  calls = {
      "logits": lambda: cnllama_jax.logits(CFG, with_adapters, np.ones((1, 3), np.int32)),
      "generate": lambda: generate.generate(CFG, with_adapters, [[1, 5]], max_new_tokens=1),
      "save_hf": lambda: export.save_hf(CFG, with_adapters, str(tmp_path / "hf")),
      "save_meta": lambda: export_meta.save_meta(CFG, with_adapters, str(tmp_path / "meta")),
  }
  for name, call in calls.items():
    with pytest.raises(ValueError) as err:
      call()
    assert str(err.value) == message, name
  with pytest.raises(ValueError, match=r"lora.rank=2 was given"):
    cnllama_jax.logits(CFG, with_adapters, np.ones((1, 3), np.int32),
                       lora=lora_lib.LoraConfig(rank=2))
  with pytest.raises(ValueError, match=r"^params hold no LoRA adapters but lora.rank=4"):
    adapters.save_peft(CFG, base, LORA, str(tmp_path / "peft"))
  assert not any(os.path.exists(tmp_path / n) for n in ("hf", "meta", "peft"))


def test_module_table_is_the_models_kernels_and_the_flops_count():
  boxed = model_lib.abstract_params(CFG, LORA)
  for name, (fan_in, fan_out) in lora_lib.module_shapes(CFG).items():
    group, module = name.split("/")
    node = boxed["layers"][group][module]
    assert node["kernel"].value.shape == (CFG.num_hidden_layers, fan_in, fan_out)
    if LORA.applies_to(module):
      assert node["lora_a"].value.shape == (CFG.num_hidden_layers, fan_in, LORA.rank)
      assert node["lora_b"].value.shape == (CFG.num_hidden_layers, LORA.rank, fan_out)
  # hidden 32, q 4 x 8 = 32, kv 2 x 8 = 16, ffn 80 (numbers written out, not from the table)
  assert flops.layer_matmul_params(CFG) == {
      "q_proj": 32 * 32, "k_proj": 32 * 16, "v_proj": 32 * 16, "o_proj": 32 * 32,
      "gate_proj": 32 * 80, "up_proj": 32 * 80, "down_proj": 80 * 32}
  assert flops._lora_params(CFG, LORA) == 4 * ((32 + 32) + (32 + 16) + (32 + 32) + (80 + 32))
  # stage 2 at sequence 16: forward 2 (base + head + LoRA) + causal attention (mean 8.5 keys of
  # 4 heads x 8 per layer), backward twice that, plus the weight gradients of head and adapters
  base = 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 80)
  head = 32 * CFG.padded_vocab_size
  adapters = 2 * 4 * ((32 + 32) + (32 + 16) + (32 + 32) + (80 + 32))
  attention = 2 * 4 * 8.5 * 4 * 8
  assert flops.train_flops_per_token(CFG, 16, LORA, lora_lib.STAGES["lora+embeddings"]) == (
      4 * (base + head + adapters) + 3 * attention + 2 * (head + adapters))
