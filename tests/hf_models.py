"""Tiny random `transformers` LLaMA models saved in each on-disk layout we import."""
from __future__ import annotations

import json
import os

import numpy as np


def make_hf_llama(seed: int = 0, **overrides):
  """A random fp32 LlamaForCausalLM with tiny shapes (override any LlamaConfig field)."""
  import torch
  import transformers
  fields = dict(vocab_size=99, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                rms_norm_eps=1e-6, rope_theta=10000.0)
  fields.update(overrides)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
  with torch.no_grad():  # norms are ones at init: randomise them so the test sees them
    for name, param in model.named_parameters():
      if "norm" in name:
        param.add_(0.1 * torch.randn_like(param))
  return model


def save(model, directory: str, layout: str) -> str:
  """layout: 'safetensors', 'sharded' (small shards + index), 'bin', or 'bin-sharded'."""
  import torch
  if layout == "safetensors":
    model.save_pretrained(directory)
  elif layout == "sharded":
    model.save_pretrained(directory, max_shard_size="40KB")
  elif layout in ("bin", "bin-sharded"):
    os.makedirs(directory, exist_ok=True)
    model.config.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "bin":
      torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    else:
      keys = sorted(state)
      halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
      weight_map = {}
      for i, part in enumerate(halves):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, os.path.join(directory, name))
        weight_map.update({k: name for k in part})
      with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
  else:
    raise ValueError(layout)
  return directory


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None):
  """Logits from `transformers` for the same batch, with positions from the mask as generate()."""
  import torch
  ids = torch.as_tensor(input_ids, dtype=torch.long)
  mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
  positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
  return out.logits.float().numpy()
