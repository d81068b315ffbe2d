"""PEFT LoRA adapters: writing them (`save_peft`), reading them (`load_peft`, safetensors or the
paper's `adapter_model.bin`) and merging one or more into a base (`merge_loras`).

PEFT keys are `base_model.model.` + the HF module name (`hf.leaves`): `...q_proj.lora_A.weight`
[r, in], `lora_B.weight` [out, r]; whole modules (modules_to_save) as
`base_model.model.model.embed_tokens.weight` [vocab, hidden] and `base_model.model.lm_head.weight`
[vocab, hidden], as PEFT 0.21 saves them.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cnllama_jax import export as ex
from cnllama_jax import hf, paths, tensor_files
from cnllama_jax.config import LlamaConfig
from cnllama_jax.lora import (TARGET_MODULES, LoraConfig, adapter_shapes, lora_for,
                              lora_from_params, merged_kernel)

PEFT_PREFIX = "base_model.model."


def save_peft(cfg: LlamaConfig, params: Any, lora: LoraConfig, out_dir: str, *,
              modules_to_save: tuple[str, ...] = ("embed_tokens", "lm_head"),
              base_model_name_or_path: str | None = None, tokenizer_dir: str | None = None,
              overwrite: bool = False) -> str:
  """PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) for `params` holding
  adapters; `modules_to_save` tensors (the resized embedding / head) are saved whole.

  base_model_name_or_path: the base the adapters were trained on (a path or hub name, written to
  adapter_config.json for `PeftModel.from_pretrained`). tokenizer_dir: the tokenizer of the resized
  vocabulary (a directory or a .model file), written beside the adapter as the paper's releases do.
  """
  lora_for(params, lora, required=True)
  present = lora_from_params(params)
  unknown = set(modules_to_save) - {"embed_tokens", "lm_head"}
  if unknown or (cfg.tie_word_embeddings and "lm_head" in modules_to_save):
    raise ValueError(f"modules_to_save={list(modules_to_save)}; expected a subset of "
                     "['embed_tokens', 'lm_head'] (no lm_head with tied embeddings)")

  def whole(leaf):  # the unpadded module in HF layout
    x = ex.read_slice(cfg, params, leaf, None, (slice(None),) * 2, 0)
    return x.T if leaf.transpose else x

  specs, sources = [], {}
  for key, leaf, layer, shape in ex.hf_plan(cfg, params):
    node = hf.get(params, leaf.path[:-1])
    if leaf.stacked and "lora_a" in node:
      a, b = node["lora_a"], node["lora_b"]  # [layers, in, r], [layers, r, out]
      for name, x in (("lora_A", a), ("lora_B", b)):
        peft_key = PEFT_PREFIX + key.replace(".weight", f".{name}.weight")
        specs.append((peft_key, x.shape[1:][::-1], np.dtype(x.dtype)))
        sources[peft_key] = lambda x=x, layer=layer: ex.to_host(x[layer]).T
    elif leaf.path[0] in modules_to_save:
      specs.append((PEFT_PREFIX + key, shape, np.dtype(hf.get(params, leaf.path).dtype)))
      sources[PEFT_PREFIX + key] = lambda leaf=leaf: whole(leaf)
  adapter_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
      "lora_dropout": lora.dropout, "target_modules": list(present.targets),
      "modules_to_save": list(modules_to_save) or None, "bias": "none", "fan_in_fan_out": False,
      "inference_mode": True, "use_rslora": False, "use_dora": False,
      "base_model_name_or_path": base_model_name_or_path}
  with ex.staged_dir(out_dir, overwrite) as tmp:
    ex.write_safetensors(paths.join(tmp, "adapter_model.safetensors"), specs,
                         lambda key: sources[key]())
    ex.write_json(paths.join(tmp, "adapter_config.json"), adapter_config)
    ex.write_tokenizer(tokenizer_dir, tmp, cfg.vocab_size)
  return out_dir


def _peft_patterns() -> list[tuple[re.Pattern, hf.Leaf]]:
  """Regexes over PEFT keys (minus prefix and `.weight`) for every kernel of the HF table."""
  out = []
  for leaf in hf.leaves(LlamaConfig()):
    if leaf.path[-1] == "kernel":
      stem = re.escape(leaf.hf_key[: -len(".weight")]).replace(r"\{layer\}", r"(\d+)")
      out.append((re.compile(rf"^{stem}\.lora_([AB])(?:\.default)?$"), leaf))
  return out


def load_peft(path: str) -> tuple[LoraConfig, dict, dict[str, np.ndarray]]:
  """Reads a PEFT LoRA directory (adapter_model.safetensors or .bin, as the paper's releases).

  Returns (LoraConfig, adapters, modules): adapters {'layers': {group: {module: {'lora_a':
  [layers, in, r], 'lora_b': [layers, r, out]}}}} as float32 numpy; modules {'embed_tokens':
  [vocab, hidden], 'lm_head': [hidden, vocab]} (our layouts, unpadded) for saved whole modules.
  """
  config_file = paths.join(path, "adapter_config.json")
  if not paths.isfile(config_file):
    raise paths.missing(config_file, "no adapter_config.json; expected a PEFT LoRA directory")
  paths.check_complete(path)
  conf = json.loads(paths.read_text(config_file))
  if conf.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{config_file}: peft_type={conf['peft_type']!r}; only LORA is supported")
  for key, ok in (("fan_in_fan_out", False), ("bias", "none"), ("use_dora", False),
                  ("rank_pattern", {}), ("alpha_pattern", {}), ("layers_to_transform", None)):
    if conf.get(key) not in (ok, None):
      raise ValueError(f"{config_file}: {key}={conf[key]!r} is not supported (expected {ok!r})")
  files = [paths.join(path, n) for n in ("adapter_model.safetensors", "adapter_model.bin")]
  files = [f for f in files if paths.isfile(f)]
  if not files:
    raise FileNotFoundError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
  source = tensor_files.open_file(files[0])
  found: dict[tuple[hf.Leaf, str], dict[int, np.ndarray]] = {}
  modules, unexpected = {}, []
  patterns = _peft_patterns()
  for key in source.keys():
    stem = key[len(PEFT_PREFIX):-len(".weight")] if key.startswith(PEFT_PREFIX) else key
    match = next(((m, leaf) for p, leaf in patterns if (m := p.match(stem))), None)
    if match:
      (m, leaf) = match
      found.setdefault((leaf, m.group(2)), {})[int(m.group(1))] = source.read(key)
    elif stem in ("model.embed_tokens", "lm_head"):
      x = source.read(key).astype(np.float32)
      modules[stem.split(".")[-1]] = x.T if stem == "lm_head" else x
    else:
      unexpected.append(key)
  if unexpected or not found:
    raise ValueError(f"{files[0]}: {len(unexpected)} keys that are not LLaMA LoRA weights "
                     f"({', '.join(sorted(unexpected)[:5])}) and {len(found)} LoRA tensors")
  adapters, layers, ranks = {}, {len(v) for v in found.values()}, set()
  for (leaf, ab), by_layer in found.items():
    if sorted(by_layer) != list(range(max(layers))):
      raise ValueError(f"{files[0]}: {leaf.hf_key} lora_{ab} found on layers {sorted(by_layer)}, "
                       f"expected every layer 0..{max(layers) - 1}")
    stacked = np.stack([by_layer[i].T.astype(np.float32) for i in range(len(by_layer))])
    ranks.add(stacked.shape[2 if ab == "A" else 1])
    node = adapters
    for name in leaf.path[:-1]:
      node = node.setdefault(name, {})
    node["lora_a" if ab == "A" else "lora_b"] = stacked
  targets = tuple(t for t in TARGET_MODULES if any(leaf.path[-2] == t for leaf, _ in found))
  rank = next(iter(ranks))
  if len(ranks) > 1 or rank != conf.get("r", rank):
    raise ValueError(f"{files[0]}: LoRA ranks {sorted(ranks)} in the weights, r={conf.get('r')} "
                     "in adapter_config.json")
  alpha = float(conf.get("lora_alpha", 8))
  if conf.get("use_rslora"):  # PEFT scales by alpha / sqrt(r); ours is alpha / r
    alpha *= math.sqrt(rank)
  lora = LoraConfig(rank=rank, alpha=alpha, dropout=float(conf.get("lora_dropout") or 0),
                    targets=targets)
  return lora, adapters, modules


# --- merging LoRAs -------------------------------------------------------------------------------

def _put_like(array: np.ndarray, like) -> Any:
  array = array.astype(like.dtype)
  sharding = getattr(like, "sharding", None)
  try:
    return jax.device_put(array, sharding) if sharding is not None else jnp.asarray(array)
  except ValueError:  # the new shape does not divide on that sharding
    return jnp.asarray(array)


def module_vocab(modules: dict[str, np.ndarray]) -> int | None:
  """Vocabulary of a LoRA's saved embed_tokens [vocab, hidden] / lm_head [hidden, vocab]."""
  sizes = {x.shape[0 if key == "embed_tokens" else 1] for key, x in modules.items()}
  if len(sizes) > 1:
    raise ValueError(f"saved embed_tokens and lm_head disagree on the vocabulary: {sorted(sizes)}")
  return sizes.pop() if sizes else None


def apply_modules(cfg: LlamaConfig, params: Any, modules: dict[str, np.ndarray],
                  name: str = "the LoRA") -> tuple[LlamaConfig, Any]:
  """Replaces embed_tokens / lm_head by a LoRA's whole saved modules; the vocabulary becomes theirs
  (padded to cfg.vocab_multiple, placed with the old leaves' sharding when it divides)."""
  vocab = module_vocab(modules)
  if vocab is None:
    return cfg, params
  hidden = {x.shape[1 if key == "embed_tokens" else 0] for key, x in modules.items()}
  needed = {"embed_tokens"} | ({"lm_head"} if not cfg.tie_word_embeddings else set())
  if hidden != {cfg.hidden_size}:
    raise ValueError(f"{name}: saved modules have hidden size {sorted(hidden)}, the base has "
                     f"{cfg.hidden_size}: the LoRA is for another model size")
  if set(modules) - needed or (vocab != cfg.vocab_size and set(modules) != needed):
    raise ValueError(f"{name} saves {sorted(modules)} with {vocab} tokens, the base has "
                     f"{cfg.vocab_size}; expected {sorted(needed)}")
  cfg, params = cfg.replace(vocab_size=vocab), dict(params)
  for key, x in modules.items():
    pad = [(0, 0), (0, 0)]
    pad[0 if key == "embed_tokens" else 1] = (0, cfg.padded_vocab_size - vocab)
    params[key] = _put_like(np.pad(x, pad), params[key])
  return cfg, params


def check_adapter_shapes(cfg: LlamaConfig, lora: LoraConfig, adapters: dict,
                         name: str = "the LoRA") -> None:
  """Every target of `lora` has A [layers, in, r] / B [layers, r, out] in `adapters` (the tree
  `load_peft` returns) of the shapes the base `cfg` needs; else one error naming the module."""
  for path, (a_shape, b_shape) in adapter_shapes(cfg, lora).items():
    node = adapters
    for key in path.split("/"):
      node = node.get(key, {})
    a, b = (getattr(node.get(k), "shape", None) for k in ("lora_a", "lora_b"))
    if (a, b) != (a_shape, b_shape):
      raise ValueError(f"{name}: {path} has A {a}, B {b}; the base (hidden {cfg.hidden_size}, "
                       f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} kv, ffn "
                       f"{cfg.intermediate_size}, {cfg.num_hidden_layers} layers) needs {a_shape}, "
                       f"{b_shape}: the LoRA is for another model size")


