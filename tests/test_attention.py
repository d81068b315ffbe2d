"""Attention implementations: each gives `xla`'s outputs and gradients on causal, left-padded and
packed batches with MHA, GQA and MQA; packing isolates examples; splash compiles for a TPU;
the choice follows the mesh; bad choices are one-line errors."""
import functools
import importlib.util
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnllama_jax import attention as attention_lib
from cnllama_jax import config as model_config
from cnllama_jax import model as model_lib
from cnllama_jax import sharding as shd
from cnllama_jax import train as train_lib

TOL = 1e-5
LENGTH = 128  # two blockwise tiles, one splash block


def _segments(length: int = LENGTH) -> np.ndarray:
  """[3, length] segment ids, one row per case: causal (all 1), left-padded by 37, packed (three
  examples, then padding)."""
  ids = np.ones((3, length), np.int32)
  ids[1, :37] = 0
  ids[2, 50:90], ids[2, 90:118], ids[2, 118:] = 2, 3, 0
  return ids


def _qkv(heads: int, kv_heads: int, batch: int = 3, length: int = LENGTH, head_dim: int = 16):
  rng = np.random.default_rng(heads * 10 + kv_heads)
  make = lambda h: jnp.asarray(rng.normal(size=(batch, length, h, head_dim)), jnp.float32)  # noqa
  return make(heads), make(kv_heads), make(kv_heads)


def _value_and_grads(fn, q, k, v):
  """Outputs and the gradients of a fixed random projection of them wrt q, k, v."""
  weights = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v) * weights)  # noqa: E731
  return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_close(got, want, tol=TOL):
  """Every leaf within tol of want, relative to the leaf's largest magnitude when that exceeds 1
  (parameter gradients sum over thousands of tokens)."""
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    scale = max(1.0, float(jnp.max(jnp.abs(b))))
    assert float(jnp.max(jnp.abs(a - b))) <= tol * scale


HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def _packed_rows(length: int = LENGTH) -> np.ndarray:
  """[3, length] packed rows whose second 64-token tile shares no segment with the first in any
  row, so the blockwise kernel skips that tile pair: 64 | 40 + 24; 30 + 34 | 50 + 14 padding;
  64 | 64 padding."""
  ids = np.zeros((3, length), np.int32)
  ids[0, :64], ids[0, 64:104], ids[0, 104:] = 1, 2, 3
  ids[1, :30], ids[1, 30:64], ids[1, 64:114] = 1, 2, 3
  ids[2, :64] = 1
  return ids


def test_blockwise_skips_tile_pairs_whose_segments_never_meet():
  computed = attention_lib.tiles_computed(jnp.asarray(_packed_rows()), 64)
  assert computed.tolist() == [[True, False], [False, True]]
  assert attention_lib.tiles_computed(jnp.asarray(_segments()), 64).tolist() == [
      [True, False], [True, True]]
  padded = np.array([[1, 1, 2, 2, 0, 0, 0, 0]], np.int32)  # padding meets only padding
  assert attention_lib.tiles_computed(jnp.asarray(padded), 2).tolist() == [
      [True, False, False, False], [False, True, False, False], [False, False, True, False],
      [False, False, True, True]]


@pytest.mark.parametrize("heads", HEADS)
def test_blockwise_matches_xla_outputs_and_gradients(heads):
  """On the causal / left-padded / packed batch and on packed rows where a tile pair is skipped
  (the segment ids are arguments: one compilation serves both)."""
  q, k, v = _qkv(*HEADS[heads])
  blockwise = jax.jit(lambda q, k, v, segments: attention_lib.blockwise_attention(
      q, k, v, segments, 64))
  for segments in (jnp.asarray(_segments()), jnp.asarray(_packed_rows())):
    xla = lambda q, k, v: attention_lib.xla_attention(  # noqa: E731
        q, k, v, attention_lib.segment_mask(segments))  # pylint: disable=cell-var-from-loop
    got = _value_and_grads(lambda q, k, v: blockwise(q, k, v, segments), q, k, v)  # noqa: B023
    _assert_close(got, _value_and_grads(xla, q, k, v))


