"""Train state, optimizer, masked (vocab-parallel) cross-entropy and the pure train step.

Frozen and trainable params are two pytrees (DESIGN.md, decision 1): the gradient is taken with
respect to `trainable` only, so no frozen weight gets a gradient and the optimizer state covers only
what trains. `train_step(frozen, state, batch) -> (state, metrics)` is pure; `cnllama_jax.plan`
jits it once with explicit shardings, donating the state (never the frozen tree). The TrainState
is exactly what a checkpoint holds.

A batch is a dict of int32 [batch, length] arrays: `input_ids`, `attention_mask` and `labels`
(aligned with input_ids, -100 = no loss; the step shifts them by one).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnllama_jax import sharding as shd
from cnllama_jax.attention import platform_of
from cnllama_jax.data.encode import IGNORE_INDEX as IGNORE
from cnllama_jax.lora import combine
from cnllama_jax.model import Llama, mask_padded_vocab


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []
  trainable: Any  # fp32 master copies of the params that train
  opt_state: Any
  rng: jax.Array  # uint32 [2] raw key data (checkpointable)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 1e-4
  warmup_ratio: float = 0.03
  schedule: str = "cosine"  # cosine | linear | constant
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 1.0


def make_schedule(opt: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup over warmup_ratio x total_steps, then cosine or linear decay to 0 (as HF)."""
  warmup = int(round(opt.warmup_ratio * total_steps))
  decay_steps = max(total_steps - warmup, 1)
  if opt.schedule == "cosine":
    decay = optax.cosine_decay_schedule(opt.learning_rate, decay_steps)
  elif opt.schedule == "linear":
    decay = optax.linear_schedule(opt.learning_rate, 0.0, decay_steps)
  elif opt.schedule == "constant":
    decay = optax.constant_schedule(opt.learning_rate)
  else:
    raise ValueError(f"train.schedule={opt.schedule!r}; expected cosine, linear or constant")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, opt.learning_rate, warmup), decay],
                              [warmup])


def decay_mask(trainable: Any) -> Any:
  """Weight decay on matrices, not on norm scales (as HF Trainer excludes LayerNorm weights)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not str(path[-1].key).endswith("scale"), trainable)


def make_optimizer(opt: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW with the schedule and a weight-decay mask."""
  return optax.chain(
      optax.clip_by_global_norm(opt.clip_norm),
      optax.adamw(make_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay, mask=decay_mask))


# --- loss ----------------------------------------------------------------------------------------

def _token_stats(logits: jax.Array, labels: jax.Array, vocab_offset) -> tuple:
  """Per-token (log-sum-exp pieces, label logit) of one vocabulary shard.

  logits: [batch, length, shard_vocab] fp32; labels: [batch, length] global ids.
  Returns (shard max, sum exp(logits - shard max), label logit or 0 when not in this shard).
  """
  local = labels - vocab_offset
  in_shard = (local >= 0) & (local < logits.shape[-1])
  onehot = jax.nn.one_hot(jnp.where(in_shard, local, 0), logits.shape[-1], dtype=logits.dtype)
  label_logit = jnp.sum(logits * onehot, axis=-1) * in_shard
  shard_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  sum_exp = jnp.sum(jnp.exp(logits - shard_max[..., None]), axis=-1)
  return shard_max, sum_exp, label_logit


def _finish(sum_exp, label_logit, global_max, labels):
  """Loss sum, correct count and token count from the combined shard statistics."""
  logsumexp = global_max + jnp.log(sum_exp)
  valid = labels != IGNORE
  loss = jnp.sum(jnp.where(valid, logsumexp - label_logit, 0.0))
  correct = jnp.sum(valid & (label_logit >= global_max))
  return loss, correct, jnp.sum(valid)


