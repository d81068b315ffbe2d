"""Export of merged weights: Hugging Face safetensors and Meta `.pth` (PEFT adapters: adapters.py).

Writers stream: one tensor (for Meta, one shard of one tensor) is gathered to the host at a time,
LoRA deltas are folded in per layer, and files go to a temporary directory beside `out_dir`,
renamed onto it at the end. Keys come from the HF table `hf.leaves(cfg)`; Meta's are a renaming.

Meta's model-parallel files (as llama.cpp's converter concatenates them): column-parallel wq, wk,
wv, w1, w3 and `output` split on dim 0, row-parallel wo, w2 and `tok_embeddings` (its embedding
dim) on dim 1, norms replicated. A vocabulary that does not divide (49,953 in 2) splits `output`
unevenly, the last file taking the remainder (24,976 + 24,977), as the paper's merge script does;
llama.cpp reads that, Meta's own loader needs an even split.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from cnllama_jax import hf, paths, tokenizer as tok_lib, tokenizer_hf
from cnllama_jax.config import (LlamaConfig, RopeScaling, rope_scaling_from_hf,
                                 rope_scaling_to_hf, to_hf_dict)
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
# Meta's number of model-parallel files per hidden size (LLaMA 7B, 13B, 33B, 65B); others: 1.
META_SHARDS = {4096: 1, 5120: 2, 6656: 4, 8192: 8}
_META_RENAMES = (("model.embed_tokens", "tok_embeddings"), ("model.layers.", "layers."),
                 ("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm"),
                 ("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
                 ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
                 ("mlp.gate_proj", "feed_forward.w1"), ("mlp.down_proj", "feed_forward.w2"),
                 ("mlp.up_proj", "feed_forward.w3"), ("model.norm", "norm"), ("lm_head", "output"))
# Split axis (Meta's [out, in] layout) of each Meta tensor; absent: replicated in every file.
_META_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0,
               "wo": 1, "w2": 1}


# --- files ---------------------------------------------------------------------------------------

def _writer() -> bool:  # only process 0 writes; the others gather with it into /dev/null
  return jax.process_index() == 0


def _open_out(path: str):
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
  with _open_out(path) as f:
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
  ids = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
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


# --- Meta (consolidated.0K.pth + params.json) ----------------------------------------------------

def meta_key(hf_key: str) -> str:
  """`model.layers.3.self_attn.q_proj.weight` -> `layers.3.attention.wq.weight`, etc."""
  for old, new in _META_RENAMES:
    hf_key = hf_key.replace(old, new)
  return hf_key


def to_meta_rotary(w: np.ndarray, heads: int) -> np.ndarray:
  """HF rotate-half rows -> Meta's interleaved pairs: the inverse of transformers'
  convert_llama_weights_to_hf `permute`. w: [heads * head_dim, in]."""
  out, inp = w.shape
  return w.reshape(heads, 2, out // heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def from_meta_rotary(w: np.ndarray, heads: int) -> np.ndarray:
  """Meta's interleaved rows -> HF rotate-half (transformers' `permute`)."""
  out, inp = w.shape
  return w.reshape(heads, out // heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def meta_split_sizes(name: str, size: int, shards: int) -> list[int]:
  """Sizes of the `shards` parts of an axis: equal, except `output`'s vocabulary, whose last part
  takes the remainder (49,953 in 2: 24,976 + 24,977)."""
  if size % shards and not name.startswith("output"):
    raise ValueError(f"{name}: {size} does not split into {shards} model-parallel files; "
                     f"choose num_shards dividing it")
  return [size // shards] * (shards - 1) + [size // shards + size % shards]


def meta_ffn_args(dim: int, ffn: int) -> dict[str, Any]:
  """multiple_of (and ffn_dim_multiplier) for which Meta's FeedForward gives `ffn` hidden units:
  h = int(8 dim / 3); h = int(multiplier h); h = multiple_of * ceil(h / multiple_of)."""
  base = int(2 * 4 * dim / 3)
  for multiplier in (None, 1.3, 1.5, 2.0):  # LLaMA: 256, None; LLaMA-2 70B: 4096, 1.3
    h = base if multiplier is None else int(multiplier * base)
    for multiple_of in (256, 4096, 1024, 512, 128, 64, 32, 16, 8, 4, 2, 1):
      if multiple_of * -(-h // multiple_of) == ffn:
        return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
  if ffn >= base:
    return {"multiple_of": ffn, "ffn_dim_multiplier": None}
  return {"multiple_of": 1, "ffn_dim_multiplier": (ffn + 0.5) / base}


# Meta's LLaMA-3.1 reference code applies its "scaled rope" with these fixed values when
# params.json says `use_scaled_rope: true` (later releases add `rope_scaling_factor`).
_META_SCALED_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=8192)


def meta_params_json(cfg: LlamaConfig) -> dict[str, Any]:
  """params.json as Meta's and llama.cpp's readers expect (n_kv_heads / rope_theta only when they
  differ from LLaMA-1, whose ModelArgs lacks them).

  RoPE scaling, when there is any: `rope_scaling`, the HF rope dict (our reader, `meta_config`,
  reads it back exactly), and `max_seq_len` (the context it was scaled for); for llama3 scaling
  also Meta's own `use_scaled_rope: true` and `rope_scaling_factor`."""
  ffn = meta_ffn_args(cfg.hidden_size, cfg.intermediate_size)
  out = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers,
         "n_heads": cfg.num_attention_heads, "norm_eps": cfg.rms_norm_eps,
         "vocab_size": cfg.vocab_size, **{k: v for k, v in ffn.items() if v is not None}}
  if cfg.num_key_value_heads != cfg.num_attention_heads:
    out["n_kv_heads"] = cfg.num_key_value_heads
  if cfg.rope_theta != 10000.0:
    out["rope_theta"] = cfg.rope_theta
  rope = rope_scaling_to_hf(cfg.rope_scaling, cfg.max_position_embeddings)
  if rope:
    out["rope_scaling"] = {k: v for k, v in rope.items() if k != "type"}
    out["max_seq_len"] = cfg.max_position_embeddings
    if cfg.rope_scaling.rope_type == "llama3":
      out.update(use_scaled_rope=True, rope_scaling_factor=cfg.rope_scaling.factor)
  return out