def merge_loras(cfg: LlamaConfig, params: Any, loras) -> tuple[LlamaConfig, Any]:
  """Merges LoRAs into a base in order (the paper's Plus then Alpaca): W += (alpha/r) A B per
  LoRA; a LoRA's whole embed_tokens / lm_head replace the base's (the vocabulary grows to theirs),
  the last one winning. loras: adapter directories or `load_peft` results. Returns (cfg, params).
  Peak memory: the base plus one merged copy of the adapted kernels."""
  if lora_from_params(params).rank:
    raise ValueError("params already hold LoRA adapters; merge_loras takes a base without them")
  last = None  # (vocabulary, name) of the last LoRA that carried one
  for number, item in enumerate(loras, 1):
    name = f"LoRA {number} ({item})" if isinstance(item, str) else f"LoRA {number}"
    lora, adapters, modules = load_peft(item) if isinstance(item, str) else item
    check_adapter_shapes(cfg, lora, adapters, name)
    vocab = module_vocab(modules)
    if vocab is not None and last and vocab < last[0]:
      raise ValueError(f"{name} has a {vocab}-token vocabulary, smaller than the {last[0]} of "
                       f"{last[1]} merged before it: give LoRAs in order of growing vocabulary, "
                       "e.g. Plus (49953) then Alpaca (49954)")
    if vocab is not None and not last and vocab < cfg.vocab_size:
      raise ValueError(f"{name} has a {vocab}-token vocabulary, smaller than the base's "
                       f"{cfg.vocab_size}: it was trained on another base model")
    cfg, params = apply_modules(cfg, params, modules, name)
    last = (vocab, name) if vocab is not None else last
    kernels = {}
    for path in adapter_shapes(cfg, lora):
      node = hf.get(adapters, path.split("/"))
      kernel = hf.get(params, path.split("/") + ["kernel"])
      kernels[path] = merged_kernel(kernel, node["lora_a"], node["lora_b"],
                                    np.float32(lora.scale))
    params = _replace(params, kernels)
  return cfg, params


def _replace(params: dict, kernels: dict[str, Any]) -> dict:
  """A copy of params with `layers/<group>/<module>/kernel` replaced (other leaves shared)."""
  flat = traverse_util.flatten_dict(params)
  flat.update({(*path.split("/"), "kernel"): kernel for path, kernel in kernels.items()})
  return traverse_util.unflatten_dict(flat)