def cross_entropy(logits: jax.Array, labels: jax.Array, mesh: Mesh | None = None,
                  rules=shd.DEFAULT_RULES) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sum of token losses, correct predictions and counted tokens for labels != -100.

  logits: [batch, length, padded_vocab] fp32 (padded rows already at -1e30); labels: [batch,
  length]. When the vocabulary axis is sharded on `mesh`, the loss runs under `shard_map`: each
  device reduces its vocabulary shard and only per-token scalars cross devices (no device ever
  holds the full-vocabulary logits).
  """
  spec = None if mesh is None else shd.logical_to_spec(shd.ACT_VOCAB, rules, mesh, logits.shape)
  if spec is None or spec[2] is None:
    shard_max, sum_exp, label_logit = _token_stats(logits, labels, 0)
    return _finish(sum_exp, label_logit, shard_max, labels)
  vocab_axes = spec[2] if isinstance(spec[2], tuple) else (spec[2],)
  row_spec = PartitionSpec(spec[0], spec[1])

  def local(logits_shard, labels_shard):
    index = jax.lax.axis_index(vocab_axes)
    shard_max, sum_exp, label_logit = _token_stats(
        logits_shard, labels_shard, index * logits_shard.shape[-1])
    global_max = jax.lax.pmax(shard_max, vocab_axes)
    sum_exp = jax.lax.psum(sum_exp * jnp.exp(shard_max - global_max), vocab_axes)
    label_logit = jax.lax.psum(label_logit, vocab_axes)
    return global_max, sum_exp, label_logit

  global_max, sum_exp, label_logit = jax.shard_map(
      local, mesh=mesh, in_specs=(spec, row_spec), out_specs=(row_spec,) * 3)(logits, labels)
  return _finish(sum_exp, label_logit, global_max, labels)


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, labels: jax.Array, vocab_size: int,
                          chunk: int, mesh: Mesh | None = None,
                          rules=shd.DEFAULT_RULES) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`cross_entropy` of the LM head's logits, computed `chunk` positions at a time under remat.

  hidden: [batch, length, hidden] (after the final norm); head: [hidden, padded_vocab]; labels:
  [batch, length]. Each chunk's [batch, chunk, padded_vocab] fp32 logits exist only inside its
  step of a scan and are recomputed in the backward pass, so no [tokens, vocab] array is held.
  The vocabulary-parallel reduction of `cross_entropy` applies per chunk.
  """
  batch, length, width = hidden.shape
  if length % chunk:
    raise ValueError(f"model.lm_head_chunk={chunk} does not divide the sequence length {length}")
  n = length // chunk
  xs = hidden.reshape(batch, n, chunk, width).swapaxes(0, 1)  # [n, batch, chunk, hidden]
  ys = labels.reshape(batch, n, chunk).swapaxes(0, 1)  # [n, batch, chunk]

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def one(x, y):
    logits = jnp.dot(x, head.astype(x.dtype), preferred_element_type=jnp.float32)
    logits = shd.constrain(logits, shd.ACT_VOCAB, mesh, rules)  # [batch, chunk, padded_vocab]
    return cross_entropy(mask_padded_vocab(logits, vocab_size), y, mesh, rules)

  def step(total, inputs):
    return jax.tree_util.tree_map(jnp.add, total, one(*inputs)), None

  init = (jnp.float32(0), jnp.int32(0), jnp.int32(0))
  return jax.lax.scan(step, init, (xs, ys))[0]


