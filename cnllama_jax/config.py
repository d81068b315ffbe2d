"""LLaMA model shapes: presets, vocabulary padding, and conversion to/from HF `config.json`.

`LlamaConfig` is a frozen dataclass (hashable, so it can be a static argument of `jax.jit`).
Run configs in `configs/` hold a `model` ConfigDict whose fields are these; build one with
`LlamaConfig.from_dict(cfg.model)`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from cnllama_jax import paths

# Vocabulary sizes of the paper: LLaMA, Chinese-LLaMA, Chinese-Alpaca (with [PAD]).
LLAMA_VOCAB = 32000
CHINESE_LLAMA_VOCAB = 49953
CHINESE_ALPACA_VOCAB = 49954
LLAMA3_VOCAB = 128256  # 128,000 byte-level BPE tokens + 256 special tokens

CHINESE_LLAMA2_VOCAB = 55296  # Chinese-LLaMA-2 / Chinese-Alpaca-2

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# Attention implementations (cnllama_jax.attention); "auto" picks by the target mesh's platform.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "blockwise", "splash", "cudnn")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary-embedding scaling, as `transformers`' `rope_parameters` (formulas in rope.py).

  rope_type: default (none) | linear (position interpolation: frequencies / factor) | dynamic (NTK:
  the base grows with the batch's longest position beyond max_position_embeddings) | yarn (per-band
  blend of interpolated and original frequencies, cos/sin scaled by attention_factor) | llama3
  (low frequencies / factor, high kept, a smooth band between).
  """
  rope_type: str = "default"
  factor: float = 1.0
  original_max_position_embeddings: int | None = None  # yarn, llama3; None: max_position_embeddings
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3
  beta_fast: float = 32.0  # yarn
  beta_slow: float = 1.0  # yarn
  attention_factor: float | None = None  # yarn; None: from factor (and mscale, mscale_all_dim)
  mscale: float | None = None  # yarn
  mscale_all_dim: float | None = None  # yarn
  truncate: bool = True  # yarn: round the correction range to whole dimensions

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"model.rope_scaling.rope_type={self.rope_type!r}; expected one of "
                       f"{ROPE_TYPES}")
    if self.rope_type != "default" and not self.factor > 0:
      raise ValueError(f"model.rope_scaling.factor={self.factor}; expected a positive number")

  @classmethod
  def from_fields(cls, fields) -> "RopeScaling":
    """From a dict / ConfigDict of this class's fields (None or a RopeScaling pass through)."""
    if fields is None:
      return cls()
    if isinstance(fields, cls):
      return fields
    fields = dict(fields.items())
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"unknown model.rope_scaling keys {unknown}; expected a subset of "
                       f"{sorted(known)}")
    return cls(**fields)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a LLaMA-family decoder.

  vocab_size is the tokenizer's (real) vocabulary; the embedding and LM head are stored with
  `padded_vocab_size` rows, a multiple of `vocab_multiple`, so that every mesh axis that shards the
  vocabulary divides it. Padded rows never enter the softmax and are never sampled.
  """
  vocab_size: int = LLAMA_VOCAB
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None  # None: same as num_attention_heads (MHA)
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  vocab_multiple: int = 128
  dtype: str = "float32"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # storage dtype of (frozen) params
  remat_policy: str = "none"  # one of REMAT_POLICIES
  attention: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS (cnllama_jax.attention)
  rope_scaling: RopeScaling = RopeScaling()
  lm_head_chunk: int = 0  # training: positions per chunk of LM head + loss under remat (0: one)
  bos_token_id: int = 1
  eos_token_id: int = 2
  pad_token_id: int | None = None
  # more ids that end generation, e.g. LLaMA-3-Instruct's <|eot_id|>: the rest of a list
  # `eos_token_id` in config.json or generation_config.json (stop_ids: all of them)
  stop_token_ids: tuple[int, ...] = ()

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """The ids that end generation: eos_token_id, then stop_token_ids, without repeats."""
    return tuple(dict.fromkeys((self.eos_token_id, *self.stop_token_ids)))

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                         f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_key_value_heads}")
    object.__setattr__(self, "rope_scaling", RopeScaling.from_fields(self.rope_scaling))
    object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids or ()))
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"model.attention={self.attention!r}; expected one of "
                       f"{ATTENTION_IMPLEMENTATIONS}")
    if self.lm_head_chunk < 0:
      raise ValueError(f"model.lm_head_chunk={self.lm_head_chunk}; expected 0 (no chunking) or "
                       "a positive number of positions")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
    if self.vocab_size < 1 or self.vocab_multiple < 1:
      raise ValueError(f"vocab_size={self.vocab_size} and vocab_multiple={self.vocab_multiple} "
                       "must be positive")

  @property
  def padded_vocab_size(self) -> int:
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, fields) -> "LlamaConfig":
    """From a dict or ConfigDict; unknown keys are an error naming them."""
    fields = dict(fields)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; expected a subset of {sorted(known)}")
    return cls(**fields)


def _preset(hidden, heads, layers, ffn, eps=1e-6, kv=None, max_pos=2048, **extra) -> dict[str, Any]:
  return dict(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
              intermediate_size=ffn, rms_norm_eps=eps, num_key_value_heads=kv,
              max_position_embeddings=max_pos, **extra)


# Chinese-LLaMA-2 (Cui et al.'s successor): LLaMA-2 shapes, 55,296 tokens, 4K context; the 16K
# models extend it by linear position interpolation (factor 4 over the 4K positions).
_CN2 = dict(eps=1e-5, max_pos=4096, vocab_size=CHINESE_LLAMA2_VOCAB)
_LINEAR_16K = RopeScaling("linear", factor=4.0)


PRESETS: dict[str, dict[str, Any]] = {
    # LLaMA (Touvron et al. 2023a).
    "7b": _preset(4096, 32, 32, 11008),
    "13b": _preset(5120, 40, 40, 13824),
    "33b": _preset(6656, 52, 60, 17920),
    "65b": _preset(8192, 64, 80, 22016, eps=1e-5),
    # LLaMA-2 (Touvron et al. 2023b).
    "llama2-7b": _preset(4096, 32, 32, 11008, eps=1e-5, max_pos=4096),
    "llama2-13b": _preset(5120, 40, 40, 13824, eps=1e-5, max_pos=4096),
    "llama2-70b": _preset(8192, 64, 80, 28672, eps=1e-5, kv=8, max_pos=4096),
    "chinese-llama2-7b": _preset(4096, 32, 32, 11008, **_CN2),
    "chinese-llama2-13b": _preset(5120, 40, 40, 13824, **_CN2),
    "chinese-llama2-7b-16k": _preset(4096, 32, 32, 11008, **_CN2, rope_scaling=_LINEAR_16K),
    "chinese-llama2-13b-16k": _preset(5120, 40, 40, 13824, **_CN2, rope_scaling=_LINEAR_16K),
    # LLaMA-3 (Meta 2024): byte-level BPE vocabulary, 8 KV heads, rope theta 500,000, untied head.
    "llama3-8b": dict(_preset(4096, 32, 32, 14336, eps=1e-5, kv=8, max_pos=8192),
                      rope_theta=500000.0, vocab_size=LLAMA3_VOCAB, bos_token_id=128000,
                      eos_token_id=128001),
    "llama3-70b": dict(_preset(8192, 64, 80, 28672, eps=1e-5, kv=8, max_pos=8192),
                       rope_theta=500000.0, vocab_size=LLAMA3_VOCAB, bos_token_id=128000,
                       eos_token_id=128001),
    # Test shapes: a few layers, small widths; `tiny-gqa` exercises grouped-query attention;
    # `tiny-llama3` is LLaMA-3-shaped (GQA, theta 500,000) with a tied head as Llama-3.2-1B's.
    "tiny": _preset(64, 4, 2, 176, max_pos=512),
    "tiny-gqa": _preset(64, 4, 2, 176, kv=2, max_pos=512),
    "tiny-llama3": dict(_preset(64, 4, 2, 176, eps=1e-5, kv=2, max_pos=512), rope_theta=500000.0,
                        tie_word_embeddings=True),
    "mid": _preset(512, 8, 4, 1376, max_pos=1024),
}


def preset(name: str, vocab_size: int | None = None, **overrides) -> LlamaConfig:
  """A named shape (`7b`, `13b`, `33b`, `65b`, `llama2-7b`, ..., `llama3-8b`, `tiny`) with a
  vocabulary size (default: the preset's own, else LLaMA's 32,000)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
  fields = {**PRESETS[name], **overrides}
  fields["vocab_size"] = vocab_size or fields.get("vocab_size", LLAMA_VOCAB)
  return LlamaConfig(**fields)