@pytest.mark.parametrize("heads", ["gqa", "mqa"])
def test_splash_interpreted_matches_xla_outputs_and_gradients(heads):
  q, k, v = _qkv(*HEADS[heads], head_dim=8)
  segments = jnp.asarray(_segments())
  xla = lambda q, k, v: attention_lib.xla_attention(  # noqa: E731
      q, k, v, attention_lib.segment_mask(segments))
  splash = lambda q, k, v: attention_lib.splash_attention(  # noqa: E731
      q, k, v, segments, None, interpret=True)
  _assert_close(_value_and_grads(splash, q, k, v), _value_and_grads(xla, q, k, v))


def _init(cfg, seed: int):
  return jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.key(seed))


def _model_value_and_grads(cfg, params, ids, segments):
  model = model_lib.Llama(cfg)
  weights = jnp.asarray(np.random.default_rng(8).normal(size=(*ids.shape, cfg.padded_vocab_size)),
                        jnp.float32)

  def loss(params):
    logits = model.apply({"params": params}, ids, segments)
    return jnp.sum(jnp.where(logits > -1e29, logits, 0.0) * weights), logits
  grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
  return logits, grads


def test_model_with_blockwise_attention_matches_xla_logits_and_gradients():
  cfg = model_config.preset("tiny-gqa", vocab_size=99, attention="xla")
  params = _init(cfg, 0)
  ids = jnp.asarray(np.random.default_rng(1).integers(3, 99, (3, LENGTH)), jnp.int32)
  segments = jnp.asarray(_segments())
  want = _model_value_and_grads(cfg, params, ids, segments)
  got = _model_value_and_grads(cfg.replace(attention="blockwise"), params, ids, segments)
  _assert_close(got, want)


def test_packed_examples_get_the_logits_and_loss_they_have_alone():
  cfg = model_config.preset("tiny", vocab_size=99, attention="blockwise")
  params = _init(cfg, 2)
  model = model_lib.Llama(cfg)
  rng = np.random.default_rng(3)
  lengths = (50, 40, 28)  # + 10 padding = 128
  examples = [rng.integers(3, 99, n).astype(np.int32) for n in lengths]
  ids = np.concatenate(examples + [np.zeros(10, np.int32)])[None]
  segments = np.concatenate([np.full(n, s + 1, np.int32) for s, n in enumerate(lengths)] +
                            [np.zeros(10, np.int32)])[None]
  # Labels as the packer writes them: the example's tokens, -100 on each example's first token
  # (the previous example's last token must not learn to predict it) and on padding.
  labels = np.where(segments > 0, ids, -100)
  starts = np.r_[0, np.cumsum(lengths)[:-1]]
  labels[0, starts] = -100
  shifted = lambda lab: np.concatenate([lab[:, 1:], np.full_like(lab[:, :1], -100)], 1)  # noqa
  forward = jax.jit(lambda model, ids, segments: model.apply({"params": params}, ids, segments),
                    static_argnums=0)
  packed_logits = forward(model, ids, segments)
  packed_loss = train_lib.cross_entropy(packed_logits, jnp.asarray(shifted(labels)))[0]
  # Each example alone in its own row, right-padded to the longest (causal: padding after a
  # token does not change its logits).
  alone_ids = np.zeros((3, 50), np.int32)
  alone_labels = np.full((3, 50), -100)
  for row, example in enumerate(examples):
    alone_ids[row, :len(example)] = example
    alone_labels[row, 1:len(example)] = example[1:]
  alone = forward(model.clone(cfg=cfg.replace(attention="xla")), alone_ids,
                  (alone_ids > 0).astype(np.int32))
  for row, (start, example) in enumerate(zip(starts, examples)):
    span = packed_logits[0, start:start + len(example)]
    assert float(jnp.max(jnp.abs(span - alone[row, :len(example)]))) <= TOL
  alone_loss = float(train_lib.cross_entropy(alone, jnp.asarray(shifted(alone_labels)))[0])
  assert abs(float(packed_loss) - alone_loss) <= TOL * abs(alone_loss)


