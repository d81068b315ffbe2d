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

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


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
  bos_token_id: int = 1
  eos_token_id: int = 2
  pad_token_id: int | None = None

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


def num_params(cfg: LlamaConfig, padded: bool = False) -> int:
  """Parameter count of the base model (no LoRA)."""
  vocab = cfg.padded_vocab_size if padded else cfg.vocab_size
  d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  attn = d * h * hd * 2 + d * kv * hd * 2
  mlp = 3 * d * cfg.intermediate_size
  per_layer = attn + mlp + 2 * d
  head = 0 if cfg.tie_word_embeddings else vocab * d
  return vocab * d + cfg.num_hidden_layers * per_layer + d + head


def _preset(hidden, heads, layers, ffn, eps=1e-6, kv=None, max_pos=2048) -> dict[str, Any]:
  return dict(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
              intermediate_size=ffn, rms_norm_eps=eps, num_key_value_heads=kv,
              max_position_embeddings=max_pos)


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
    # Test shapes: a few layers, small widths; `tiny-gqa` exercises grouped-query attention.
    "tiny": _preset(64, 4, 2, 176, max_pos=512),
    "tiny-gqa": _preset(64, 4, 2, 176, kv=2, max_pos=512),
    "mid": _preset(512, 8, 4, 1376, max_pos=1024),
}


def preset(name: str, vocab_size: int = LLAMA_VOCAB, **overrides) -> LlamaConfig:
  """A named shape (`7b`, `13b`, `33b`, `65b`, `llama2-7b`, ..., `tiny`) with a vocabulary size."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
  return LlamaConfig(vocab_size=vocab_size, **{**PRESETS[name], **overrides})


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
  rope_scaling = hf.get("rope_scaling")
  rope_params = hf.get("rope_parameters") or {}
  if rope_scaling or rope_params.get("rope_type", "default") != "default":
    raise ValueError(f"{source}: rope scaling {rope_scaling or rope_params} is not supported; "
                     "expected plain rotary embeddings")
  fields = {k: hf[k] for k in _HF_FIELDS if hf.get(k) is not None}
  theta = hf.get("rope_theta", rope_params.get("rope_theta"))
  if theta is not None:
    fields["rope_theta"] = float(theta)
  for key in ("bos_token_id", "eos_token_id"):
    if isinstance(fields.get(key), list):
      fields[key] = fields[key][0]
  return LlamaConfig(**{**fields, **overrides})


def to_hf_dict(cfg: LlamaConfig, torch_dtype: str = "float32") -> dict[str, Any]:
  """The HF `config.json` for `cfg` (real vocabulary size, no padding)."""
  return {
      "architectures": list(_HF_ARCHITECTURES),
      "model_type": "llama",
      "hidden_act": "silu",
      "attention_bias": False,
      "mlp_bias": False,
      "initializer_range": 0.02,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None,
      "torch_dtype": torch_dtype,
      "use_cache": True,
      **{k: getattr(cfg, k) for k in _HF_FIELDS},
  }


def load_hf_config(path: str, **overrides) -> LlamaConfig:
  """Reads `<path>/config.json` (or a config.json path; local or `gs://...`) with a clear error
  when missing."""
  path = os.fspath(path)
  file = path if path.endswith(".json") else paths.join(path, "config.json")
  if not paths.isfile(file):
    raise paths.missing(file, "no config.json; expected a Hugging Face LLaMA directory")
  try:
    hf = json.loads(paths.read_text(file))
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: not valid JSON ({e})") from None
  return from_hf_dict(hf, source=file, **overrides)
