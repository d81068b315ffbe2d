"""Export: merged HF, PEFT adapters and Meta .pth agree with transformers / PEFT / themselves."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import cnllama_jax
from cnllama_jax import adapters, export, export_meta, tensor_files
from cnllama_jax import lora as lora_lib
from cnllama_jax.config import LlamaConfig, RopeScaling, preset
from cnllama_jax.model import abstract_params, apply_rotary
from cnllama_jax.rope import rotary_tables
from cnllama_jax.vocab import resize_vocab
from launch import convert
from tests import hf_models

TOL = 1e-4
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _ids(vocab, seed=0, shape=(2, 9)):
  return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


def _max_diff(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _base(tmp_path, seed=0, **shape):
  """A tiny HF LLaMA saved to disk and loaded as ours: (dir, cfg, params)."""
  path = hf_models.save(hf_models.make_hf_llama(seed=seed, **shape), str(tmp_path / "base"),
                        "safetensors")
  return (path, *cnllama_jax.load_hf(path))


def _peft_lora(model, rank, alpha, targets, seed, modules_to_save=("embed_tokens", "lm_head")):
  """A PeftModel on `model` with random non-zero B and perturbed saved modules."""
  import peft
  import torch
  torch.manual_seed(seed)
  pm = peft.get_peft_model(model, peft.LoraConfig(
      r=rank, lora_alpha=alpha, target_modules=list(targets), task_type="CAUSAL_LM",
      modules_to_save=list(modules_to_save) or None))
  with torch.no_grad():
    for name, param in pm.named_parameters():
      if "lora_B" in name or "modules_to_save" in name:
        param.add_(0.05 * torch.randn_like(param))
  return pm


def _our_lora(cfg, params, rank=4, alpha=8.0, targets=ALL, seed=0):
  """Our params with adapters whose B is random (non-zero), and their LoraConfig."""
  lora = lora_lib.LoraConfig(rank=rank, alpha=alpha, targets=targets)
  tree = lora_lib.init_adapters(cfg, lora, jax.random.key(seed))
  tree = jax.tree_util.tree_map_with_path(
      lambda p, x: 0.05 * jax.random.normal(jax.random.key(seed + 1), x.shape)
      if p[-1].key == "lora_b" else x, tree)
  return lora, lora_lib.combine(params, tree)


def _tensors(path):
  source = tensor_files.open_weights(path)
  return {k: source.read(k) for k in source.keys()}


# --- Hugging Face ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_to_ours_to_hf_is_bit_identical(tmp_path, dtype):
  import torch
  model = hf_models.make_hf_llama(seed=1, num_key_value_heads=2, vocab_size=131)
  src = hf_models.save(model.to(getattr(torch, dtype)), str(tmp_path / "src"), "safetensors")
  cfg, params = cnllama_jax.load_hf(src)  # float32 params: bf16 -> f32 -> bf16 is exact
  out = export.save_hf(cfg, params, str(tmp_path / "out"), dtype=dtype, max_shard_bytes=60_000)
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  ours, theirs = _tensors(out), _tensors(src)
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
    assert ours[key].tobytes() == value.tobytes(), key


@pytest.mark.parametrize("shape", [dict(num_key_value_heads=2), dict(tie_word_embeddings=True)])
def test_hf_export_of_resized_odd_vocab_loads_in_transformers(tmp_path, shape):
  import transformers
  _, cfg, params = _base(tmp_path, seed=2, **shape)
  cfg, params = resize_vocab(cfg, params, 131, rng=jax.random.key(0))  # padded to 256
  tokenizer = tmp_path / "tok"
  tokenizer.mkdir()
  _sp_model(str(tokenizer / "tokenizer.model"), 131)
  out = export.save_hf(cfg, params, str(tmp_path / "out"), tokenizer_dir=str(tokenizer))
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["vocab_size"] == 131 and config["torch_dtype"] == config["dtype"] == "float32"
  assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
  assert ((tmp_path / "out" / "tokenizer.model").read_bytes()
          == (tokenizer / "tokenizer.model").read_bytes())
  assert len(transformers.AutoTokenizer.from_pretrained(out)) == 131  # HF files made beside it
  generation = transformers.GenerationConfig.from_pretrained(out)
  assert (generation.temperature, generation.top_k, generation.top_p,
          generation.repetition_penalty, generation.do_sample) == (0.2, 40, 0.9, 1.1, True)
  model = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert model.config.vocab_size == 131
  ids = _ids(131)
  diff = _max_diff(cnllama_jax.logits(cfg, params, ids), hf_models.hf_logits(model, ids))
  print(f"hf export logits max diff ({shape}): {diff:.2e}")
  assert diff <= TOL


def test_save_hf_folds_in_lora_given_its_config_and_refuses_without(tmp_path):
  _, cfg, params = _base(tmp_path, seed=3)
  lora, with_lora = _our_lora(cfg, params)
  with pytest.raises(ValueError, match="params hold LoRA adapters of rank 4"):
    export.save_hf(cfg, with_lora, str(tmp_path / "no"))
  out = export.save_hf(cfg, with_lora, str(tmp_path / "out"), lora=lora)
  merged = _tensors(out)
  expected = lora_lib.merge(with_lora, lora)
  q = np.asarray(expected["layers"]["self_attn"]["q_proj"]["kernel"])  # [layers, in, out]
  assert _max_diff(merged["model.layers.1.self_attn.q_proj.weight"], q[1].T) <= 1e-6
  assert not os.path.exists(tmp_path / "no")


def test_export_refuses_a_non_empty_directory(tmp_path):
  _, cfg, params = _base(tmp_path, seed=3)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  with pytest.raises(FileExistsError, match="already exists and is not empty"):
    export.save_hf(cfg, params, str(tmp_path / "full"))


# --- PEFT --------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_merge_equals_peft_merge_and_unload(tmp_path, layout):
  _, cfg, params = _base(tmp_path, seed=4, num_key_value_heads=2)  # vocabulary 99
  model = hf_models.make_hf_llama(seed=4, num_key_value_heads=2)
  model.resize_token_embeddings(131)  # the LoRA was trained on the resized base
  pm = _peft_lora(model, 4, 16, ALL, seed=5)
  pm.save_pretrained(str(tmp_path / "lora"), safe_serialization=layout == "safetensors")
  merged_torch = pm.merge_and_unload()
  cfg, merged = adapters.merge_loras(cfg, params, [str(tmp_path / "lora")])
  assert cfg.vocab_size == 131
  ours = _tensors(export.save_hf(cfg, merged, str(tmp_path / "merged")))
  theirs = {k: v.numpy() for k, v in merged_torch.state_dict().items()}
  assert sorted(ours) == sorted(theirs)
  weight_diff = max(_max_diff(ours[k], theirs[k]) for k in theirs)
  ids = _ids(131, seed=6)
  logit_diff = _max_diff(cnllama_jax.logits(cfg, merged, ids),
                         hf_models.hf_logits(merged_torch, ids))
  print(f"merge vs PEFT ({layout}): weights {weight_diff:.2e}, logits {logit_diff:.2e}")
  assert weight_diff <= 1e-6 and logit_diff <= TOL


def test_two_loras_merge_in_order_as_plus_then_alpaca(tmp_path):
  _, cfg, params = _base(tmp_path, seed=7)
  model = hf_models.make_hf_llama(seed=7)
  model.resize_token_embeddings(120)  # "Plus": 120 tokens
  plus = _peft_lora(model, 4, 8, ("q_proj", "v_proj", "down_proj"), seed=8)
  plus.save_pretrained(str(tmp_path / "plus"))
  model = plus.merge_and_unload()
  model.resize_token_embeddings(121)  # "Alpaca": one more ([PAD])
  alpaca = _peft_lora(model, 2, 4, ALL, seed=9)
  alpaca.save_pretrained(str(tmp_path / "alpaca"))
  model = alpaca.merge_and_unload()
  new_cfg, merged = adapters.merge_loras(cfg, params, [str(tmp_path / "plus"),
                                                       str(tmp_path / "alpaca")])
  assert new_cfg.vocab_size == 121
  ids = _ids(121, seed=10)
  diff = _max_diff(cnllama_jax.logits(new_cfg, merged, ids), hf_models.hf_logits(model, ids))
  print(f"plus + alpaca merge vs PEFT logits: {diff:.2e}")
  assert diff <= TOL
  with pytest.raises(ValueError, match=r"120-token vocabulary, smaller than the 121 of LoRA 1 "
                     r".*Plus \(49953\) then Alpaca \(49954\)"):
    adapters.merge_loras(cfg, params, [str(tmp_path / "alpaca"), str(tmp_path / "plus")])


def test_peft_export_loads_with_peft_from_pretrained(tmp_path):
  import peft
  _, cfg, params = _base(tmp_path, seed=11, num_key_value_heads=2)
  cfg, params = resize_vocab(cfg, params, 131, rng=jax.random.key(1))
  lora, with_lora = _our_lora(cfg, params, rank=4, alpha=8.0, seed=2)
  out = adapters.save_peft(cfg, with_lora, lora, str(tmp_path / "adapter"))
  base = hf_models.make_hf_llama(seed=11, num_key_value_heads=2)
  base.resize_token_embeddings(131)  # as the paper's scripts, before loading the LoRA
  model = peft.PeftModel.from_pretrained(base, out).eval()
  ids = _ids(131, seed=12)
  diff = _max_diff(cnllama_jax.logits(cfg, with_lora, ids, lora=lora),
                   hf_models.hf_logits(model, ids))
  print(f"PEFT export logits max diff: {diff:.2e}")
  assert diff <= TOL
  loaded, tree, modules = adapters.load_peft(out)
  assert loaded == lora
  ours = lora_lib.split(with_lora, lora_lib.trainable_mask(with_lora, "lora"))[1]
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), ours, tree))
  assert np.array_equal(modules["lm_head"], np.asarray(params["lm_head"])[:, :131])


def test_peft_key_names_match_what_peft_saves(tmp_path):
  _, cfg, params = _base(tmp_path, seed=13)
  lora, with_lora = _our_lora(cfg, params, targets=("q_proj", "down_proj"))
  keys = set(_tensors_file(adapters.save_peft(cfg, with_lora, lora, str(tmp_path / "a"))))
  assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight",
          "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
          "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"} <= keys
  assert len(keys) == 2 + 2 * 2 * 2


def _tensors_file(directory):
  source = tensor_files.open_file(os.path.join(directory, "adapter_model.safetensors"))
  return {k: source.read(k) for k in source.keys()}


def test_merge_errors_name_the_problem(tmp_path):
  _, cfg, params = _base(tmp_path / "a", seed=14)
  _, small_cfg, small_params = _base(tmp_path / "b", seed=14, hidden_size=48,
                                     num_attention_heads=4, intermediate_size=128)
  lora, with_lora = _our_lora(small_cfg, small_params)
  other = adapters.save_peft(small_cfg, with_lora, lora, str(tmp_path / "other"))
  with pytest.raises(ValueError, match=r"hidden 64.*another model size"):
    adapters.merge_loras(cfg, params, [other])
  with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
    adapters.load_peft(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="already hold LoRA adapters"):
    adapters.merge_loras(cfg, with_lora, [other])


# --- Meta --------------------------------------------------------------------------------------

META_ROPE = {"default": RopeScaling(), "linear": RopeScaling(rope_type="linear", factor=4.0),
             "llama3": RopeScaling(rope_type="llama3", factor=32.0, low_freq_factor=2.0,
                                   original_max_position_embeddings=1024)}


@pytest.mark.parametrize("dtype,shards,rope,where", [
    ("float32", 1, "default", "local"), ("float32", 2, "linear", "local"),
    ("bfloat16", 2, "llama3", "gs")])
def test_meta_round_trip_is_bit_identical(tmp_path, request, dtype, shards, rope, where):
  """save_meta then load_meta (locally, and on a bucket for the last case): the same weights bit
  for bit and the same config, RoPE scaling included."""
  from cnllama_jax import paths
  _, cfg, params = _base(tmp_path, seed=15, num_key_value_heads=2, vocab_size=131)
  cfg = cfg.replace(rope_scaling=META_ROPE[rope])
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  out_dir = (request.getfixturevalue("gcs").bucket() + "/meta" if where == "gs"
             else str(tmp_path / "meta"))
  out = export_meta.save_meta(cfg, params, out_dir, num_shards=shards, dtype=dtype)
  assert paths.listdir(out) == [f"consolidated.{k:02d}.pth" for k in range(shards)] + [
      "params.json"]
  loaded_cfg, loaded = export_meta.load_meta(out, dtype=dtype)
  scaled = {} if rope == "default" else {"max_position_embeddings": cfg.max_position_embeddings}
  assert loaded_cfg == cfg.replace(max_position_embeddings=2048, param_dtype=dtype).replace(
      **scaled)
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree_util.tree_leaves_with_path(loaded)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path


def test_meta_params_json_carries_rope_scaling_as_meta_and_reads_metas_own():
  cfg = preset("tiny-llama3", rope_scaling=META_ROPE["llama3"])
  written = export_meta.meta_params_json(cfg)
  assert written["use_scaled_rope"] is True and written["rope_scaling_factor"] == 32.0
  assert export_meta.meta_config(
      written, "params.json", vocab_size=cfg.vocab_size,
      intermediate_size=cfg.intermediate_size).rope_scaling == cfg.rope_scaling
  # Meta's LLaMA-3.1 params.json: only `use_scaled_rope` (its code fixes factor 8, 1, 4, 8192).
  meta = {k: v for k, v in written.items() if k not in ("rope_scaling", "rope_scaling_factor")}
  assert export_meta.meta_config(
      meta, "params.json", vocab_size=cfg.vocab_size,
      intermediate_size=cfg.intermediate_size).rope_scaling == RopeScaling(
      rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
      original_max_position_embeddings=8192)


def test_meta_rotary_layout_gives_the_same_attention_scores():
  """Meta rotates interleaved pairs (x[2i], x[2i+1]); HF rotates halves (x[i], x[i + d/2])."""
  rng = np.random.default_rng(0)
  heads, head_dim, dim = 2, 8, 16
  w_q, w_k = rng.normal(size=(2, heads * head_dim, dim)).astype(np.float32)  # HF layout
  x, positions = rng.normal(size=(3, dim)).astype(np.float32), np.array([[0, 5, 11]])
  rope_cfg = preset("tiny", hidden_size=heads * head_dim, num_attention_heads=heads,
                    num_key_value_heads=heads, rope_theta=10000.0)
  cos, sin = (np.asarray(t) for t in rotary_tables(jax.numpy.asarray(positions), rope_cfg))

  def hf_scores(wq, wk):
    q = apply_rotary((x @ wq.T).reshape(1, 3, heads, head_dim), cos, sin)[0]
    k = apply_rotary((x @ wk.T).reshape(1, 3, heads, head_dim), cos, sin)[0]
    return np.einsum("thd,shd->hts", q, k)

  def meta_scores(wq, wk):
    freqs = 1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    rot = np.exp(1j * positions[0][:, None] * freqs)  # [t, head_dim / 2]
    pair = lambda y: y.reshape(3, heads, head_dim // 2, 2) @ np.array([1, 1j])  # noqa: E731
    q, k = pair(x @ wq.T) * rot[:, None], pair(x @ wk.T) * rot[:, None]
    return np.einsum("thd,shd->hts", q, np.conj(k)).real

  meta_q, meta_k = export_meta.to_meta_rotary(w_q, heads), export_meta.to_meta_rotary(w_k, heads)
  assert np.abs(hf_scores(w_q, w_k) - meta_scores(meta_q, meta_k)).max() < 1e-4
  assert np.array_equal(export_meta.from_meta_rotary(meta_q, heads), w_q)


def test_meta_shards_split_as_meta_and_odd_vocab_unevenly(tmp_path):
  import torch
  cfg = LlamaConfig(vocab_size=49953, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                    num_attention_heads=2)
  rng = np.random.default_rng(0)  # numpy params of the model's shapes (init would compile)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                        nn.meta.unbox(abstract_params(cfg)))
  out = export_meta.save_meta(cfg, params, str(tmp_path / "m"), num_shards=2, dtype="float16")
  shards = [torch.load(os.path.join(out, f"consolidated.0{k}.pth"), weights_only=True)
            for k in range(2)]
  shapes = [{k: tuple(v.shape) for k, v in s.items()} for s in shards]
  assert [s["output.weight"] for s in shapes] == [(24976, 8), (24977, 8)]
  for s in shapes:
    assert s["tok_embeddings.weight"] == (49953, 4)
    assert s["layers.0.attention.wq.weight"] == s["layers.0.attention.wv.weight"] == (4, 8)
    assert s["layers.0.attention.wo.weight"] == (8, 4)
    assert s["layers.0.feed_forward.w1.weight"] == s["layers.0.feed_forward.w3.weight"] == (8, 8)
    assert s["layers.0.feed_forward.w2.weight"] == (8, 8)
    assert s["norm.weight"] == s["layers.0.attention_norm.weight"] == (8,)
  assert shards[0]["norm.weight"].dtype == torch.float16
  assert torch.equal(shards[0]["layers.0.ffn_norm.weight"], shards[1]["layers.0.ffn_norm.weight"])
  head = np.concatenate([s["output.weight"].float().numpy() for s in shards])
  assert np.array_equal(head, np.asarray(params["lm_head"]).T[:49953].astype(np.float16))
  assert json.load(open(os.path.join(out, "params.json")))["vocab_size"] == 49953


def test_meta_params_json_matches_meta_releases():
  assert export_meta.meta_params_json(preset("7b")) == {
      "dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-6,
      "vocab_size": 32000}
  assert export_meta.meta_params_json(preset("65b"))["multiple_of"] == 256
  assert export_meta.meta_params_json(preset("llama2-70b")) == {
      "dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
      "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-5, "vocab_size": 32000}


def test_meta_refuses_heads_that_do_not_split(tmp_path):
  _, cfg, params = _base(tmp_path, seed=16, num_key_value_heads=2)
  with pytest.raises(ValueError, match="do not split into 4 model-parallel files"):
    export_meta.save_meta(cfg, params, str(tmp_path / "m"), num_shards=4)


# --- command line ------------------------------------------------------------------------------

def test_convert_merge_writes_a_loadable_directory(tmp_path):
  base, cfg, params = _base(tmp_path, seed=17)
  cfg2, params2 = resize_vocab(cfg, params, 101, rng=jax.random.key(0))
  lora, with_lora = _our_lora(cfg2, params2)
  adapter = adapters.save_peft(cfg2, with_lora, lora, str(tmp_path / "lora"))
  out = str(tmp_path / "merged")
  assert convert.main(["merge", "--base", base, "--lora", adapter, "--out", out,
                       "--dtype", "float32"]) == 0
  loaded_cfg, loaded = cnllama_jax.load_hf(out)
  ids = _ids(101, seed=18)
  expected = cnllama_jax.logits(cfg2, with_lora, ids, lora=lora)
  assert loaded_cfg.vocab_size == 101
  assert _max_diff(cnllama_jax.logits(loaded_cfg, loaded, ids), expected) <= TOL
  assert convert.main(["merge", "--base", base, "--lora", adapter, "--lora", adapter,
                       "--out", str(tmp_path / "meta"), "--format", "meta"]) == 0
  assert convert.main(["export", "--format", "peft", "--checkpoint", base, "--lora", adapter,
                       "--out", str(tmp_path / "peft")]) == 0
  assert adapters.load_peft(str(tmp_path / "peft"))[0] == lora


@pytest.mark.parametrize("argv,message", [
    (["merge", "--base", "{tmp}/nope", "--lora", "{tmp}/nope", "--out", "{tmp}/o"],
     "error: --base/--checkpoint {tmp}/nope: no such directory"),
    (["export", "--format", "peft", "--checkpoint", "{base}", "--out", "{tmp}/o"],
     "error: --format peft exports one LoRA; got 0 --lora"),
])
def test_convert_errors_are_one_line(tmp_path, capsys, argv, message):
  base = _base(tmp_path, seed=19)[0] if "{base}" in " ".join(argv) else ""
  argv = [a.format(tmp=tmp_path, base=base) for a in argv]
  capsys.readouterr()
  assert convert.main(argv) == 1
  err = capsys.readouterr().err.strip()
  assert err == message.format(tmp=tmp_path)


def test_convert_exports_a_training_workdir(tmp_path):
  import transformers
  from cnllama_jax import run_config, trainer
  config = run_config.default()  # random tiny base, synthetic data, LoRA + embeddings + head
  config.train.update(dict(global_batch_size=8, seq_len=16, steps=2, log_every=2))
  config.lora.update(dict(rank=4, alpha=8.0, dropout=0.0))
  result = trainer.train(config, str(tmp_path / "run"))
  run = result["run"]
  params = lora_lib.combine(run.frozen, result["state"].trainable)
  ids = _ids(run.cfg.vocab_size, seed=20)
  expected = cnllama_jax.logits(run.cfg, params, ids, lora=run.lora)
  out = str(tmp_path / "hf")
  assert convert.main(["export", "--format", "hf", "--workdir", str(tmp_path / "run"),
                       "--out", out, "--dtype", "float32"]) == 0
  model = transformers.AutoModelForCausalLM.from_pretrained(out)
  diff = _max_diff(expected, hf_models.hf_logits(model, ids))
  print(f"workdir -> HF logits max diff: {diff:.2e}")
  assert diff <= TOL
  assert convert.main(["export", "--format", "peft", "--workdir", str(tmp_path / "run"),
                       "--out", str(tmp_path / "peft")]) == 0
  lora, tree, modules = adapters.load_peft(str(tmp_path / "peft"))
  assert lora == run.lora and sorted(modules) == ["embed_tokens", "lm_head"]


# --- exports that stand alone: the run's tokenizer and base travel with them -------------------

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sp_model(path: str, vocab_size: int) -> str:
  """A real SentencePiece BPE model of exactly `vocab_size` pieces (BOS 1, EOS 2), ~0.1 s."""
  from cnllama_jax import tokenizer as tok_lib
  return str(tok_lib.train_sentencepiece([os.path.join(DATA, "tokenizer_en.txt")], path,
                                         vocab_size=vocab_size, model_type="bpe",
                                         character_coverage=1.0, progress=False))


@pytest.fixture(scope="module")
def tokenized_run(tmp_path_factory):
  """A trained workdir on a HF base (vocabulary 99) resized to a 131-piece tokenizer."""
  from cnllama_jax import run_config, trainer
  tmp = tmp_path_factory.mktemp("tokenized_run")
  base = hf_models.save(hf_models.make_hf_llama(seed=21, max_position_embeddings=512),
                        str(tmp / "base"), "safetensors")
  config = run_config.default()
  config.base_model, config.tokenizer = base, _sp_model(str(tmp / "tok.model"), 131)
  config.train.update(dict(global_batch_size=8, seq_len=16, steps=2, log_every=2))
  config.lora.update(dict(rank=4, alpha=8.0, dropout=0.0))
  return tmp, config, trainer.train(config, str(tmp / "run"))


def _export_run(tokenized_run, fmt: str, *extra: str) -> str:
  """Exports the tokenized run's workdir as `fmt` into <tmp>/<fmt>; the export holds the run's
  tokenizer.model byte for byte. Returns the export directory."""
  tmp, config, _ = tokenized_run
  out = str(tmp / fmt)
  assert convert.main(["export", "--format", fmt, "--workdir", str(tmp / "run"), "--out", out,
                       *extra]) == 0
  with open(os.path.join(out, "tokenizer.model"), "rb") as f, open(config.tokenizer, "rb") as g:
    assert f.read() == g.read()
  return out


def test_hf_export_of_a_workdir_carries_its_tokenizer_and_chats_alone(tokenized_run):
  import sentencepiece as spm
  import subprocess
  import sys
  import transformers
  _, config, result = tokenized_run
  run = result["run"]
  out = _export_run(tokenized_run, "hf", "--dtype", "float32")
  assert run.cfg.vocab_size == 131
  tok = transformers.AutoTokenizer.from_pretrained(out)
  sp = spm.SentencePieceProcessor(model_file=config.tokenizer)
  text = "The quick brown fox jumps over the lazy dog."
  assert len(tok) == 131
  assert tok(text).input_ids == [1] + sp.encode(text)
  chat = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "generate.py"), f"--model={out}",
       "--interactive", "--max_new_tokens=3", "--temperature=0"],
      input="hello there\n", capture_output=True, text=True, timeout=300, cwd=REPO)
  assert chat.returncode == 0, chat.stderr[-2000:]
  assert "(vocab 131, 2 layers" in chat.stderr and "(3 tokens, " in chat.stderr


def test_meta_export_of_a_workdir_carries_its_tokenizer(tokenized_run):
  import transformers
  run = tokenized_run[2]["run"]
  out = _export_run(tokenized_run, "meta")
  assert len(transformers.AutoTokenizer.from_pretrained(out)) == 131 == run.cfg.vocab_size
  assert export_meta.load_meta(out)[0].vocab_size == 131


def test_generate_without_a_tokenizer_is_a_one_line_error(tmp_path):
  import subprocess
  import sys
  _, cfg, params = _base(tmp_path, seed=22)
  out = export.save_hf(cfg, params, str(tmp_path / "bare"))
  run = subprocess.run([sys.executable, os.path.join(REPO, "launch", "generate.py"),
                        f"--model={out}", "--interactive"], input="", capture_output=True,
                       text=True, timeout=300, cwd=REPO)
  assert run.returncode == 1
  lines = run.stderr.strip().splitlines()
  assert lines[-1] == f"error: no tokenizer.model or tokenizer.json in ['{out}']; pass --tokenizer"
  assert "Traceback" not in run.stderr


def test_peft_export_of_a_workdir_loads_on_its_named_base_with_its_tokenizer(tokenized_run):
  import peft
  import transformers
  _, config, result = tokenized_run
  run = result["run"]
  out = _export_run(tokenized_run, "peft")
  with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as f:
    assert json.load(f)["base_model_name_or_path"] == config.base_model
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert len(tok) == 131
  base = transformers.AutoModelForCausalLM.from_pretrained(config.base_model)
  base.resize_token_embeddings(len(tok))  # as the paper's scripts, before loading the LoRA
  model = peft.PeftModel.from_pretrained(base, out).eval()
  ids = np.asarray([tok("The lazy dog").input_ids + [5, 130, 64]], np.int32)
  params = lora_lib.combine(run.frozen, result["state"].trainable)
  diff = _max_diff(cnllama_jax.logits(run.cfg, params, ids, lora=run.lora),
                   hf_models.hf_logits(model, ids))
  print(f"workdir PEFT export on its named base: logits max diff {diff:.2e}")
  assert diff <= TOL


def test_export_refuses_a_tokenizer_of_another_size(tmp_path):
  _, cfg, params = _base(tmp_path, seed=23)  # vocabulary 99
  tokenizer = _sp_model(str(tmp_path / "t.model"), 131)
  with pytest.raises(ValueError, match=r"t.model has 131 pieces but the exported model has 99 "
                     "tokens; pass the tokenizer it was trained with"):
    export.save_hf(cfg, params, str(tmp_path / "out"), tokenizer_dir=tokenizer)
  assert not os.path.exists(tmp_path / "out")