def test_segment_positions_restart_per_example_and_skip_padding():
  segments = jnp.asarray([[0, 0, 1, 1, 1, 1],     # left-padded: as cumsum(mask) - 1
                          [1, 1, 2, 2, 2, 0],     # packed, right padding
                          [1, 1, 0, 0, 1, 1]])    # a hole inside one example
  assert model_lib.segment_positions(segments).tolist() == [[0, 0, 0, 1, 2, 3],
                                                            [0, 1, 0, 1, 2, 0],
                                                            [0, 1, 0, 0, 2, 3]]


def test_chunked_head_loss_equals_the_whole_logits_loss_on_a_vocab_sharded_mesh():
  cfg = model_config.preset("tiny", vocab_size=99)
  mesh = shd.make_mesh((1, 4, 2))  # vocabulary over `tensor`: the shard_map loss per chunk
  rng = np.random.default_rng(4)
  hidden = jnp.asarray(rng.normal(size=(4, 32, cfg.hidden_size)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(cfg.hidden_size, cfg.padded_vocab_size)), jnp.float32)
  labels = jnp.asarray(np.where(rng.random((4, 32)) < 0.2, -100, rng.integers(0, 99, (4, 32))))

  def whole(hidden, head):
    logits = model_lib.mask_padded_vocab(hidden @ head, cfg.vocab_size)
    return train_lib.cross_entropy(logits, labels, mesh)

  chunked = functools.partial(train_lib.chunked_cross_entropy, labels=labels,
                              vocab_size=cfg.vocab_size, chunk=8, mesh=mesh)
  want = jax.jit(whole)(hidden, head)
  got = jax.jit(chunked)(hidden, head)
  grad = lambda f: jax.jit(jax.grad(lambda h, w: f(h, w)[0], argnums=(0, 1)))  # noqa: E731
  want_grads, got_grads = grad(whole)(hidden, head), grad(chunked)(hidden, head)
  assert int(got[2]) == int(want[2]) and int(got[1]) == int(want[1])
  assert abs(float(got[0]) - float(want[0])) <= 1e-4 * abs(float(want[0]))
  _assert_close(got_grads, want_grads, 1e-5)


def test_model_loss_with_a_chunked_head_equals_the_whole_head():
  cfg = model_config.preset("tiny", vocab_size=99)
  params = _init(cfg, 5)
  ids = jnp.asarray(np.random.default_rng(6).integers(3, 99, (2, 64)), jnp.int32)
  batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
  loss = jax.jit(train_lib.model_loss, static_argnums=0)
  want = loss(model_lib.Llama(cfg), params, batch, ids)
  got = loss(model_lib.Llama(cfg.replace(lm_head_chunk=16)), params, batch, ids)
  assert abs(float(got[0]) - float(want[0])) <= 1e-5 * abs(float(want[0]))
  assert int(got[2]) == int(want[2])


# --- choice and errors ---------------------------------------------------------------------------

def _fake_mesh(platform: str):
  """Only the platform is read by the choice; no GPU/TPU needed for the selection logic."""
  return types.SimpleNamespace(devices=np.asarray([types.SimpleNamespace(platform=platform)]))


def test_auto_follows_the_mesh_platform_and_the_length():
  cpu = shd.make_mesh((1, -1, 1))
  assert attention_lib.choose("auto", cpu, 512, jnp.float32) == "blockwise"
  assert attention_lib.choose("auto", cpu, 100, jnp.float32) == "xla"
  assert attention_lib.choose("auto", _fake_mesh("tpu"), 512, jnp.bfloat16) == "splash"
  assert attention_lib.choose("auto", _fake_mesh("tpu"), 100, jnp.bfloat16) == "xla"
  assert attention_lib.choose("auto", _fake_mesh("gpu"), 512, jnp.bfloat16) == "cudnn"
  assert attention_lib.choose("auto", _fake_mesh("gpu"), 512, jnp.float32) == "xla"


