"""LoRA (Hu et al. 2021, as PEFT implements it) and the partition of params into frozen/trainable.

A LoRA-adapted dense layer computes `y = x W + (alpha / r) * dropout(x) A B` with
A: [in, r] (Kaiming-uniform, as PEFT) and B: [r, out] (zeros), so a fresh adapter is the identity.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank 0 means no adapters. `targets` uses PEFT's module names."""
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = TARGET_MODULES

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    unknown = sorted(set(self.targets) - set(TARGET_MODULES))
    if unknown:
      raise ValueError(f"unknown LoRA target modules {unknown}; expected names from "
                       f"{list(TARGET_MODULES)}")
    if self.rank < 0 or not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA rank={self.rank} must be >= 0 and dropout={self.dropout} in [0, 1)")
    if self.rank and not self.targets:
      raise ValueError("LoRA rank > 0 but no target modules were given")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0

  def applies_to(self, module_name: str) -> bool:
    return self.rank > 0 and module_name in self.targets


def kaiming_uniform_a(key, shape, dtype=jnp.float32):
  """PEFT's lora_A init: kaiming_uniform_(a=sqrt(5)) on a [r, in] weight is U(-1/sqrt(in), 1/sqrt(in)).

  Our A is stored [in, r] (fan-in on axis 0).
  """
  bound = 1.0 / jnp.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


# --- dropout on an adapter's input ---------------------------------------------------------------

