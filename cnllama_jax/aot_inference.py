"""Compiles generation (prefill + one decode step) for a TPU topology without a TPU and reports
per-chip memory: does a model serve at a batch and context on a slice?

The programs are exactly `generate`'s (`generate._programs`): params in the training layout
(`sharding.py` rules on a `(data, fsdp, tensor)` mesh), a KV cache of `context` slots per row, the
paper's sampling. Nothing is allocated: every argument is a `jax.ShapeDtypeStruct` carrying the
sharding a real run would use. Topology names and devices come from `aot.py`.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from cnllama_jax import aot, generate as gen, model as model_lib, sharding as shd
from cnllama_jax import vocab as vocab_lib
from cnllama_jax.config import preset
from cnllama_jax.lora import LoraConfig

GiB = aot.GiB
VOCAB = 49954  # Chinese-Alpaca's vocabulary


@dataclasses.dataclass
class Program:
  """Per-chip bytes of one compiled program (or the compiler's out-of-memory sentence)."""
  name: str
  argument_bytes: int = 0
  temp_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  oom: str = ""

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


@dataclasses.dataclass
class InferenceReport:
  model: str
  topology: str
  chips: int
  mesh_shape: tuple
  batch: int
  context: int
  hbm_bytes: int
  programs: list

  @property
  def peak_bytes(self) -> int:
    return max(p.total_bytes for p in self.programs)

  @property
  def fits(self) -> bool:
    return not any(p.oom for p in self.programs) and self.peak_bytes <= self.hbm_bytes

  def lines(self) -> list[str]:
    gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    out = [f"{self.model} on {self.topology} ({self.chips} chips, mesh {self.mesh_shape}), "
           f"batch {self.batch}, context {self.context}"]
    for p in self.programs:
      out.append(f"  {p.name}: DOES NOT FIT: {p.oom}" if p.oom else
                 f"  {p.name}: arguments {gib(p.argument_bytes)}, temporaries {gib(p.temp_bytes)}"
                 f", outputs {gib(p.output_bytes)} (aliased {gib(p.alias_bytes)}), total "
                 f"{gib(p.total_bytes)}")
    if any(p.oom for p in self.programs):
      out.append(f"  DOES NOT FIT in {gib(self.hbm_bytes)} HBM per chip")
    else:
      out.append(f"  peak {gib(self.peak_bytes)} of {gib(self.hbm_bytes)} HBM per chip: "
                 f"{'fits' if self.fits else 'DOES NOT FIT'}")
    return out


def _compile(name: str, jitted, *args) -> Program:
  try:
    memory = jitted.lower(*args).compile().memory_analysis()
  except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    oom = re.search(r"(Ran out of memory[^\n]*?)(?:\.\s+HLO module|\.?\s*$)", str(e), re.M)
    return Program(name, oom=oom.group(1) if oom else str(e).splitlines()[0])
  return Program(name, memory.argument_size_in_bytes, memory.temp_size_in_bytes,
                 memory.output_size_in_bytes, memory.alias_size_in_bytes)


def compile_inference(model: str, topology: str, *, batch: int = 16, context: int = 2048,
                      mesh_shape=(1, -1, 1), rules=shd.DEFAULT_RULES, dtype: str = "bfloat16",
                      vocab_size: int = VOCAB) -> InferenceReport:
  """Compiles prefill (a full `context`-token prompt) and one decode step over a `context`-slot
  cache for `model` (a config preset: 7b, 13b, 33b, ...) on `topology` (e.g. v5e-16)."""
  generation, devices = aot.tpu_devices(topology)
  mesh = shd.make_mesh(tuple(mesh_shape), devices)
  rules = shd.normalize_rules(rules)
  cfg = preset(model, vocab_size=vocab_size, dtype=dtype, param_dtype=dtype,
               vocab_multiple=vocab_lib.mesh_vocab_multiple(mesh, rules))
  lora, sampling = LoraConfig(), gen.Sampling()
  prefill, decode = gen._programs(cfg, lora, sampling, context, batch, mesh, rules)  # pylint: disable=protected-access
  abstract = lambda tree, shardings: jax.tree_util.tree_map(  # noqa: E731
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
  boxed = model_lib.abstract_params(cfg, lora)
  params = abstract(jax.tree_util.tree_map(lambda b: b.value, boxed,
                                           is_leaf=lambda x: hasattr(x, "names")),
                    gen.param_shardings(cfg, lora, mesh, rules))
  replicated = NamedSharding(mesh, PartitionSpec())
  state_sh = gen.state_shardings(cfg, batch, context, mesh, rules)
  rows = jax.ShapeDtypeStruct((batch, context), jnp.int32, sharding=state_sh["cache"]["mask"])
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=replicated)
  eos = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=replicated)  # the stop ids (one)
  state_shape = jax.eval_shape(prefill, params, rows, rows, rng, eos)[0]
  state = abstract(state_shape, state_sh)
  programs = [_compile("prefill", prefill, params, rows, rows, rng, eos),
              _compile("decode", decode, params, state, rng, eos, context)]
  return InferenceReport(model, topology, len(devices), tuple(mesh.devices.shape), batch, context,
                         aot.HBM_BYTES[generation], programs)