def meta_config(meta: dict[str, Any], source: str, **fields) -> LlamaConfig:
  """The LlamaConfig of a Meta params.json (`fields`: what the weights say: vocabulary and
  feed-forward sizes, dtype, ...). RoPE scaling from our `rope_scaling` dict, else from Meta's
  `use_scaled_rope` (llama3 scaling, factor `rope_scaling_factor` or 8)."""
  if meta.get("rope_scaling"):
    scaling = rope_scaling_from_hf(meta["rope_scaling"], source)
  elif meta.get("use_scaled_rope"):
    scaling = RopeScaling(rope_type="llama3", **{
        **_META_SCALED_ROPE, "factor": float(meta.get("rope_scaling_factor") or 8.0)})
  else:
    scaling = RopeScaling()
  extra = {"max_position_embeddings": int(meta["max_seq_len"])} if "max_seq_len" in meta else {}
  return LlamaConfig(
      hidden_size=meta["dim"], num_hidden_layers=meta["n_layers"],
      num_attention_heads=meta["n_heads"], num_key_value_heads=meta.get("n_kv_heads"),
      rms_norm_eps=meta["norm_eps"], rope_theta=float(meta.get("rope_theta", 10000.0)),
      rope_scaling=scaling, **extra, **fields)


def save_meta(cfg: LlamaConfig, params: Any, out_dir: str, *, num_shards: int | None = None,
              dtype: str = "float16", lora: LoraConfig | None = None,
              tokenizer_dir: str | None = None, overwrite: bool = False) -> str:
  """Meta checkpoint: consolidated.0K.pth (model-parallel files, default by hidden size: 7B 1,
  13B 2, 33B 4, 65B 8) + params.json (+ tokenizer files). q/k rows are permuted back to Meta's
  interleaved rotary layout. Each file is built one shard of one tensor at a time."""
  import torch  # pylint: disable=import-outside-toplevel
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {list(DTYPES)}")
  if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
    raise ValueError(f"head_dim={cfg.head_dim} x {cfg.num_attention_heads} heads != hidden_size="
                     f"{cfg.hidden_size}: Meta's format cannot express it")
  shards = num_shards or META_SHARDS.get(cfg.hidden_size, 1)
  heads = {"wq": cfg.num_attention_heads, "wk": cfg.num_key_value_heads}
  if any(n % shards for n in heads.values()):
    raise ValueError(f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv heads do not "
                     f"split into {shards} model-parallel files; choose num_shards dividing both")
  scale, target = lora_scale(params, lora), DTYPES[dtype]
  plan = hf_plan(cfg, params)
  if cfg.tie_word_embeddings:  # Meta always has `output`: our embedding, not transposed
    plan.append(("lm_head.weight", hf.Leaf(("embed_tokens",), "lm_head.weight", vocab_axis=0),
                 None, (cfg.vocab_size, cfg.hidden_size)))
  with staged_dir(out_dir, overwrite) as tmp:
    for shard in range(shards):
      state = {}
      for key, leaf, layer, shape in plan:  # shape: Meta's = HF's [out, in]
        name = meta_key(key)
        kind = name.split(".")[-2]
        index = [slice(None)] * len(shape)
        if kind in _META_SPLIT:
          axis = _META_SPLIT[kind]
          sizes = meta_split_sizes(name, shape[axis], shards)
          index[axis] = slice(sum(sizes[:shard]), sum(sizes[:shard + 1]))
        x = read_slice(cfg, params, leaf, layer, tuple(index[::-1] if leaf.transpose else index),
                       scale)
        x = x.T if leaf.transpose else x
        if kind in heads:
          x = to_meta_rotary(x, heads[kind] // shards)
        x = np.array(x, dtype=target, order="C")  # a writable copy, as torch wants
        state[name] = (torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
                       if target == ml_dtypes.bfloat16 else torch.from_numpy(x))
      with _open_out(paths.join(tmp, f"consolidated.{shard:02d}.pth")) as f:
        torch.save(state, f)
    write_json(paths.join(tmp, "params.json"), meta_params_json(cfg))
    write_tokenizer(tokenizer_dir, tmp, cfg.vocab_size)  # as the paper's merge script
  return out_dir


def load_meta(path: str, *, dtype: str = "float32", vocab_multiple: int = 128
              ) -> tuple[LlamaConfig, Any]:
  """Reads a Meta checkpoint directory (local or gs://) into (cfg, params) on the default device
  (the whole model in host memory: for tests and inspection, not for 65B)."""
  import torch  # pylint: disable=import-outside-toplevel
  names = paths.listdir(path) if paths.isdir(path) else []
  files = [paths.join(path, n) for n in names if n.startswith("consolidated.") and
           n.endswith(".pth")]
  if not files or "params.json" not in names:
    raise FileNotFoundError(f"{path}: not a Meta checkpoint (params.json + consolidated.*.pth)")
  paths.check_complete(path)
  meta = json.loads(paths.read_text(paths.join(path, "params.json")))

  def load(file):  # local files are memory-mapped; an object is read whole
    if paths.is_local(file):
      return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    return torch.load(io.BytesIO(paths.read_bytes(file)), map_location="cpu", weights_only=True)

  states = [load(f) for f in files]

  def full(name):  # the whole tensor, its model-parallel parts concatenated
    parts = [s[name] for s in states]
    parts = [p.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if p.dtype == torch.bfloat16
             else p.numpy() for p in parts]
    axis = _META_SPLIT.get(name.split(".")[-2])
    return parts[0] if axis is None else np.concatenate(parts, axis)

  cfg = meta_config(meta, paths.join(path, "params.json"),
                    vocab_size=full("tok_embeddings.weight").shape[0],
                    intermediate_size=full("layers.0.feed_forward.w1.weight").shape[0],
                    vocab_multiple=vocab_multiple, param_dtype=dtype)
  heads = {"wq": cfg.num_attention_heads, "wk": cfg.num_key_value_heads}
  params: dict = {}
  for leaf in hf.leaves(cfg):
    arrays = []
    for layer in range(cfg.num_hidden_layers) if leaf.stacked else [None]:
      name = meta_key(leaf.hf_key.format(layer=layer))
      x = full(name)
      if name.split(".")[-2] in heads:
        x = from_meta_rotary(x, heads[name.split(".")[-2]])
      x = x.T if leaf.transpose else x
      if leaf.vocab_axis is not None:
        pad = [(0, 0), (0, 0)]
        pad[leaf.vocab_axis] = (0, cfg.padded_vocab_size - cfg.vocab_size)
        x = np.pad(x, pad)
      arrays.append(x.astype(DTYPES[dtype]))
    node = params
    for key in leaf.path[:-1]:
      node = node.setdefault(key, {})
    node[leaf.path[-1]] = jnp.asarray(np.stack(arrays) if leaf.stacked else arrays[0])
  return cfg, params
