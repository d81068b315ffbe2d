"""Hugging Face LLaMA checkpoints <-> our param tree.

Import streams: every param is built with `jax.make_array_from_callback`, so each device's shard
is read with ranged reads of just its bytes, from a local file or a bucket (`gs://...`), never a
whole file (torch's `[out, in]` weights transposed to our `[in, out]`, per-layer tensors stacked
on the layer axis, the vocabulary padded with zero rows). Each shard is read into a 64-byte
aligned host buffer in our layout, which the CPU backend adopts as the array's buffer (on an
accelerator it is copied to the device and dropped). Reads run as jobs of at most 4 MB on a few
threads (file reads, ranged GETs and the transposes overlap), so beyond the params it returns a
host holds a few read blocks (plus, on an accelerator, one shard being copied).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import mmap
import queue
import time
from typing import Any, Callable, Iterable, Iterator

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
_MAPPED_BYTES = 1 << 20  # buffers from this size on are anonymous mappings of their own
_BLOCK_BYTES = 4 << 20  # the most one read job reads (and, transposed, holds) at a time
_READ_WORKERS = 4  # read jobs in flight at once (reads and transposes release the GIL)


def aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
  """np.zeros(shape, dtype) whose buffer starts on a 64-byte boundary, so that device_put on the
  CPU backend uses it as the array's buffer (no copy). A large one is a private anonymous
  mapping of its own (unmapped with the last array on it), populated when mapped (one call
  instead of a trap per 4 KB page on first write). First-touch rates of 820 MB on
  bench/hf_import.py's VM (2 cores): populated private ~2.0 GB/s, private write faults ~1.7,
  shared (shmem, where huge-page advice has no effect) ~1.1, private huge pages 0.3-10 (by
  whether the host still backed the memory); the import ran ~1.15x faster populated.
  """
  nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
  if nbytes >= _MAPPED_BYTES and hasattr(mmap, "MAP_PRIVATE"):
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    memory = mmap.mmap(-1, nbytes, flags=flags)  # zeroed, page-aligned
    return np.frombuffer(memory, np.uint8).view(dtype).reshape(shape)
  raw = np.zeros(nbytes + _ALIGN, np.uint8)
  start = -raw.ctypes.data % _ALIGN
  return raw[start:start + nbytes].view(dtype).reshape(shape)


class _Blocks:
  """Reusable read buffers of _BLOCK_BYTES, one per job in flight: a block read into memory the
  process already touched runs at memory speed; into fresh pages it costs a page fault per 4 KB
  (several times slower on a VM)."""

  def __init__(self):
    self._free: queue.SimpleQueue = queue.SimpleQueue()

  @contextlib.contextmanager
  def get(self, shape: tuple[int, ...], dtype) -> Iterator[np.ndarray]:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes > _BLOCK_BYTES:  # one row longer than a block: a buffer of its own
      yield np.empty(shape, dtype)
      return
    try:
      buffer = self._free.get_nowait()
    except queue.Empty:
      buffer = np.empty(_BLOCK_BYTES, np.uint8)
    try:
      yield buffer[:nbytes].view(dtype).reshape(shape)
    finally:
      self._free.put(buffer)


@dataclasses.dataclass
class _Reader:
  """What the read jobs of one import share: the weights, a pool of threads (jobs in flight at
  once, so reads overlap transposes and, on an object store, ranged GETs overlap each other) and
  their read buffers. Beyond the params a host holds at most _READ_WORKERS blocks."""
  source: tensor_files.WeightSource
  pool: concurrent.futures.ThreadPoolExecutor
  blocks: _Blocks = dataclasses.field(default_factory=_Blocks)

  def run(self, jobs: list[Callable[[], Any]]) -> None:
    """Runs the jobs (each writes its own part of a destination) and waits for them all; the
    first failure is raised and the jobs not yet started are cancelled."""
    futures = [self.pool.submit(job) for job in jobs]
    try:
      for future in futures:
        future.result()
    finally:
      for future in futures:
        future.cancel()
      concurrent.futures.wait(futures)

  def read_transposed(self, key: str, rows: tuple[int, int], cols: tuple[int, int],
                      dest: np.ndarray) -> None:
    """dest[:] = tensor[rows, cols].T for an HF `[out, in]` weight, through one block buffer."""
    with self.blocks.get((rows[1] - rows[0], cols[1] - cols[0]), dest.dtype) as block:
      self.source.read_into(key, (slice(*rows), slice(*cols)), block)  # [rows, cols]
      _transpose_into(block, dest)


def _read_shard(reader: _Reader, leaf: Leaf, cfg: LlamaConfig, shape, index,
                dtype) -> np.ndarray:
  """Our-layout slice `index` (a tuple of slices over `shape`) of one param, from HF tensors.

  The slice is allocated once, in our layout, zeroed (vocabulary padding rows stay zero) and
  64-byte aligned (on CPU it becomes the param's buffer without a copy). It is filled by read
  jobs of at most _BLOCK_BYTES each, run by `reader`'s threads: a run of whole leading-axis rows
  is read straight into it, cast on the way; an HF `[out, in]` weight is read in blocks of whole
  rows, each transposed into place.
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
  # A job's rows: HF rows (our columns) when transposed, else our (= HF) leading axis.
  (lo, hi), inner = (real[1], real[:1]) if leaf.transpose else (real[0], real[1:])
  keys = [leaf.hf_key if layer is None else leaf.hf_key.format(layer=layer) for layer in layers]
  # A job's bytes per row: what it writes, or the whole file rows it reads (a column slice is
  # read through whole rows), whichever is more.
  first = leaf.hf_key.format(layer=0)
  file_row = int(np.prod(reader.source.shape(first)[1:], dtype=np.int64))
  row_bytes = max(int(np.prod([b - a for a, b in inner], dtype=np.int64)) * out.itemsize,
                  file_row * reader.source.dtype(first).itemsize)
  step = max(1, _BLOCK_BYTES // max(row_bytes, 1))
  jobs = []
  for i, key in enumerate(keys):
    dest = out[i] if leaf.stacked else out
    dest = dest[tuple(slice(0, n) for n in sizes)]  # the real part (padding stays zero)
    for r0 in range(lo, hi, step):
      r1 = min(r0 + step, hi)
      if leaf.transpose:  # ours [in, out]; HF rows are our columns
        jobs.append(functools.partial(reader.read_transposed, key, (r0, r1), inner[0],
                                      dest[:, r0 - lo:r1 - lo]))
      else:  # leading-axis rows of a contiguous destination: read straight into it
        where = (slice(r0, r1),) + tuple(slice(a, b) for a, b in inner)
        jobs.append(functools.partial(reader.source.read_into, key, where,
                                      dest[r0 - lo:r1 - lo]))
  reader.run(jobs)
  return out


def _transpose_into(block: np.ndarray, dest: np.ndarray, tile=(16, 2048)) -> None:
  """dest[:] = block.T in tiles of 16 block rows by at most 2048 columns: a tile writes whole
  64-byte lines of fp32 dest rows while reading 16 source lines at a time. Square 256 x 128 tiles
  walk 256 source rows 4 KB apart, which evict each other from L1: 1.4x slower summed over fp32
  and bf16 LLaMA-7B/bench block shapes, 1.5-2.5x on the bench's fp32 ones."""
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
  with concurrent.futures.ThreadPoolExecutor(_READ_WORKERS, "load_hf") as pool:
    reader = _Reader(source, pool)
    for leaf in leaves(cfg):
      shape = get(boxed, leaf.path).value.shape
      array = jax.make_array_from_callback(
          shape, get(shardings, leaf.path),
          lambda index, leaf=leaf, shape=shape: _read_shard(reader, leaf, cfg, shape, index,
                                                            target))
      node = params
      for name in leaf.path[:-1]:
        node = node.setdefault(name, {})
      node[leaf.path[-1]] = array
  logging.info("loaded %s (%d tensors) in %.1f s", path, len(source.keys()),
               time.perf_counter() - start)
  return cfg, params

