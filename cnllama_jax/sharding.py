"""Device mesh, logical-axis rules, and placement of params and batches.

Every param and key activation is annotated with logical axis names (`embed`, `vocab`, `mlp`,
`activation_batch`, ...). One rules table maps them to the mesh axes (`data`, `fsdp`, `tensor`),
so a new parallelism layout is a config change. A mesh axis that does not divide a dimension is
dropped for that dimension (the dimension is replicated over it) rather than failing.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Activation logical axes used by the model.
ACT_EMBED = ("activation_batch", "activation_length", "activation_embed")
ACT_HEADS = ("activation_batch", "activation_length", "activation_heads", None)
ACT_MLP = ("activation_batch", "activation_length", "activation_mlp")
ACT_VOCAB = ("activation_batch", "activation_length", "activation_vocab")
BATCH = ("activation_batch", "activation_length")

# Logical axis -> mesh axes (a name, a tuple of names, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
)


def normalize_rules(rules) -> tuple[tuple[str, Any], ...]:
  """Rules from a config (lists of [name, axes]) as hashable tuples."""
  out = []
  for rule in rules:
    name, axes = rule
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
    out.append((str(name), axes))
  return tuple(out)


def mesh_axes(rules, logical: str) -> tuple[str, ...]:
  """The mesh axes a logical axis maps to under `rules` (empty when replicated or absent)."""
  target = dict(rules).get(logical)
  return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def mesh_shape(requested: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 in `requested` to the remaining devices; errors when it cannot divide."""
  requested = [int(n) for n in requested]
  if len(requested) != len(MESH_AXES):
    raise ValueError(f"mesh shape {requested} must have {len(MESH_AXES)} entries for axes "
                     f"{MESH_AXES}")
  if requested.count(-1) > 1 or any(n == 0 or n < -1 for n in requested):
    raise ValueError(f"mesh shape {requested}: sizes must be positive, with at most one -1")
  fixed = math.prod(n for n in requested if n != -1)
  if num_devices % fixed:
    raise ValueError(f"mesh shape {requested} does not divide the {num_devices} devices "
                     f"(the fixed axes need a multiple of {fixed})")
  shape = [num_devices // fixed if n == -1 else n for n in requested]
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {requested} uses {math.prod(shape)} devices but there are "
                     f"{num_devices}; use -1 for one axis to take the remaining devices")
  return tuple(shape)


def make_mesh(requested: Sequence[int] = (1, -1, 1), devices=None) -> Mesh:
  """A mesh over axes (data, fsdp, tensor); `requested` may hold one -1."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(requested, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


def single_device_mesh(device=None) -> Mesh:
  device = device or jax.devices()[0]
  return Mesh(np.asarray([device], dtype=object).reshape(1, 1, 1), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """PartitionSpec for logical `axes`. Mesh axes that are absent, of size 1, already used by an
  earlier dimension, or that do not divide the dimension (when `shape` is given) are dropped."""
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(axes):
    kept = []
    for axis in (mesh_axes(rules, name) if name is not None else ()):
      size = mesh.shape.get(axis, 1)
      if size == 1 or axis in used:
        continue
      if shape is not None and shape[dim] % (math.prod(mesh.shape[a] for a in kept) * size):
        continue
      kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None, rules) -> jax.Array:
  """with_sharding_constraint by logical names; the identity when no mesh is given."""
  if mesh is None:
    return x
  spec = logical_to_spec(axes, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def param_shardings(boxed_params: Any, mesh: Mesh, rules) -> Any:
  """NamedSharding for every leaf of a tree of `nn.LogicallyPartitioned` boxes (e.g. from
  `model.abstract_params`). A leaf without logical names is an error naming its path."""
  def one(path, box):
    if not isinstance(box, nn.LogicallyPartitioned):
      raise ValueError(f"param {jax.tree_util.keystr(path)} has no logical axis names")
    spec = logical_to_spec(box.names, rules, mesh, box.value.shape)
    dropped = [n for n, s in zip(box.names, spec) if dict(rules).get(n) and s is None]
    if dropped:
      logging.debug("param %s: axes %s replicated (mesh does not divide)",
                    jax.tree_util.keystr(path), dropped)
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(
      one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def place(tree: Any, shardings: Any) -> Any:
  """Puts a tree of host or device arrays onto the mesh by a matching tree of shardings."""
  return jax.tree_util.tree_map(jax.device_put, tree, shardings)


def batch_sharding(mesh: Mesh, rules, shape: Sequence[int]) -> NamedSharding:
  """Sharding of a [batch, length] array of token ids."""
  return NamedSharding(mesh, logical_to_spec(BATCH, rules, mesh, shape))


def host_to_global(local_batch: dict, shardings: dict) -> dict:
  """This host's rows of a batch (numpy [rows / hosts, ...]) -> global jax arrays on the mesh."""
  return {key: jax.make_array_from_process_local_data(shardings[key], np.asarray(value))
          for key, value in local_batch.items()}
