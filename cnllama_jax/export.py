"""Export of merged weights: Hugging Face safetensors (Meta `.pth`: export_meta.py; PEFT adapters:
adapters.py), and the streaming pieces both formats share.

Writers stream: one tensor is gathered to the host at a time, LoRA deltas are folded in per layer,
and files go to a temporary directory beside `out_dir`, renamed onto it at the end. Keys come from
the HF table `hf.leaves(cfg)`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from cnllama_jax import hf, paths, tokenizer as tok_lib, tokenizer_hf
from cnllama_jax.config import LlamaConfig, hf_eos_token_id, to_hf_dict
from cnllama_jax.lora import LoraConfig, lora_for, merged_kernel

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
              np.dtype(np.float16): "F16"}
# The paper's sampling defaults (Cui et al. 2023, decoding hyper-parameters).
GENERATION_DEFAULTS = dict(do_sample=True, temperature=0.2, top_k=40, top_p=0.9,
                           repetition_penalty=1.1)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")



# --- files ---------------------------------------------------------------------------------------

def _writer() -> bool:  # only process 0 writes; the others gather with it into /dev/null
  return jax.process_index() == 0


def open_out(path: str):
  if not _writer():
    return open(os.devnull, "wb")
  return paths.path(path).open("wb")  # local or a streamed object upload


@contextlib.contextmanager
def staged_dir(out_dir: str, overwrite: bool):
  """A directory to write into that becomes `out_dir` only when the block succeeds (local: a temp
  sibling renamed onto it; a bucket: an `_INCOMPLETE` marker removed last; see paths.publish_dir)."""
  out_dir = paths.absolute(out_dir)
  with paths.publish_dir(out_dir, overwrite) as tmp:
    yield tmp
  if jax.process_count() > 1:  # the others return once the directory is in place
    multihost_utils.sync_global_devices(f"export {out_dir}")


def write_json(path: str, obj: Any) -> None:
  if _writer():
    paths.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_safetensors(path: str, specs: list[tuple[str, tuple, np.dtype]], fetch) -> None:
  """specs: (key, shape, dtype) in file order; fetch(key) -> numpy array, called one at a time."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for key, shape, dtype in specs:
    size = math.prod(shape) * dtype.itemsize
    header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                   "data_offsets": [offset, offset + size]}
    offset += size
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open_out(path) as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for key, shape, dtype in specs:
      array = np.ascontiguousarray(fetch(key)).astype(dtype, copy=False)
      if array.shape != tuple(shape):
        raise AssertionError(f"{key}: fetched shape {array.shape}, planned {shape}")
      f.write(array.reshape(-1).view(np.uint8).data)  # a file or a streamed object upload


def tokenizer_files(source: str) -> dict[str, str]:
  """{file name: path} of the tokenizer files in a directory, or of a lone `.model` file."""
  if paths.isfile(source) and source.endswith(".model"):
    return {"tokenizer.model": source}
  return {n: paths.join(source, n) for n in TOKENIZER_FILES
          if paths.isfile(paths.join(source, n))}


def write_tokenizer(source: str | None, out: str, vocab_size: int) -> None:
  """Puts the tokenizer of a `vocab_size`-token model beside it in `out`: `tokenizer.model` and
  the Hugging Face files, copied from `source` (a directory or a `.model` file; None: nothing),
  the HF files made from `tokenizer.model` when `source` has none. A tokenizer.model of another
  size than the model's vocabulary is an error: the export would not load with it."""
  if source is None:
    return
  found = tokenizer_files(source)
  if not found:
    raise FileNotFoundError(f"tokenizer {source}: no tokenizer files; expected a .model file or "
                            f"a directory with any of {list(TOKENIZER_FILES)}")
  made = {}
  if "tokenizer.model" in found:
    proto = tok_lib.parse_model_proto(paths.read_bytes(found["tokenizer.model"]),
                                      found["tokenizer.model"])
    if len(proto.pieces) != vocab_size:
      raise ValueError(f"tokenizer {found['tokenizer.model']} has {len(proto.pieces)} pieces but "
                       f"the exported model has {vocab_size} tokens; pass the tokenizer it was "
                       "trained with")
    if not {"tokenizer.json", "tokenizer_config.json"} & set(found):
      pad = "[PAD]" if any(p.piece == "[PAD]" for p in proto.pieces) else None
      made = tokenizer_hf.hf_files(proto, pad)
  if _writer():
    for name, src in found.items():
      paths.write_bytes(paths.join(out, name), paths.read_bytes(src))
    for name, data in made.items():
      paths.write_bytes(paths.join(out, name), data)


# --- reading params one slice at a time ----------------------------------------------------------

