"""Hugging Face LLaMA checkpoints <-> our param tree.

Import streams: every param is built with `jax.make_array_from_callback`, so each device's shard
is read with ranged reads of just its bytes, from a local file or a bucket (`gs://...`), never a
whole file (torch's `[out, in]` weights transposed to our `[in, out]`, per-layer tensors stacked
on the layer axis, the vocabulary padded with zero rows). Each shard is read into a 64-byte
aligned host buffer in our layout, which the CPU backend adopts as the array's buffer (on an
accelerator it is copied to the device and dropped), so beyond the params it returns a host holds
one read block at a time (plus, on an accelerator, one shard being copied).
"""
from __future__ import annotations

import dataclasses
import logging
import mmap
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


_ALIGN = 64  # jax on CPU adopts a host buffer aligned like this without copying it
_HUGE_BYTES = 1 << 20  # buffers from this size on are mapped with huge pages
_TRANSPOSE_BLOCK_BYTES = 4 << 20  # rows of a transposed tensor read (and held) at a time


def aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
  """np.zeros(shape, dtype) whose buffer starts on a 64-byte boundary, so that device_put on the
  CPU backend uses it as the array's buffer (no copy). A large one is an anonymous mapping
  advised to use huge pages: first writes into fresh memory then fault 2 MB at a time, not 4 KB
  (with 4 KB pages the import was ~1.7x slower)."""
  nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
  if nbytes >= _HUGE_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
    memory = mmap.mmap(-1, nbytes)  # zeroed, page-aligned; unmapped with the last array on it
    memory.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(memory, np.uint8).view(dtype).reshape(shape)
  raw = np.zeros(nbytes + _ALIGN, np.uint8)
  start = -raw.ctypes.data % _ALIGN
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def _read_shard(source, leaf: Leaf, cfg: LlamaConfig, shape, index, dtype) -> np.ndarray:
  """Our-layout slice `index` (a tuple of slices over `shape`) of one param, from HF tensors.

  The slice is allocated once, in our layout, zeroed (vocabulary padding rows stay zero) and
  64-byte aligned (on CPU it becomes the param's buffer without a copy). Each HF tensor's byte
  ranges are read straight into it, cast on the way; an HF `[out, in]` weight is read in blocks of
  whole rows (at most _TRANSPOSE_BLOCK_BYTES), each transposed into place. Beyond the result the
  process holds one such block, or one read block (tensor_files.CHUNK_BYTES) of a column slice.
  """
  bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
  layers: list = [None]
  if leaf.stacked:
    layers, bounds = list(range(*bounds[0])), bounds[1:]
  real = list(bounds)  # our axes, the vocabulary cut to the real rows
  if leaf.vocab_axis is not None:
    lo, hi = bounds[leaf.vocab_axis]
    real[leaf.vocab_axis] = (min(lo, cfg.vocab_size), min(hi, cfg.vocab_size))
  out = aligned_zeros(tuple([len(layers)] if leaf.stacked else []) +
                      tuple(hi - lo for lo, hi in bounds), dtype)  # [layers?, *our slice]
  sizes = [hi - lo for lo, hi in real]
  for i, layer in enumerate(layers):
    key = leaf.hf_key if layer is None else leaf.hf_key.format(layer=layer)
    dest = out if layer is None else out[i]
    dest = dest[tuple(slice(0, n) for n in sizes)]  # the real part (padding stays zero)
    if not leaf.transpose:  # the vocabulary is the leading axis: dest stays contiguous
      source.read_into(key, tuple(slice(lo, hi) for lo, hi in real), dest)
      continue
    (in_lo, in_hi), (out_lo, out_hi) = real  # ours [in, out]; HF rows are our columns
    step = max(1, _TRANSPOSE_BLOCK_BYTES // max((in_hi - in_lo) * out.itemsize, 1))
    for r0 in range(out_lo, out_hi, step):
      r1 = min(r0 + step, out_hi)
      block = np.empty((r1 - r0, in_hi - in_lo), dtype)  # HF [rows, in] of this block
      source.read_into(key, (slice(r0, r1), slice(in_lo, in_hi)), block)
      _transpose_into(block, dest[:, r0 - out_lo:r1 - out_lo])
  return out


def _transpose_into(block: np.ndarray, dest: np.ndarray, tile=(256, 128)) -> None:
  """dest[:] = block.T in cache-sized tiles (a plain strided copy of a large block is ~2x
  slower: every element of a column is on another cache line)."""
  rows, cols = block.shape
  for r in range(0, rows, tile[0]):
    for c in range(0, cols, tile[1]):
      dest[c:c + tile[1], r:r + tile[0]] = block[r:r + tile[0], c:c + tile[1]].T


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

