"""Hugging Face LLaMA checkpoints <-> our param tree.

Import streams: every param is built with `jax.make_array_from_callback`, so each device's shard
is read with ranged reads of just its bytes, from a local file or a bucket (`gs://...`), never a
whole file (torch's `[out, in]` weights transposed to our `[in, out]`, per-layer tensors stacked
on the layer axis, the vocabulary padded with zero rows). Beyond the params it returns, a host
holds one shard of one param and one read block at a time.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cnllama_jax import sharding as shd
from cnllama_jax import tensor_files
from cnllama_jax.config import LlamaConfig, load_hf_config
from cnllama_jax.model import abstract_params
from cnllama_jax.vocab import mesh_vocab_multiple

# Keys that some checkpoints carry and that hold no weights of ours.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One param of ours and the HF tensor(s) it comes from.

  path: our param path; hf_key: the HF key (with `{layer}` when stacked over layers);
  transpose: HF stores the transpose of ours; vocab_axis: our axis padded to padded_vocab_size.
  """
  path: tuple[str, ...]
  hf_key: str
  transpose: bool = False
  vocab_axis: int | None = None

  @property
  def stacked(self) -> bool:
    return "{layer}" in self.hf_key


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def leaves(cfg: LlamaConfig) -> list[Leaf]:
  """The param <-> HF key table for a config."""
  table = [Leaf(("embed_tokens",), "model.embed_tokens.weight", vocab_axis=0)]
  for norm in ("input_layernorm", "post_attention_layernorm"):
    table.append(Leaf(("layers", norm, "scale"), f"model.layers.{{layer}}.{norm}.weight"))
  for group, names in (("self_attn", _ATTN), ("mlp", _MLP)):
    for name in names:
      table.append(Leaf(("layers", group, name, "kernel"),
                        f"model.layers.{{layer}}.{group}.{name}.weight", transpose=True))
  table.append(Leaf(("norm", "scale"), "model.norm.weight"))
  if not cfg.tie_word_embeddings:
    table.append(Leaf(("lm_head",), "lm_head.weight", transpose=True, vocab_axis=1))
  return table


def hf_shape(leaf: Leaf, our_shape: tuple[int, ...], cfg: LlamaConfig) -> tuple[int, ...]:
  """Shape of one HF tensor for `leaf`, given our (possibly stacked, padded) shape."""
  shape = list(our_shape[1:] if leaf.stacked else our_shape)
  if leaf.vocab_axis is not None:
    shape[leaf.vocab_axis] = cfg.vocab_size
  return tuple(reversed(shape)) if leaf.transpose else tuple(shape)


def get(tree: Any, path: Iterable[str]) -> Any:
  """tree[path[0]][path[1]]...: the node of a nested dict at a param path."""
  for name in path:
    tree = tree[name]
  return tree


def _listing(keys) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
  return ", ".join(keys[:_MAX_LISTED]) + more


def check_keys(source: tensor_files.WeightSource, cfg: LlamaConfig, boxed: Any,
               directory: str) -> None:
  """Missing, unexpected and mis-shaped tensors, each an error that lists them."""
  expected = {}
  for leaf in leaves(cfg):
    shape = hf_shape(leaf, get(boxed, leaf.path).value.shape, cfg)
    layers = range(cfg.num_hidden_layers) if leaf.stacked else [None]
    for layer in layers:
      expected[leaf.hf_key.format(layer=layer)] = shape
  found = {k for k in source.keys() if not k.endswith(_IGNORED_SUFFIXES)}
  if cfg.tie_word_embeddings:
    found.discard("lm_head.weight")
  missing, unexpected = set(expected) - found, found - set(expected)
  if missing:
    raise ValueError(f"{directory}: missing keys ({len(missing)}): {_listing(missing)}")
  if unexpected:
    raise ValueError(f"{directory}: unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
  for key, shape in expected.items():
    if source.shape(key) != shape:
      raise ValueError(f"{directory}: {key} in {source.file_of(key)} has shape "
                       f"{source.shape(key)}, expected {shape} from config.json")


def _read_shard(source, leaf: Leaf, cfg: LlamaConfig, shape, index, dtype) -> np.ndarray:
  """Our-layout slice `index` (a tuple of slices over `shape`) of one param, from HF tensors.

  The slice is allocated once in the HF layout (zeros: vocabulary padding rows stay zero), each HF
  tensor's byte ranges are read straight into it (cast on the way), and a transposed *view* is
  returned for `[out, in]` weights: device_put does the transpose. Beyond the result the process
  holds this one slice and at most one read block (tensor_files.CHUNK_BYTES).
  """
  bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
  layers: list = [None]
  if leaf.stacked:
    layers, bounds = list(range(*bounds[0])), bounds[1:]
  real = list(bounds)
  if leaf.vocab_axis is not None:
    lo, hi = bounds[leaf.vocab_axis]
    real[leaf.vocab_axis] = (min(lo, cfg.vocab_size), min(hi, cfg.vocab_size))
  theirs = [slice(lo, hi) for lo, hi in real]
  inner = [hi - lo for lo, hi in bounds]
  if leaf.transpose:
    theirs, inner = theirs[::-1], inner[::-1]
  # [layers?, *HF layout of the slice]; the vocabulary axis is the leading HF axis, so the real
  # rows are a leading (contiguous) part of it.
  out = np.zeros(([len(layers)] if leaf.stacked else []) + inner, dtype)
  real_rows = tuple(s.stop - s.start for s in theirs)
  for i, layer in enumerate(layers):
    key = leaf.hf_key if layer is None else leaf.hf_key.format(layer=layer)
    dest = out if layer is None else out[i]
    if real_rows and real_rows[0] < dest.shape[0]:
      dest = dest[:real_rows[0]]
    source.read_into(key, tuple(theirs), dest)
  return np.swapaxes(out, -1, -2) if leaf.transpose else out


def load_hf(path: str, *, mesh: Mesh | None = None, dtype=None,
            rules=shd.DEFAULT_RULES) -> tuple[LlamaConfig, Any]:
  """Loads a HF LLaMA directory (local or `gs://...`) into params sharded on `mesh` (one device
  when None).

  dtype: param dtype (default: the config's param_dtype, float32). The vocabulary is padded to a
  multiple of 128 x the mesh axes that shard it. Returns (cfg, params) with plain jax arrays.
  """
  start = time.perf_counter()
  mesh = mesh or shd.single_device_mesh()
  rules = shd.normalize_rules(rules)
  overrides = {"vocab_multiple": mesh_vocab_multiple(mesh, rules)}
  if dtype is not None:
    overrides["param_dtype"] = jnp.dtype(dtype).name
  cfg = load_hf_config(path, **overrides)
  source = tensor_files.open_weights(path)
  boxed = abstract_params(cfg)
  check_keys(source, cfg, boxed, path)
  shardings = shd.param_shardings(boxed, mesh, rules)
  target = jnp.dtype(cfg.param_dtype)

  params: dict = {}
  for leaf in leaves(cfg):
    shape = get(boxed, leaf.path).value.shape
    array = jax.make_array_from_callback(
        shape, get(shardings, leaf.path),
        lambda index, leaf=leaf, shape=shape: _read_shard(source, leaf, cfg, shape, index, target))
    node = params
    for name in leaf.path[:-1]:
      node = node.setdefault(name, {})
    node[leaf.path[-1]] = array
  logging.info("loaded %s (%d tensors) in %.1f s", path, len(source.keys()),
               time.perf_counter() - start)
  return cfg, params