# --- Hugging Face config.json -----------------------------------------------------------------

_HF_ARCHITECTURES = ("LlamaForCausalLM",)
_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
              "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
              "pad_token_id")


def from_hf_dict(hf: dict[str, Any], source: str = "config.json", **overrides) -> LlamaConfig:
  """Builds a LlamaConfig from a parsed HF `config.json`; rejects non-LLaMA models by name."""
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or []
  if model_type != "llama" or (archs and not set(archs) & set(_HF_ARCHITECTURES)):
    raise ValueError(f"{source}: model_type={model_type!r}, architectures={archs}; expected a "
                     f"LLaMA model (model_type 'llama', architectures {list(_HF_ARCHITECTURES)})")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; LLaMA uses 'silu'")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ValueError(f"{source}: {flag}=true is not supported (LLaMA has no biases)")
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}  # transformers 4 / 5
  fields = {k: hf[k] for k in _HF_FIELDS if hf.get(k) is not None}
  fields["rope_scaling"] = rope_scaling_from_hf(rope, source)
  theta = hf.get("rope_theta", rope.get("rope_theta"))
  if theta is not None:
    fields["rope_theta"] = float(theta)
  if isinstance(fields.get("bos_token_id"), list):
    fields["bos_token_id"] = fields["bos_token_id"][0] if fields["bos_token_id"] else 1
  eos = fields.get("eos_token_id")
  if isinstance(eos, list):  # LLaMA-3-Instruct: [<|end_of_text|>, <|eom_id|>, <|eot_id|>]
    if not eos or not all(isinstance(i, int) for i in eos):
      raise ValueError(f"{source}: eos_token_id={eos!r}; expected an id or a list of ids")
    fields["eos_token_id"], fields["stop_token_ids"] = eos[0], tuple(eos[1:])
  return LlamaConfig(**{**fields, **overrides})