def _real_vocab_max(logits: jax.Array, vocab_size: int) -> jax.Array:
  """max over the first `vocab_size` columns of [..., padded_vocab] logits -> [...], without
  writing a masked copy of the logits (which XLA:CPU does for a masked reduction, ~10x the cost
  of the reduction): a max per block of columns over the array as it lies, the blocks wholly
  inside the vocabulary, and the one block that straddles its end masked alone."""
  padded = logits.shape[-1]
  if padded == vocab_size:
    return jnp.max(logits, axis=-1)
  block = math.gcd(padded, 128)
  whole = vocab_size // block  # blocks of real columns only
  tail = logits[..., whole * block:(whole + 1) * block]  # [..., block]
  cols = whole * block + jax.lax.broadcasted_iota(jnp.int32, tail.shape, tail.ndim - 1)
  top = jnp.max(jnp.where(cols < vocab_size, tail, -jnp.inf), axis=-1)
  if whole:
    blocks = logits.reshape(*logits.shape[:-1], padded // block, block)
    top = jnp.maximum(top, jnp.max(jnp.max(blocks, axis=-1)[..., :whole], axis=-1))
  return top


def _head_loss_stats(logits, labels, vocab_size: int):
  """Per token of [batch, length, padded_vocab] fp32 logits: (log-sum-exp over the real
  vocabulary, label logit, valid, top logit, exponentials exp(logits - top) [batch, length,
  padded_vocab], their sum over the real vocabulary). The padding columns are left out without a
  masked copy: the sum is a matrix-vector product with 0/1 column weights (multi-threaded on the
  CPU, where a reduction with the exponential fused in runs on one thread at ~2.5x the CPU time).
  The exponent is clipped at 0, which only padding columns can exceed (their weight is 0, and an
  overflow there would give 0 * inf = NaN)."""
  top = _real_vocab_max(logits, vocab_size)  # [batch, length]
  real = (jnp.arange(logits.shape[-1]) < vocab_size).astype(logits.dtype)  # [padded_vocab]
  shifted = jnp.exp(jnp.minimum(logits - top[..., None], 0.0))
  total = jnp.dot(shifted, real)
  logsumexp = top + jnp.log(total)
  valid = labels != IGNORE
  label_logit = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], -1)[..., 0]
  return logsumexp, label_logit, valid, top, shifted, total


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fused_head_cross_entropy(hidden: jax.Array, head: jax.Array, labels: jax.Array,
                             vocab_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`cross_entropy` of the LM head's logits `hidden @ head` with a hand-written backward pass
  (plain array ops: on a mesh the partitioner shards them like any others; no `shard_map`).

  hidden: [batch, length, hidden]; head: [hidden, padded_vocab]; labels: [batch, length].
  What autodiff of `mask_padded_vocab` + `cross_entropy` does that this does not: a masked copy of
  the logits, a one-hot multiply-reduce for the label logit, and the gradient of the logits
  computed twice (once per GEMM that consumes it, one of them transposed). Here the softmax
  gradient is one fused pass over the forward's saved exponentials, feeding both GEMMs. On the CPU this is ~30%
  less CPU time for the head and loss (bench/README.md); `model_loss` uses it on CPU meshes.
  """
  return _fused_head_forward(hidden, head, labels, vocab_size)[0]


def _fused_head_forward(hidden, head, labels, vocab_size):
  logits = jnp.dot(hidden, head, preferred_element_type=jnp.float32)  # [batch, length, vocab]
  logsumexp, label_logit, valid, top, shifted, total = _head_loss_stats(logits, labels, vocab_size)
  loss = jnp.sum(jnp.where(valid, logsumexp - label_logit, 0.0))
  correct = jnp.sum(valid & (label_logit >= top))
  return (loss, correct, jnp.sum(valid)), (hidden, head, labels, shifted, total, valid)


def _fused_head_backward(vocab_size, residuals, cotangents):
  hidden, head, labels, shifted, total, valid = residuals
  scale = jnp.where(valid, cotangents[0], 0.0)  # [batch, length]: d loss_sum per counted token
  cols = jax.lax.broadcasted_iota(jnp.int32, shifted.shape, shifted.ndim - 1)
  softmax = jnp.where(cols < vocab_size, shifted * (1.0 / total)[..., None], 0.0)
  d_logits = (softmax - (cols == labels[..., None])) * scale[..., None]  # [batch, length, vocab]
  d_hidden = jnp.einsum("blv,hv->blh", d_logits, head.astype(jnp.float32))
  d_head = jnp.einsum("blh,blv->hv", hidden.astype(jnp.float32), d_logits)
  return d_hidden.astype(hidden.dtype), d_head.astype(head.dtype), None


fused_head_cross_entropy.defvjp(_fused_head_forward, _fused_head_backward)


def model_loss(model: Llama, params: Any, batch: dict, labels: jax.Array,
               rngs: dict | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(loss sum, correct, token count) of `model` on a batch against shifted `labels`; the LM head
  and loss run in chunks of `model.cfg.lm_head_chunk` positions when set, else on a CPU mesh as
  `fused_head_cross_entropy` (same values, a faster backward there), else as `cross_entropy`
  (vocabulary-parallel under `shard_map`)."""
  chunk = model.cfg.lm_head_chunk
  chunked = bool(chunk) and chunk < labels.shape[1]
  if not chunked and platform_of(model.mesh) != "cpu":
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         rngs=rngs)
    return cross_entropy(logits, labels, model.mesh, model.rules)
  hidden, head = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                             rngs=rngs, return_hidden=True)
  if not chunked:  # a CPU mesh
    return fused_head_cross_entropy(hidden, head.astype(hidden.dtype), labels,
                                    model.cfg.vocab_size)
  return chunked_cross_entropy(hidden, head, labels, model.cfg.vocab_size, chunk, model.mesh,
                               model.rules)


# --- the step ------------------------------------------------------------------------------------

