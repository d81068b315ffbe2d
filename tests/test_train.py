"""Training core: stage partitions, the pure sharded step, accumulation, vocab-parallel loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnllama_jax import build, lora as lora_lib, plan as plan_lib, sharding as shd
from cnllama_jax import train as train_lib
from tests.runs import batch_of, build_on, flat, real_rows, run_steps, sentencepiece_model
from tests.runs import tiny_config


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
    config.tokenizer = sentencepiece_model(tmp_path, 140)
  params_before = flat(build.load_params(plan_lib.plan(config, shd.single_device_mesh())))
  run, state, losses, _ = run_steps(config, shd.single_device_mesh(), steps=2)
  after = flat(lora_lib.combine(run.frozen, state.trainable))
  changed = {p for p in after if not np.array_equal(after[p], params_before[p])}
  kinds = {p.split("/")[-1] for p in changed}
  kinds = {"lora" if k.startswith("lora_") else k for k in kinds}
  assert kinds == EXPECTED_GROUPS[stage]
  trainable_paths = set(flat(state.trainable))
  assert changed <= trainable_paths  # frozen params bit-identical
  for p in flat(run.frozen):
    np.testing.assert_array_equal(after[p], params_before[p])
  if stage == "lora+new_rows":  # only appended rows of embedding and head moved
    old = run.plan.new_rows[0]
    np.testing.assert_array_equal(after["embed_tokens"][:old], params_before["embed_tokens"][:old])
    np.testing.assert_array_equal(after["lm_head"][:, :old], params_before["lm_head"][:, :old])
    assert not np.array_equal(after["embed_tokens"][old:140], params_before["embed_tokens"][old:140])


def test_optimizer_state_covers_only_trainable_params():
  run = build_on(tiny_config(trainable="lora"), shd.single_device_mesh())
  adam = run.state.opt_state[1][0]
  assert set(flat(adam.mu)) == set(flat(run.state.trainable))
  assert all(p.endswith(("lora_a", "lora_b")) for p in flat(adam.mu))


def test_loss_falls_on_a_tiny_corpus():
  config = tiny_config(trainable="full", steps=30, learning_rate=3e-3)
  _, _, losses, _ = run_steps(config, shd.single_device_mesh(), steps=30)
  assert losses[-1] < 0.5 * losses[0], losses


# --- sharding and accumulation ---------------------------------------------------------------

# Adam divides by sqrt(v): a gradient entry that is ~0 up to rounding still moves its weight by
# ~lr, so weights after several steps are compared loosely and losses / gradients tightly.

def test_three_steps_on_a_2x2x2_mesh_match_one_device():
  config = tiny_config()
  _, state1, losses1, grad_norms1 = run_steps(config, shd.single_device_mesh())
  _, state8, losses8, grad_norms8 = run_steps(config, shd.make_mesh((2, 2, 2)))
  np.testing.assert_allclose(losses8, losses1, atol=1e-5)
  np.testing.assert_allclose(grad_norms8, grad_norms1, rtol=1e-5)
  one, eight = real_rows(state1.trainable), real_rows(state8.trainable)
  assert max(np.abs(one[p] - eight[p]).max() for p in one) <= 0.1 * config.train.learning_rate


def test_gradient_accumulation_equals_one_large_batch():
  config = tiny_config(steps=1)
  batch = batch_of(config)
  batch["labels"][1, 5:] = -100  # unequal supervised tokens per micro-batch
  grads = {}
  for k in (1, 4):
    run = build_on(tiny_config(micro_batches=k), shd.make_mesh((2, 1, 1), jax.devices()[:2]))
    state, metrics = run.train_step(run.frozen, run.state,
                                    shd.host_to_global(batch, run.plan.batch_shardings))
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


@pytest.mark.parametrize("vocab,padding_weight", [(200, 0.0), (200, 1e3), (128, -1e3), (256, 0.0)])
def test_fused_head_loss_equals_autodiff_of_the_plain_loss_with_its_gradients(vocab, padding_weight):
  """The CPU's hand-written head + loss backward: loss, correct and count equal the plain loss;
  gradients of hidden and head equal autodiff's (padded vocabulary, ignored labels), also with the
  head's vocabulary sharded over 4 devices. Padding columns whose logits dwarf the real ones (or
  lie far below them) change nothing; the vocabulary ends inside a block of columns, on a block's
  edge, or fills the head."""
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(16, 256)), jnp.float32).at[:, vocab:].set(padding_weight)
  labels = jnp.asarray(rng.integers(0, vocab, size=(2, 5)), jnp.int32).at[1, 3:].set(-100)

  def plain(h, w):
    logits = train_lib.mask_padded_vocab(jnp.dot(h, w), vocab)
    return train_lib.cross_entropy(logits, labels)

  def fused(h, w):
    return train_lib.fused_head_cross_entropy(h, w, labels, vocab)

  want, got = plain(hidden, head), jax.jit(fused)(hidden, head)
  assert np.isfinite(float(got[0]))
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
  assert (int(got[1]), int(got[2])) == (int(want[1]), 8)
  scaled = lambda f: lambda h, w: f(h, w)[0] / 7.0  # noqa: E731  (a cotangent other than 1)
  want_grads = jax.grad(scaled(plain), (0, 1))(hidden, head)
  mesh = shd.make_mesh((1, 1, 4), jax.devices()[:4])
  sharded_head = jax.device_put(head, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, "tensor")))
  for w in (head, sharded_head):
    got_grads = jax.jit(jax.grad(scaled(fused), (0, 1)))(hidden, w)
    for g, ref in zip(got_grads, want_grads):
      np.testing.assert_allclose(np.asarray(g), np.asarray(ref), atol=1e-6)
  assert float(jnp.abs(want_grads[1][:, vocab:]).max(initial=0.0)) == 0.0  # padding: no gradient