def to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def lora_scale(params: Any, lora: LoraConfig | None) -> float:
  """The scale to fold adapters in with (0 when there are none); see `lora.lora_for`."""
  return lora_for(params, lora).scale


def read_slice(cfg: LlamaConfig, params, leaf: hf.Leaf, layer: int | None, index: tuple,
               scale: float) -> np.ndarray:
  """params[leaf][layer][index] in our layout, vocabulary cropped to cfg.vocab_size, LoRA folded in.

  index: two slices over our per-layer [in, out] / [vocab, hidden] axes (one for a norm).
  """
  node = hf.get(params, leaf.path[:-1])
  if leaf.vocab_axis is not None:
    index, s = list(index), index[leaf.vocab_axis]
    index[leaf.vocab_axis] = slice(s.start or 0, min(s.stop or cfg.vocab_size, cfg.vocab_size))
  pre = () if layer is None else (layer,)
  x = node[leaf.path[-1]][pre + tuple(index)]
  if scale and leaf.path[-1] == "kernel" and "lora_a" in node:
    x = merged_kernel(x, node["lora_a"][pre + (index[0],)],  # [in, r]
                      node["lora_b"][pre + (slice(None), index[1])], np.float32(scale))  # [r, out]
  return to_host(x)


def hf_plan(cfg: LlamaConfig, params) -> list[tuple[str, hf.Leaf, int | None, tuple]]:
  """(HF key, leaf, layer, HF shape) in HF's module order: embedding, layer by layer, norm, head."""
  table = hf.leaves(cfg)
  entry = lambda leaf, layer: (leaf.hf_key.format(layer=layer), leaf, layer,  # noqa: E731
                               hf.hf_shape(leaf, hf.get(params, leaf.path).shape, cfg))
  single = [leaf for leaf in table if not leaf.stacked]  # embed_tokens, norm, lm_head
  return ([entry(single[0], None)]
          + [entry(leaf, layer) for layer in range(cfg.num_hidden_layers)
             for leaf in table if leaf.stacked]
          + [entry(leaf, None) for leaf in single[1:]])


# --- Hugging Face ------------------------------------------------------------------------------

def hf_config_dict(cfg: LlamaConfig, dtype: str) -> dict[str, Any]:
  """config.json readable by transformers 5 (`dtype`, `rope_parameters`) and 4 (`torch_dtype`,
  `rope_theta`, `rope_scaling`), with the real (unpadded) vocabulary size."""
  return {**to_hf_dict(cfg, dtype), "dtype": dtype}


def generation_config_dict(cfg: LlamaConfig) -> dict[str, Any]:
  ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": hf_eos_token_id(cfg),
         "pad_token_id": cfg.pad_token_id}
  return {**{k: v for k, v in ids.items() if v is not None}, **GENERATION_DEFAULTS}


def save_hf(cfg: LlamaConfig, params: Any, out_dir: str, *, dtype: str = "float32",
            max_shard_bytes: int = 5 * 10**9, tokenizer_dir: str | None = None,
            lora: LoraConfig | None = None, overwrite: bool = False) -> str:
  """Merged HF LLaMA directory: safetensors (sharded + index above max_shard_bytes), config.json,
  generation_config.json and the tokenizer (`write_tokenizer` of `tokenizer_dir`, a directory or a
  .model file). Padded vocabulary rows are
  dropped. LoRA leaves in `params` are folded in per layer when `lora` (their alpha) is given."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {list(DTYPES)}")
  scale, target = lora_scale(params, lora), DTYPES[dtype]
  plan = hf_plan(cfg, params)
  by_key = {key: (leaf, layer, len(shape)) for key, leaf, layer, shape in plan}
  shards, size = [[]], 0
  for key, _, _, shape in plan:
    nbytes = math.prod(shape) * target.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards, size = shards + [[]], 0
    shards[-1].append((key, shape, target))
    size += nbytes

  def fetch(key):
    leaf, layer, ndim = by_key[key]
    x = read_slice(cfg, params, leaf, layer, (slice(None),) * ndim, scale)
    return x.T if leaf.transpose else x

  with staged_dir(out_dir, overwrite) as tmp:
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, specs in zip(names, shards):
      write_safetensors(paths.join(tmp, name), specs, fetch)
    if len(shards) > 1:
      total = sum(math.prod(s) * target.itemsize for _, _, _, s in plan)
      write_json(paths.join(tmp, "model.safetensors.index.json"), {
          "metadata": {"total_size": total},
          "weight_map": {key: name for name, specs in zip(names, shards) for key, _, _ in specs}})
    write_json(paths.join(tmp, "config.json"), hf_config_dict(cfg, dtype))
    write_json(paths.join(tmp, "generation_config.json"), generation_config_dict(cfg))
    write_tokenizer(tokenizer_dir, tmp, cfg.vocab_size)
  return out_dir