def _mix(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 whose output bits each depend on every
  input bit."""
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def dropout(x: jax.Array, rng: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout of one adapter's input, as PEFT's `lora_dropout` (one mask per module).

  Each element is zeroed with probability `rate` (to 2^-32) and the rest scaled by 1 / (1 - rate).
  The mask comes from a keyed counter hash: the element's (row, feature) index mixed with 64 key
  bits drawn from `rng` (two rounds of xor-key and MurmurHash3's finalizer). The key is the only
  use of JAX's PRNG, so the mask is a pure function of `rng` (and of the global index, so of no
  mesh) like `jax.random.bernoulli`'s, at a dozen integer ops per element instead of threefry's
  ~100: 10-30x cheaper per element on the CPU (bench/README.md). Not for cryptography; the
  flattened leading axes and the features each hold fewer than 2^32 elements.

  Args:
    x: [..., features], any float dtype.
    rng: a PRNG key, distinct per module, layer, step and micro-batch (flax's 'dropout' stream).
    rate: drop probability in [0, 1).

  Returns:
    x's shape and dtype.
  """
  if rate == 0.0:
    return x
  k0, k1 = jax.random.bits(rng, (2,), jnp.uint32)
  rows = jnp.zeros(x.shape, jnp.uint32)  # the leading axes flattened into one row index
  for axis in range(x.ndim - 1):
    rows = rows * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
  features = jax.lax.broadcasted_iota(jnp.uint32, x.shape, x.ndim - 1)  # [..., features]
  bits = _mix(_mix(rows ^ k0) ^ features ^ k1)  # [..., features] uint32
  threshold = min(round(rate * 2.0 ** 32), 2 ** 32 - 1)
  keep = bits >= jnp.uint32(threshold)
  return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


# --- which leaves train: the paper's stages ------------------------------------------------------

# Each param path falls in exactly one group; the last rule is a catch-all that raises.
_GROUP_RULES = (
    (re.compile(r"^embed_tokens$"), "embed"),
    (re.compile(r"^lm_head$"), "head"),
    (re.compile(r"^layers/(self_attn|mlp)/\w+_proj/lora_[ab]$"), "lora"),
    (re.compile(r"^layers/(self_attn|mlp)/\w+_proj/kernel$"), "base"),
    (re.compile(r"^(layers/\w+_layernorm|norm)/scale$"), "base"),
)

STAGES: dict[str, frozenset[str]] = {
    "embeddings": frozenset({"embed"}),  # stage 1: the input embedding only
    "lora+embeddings": frozenset({"lora", "embed", "head"}),  # stage 2 and SFT (modules_to_save)
    "lora": frozenset({"lora"}),
    "full": frozenset({"embed", "head", "base", "lora"}),
    "lora+new_rows": frozenset({"lora", "embed", "head"}),  # only appended vocabulary rows train
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """The adapter's output (x a) b * scale, x: [batch, length, in], a: [in, r], b: [r, out], with
  a backward pass written for the CPU: its GEMMs want the contracted (token) axis of a left-hand
  operand in the minor position, and autodiff's gradient of b contracts the [tokens, out]
  cotangent from the left, so XLA copies it transposed (per projection, as large as the
  activation). Here both weight gradients contract a [tokens, r] operand from the left instead.
  Same values as autodiff (up to summation order)."""
  return _delta_forward(x, a, b, scale)[0]


def _delta_forward(x, a, b, scale):
  h = jnp.einsum("bli,ir->blr", x, a)  # [batch, length, r]
  return jnp.einsum("blr,ro->blo", h, b) * jnp.asarray(scale, x.dtype), (x, a, b, h)


def _delta_backward(scale, residuals, cotangent):
  x, a, b, h = residuals
  g = cotangent * jnp.asarray(scale, cotangent.dtype)  # [batch, length, out]
  d_b = jnp.einsum("blr,blo->ro", h, g)  # [r, out]
  d_h = jnp.einsum("blo,ro->blr", g, b)  # [batch, length, r]
  d_a = jnp.einsum("blr,bli->ri", d_h, x).T  # [in, r], contracted with the small d_h on the left
  d_x = jnp.einsum("blr,ir->bli", d_h, a)
  return d_x, d_a, d_b


delta.defvjp(_delta_forward, _delta_backward)


def param_group(path: str) -> str:
  """'embed', 'head', 'lora' or 'base' for a '/'-joined param path; unknown paths raise."""
  for pattern, group in _GROUP_RULES:
    if pattern.match(path):
      return group
  raise ValueError(f"param {path!r} matches no partition rule; extend lora._GROUP_RULES")


def _flat(tree: Any) -> dict[str, Any]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _unflat(flat: dict[str, Any]) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _is_node(x: Any) -> bool:
  return isinstance(x, Mapping)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def trainable_mask(params: Any, stage: str) -> dict:
  """A tree of bools shaped like `params`: True where the leaf trains in `stage` (see STAGES).

  `params` may hold arrays, `jax.ShapeDtypeStruct`s or logical-partitioning boxes.
  """
  if stage not in STAGES:
    raise ValueError(f"unknown trainable stage {stage!r}; expected one of {sorted(STAGES)}")
  groups = STAGES[stage]
  leaf_groups = jax.tree_util.tree_map_with_path(
      lambda path, _: param_group(_path_name(path)), params, is_leaf=lambda x: not _is_node(x))
  found = set(jax.tree_util.tree_leaves(leaf_groups)) & groups
  if not found:
    raise ValueError(f"stage {stage!r} trains nothing in these params (groups {sorted(groups)}; "
                     "is LoRA rank 0 for a LoRA stage?)")
  if "lora" in groups and stage != "full" and "lora" not in found:
    raise ValueError(f"stage {stage!r} needs LoRA adapters but the params have none (rank 0)")
  return jax.tree_util.tree_map(lambda group: group in groups, leaf_groups)


def split(params: Any, mask: Any) -> tuple[dict, dict]:
  """(frozen, trainable): two disjoint nested trees whose union is `params`; `mask` is a tree of
  bools shaped like `params` (True: trainable). Empty sub-trees are dropped."""
  frozen, trainable = {}, {}
  for key, value in params.items():
    if _is_node(value):
      sub_frozen, sub_trainable = split(value, mask[key])
      if sub_frozen:
        frozen[key] = sub_frozen
      if sub_trainable:
        trainable[key] = sub_trainable
    else:
      (trainable if mask[key] else frozen)[key] = value
  return frozen, trainable


def combine(frozen: Any, trainable: Any) -> dict:
  """The model's view: one nested tree holding the leaves of both."""
  out = dict(frozen)
  for key, value in trainable.items():
    out[key] = combine(out[key], value) if key in out and _is_node(value) else value
  return out


def check_adapters(params: Any, num_layers: int, lora: LoraConfig) -> int:
  """Asserts an adapter pair on every target module of every layer; returns the count
  (layers x targets). A target pattern that matches nothing is an error, never a no-op."""
  flat = _flat(params)
  found = {}
  for path, value in flat.items():
    if path.endswith("/lora_a"):
      found[path.split("/")[-2]] = value.shape[0]
  missing = sorted(set(lora.targets) - set(found)) if lora.rank else []
  if missing or any(n != num_layers for n in found.values()):
    raise ValueError(f"LoRA adapters found on {found} (module: layers); expected all of "
                     f"{list(lora.targets)} on {num_layers} layers, missing {missing}")
  return sum(found.values())


# --- adapters present in params, and folding them in ------------------------------------------

def lora_from_params(params: Any) -> LoraConfig:
  """The rank and targets of the adapters present in `params` (alpha unknown: rank 0 if none)."""
  layers = params.get("layers", {})
  found = {name: leaf["lora_a"].shape[-1] for group in layers.values() if isinstance(group, dict)
           for name, leaf in group.items() if isinstance(leaf, dict) and "lora_a" in leaf}
  if not found:
    return LoraConfig()
  return LoraConfig(rank=next(iter(found.values())), targets=tuple(sorted(found)))


def lora_for(params: Any, lora: LoraConfig | None, *, required: bool = False) -> LoraConfig:
  """The LoraConfig to apply `params` with: `lora` when they hold adapters of its rank, the
  rank-0 config when they hold none and `lora` is None or rank 0. The alpha of adapters is not
  stored in params, so adapters without a matching `lora` are an error, as is a `lora` of rank > 0
  for params without adapters (and, when `required`, params without adapters at all)."""
  present = lora_from_params(params)
  given = lora.rank if lora else 0
  if present.rank and given != present.rank:
    passed = "no lora" if lora is None else f"lora.rank={given}"
    raise ValueError(f"params hold LoRA adapters of rank {present.rank} on "
                     f"{list(present.targets)} but {passed} was given; pass lora=LoraConfig(rank, "
                     "alpha, ...) matching them, or merge them first (lora.merge)")
  if not present.rank and (given or required):
    raise ValueError(f"params hold no LoRA adapters but lora.rank={given}; expected params with "
                     "adapters (or lora=None for a model without them)")
  return lora if present.rank else LoraConfig()


@jax.jit
def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale) -> jax.Array:
  """kernel + scale * a b: the one place a LoRA delta is formed (merge, HF/Meta export, PEFT
  merge). The product and the sum are fp32 at HIGHEST precision, cast back to kernel's dtype.

  kernel: [..., in, out]; a: [..., in, r]; b: [..., r, out] (leading axes: layers, or none).
  """
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * scale  # [..., in, out]
  return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def merge(params: Any, lora: LoraConfig) -> dict:
  """W <- W + (alpha / r) * A B for every adapted kernel (`merged_kernel`); returns params
  without adapters. A: [layers, in, r], B: [layers, r, out], W: [layers, in, out]."""
  lora_for(params, lora)
  flat = _flat(params)
  out = {}
  for path, value in flat.items():
    if path.endswith(("/lora_a", "/lora_b")):
      continue
    prefix = path[: -len("kernel")]
    if path.endswith("/kernel") and prefix + "lora_a" in flat:
      value = merged_kernel(value, flat[prefix + "lora_a"], flat[prefix + "lora_b"],
                            jnp.float32(lora.scale))
    out[path] = value
  return _unflat(out)


def module_shapes(cfg) -> dict[str, tuple[int, int]]:
  """(in, out) features of each dense module of one layer: {'self_attn/q_proj': (hidden,
  heads * head_dim), ..., 'mlp/down_proj': (intermediate, hidden)}, in TARGET_MODULES order."""
  d, hd, ffn = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
  return {"self_attn/q_proj": (d, q), "self_attn/k_proj": (d, kv), "self_attn/v_proj": (d, kv),
          "self_attn/o_proj": (q, d), "mlp/gate_proj": (d, ffn), "mlp/up_proj": (d, ffn),
          "mlp/down_proj": (ffn, d)}


def adapter_shapes(cfg, lora: LoraConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
  """{'layers/<group>/<module>': (A shape, B shape)} for every target, stacked over layers."""
  layers = cfg.num_hidden_layers
  return {f"layers/{name}": ((layers, i, lora.rank), (layers, lora.rank, o))
          for name, (i, o) in module_shapes(cfg).items() if lora.applies_to(name.split("/")[1])}


def init_adapters(cfg, lora: LoraConfig, rng: jax.Array) -> dict:
  """Fresh adapters (A Kaiming-uniform, B zeros, fp32) for a base loaded without them."""
  flat = {}
  for index, (name, (a_shape, b_shape)) in enumerate(sorted(adapter_shapes(cfg, lora).items())):
    flat[f"{name}/lora_a"] = jax.vmap(lambda k, s=a_shape: kaiming_uniform_a(k, s[1:]))(
        jax.random.split(jax.random.fold_in(rng, index), a_shape[0]))
    flat[f"{name}/lora_b"] = jnp.zeros(b_shape, jnp.float32)
  return _unflat(flat)
