"""A model placed for inference: a Hugging Face directory (+ PEFT LoRAs) on the training mesh.

    cfg, lora, params = load_model(model_dir, loras=[plus, alpaca], mesh=mesh)

Params land in the training layout (`sharding.py`'s logical rules over `(data, fsdp, tensor)`),
streamed shard by shard (`hf.load_hf`). LoRAs are merged in order (`adapters.merge_loras`); with
`merge=False` the last one stays unmerged (its A/B placed beside the frozen base with the same
rules, `lora` returned for the model), the ones before it merged. Every process of a multi-host
run calls this with the same arguments.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cnllama_jax import adapters as adapters_lib
from cnllama_jax import model as model_lib
from cnllama_jax import sharding as shd
from cnllama_jax.config import LlamaConfig
from cnllama_jax.hf import load_hf
from cnllama_jax.lora import LoraConfig


def parse_mesh_shape(text: str) -> tuple[int, int, int]:
  """'1,-1,1' -> (1, -1, 1): sizes of the (data, fsdp, tensor) axes, one of them may be -1."""
  try:
    sizes = tuple(int(n) for n in text.split(","))
  except ValueError:
    sizes = ()
  if len(sizes) != len(shd.MESH_AXES):
    raise ValueError(f"mesh shape {text!r}: expected three integers data,fsdp,tensor, e.g. 1,-1,1")
  return sizes


def build_mesh(shape: Sequence[int]):
  """The mesh of `shape` over every device (all hosts); (1, 1, 1): this process's first device."""
  return shd.single_device_mesh() if tuple(shape) == (1, 1, 1) else shd.make_mesh(shape)


def attach_lora(cfg: LlamaConfig, params: Any, peft, mesh=None,
                rules=shd.DEFAULT_RULES) -> tuple[LlamaConfig, LoraConfig, Any]:
  """Adds a PEFT LoRA's A/B to `params` unmerged (its saved embed_tokens / lm_head replace the
  base's). peft: a directory or a `adapters.load_peft` result. Returns (cfg, lora, params)."""
  lora, adapters, modules = adapters_lib.load_peft(peft) if isinstance(peft, str) else peft
  cfg, params = adapters_lib.apply_modules(cfg, params, modules)
  expected = {tuple(path.split("/")): shapes for path, shapes
              in adapters_lib.adapter_shapes(cfg, lora).items()}
  flat_adapters = traverse_util.flatten_dict(adapters)
  boxed = traverse_util.flatten_dict(model_lib.abstract_params(cfg, lora),
                                     is_leaf=lambda _, x: hasattr(x, "names"))
  mesh = mesh or shd.single_device_mesh()
  rules = shd.normalize_rules(rules)
  flat = traverse_util.flatten_dict(params)
  adapters_lib.check_adapter_shapes(cfg, lora, adapters)
  for path, (a_shape, b_shape) in expected.items():
    for name, shape in (("lora_a", a_shape), ("lora_b", b_shape)):
      array = flat_adapters[(*path, name)]
      box = boxed[(*path, name)]
      sharding = jax.sharding.NamedSharding(
          mesh, shd.logical_to_spec(box.names, rules, mesh, shape))
      host = np.asarray(array, np.float32)
      flat[(*path, name)] = jax.make_array_from_callback(shape, sharding, lambda i, h=host: h[i])
  return cfg, lora, traverse_util.unflatten_dict(flat)


def load_model(model_dir: str, *, loras: Sequence[str] = (), merge: bool = True, mesh=None,
               rules=shd.DEFAULT_RULES, dtype=None) -> tuple[LlamaConfig, LoraConfig, Any]:
  """(cfg, lora, params) of a HF LLaMA directory plus LoRAs, on `mesh` (one device when None).

  dtype: param and compute dtype (default float32). `lora` is rank 0 unless merge=False.
  """
  cfg, params = load_hf(model_dir, mesh=mesh, dtype=dtype, rules=rules)
  lora = LoraConfig()
  loras = list(loras)
  if loras and not merge:
    *merged, last = loras
    if merged:
      cfg, params = adapters_lib.merge_loras(cfg, params, merged)
    cfg, lora, params = attach_lora(cfg, params, last, mesh, rules)
  elif loras:
    cfg, params = adapters_lib.merge_loras(cfg, params, loras)
  if dtype is not None:
    cfg = cfg.replace(dtype=jnp.dtype(dtype).name)
  return cfg, lora, params
