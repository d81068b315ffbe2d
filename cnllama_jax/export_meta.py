"""Meta checkpoints: consolidated.0K.pth model-parallel files + params.json, written one shard of
one tensor at a time (keys: a renaming of the HF table `hf.leaves(cfg)`), and read back.

Meta's model-parallel files (as llama.cpp's converter concatenates them): column-parallel wq, wk,
wv, w1, w3 and `output` split on dim 0, row-parallel wo, w2 and `tok_embeddings` (its embedding
dim) on dim 1, norms replicated. A vocabulary that does not divide (49,953 in 2) splits `output`
unevenly, the last file taking the remainder (24,976 + 24,977), as the paper's merge script does;
llama.cpp reads that, Meta's own loader needs an even split.
"""
from __future__ import annotations

import io
import json
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from cnllama_jax import hf, paths
from cnllama_jax.config import LlamaConfig, RopeScaling, rope_scaling_from_hf, rope_scaling_to_hf
from cnllama_jax.export import (DTYPES, hf_plan, lora_scale, open_out, read_slice, staged_dir,
                                write_json, write_tokenizer)
from cnllama_jax.lora import LoraConfig

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
      with open_out(paths.join(tmp, f"consolidated.{shard:02d}.pth")) as f:
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
