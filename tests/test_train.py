"""Training core: LoRA, stage partitions, the pure sharded step, accumulation, vocab-parallel loss."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cnllama_jax import config as model_config
from cnllama_jax import experiment, lora as lora_lib, model, run_config, sharding as shd
from cnllama_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, preset="tiny"):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def tiny_config(**train):
  c = run_config.default()
  c.train.update(dict(global_batch_size=8, seq_len=16, steps=3, learning_rate=1e-2,
                      warmup_ratio=0.0, weight_decay=0.01), **train)
  c.lora.update(rank=4, alpha=8.0, dropout=0.0)
  return c


def flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def real_rows(tree, vocab=99):
  """Flat params with the padded vocabulary rows cut off (padding depends on the mesh)."""
  out = flat(tree)
  out["embed_tokens"] = out["embed_tokens"][:vocab]
  if "lm_head" in out:
    out["lm_head"] = out["lm_head"][:, :vocab]
  return out


def batch_of(config, vocab=99, seed=0):
  ids = np.random.default_rng(seed).integers(3, vocab, size=(
      config.train.global_batch_size, config.train.seq_len)).astype(np.int32)
  labels = ids.copy()
  labels[:, :3] = -100  # a masked prompt, as in SFT
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def run_steps(config, mesh, steps=3, batch=None):
  run = experiment.build(config, mesh)
  batch = batch or batch_of(config)
  state, losses, grad_norms = run.state, [], []
  for _ in range(steps):
    state, metrics = run.train_step(state, shd.host_to_global(batch, run.batch_sharding))
    losses.append(float(metrics["loss"]))
    grad_norms.append(float(metrics["grad_norm"]))
  run.grad_norms = grad_norms
  return run, state, losses


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
  base = lora_lib.split(params, [p for p in flat(params) if "lora" in p])[0]
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


# --- stages --------------------------------------------------------------------------------------

EXPECTED_GROUPS = {
    "embeddings": {"embed_tokens"},
    "lora+embeddings": {"embed_tokens", "lm_head", "lora"},
    "lora": {"lora"},
    "full": {"embed_tokens", "lm_head", "lora", "kernel", "scale"},
    "lora+new_rows": {"embed_tokens", "lm_head", "lora"},
}


@pytest.mark.parametrize("stage", sorted(EXPECTED_GROUPS))
def test_each_stage_trains_exactly_its_leaves(stage, tmp_path):
  config = tiny_config(trainable=stage, steps=2)
  if stage == "lora+new_rows":
    config.tokenizer = _tokenizer(tmp_path, 140)
  params_before = flat(experiment.load_params(config, shd.single_device_mesh(),
                                              shd.DEFAULT_RULES)[1])
  run, state, losses = run_steps(config, shd.single_device_mesh(), steps=2)
  after = flat(lora_lib.combine(state.frozen, state.trainable))
  changed = {p for p in after if not np.array_equal(after[p], params_before[p])}
  kinds = {p.split("/")[-1] for p in changed}
  kinds = {"lora" if k.startswith("lora_") else k for k in kinds}
  assert kinds == EXPECTED_GROUPS[stage]
  trainable_paths = set(flat(state.trainable))
  assert changed <= trainable_paths  # frozen params bit-identical
  for p in flat(state.frozen):
    np.testing.assert_array_equal(after[p], params_before[p])
  if stage == "lora+new_rows":  # only appended rows of embedding and head moved
    old = run.new_rows[0]
    np.testing.assert_array_equal(after["embed_tokens"][:old], params_before["embed_tokens"][:old])
    np.testing.assert_array_equal(after["lm_head"][:, :old], params_before["lm_head"][:, :old])
    assert not np.array_equal(after["embed_tokens"][old:140], params_before["embed_tokens"][old:140])


def _tokenizer(tmp_path, size):
  """A SentencePiece model with `size` pieces (only its size matters for the resize)."""
  import sentencepiece as spm
  text = [f"word{i} token{i * 7} piece{i % 13} 中文{i}" for i in range(400)]
  prefix = str(tmp_path / "tok")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=prefix,
                                 vocab_size=size, model_type="bpe", minloglevel=2,
                                 hard_vocab_limit=True, bos_id=1, eos_id=2, unk_id=0)
  return prefix + ".model"


def test_optimizer_state_covers_only_trainable_params():
  run = experiment.build(tiny_config(trainable="lora"), shd.single_device_mesh())
  adam = run.state.opt_state[1][0]
  assert set(flat(adam.mu)) == set(flat(run.state.trainable))
  assert all(p.endswith(("lora_a", "lora_b")) for p in flat(adam.mu))


def test_loss_falls_on_a_tiny_corpus():
  config = tiny_config(trainable="full", steps=30, learning_rate=3e-3)
  _, _, losses = run_steps(config, shd.single_device_mesh(), steps=30)
  assert losses[-1] < 0.5 * losses[0], losses


# --- sharding and accumulation ---------------------------------------------------------------

# Adam divides by sqrt(v): a gradient entry that is ~0 up to rounding still moves its weight by
# ~lr, so weights after several steps are compared loosely and losses / gradients tightly.

def test_three_steps_on_a_2x2x2_mesh_match_one_device():
  config = tiny_config()
  run1, state1, losses1 = run_steps(config, shd.single_device_mesh())
  run8, state8, losses8 = run_steps(config, shd.make_mesh((2, 2, 2)))
  np.testing.assert_allclose(losses8, losses1, atol=1e-5)
  np.testing.assert_allclose(run8.grad_norms, run1.grad_norms, rtol=1e-5)
  one, eight = real_rows(state1.trainable), real_rows(state8.trainable)
  assert max(np.abs(one[p] - eight[p]).max() for p in one) <= 0.1 * config.train.learning_rate


def test_gradient_accumulation_equals_one_large_batch():
  config = tiny_config(steps=1)
  batch = batch_of(config)
  batch["labels"][1, 5:] = -100  # unequal supervised tokens per micro-batch
  grads = {}
  for k in (1, 4):
    run = experiment.build(tiny_config(micro_batches=k), shd.make_mesh((2, 1, 1), jax.devices()[:2]))
    state, metrics = run.train_step(run.state, shd.host_to_global(batch, run.batch_sharding))
    # one AdamW step from zero moments: the update's sign is the gradient's sign; recover the
    # gradient itself from the optimizer's first moment (mu = (1 - b1) * g).
    grads[k] = real_rows(state.opt_state[1][0].mu)
    grads[k]["loss"] = np.float32(metrics["loss"])
  for name in grads[1]:
    np.testing.assert_allclose(grads[4][name], grads[1][name], atol=1e-5, err_msg=name)


def test_vocab_parallel_loss_equals_the_plain_loss():
  mesh = shd.make_mesh((2, 1, 4))
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 6, 256)).astype(np.float32) * 3
  logits[..., 200:] = -1e30  # padded vocabulary rows
  labels = rng.integers(0, 200, size=(4, 6)).astype(np.int32)
  labels[0, :2] = -100
  plain = train_lib.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  sharded_logits = jax.device_put(logits, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")))
  parallel = jax.jit(lambda l, y: train_lib.cross_entropy(l, y, mesh, shd.DEFAULT_RULES))(
      sharded_logits, labels)
  reference = -np.take_along_axis(jax.nn.log_softmax(logits[..., :200]), np.maximum(
      labels, 0)[..., None], -1)[..., 0]
  assert int(plain[2]) == int(parallel[2]) == 22
  np.testing.assert_allclose(float(plain[0]), reference[labels != -100].sum(), rtol=1e-5)
  np.testing.assert_allclose(float(parallel[0]), float(plain[0]), rtol=1e-6)
  assert int(parallel[1]) == int(plain[1])
  hlo = jax.jit(lambda l, y: train_lib.cross_entropy(l, y, mesh, shd.DEFAULT_RULES)).lower(
      sharded_logits, labels).compile().as_text()
  assert "all-gather" not in hlo  # only per-token scalars cross devices


def test_batch_not_divisible_by_data_parallel_size_is_an_error():
  with pytest.raises(ValueError, match=r"global_batch_size=6 .* not divisible by the "
                                       r"data-parallel size 4"):
    experiment.check_batch(6, 1, shd.make_mesh((2, 2, 2)), shd.DEFAULT_RULES)


# --- the paper's configs ---------------------------------------------------------------------

@pytest.mark.parametrize("name, preset, percent", [
    ("sft", "7b", "6.22%"), ("sft", "13b", "4.10%"), ("sft", "33b", "2.21%")])
def test_dry_run_reports_the_papers_trainable_share(name, preset, percent):
  report = experiment.dry_run(load_config(name, preset), shd.single_device_mesh())
  assert f"{report['percent']:.2f}%" == percent


def test_paper_hyperparameters_in_configs():
  s1, s2, sft = (load_config(n, "7b") for n in ("pretrain_stage1", "pretrain_stage2", "sft"))
  assert (s1.train.trainable, s1.train.learning_rate, s1.train.global_batch_size) == (
      "embeddings", 2e-4, 1024)
  assert (s2.lora.rank, s2.lora.alpha, s2.lora.dropout, s2.train.learning_rate) == (8, 32, 0.05, 1e-4)
  assert (sft.train.warmup_ratio, sft.train.weight_decay, sft.train.global_batch_size,
          sft.model.vocab_size, sft.train.seq_len) == (0.03, 0.0, 512, 49954, 512)
  assert s2.train.weight_decay == 0.01 and s2.train.warmup_ratio == 0.05