def _id_list(value: Any) -> list[int]:
  return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def to_hf_dict(cfg: LlamaConfig, torch_dtype: str = "float32") -> dict[str, Any]:
  """The HF `config.json` for `cfg` (real vocabulary size, no padding); RoPE scaling both as
  transformers 4 (`rope_scaling`) and 5 (`rope_parameters`) read it."""
  rope = rope_scaling_to_hf(cfg.rope_scaling, cfg.max_position_embeddings)
  return {
      "architectures": list(_HF_ARCHITECTURES),
      "model_type": "llama",
      "hidden_act": "silu",
      "attention_bias": False,
      "mlp_bias": False,
      "initializer_range": 0.02,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": rope or None,  # transformers 4
      "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default", **rope},  # 5
      "torch_dtype": torch_dtype,
      "use_cache": True,
      **{k: getattr(cfg, k) for k in _HF_FIELDS},
      "eos_token_id": hf_eos_token_id(cfg),
  }


def hf_eos_token_id(cfg: LlamaConfig) -> int | list[int]:
  """config.json's / generation_config.json's eos_token_id: the id, or the list of stop ids."""
  return list(cfg.stop_ids) if cfg.stop_token_ids else cfg.eos_token_id


# Keys of HF rope dicts per type (transformers' names = RopeScaling's fields).
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
             "attention_factor", "mscale", "mscale_all_dim", "truncate"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
               "high_freq_factor"),
}
_ROPE_IGNORED = ("type", "rope_type", "rope_theta", "finetuned")


def rope_scaling_from_hf(rope: dict[str, Any], source: str = "config.json") -> RopeScaling:
  """RopeScaling from HF `rope_scaling` (`type` or `rope_type`) or `rope_parameters`."""
  kind = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
  if kind not in _ROPE_KEYS:
    raise ValueError(f"{source}: rope type {kind!r} is not supported; expected one of "
                     f"{sorted(_ROPE_KEYS)}")
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"{source}: partial_rotary_factor={rope['partial_rotary_factor']} is not "
                     "supported; expected rotary embeddings on the whole head (1.0)")
  unknown = sorted(set(rope) - set(_ROPE_KEYS[kind]) - set(_ROPE_IGNORED) -
                   {"partial_rotary_factor"})
  if unknown:
    raise ValueError(f"{source}: rope keys {unknown} are not used by rope type {kind!r}; "
                     f"expected a subset of {list(_ROPE_KEYS[kind])}")
  fields = {k: rope[k] for k in _ROPE_KEYS[kind] if rope.get(k) is not None}
  if "factor" in _ROPE_KEYS[kind] and "factor" not in fields:
    raise ValueError(f"{source}: rope type {kind!r} needs a 'factor'")
  return RopeScaling(rope_type=kind, **fields)


def rope_scaling_to_hf(scaling: RopeScaling, max_position_embeddings: int) -> dict[str, Any]:
  """The HF rope dict ({} for plain rotary embeddings), without rope_theta."""
  if scaling.rope_type == "default":
    return {}
  out = {"rope_type": scaling.rope_type, "type": scaling.rope_type}
  for key in _ROPE_KEYS[scaling.rope_type]:
    value = getattr(scaling, key)
    if key == "original_max_position_embeddings" and value is None:
      value = max_position_embeddings
    if value is not None and not (key == "truncate" and value):
      out[key] = value
  return out


def load_hf_config(path: str, **overrides) -> LlamaConfig:
  """Reads `<path>/config.json` (or a config.json path; local or `gs://...`) with a clear error
  when missing."""
  path = os.fspath(path)
  file = path if path.endswith(".json") else paths.join(path, "config.json")
  if not paths.isfile(file):
    raise paths.missing(file, "no config.json; expected a Hugging Face LLaMA directory")
  hf = _read_json(file)
  generation = paths.join(str(paths.path(file).parent), "generation_config.json")
  if paths.isfile(generation):  # its eos ids end generation too (LLaMA-3-Instruct's <|eot_id|>)
    eos = _id_list(hf.get("eos_token_id"))
    extra = [i for i in _id_list(_read_json(generation).get("eos_token_id")) if i not in eos]
    if extra:
      hf = dict(hf, eos_token_id=eos + extra)
  return from_hf_dict(hf, source=file, **overrides)


def _read_json(file: str) -> dict[str, Any]:
  try:
    return json.loads(paths.read_text(file))
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: not valid JSON ({e})") from None