def _row_mask_updates(updates: Any, row_range: tuple[int, int] | None) -> Any:
  """Zeroes updates of embedding / LM-head rows outside [lo, hi) (the `lora+new_rows` stage)."""
  if row_range is None:
    return updates
  lo, hi = row_range

  def mask(path, update):
    name = str(path[0].key)
    if name == "embed_tokens":
      ids = jax.lax.broadcasted_iota(jnp.int32, update.shape, 0)
    elif name == "lm_head":
      ids = jax.lax.broadcasted_iota(jnp.int32, update.shape, 1)
    else:
      return update
    return jnp.where((ids >= lo) & (ids < hi), update, 0)
  return jax.tree_util.tree_map_with_path(mask, updates)


def make_train_step(model: Llama, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, micro_batches: int = 1,
                    new_rows: tuple[int, int] | None = None) -> Callable:
  """Builds `train_step(frozen, state, batch) -> (state, metrics)`.

  micro_batches: gradient accumulation; the batch is split into that many strided micro-batches
  (rows i, i+k, i+2k, ... so each data shard holds an equal part of each) and the loss is the mean
  over all supervised tokens of the whole batch, exactly as one large batch.
  new_rows: (old_vocab, vocab) when only appended vocabulary rows of embedding/head may change.
  """
  mesh, rules = model.mesh, model.rules

  def loss_fn(trainable, frozen, batch, rng, total_tokens):
    params = combine(frozen, trainable)
    labels = jnp.concatenate([batch["labels"][:, 1:], jnp.full_like(batch["labels"][:, :1],
                                                                   IGNORE)], axis=1)
    loss_sum, correct, count = model_loss(model, params, batch, labels, {"dropout": rng})
    return loss_sum / total_tokens, (loss_sum, correct, count)

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def train_step(frozen: Any, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    total_tokens = jnp.maximum(jnp.sum(batch["labels"][:, 1:] != IGNORE), 1).astype(jnp.float32)
    k = micro_batches

    def accumulate(carry, inputs):
      grads, loss_sum, correct, count = carry
      index, mb = inputs
      mb = {key: shd.constrain(v, shd.BATCH, mesh, rules) for key, v in mb.items()}
      g, (l, c, n) = grad_fn(state.trainable, frozen, mb, jax.random.fold_in(rng, index),
                             total_tokens)
      grads = jax.tree_util.tree_map(jnp.add, grads, g)
      return (grads, loss_sum + l, correct + c, count + n), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
    init = (zeros, jnp.float32(0), jnp.int32(0), jnp.int32(0))
    if k == 1:
      (grads, loss_sum, correct, count), _ = accumulate(init, (0, batch))
    else:
      micro = jax.tree_util.tree_map(  # [k, batch / k, length], micro-batch i = rows i::k
          lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)
      (grads, loss_sum, correct, count), _ = jax.lax.scan(accumulate, init,
                                                          (jnp.arange(k), micro))
    grads = _row_mask_updates(grads, new_rows)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    updates = _row_mask_updates(updates, new_rows)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": loss_sum / total_tokens, "accuracy": correct / jnp.maximum(count, 1),
               "grad_norm": grad_norm, "learning_rate": schedule(state.step), "tokens": count,
               "real_tokens": jnp.sum(batch["attention_mask"] != 0)}  # non-padding (segment > 0)
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(model: Llama) -> Callable:
  """`eval_step(frozen, state, batch) -> {loss_sum, correct, tokens}` with dropout off."""
  model = model.clone(deterministic=True)

  def eval_step(frozen: Any, state: TrainState, batch: dict) -> dict:
    params = combine(frozen, state.trainable)
    labels = jnp.concatenate([batch["labels"][:, 1:], jnp.full_like(batch["labels"][:, :1],
                                                                   IGNORE)], axis=1)
    loss_sum, correct, count = model_loss(model, params, batch, labels)
    return {"loss_sum": loss_sum, "correct": correct, "tokens": count}
  return eval_step


def init_state(trainable: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """A fresh state at step 0; trainable params become fp32 master weights."""
  trainable = jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32, copy=True), trainable)
  return TrainState(step=jnp.int32(0), trainable=trainable,
                    opt_state=optimizer.init(trainable),
                    rng=jax.random.key_data(jax.random.key(seed)))


def state_shardings(state_shape: TrainState, trainable_shardings: Any, mesh: Mesh,
                    optimizer: optax.GradientTransformation) -> TrainState:
  """Shardings of a TrainState: trainable params as given (a tree shaped like `trainable`),
  optimizer moments like their params, step and rng replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_sh = optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, state_shape.opt_state, trainable_shardings,
      transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, trainable=trainable_shardings, opt_state=opt_sh,
                    rng=replicated)
