"""Checkpoints of a run: an Orbax `CheckpointManager` in `<workdir>/checkpoints`.

A checkpoint (one directory per step) holds two items:
  state  the TrainState exactly as it trains: trainable params, optimizer state, step and rng
         (Orbax, sharded, written asynchronously: the device-to-host copy blocks, the file writes
         run in the background);
  meta   JSON: the run's config, where the frozen base came from and its fingerprint, the real
         vocabulary size, and per-leaf checksums of the state.
The frozen base is not copied: resuming rebuilds it from the config and refuses a base whose
fingerprint differs.

Restoring onto another mesh: arrays are read straight into the new run's shardings. The padded
vocabulary depends on the mesh (99 real rows pad to 256 on a (2,2,2) mesh, to 128 on one device);
embedding / LM-head leaves (and their Adam moments) are read with Orbax's padding/truncation, which
only adds or drops padding rows. That is exact because padding rows are zero and stay zero (their
logits are masked, so their gradients, moments and updates are all zero); the checksums prove it.

Checksums: per leaf, a uint32 sum of the raw bits weighted by each element's coordinates. Integer
sums do not depend on the reduction order, and zero padding adds nothing, so they are the same on
any mesh. A checkpoint whose restored checksums differ, or that Orbax cannot read, is damaged: it
is reported, moved to `<workdir>/checkpoints_damaged/` and the previous one is used.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from cnllama_jax import cli, paths, storage_retries, train as train_lib

SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "checkpoints_damaged"
FORMAT = 1
VOCAB_AXIS = {"embed_tokens": 0, "lm_head": 1}  # leaf name -> its padded vocabulary axis


class CheckpointError(RuntimeError):
  """A checkpoint problem the user has to resolve; the message is one line."""


# --- what a checkpoint holds ---------------------------------------------------------------------

def leaf_name(path) -> str:
  """'trainable.layers.mlp.down_proj.lora_a', 'opt_state.1.0.mu.embed_tokens', ..."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return ".".join(parts)


def _named_leaves(tree) -> dict[str, Any]:
  return {leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _vocab_axis(name: str) -> int | None:
  return VOCAB_AXIS.get(name.rsplit(".", 1)[-1])


def _bits(x: jax.Array) -> jax.Array:
  """The raw bits of x as uint32 (same shape)."""
  size = jnp.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


_PRIMES = (2654435761, 2246822519, 3266489917, 668265263, 374761393)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """uint32 []: the sum of each element's bits x (1 + a weighted sum of its coordinates).

  Integer sums wrap and do not depend on the reduction order, so the value is the same on any
  mesh; zero padding adds nothing; a zeroed, cut or misplaced block changes it."""
  weight = jnp.ones(x.shape, jnp.uint32)
  for axis in range(x.ndim):
    weight = weight + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(
        _PRIMES[axis % len(_PRIMES)])
  return jnp.sum(_bits(x) * weight, dtype=jnp.uint32)


def _replicated_to_host(tree) -> Any:
  """A tree computed replicated on a mesh as numpy (works across processes)."""
  return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), tree)


@functools.lru_cache(maxsize=8)
def _checksum_fn(mesh):
  return jax.jit(lambda t: jax.tree_util.tree_map(_leaf_checksum, t),
                 out_shardings=NamedSharding(mesh, PartitionSpec()))


def checksums(state: train_lib.TrainState, mesh) -> dict[str, int]:
  """{leaf name: checksum} of a state; the same on any mesh (see module doc)."""
  sums = _replicated_to_host(_checksum_fn(mesh)(state))
  return {name: int(value) for name, value in _named_leaves(sums).items()}


# --- the frozen base -----------------------------------------------------------------------------