@pytest.mark.parametrize("requested,platform,length,dtype,message", [
    ("splash", "cpu", 512, jnp.float32, "model.attention='splash' needs a TPU mesh"),
    ("splash", "tpu", 200, jnp.bfloat16, "sequence length 200 is not a multiple"),
    ("blockwise", "cpu", 100, jnp.float32, "sequence length 100 is not a multiple of its block"),
    ("cudnn", "cpu", 512, jnp.bfloat16, "model.attention='cudnn' needs a GPU mesh"),
    ("cudnn", "gpu", 512, jnp.float32, "needs model.dtype bfloat16 or float16"),
    ("flash", "cpu", 512, jnp.float32, "model.attention='flash'; expected one of"),
])
def test_bad_attention_choices_are_one_line_errors(requested, platform, length, dtype, message):
  with pytest.raises(ValueError, match=message) as err:
    attention_lib.choose(requested, _fake_mesh(platform), length, dtype)
  assert "\n" not in str(err.value)


def test_unknown_attention_name_in_the_model_config_is_an_error():
  with pytest.raises(ValueError, match=r"model.attention='flash'; expected one of"):
    model_config.preset("tiny", attention="flash")


def test_splash_requested_on_a_cpu_mesh_fails_in_the_model():
  cfg = model_config.preset("tiny", vocab_size=99, attention="splash")
  model = model_lib.Llama(cfg, mesh=shd.make_mesh((1, -1, 1)))
  ids = jax.ShapeDtypeStruct((8, 128), jnp.int32)
  with pytest.raises(ValueError, match="needs a TPU mesh, but the mesh's devices are 'cpu'"):
    jax.eval_shape(model.init, jax.random.key(0), ids)


# --- splash for a TPU topology (libtpu's compiler on this CPU host) -------------------------------

@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_splash_compiles_for_a_tpu_topology_with_the_mosaic_kernel():
  from cnllama_jax import aot  # pylint: disable=import-outside-toplevel
  _, devices = aot.tpu_devices("v4-8")  # 4 chips, megacore
  mesh = shd.make_mesh((1, 2, 2), devices)  # batch over fsdp, heads over tensor
  assert attention_lib.choose("auto", mesh, 256, jnp.bfloat16) == "splash"
  batch, length, heads, kv_heads, head_dim = 2, 256, 4, 2, 128
  spec = jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
  sharding = jax.sharding.NamedSharding(mesh, spec)
  q = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16, sharding=sharding)
  kv = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.bfloat16, sharding=sharding)
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("fsdp", None)))

  def loss(q, k, v, segment_ids):
    out = attention_lib.attention(q, k, v, segment_ids, "auto", mesh)
    return jnp.sum(out.astype(jnp.float32))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, ids).compile()
  assert "tpu_custom_call" in compiled.as_text()



def test_the_prepared_gpu_check_runs_here_in_smoke_mode(capsys):
  """bench/gpu_check.py waits for a session with a GPU; its parity and speed sections must still
  run when one comes (`--smoke`: the CPU, tiny shapes, blockwise standing in for cuDNN)."""
  import os  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                      "gpu_check.py")
  spec = importlib.util.spec_from_file_location("gpu_check", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with pytest.raises(SystemExit) as done:
    module.main(["--smoke", "--sections", "1,2", "--repeats", "1"])
  out = capsys.readouterr().out
  assert done.value.code == 0, out[-3000:]
  assert out.count("  ok") == 7 and "gpu_check: all parity cases passed" in out  # 6 cases + model
  assert "xla causal only" in out and "failed" not in out
