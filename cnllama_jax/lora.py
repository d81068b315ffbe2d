"""LoRA adapter settings and initialisers (Hu et al. 2021, as PEFT implements them).

A LoRA-adapted dense layer computes `y = x W + (alpha / r) * dropout(x) A B` with
A: [in, r] (Kaiming-uniform, as PEFT) and B: [r, out] (zeros), so a fresh adapter is the identity.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank 0 means no adapters. `targets` uses PEFT's module names."""
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = TARGET_MODULES

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    unknown = sorted(set(self.targets) - set(TARGET_MODULES))
    if unknown:
      raise ValueError(f"unknown LoRA target modules {unknown}; expected names from "
                       f"{list(TARGET_MODULES)}")
    if self.rank < 0 or not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA rank={self.rank} must be >= 0 and dropout={self.dropout} in [0, 1)")
    if self.rank and not self.targets:
      raise ValueError("LoRA rank > 0 but no target modules were given")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0

  def applies_to(self, module_name: str) -> bool:
    return self.rank > 0 and module_name in self.targets


def kaiming_uniform_a(key, shape, dtype=jnp.float32):
  """PEFT's lora_A init: kaiming_uniform_(a=sqrt(5)) on a [r, in] weight is U(-1/sqrt(in), 1/sqrt(in)).

  Our A is stored [in, r] (fan-in on axis 0).
  """
  bound = 1.0 / jnp.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)