def _sample_indices(n: int, salt: int) -> np.ndarray:
  """A few fixed positions along a dimension of size n: the ends, the middle and 3 spread ones."""
  rng = np.random.default_rng([n, salt])
  picks = {0, n // 2, n - 1, *rng.integers(0, n, size=3).tolist()}
  return np.asarray(sorted(picks), np.int32)


def base_fingerprint(frozen: Any, vocab_size: int, mesh) -> str:
  """A 16-hex-digit hash of the frozen params' real shapes, dtypes and a grid of sampled values.

  Cheap (a few hundred values per leaf, gathered on device) and mesh-independent (padding rows of
  the vocabulary are never sampled); any other base differs in nearly every sampled value.
  """
  leaves = _named_leaves(frozen)
  index = {}
  for salt, (name, x) in enumerate(sorted(leaves.items())):
    shape = list(x.shape)
    axis = _vocab_axis(name)
    if axis is not None and axis < len(shape):
      shape[axis] = min(shape[axis], vocab_size)
    index[name] = (tuple(shape), [_sample_indices(n, salt) for n in shape])
  if not leaves:
    return "no-frozen-params"
  names = sorted(leaves)
  gather = jax.jit(lambda xs: [x[np.ix_(*index[n][1])] if x.ndim else x
                               for n, x in zip(names, xs)],
                   out_shardings=NamedSharding(mesh, PartitionSpec()))
  samples = _replicated_to_host(gather([leaves[n] for n in names]))
  digest = hashlib.sha256()
  for name, sample in zip(names, samples):
    digest.update(f"{name}:{index[name][0]}:{sample.dtype}".encode())
    digest.update(np.ascontiguousarray(sample).tobytes())
  return digest.hexdigest()[:16]


def base_source(config, base_given: bool) -> str:
  """Where the frozen base came from, for messages and the checkpoint's meta."""
  if base_given:
    return "the base passed to fit (e.g. the previous stage's merged model)"
  if config.base_model:
    return f"base_model {paths.absolute(config.base_model)}"
  m = config.model
  return (f"random init seed {config.seed} (hidden {m.hidden_size}, layers "
          f"{m.num_hidden_layers}, heads {m.num_attention_heads}, vocab {m.vocab_size})")


# --- logging -------------------------------------------------------------------------------------

class _OneLineOrbaxErrors(logging.Filter):
  """Orbax logs a failed background write with its traceback before the error reaches the caller
  (as a CheckpointError), and asyncio may log the same failure of another in-flight write as
  "Task exception was never retrieved"; keep those log records to one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and ("orbax" in (record.pathname or "") or record.name == "asyncio"):
      record.exc_info, record.exc_text = None, None
      record.msg = " ".join(str(record.msg).split())
    return True


def one_line_orbax_errors() -> None:
  """Installs the filter on absl's logger (which Orbax logs through) and asyncio's; idempotent."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OneLineOrbaxErrors) for f in logger.filters):
      logger.addFilter(_OneLineOrbaxErrors())


# --- the manager ---------------------------------------------------------------------------------

def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _flatten(d: Any, prefix: str = "") -> dict:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


class Checkpoints:
  """Saving and resuming one run in `<workdir>/checkpoints`.

  `plan` is the run's plan (its abstract state, with shardings, is the restore target);
  `frozen` the run's frozen params (fingerprinted); `source` describes where they came from (see
  `base_source`).
  """

  def __init__(self, workdir: str, plan, frozen: Any, source: str, *, async_save: bool = True):
    self.workdir = paths.absolute(workdir)  # local or gs://: Orbax writes through tensorstore
    storage_retries.configure_retries()  # bounded gs:// retries, also for Orbax's tensorstore (idempotent)
    self.directory = paths.join(self.workdir, SUBDIR)
    self.config, self.plan = plan.config, plan
    self.vocab_size = plan.cfg.vocab_size
    self.base = {"source": source,
                 "fingerprint": base_fingerprint(frozen, self.vocab_size, plan.mesh)}
    self._shapes = {n: list(x.shape) for n, x in _named_leaves(plan.state).items()}
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(int(self.config.train.keep_checkpoints), 1), create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_handlers=self._handlers())
    except OSError as err:
      raise CheckpointError(f"cannot use checkpoint directory {self.directory}: "
                            f"{cli.one_line(err, storage=True)}") from None
    self.saved_step: int | None = None
    self._pending_step: int | None = None

  @staticmethod
  def _handlers() -> dict:
    return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}

  # -- saving --

  def save(self, step: int, state: train_lib.TrainState) -> None:
    """Starts saving `state` as checkpoint `step` (returns once the data is off the devices)."""
    self.wait()  # Orbax waits for the previous save anyway; this names its step if it failed
    meta = {"format": FORMAT, "step": int(step), "time": time.time(),
            "vocab_size": self.vocab_size, "base": self.base,
            "mesh": {k: int(v) for k, v in self.plan.mesh.shape.items()},
            "process_count": jax.process_count(), "shapes": self._shapes,
            "checksums": checksums(state, self.plan.mesh), "config": _config_json(self.config)}
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as err:  # noqa: BLE001 - an earlier async save may surface here
      raise CheckpointError(f"saving checkpoint step {step} in {self.directory} failed: "
                            f"{cli.one_line(err, storage=True)}") from err
    self._pending_step = step

  def wait(self) -> None:
    """Blocks until the last save is on disk; a failed write is a CheckpointError."""
    try:
      self.manager.wait_until_finished()
    except Exception as err:  # noqa: BLE001
      raise CheckpointError(f"saving checkpoint step {self._pending_step} in {self.directory} "
                            f"failed: {cli.one_line(err, storage=True)}") from err
    if self._pending_step is not None:
      self.saved_step, self._pending_step = self._pending_step, None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()

  @property
  def last_step(self) -> int | None:
    """The step of the newest good checkpoint (being written or on disk), None if none."""
    return self._pending_step if self._pending_step is not None else self.saved_step

  # -- restoring --

  def restore(self) -> train_lib.TrainState | None:
    """The latest complete checkpoint as a TrainState on the run's mesh, or None if there is none.

    Damaged checkpoints are reported, moved aside and skipped; a checkpoint of another base or of
    incompatible shapes is a CheckpointError.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
        if not isinstance(meta, dict) or "checksums" not in meta:
          raise ValueError("its meta item is missing or unreadable")
      except Exception as err:  # noqa: BLE001
        self._set_aside(step, err)
        continue
      self._check_compatible(step, meta)
      try:
        state = self._restore_state(step)
        found = checksums(state, self.plan.mesh)
        bad = sorted(n for n, v in meta["checksums"].items() if found.get(n) != v)
        if bad:
          raise ValueError(f"checksums of {len(bad)} arrays differ, e.g. {bad[0]}")
      except Exception as err:  # noqa: BLE001
        self._set_aside(step, err)
        continue
      self._warn_config_changes(step, meta.get("config", {}))
      self.saved_step = step
      return state
    return None

  def _restore_state(self, step: int) -> train_lib.TrainState:
    # strict=False: vocabulary leaves may carry another mesh's padding (checked in
    # _check_compatible: only those leaves, only on their vocabulary axis).
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(self.plan.state, strict=False)))["state"]

  def _check_compatible(self, step: int, meta: dict) -> None:
    where = f"checkpoint step {step} in {self.directory}"
    if meta.get("format") != FORMAT:
      raise CheckpointError(f"{where} has checkpoint format {meta.get('format')}; this code reads "
                            f"format {FORMAT}")
    saved_base = meta.get("base", {})
    if saved_base.get("fingerprint") != self.base["fingerprint"]:
      raise CheckpointError(
          f"{where} was trained on a different frozen base ({saved_base.get('source')}, "
          f"fingerprint {saved_base.get('fingerprint')}) than this run ({self.base['source']}, "
          f"fingerprint {self.base['fingerprint']}); resume with the same base model and seed, "
          "or use a new --workdir")
    if meta.get("vocab_size") != self.vocab_size:
      raise CheckpointError(f"{where} has a vocabulary of {meta.get('vocab_size')} but this run "
                            f"has {self.vocab_size}; use the same tokenizer or a new --workdir")
    saved = meta.get("shapes", {})
    missing, extra = sorted(set(self._shapes) - set(saved)), sorted(set(saved) - set(self._shapes))
    if missing or extra:
      raise CheckpointError(
          f"{where} holds other trainable leaves than this run (missing {missing[:3]}, extra "
          f"{extra[:3]}); was train.trainable or the LoRA config changed? Use a new --workdir")
    for name, shape in self._shapes.items():
      old = list(saved[name])
      axis = _vocab_axis(name)
      if axis is not None and len(old) == len(shape) and all(
          a == b for i, (a, b) in enumerate(zip(old, shape)) if i != axis) and min(
              old[axis], shape[axis]) >= self.vocab_size:
        continue  # another mesh's vocabulary padding
      if old != shape:
        raise CheckpointError(f"{where}: {name} has shape {tuple(old)} but this run expects "
                              f"{tuple(shape)}; was the model or LoRA config changed? Use a new "
                              "--workdir")

  def _set_aside(self, step: int, err: BaseException) -> None:
    """Reports a damaged checkpoint and moves it to <workdir>/checkpoints_damaged/<step>."""
    target = paths.join(self.workdir, DAMAGED_SUBDIR, f"{step}-{int(time.time())}")
    if jax.process_index() == 0:
      print(f"warning: checkpoint step {step} in {self.directory} is damaged "
            f"({cli.one_line(err, storage=True)}); moved to {target}, trying the previous one",
            file=sys.stderr, flush=True)
      paths.move(paths.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint set aside {step}")
    self.manager.reload()

  def _warn_config_changes(self, step: int, saved: dict) -> None:
    old, new = _flatten(saved), _flatten(_config_json(self.config))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed and jax.process_index() == 0:
      shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
      logging.warning("resuming from step %d with a changed config: %s%s", step, shown,
                      " ..." if len(changed) > 5 else "")


@contextlib.contextmanager
def opened(workdir: str, plan, frozen: Any, source: str, **kwargs):
  """Checkpoints(...) that waits for its last save and closes on exit."""
  checkpoints = Checkpoints(workdir, plan, frozen, source, **kwargs)
  try:
    yield checkpoints
  except BaseException:
    try:  # finish the last good save, without hiding the error that stopped the run
      checkpoints.close()
    except Exception as err:  # noqa: BLE001
      logging.error("while stopping: %s", cli.one_line(err, storage=True))
    raise
  checkpoints.close()
