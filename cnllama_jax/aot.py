"""Compiles the exact train step of a config for a TPU topology without a TPU (libtpu's compiler
runs on the CPU host), and reports per-chip memory and model FLOPs.

Nothing is allocated: the frozen params, TrainState and batch are the plan's
`jax.ShapeDtypeStruct`s (cnllama_jax.plan), carrying the shardings the real run uses. FLOPs are
counted analytically (`cnllama_jax.flops`), because XLA's cost analysis counts a scanned layer
body once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re

from cnllama_jax import flops, lora as lora_lib, plan as plan_lib

GiB = 2**30
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
PEAK_BF16 = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
# Slice names count TensorCores on v4 / v5p (2 per chip, megacore) and chips on v5e / v6e.
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_3D_SHAPES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_2D_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}


def topology_description(name: str) -> tuple[str, str, int]:
  """'v4-32' -> ('v4', 'v4:2x2x4', 16 chips). Errors list the accepted forms."""
  match = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
  if not match:
    raise ValueError(f"topology {name!r}; expected <v4|v5e|v5p|v6e>-<size>, e.g. v4-32, v5e-16")
  gen, size = match.group(1), int(match.group(2))
  chips, rest = divmod(size, _CORES_PER_CHIP[gen])
  shapes = _3D_SHAPES if gen in ("v4", "v5p") else _2D_SHAPES
  if rest or chips not in shapes:
    raise ValueError(f"topology {name!r}: {size} is not a {gen} slice size; expected one of "
                     f"{sorted(n * _CORES_PER_CHIP[gen] for n in shapes)}")
  return gen, f"{gen}:{shapes[chips]}", chips


def tpu_devices(name: str) -> tuple[str, list]:
  """TPU devices of a topology to compile for (libtpu must be installed)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  gen, topology, _ = topology_description(name)
  # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) when it loads, so a second process
  # (another compile, a test) fails with "Internal error when accessing libtpu multi-process
  # lockfile". Compiling touches no TPU, so sharing is safe; must be set before libtpu loads.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  kwargs = dict(platform="tpu", topology_name=topology, chips_per_host_bounds=(2, 2, 1),
                num_slices=1)
  if gen in ("v4", "v5p"):
    kwargs["chip_config_name"] = "megacore"
  return gen, list(topologies.get_topology_desc(**kwargs).devices)


@dataclasses.dataclass
class Report:
  topology: str
  chips: int
  micro_batches: int
  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int
  hbm_bytes: int
  flops_per_step: float
  step_seconds_at_peak: float
  oom: str = ""  # the compiler's message when it refused the program for lack of HBM
  program_hash: str = ""  # program_hash() of what was compiled

  @property
  def total_bytes(self) -> int:
    """Per-chip peak: inputs + temporaries + outputs not aliased to (donated) inputs."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

  @property
  def fits(self) -> bool:
    return not self.oom and self.total_bytes <= self.hbm_bytes

  def lines(self) -> list[str]:
    gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    if self.oom:
      return [f"topology {self.topology}: {self.chips} chips, micro_batches={self.micro_batches}",
              f"DOES NOT FIT: {self.oom}",
              f"model FLOPs per step {self.flops_per_step:.3e}"]
    return [
        f"topology {self.topology}: {self.chips} chips, micro_batches={self.micro_batches}",
        f"per chip: arguments {gib(self.argument_bytes)}, temporaries {gib(self.temp_bytes)}, "
        f"outputs {gib(self.output_bytes)} (aliased {gib(self.alias_bytes)}), "
        f"total {gib(self.total_bytes)} of {gib(self.hbm_bytes)} HBM: "
        f"{'fits' if self.fits else 'DOES NOT FIT'} (headroom {gib(self.hbm_bytes - self.total_bytes)})",
        f"model FLOPs per step {self.flops_per_step:.3e} "
        f"({self.step_seconds_at_peak:.2f} s per step at 100% MFU)",
    ]


def lower(p: plan_lib.Plan):
  """The plan's jitted train step lowered on its abstract frozen params, state and batch."""
  train_step, _ = plan_lib.jit_steps(p)
  return train_step.lower(p.frozen, p.state, p.batch)


def program_hash(lowered) -> str:
  """sha1 (16 hex digits) of a lowered program's StableHLO without source locations: what a
  compiled figure is a function of besides the jax and libtpu versions (unlike a hash of the
  source files, it does not change when code that does not reach the program does)."""
  return hashlib.sha1(lowered.as_text(debug_info=False).encode()).hexdigest()[:16]


def lower_for(config, topology: str):
  """(plan, lowered train step) of `config` on `topology`'s TPU devices."""
  _, devices = tpu_devices(topology)
  p = plan_lib.plan(config, plan_lib.build_mesh(config, devices))
  return p, lower(p)


def compile_report(config, topology: str) -> Report:
  """Lowers and compiles the train step for `topology`; reads the per-chip memory."""
  gen, _, chips = topology_description(topology)
  p, lowered = lower_for(config, topology)
  tokens = config.train.global_batch_size * config.train.seq_len
  step_flops = tokens * flops.train_flops_per_token(p.cfg, config.train.seq_len, p.lora,
                                                    lora_lib.STAGES[p.stage])
  common = dict(topology=topology, chips=chips, micro_batches=config.train.micro_batches,
                hbm_bytes=HBM_BYTES[gen], flops_per_step=step_flops,
                step_seconds_at_peak=step_flops / (PEAK_BF16[gen] * chips),
                program_hash=program_hash(lowered))
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # "Ran out of memory on HBM, the total memory required for HLO temporaries (19.00G) exceeds
    # available HBM (15.75G). HLO module: ..." -> the sentence up to "HLO module".
    oom = re.search(r"(Ran out of memory[^\n]*?)(?:\.\s+HLO module|\.?\s*$)", str(e), re.M)
    return Report(argument_bytes=0, temp_bytes=0, output_bytes=0, alias_bytes=0,
                  oom=oom.group(1) if oom else str(e).splitlines()[0], **common)
  memory = compiled.memory_analysis()
  return Report(argument_bytes=memory.argument_size_in_bytes,
                temp_bytes=memory.temp_size_in_bytes, output_bytes=memory.output_size_in_bytes,
                alias_bytes=memory.alias_size_in_bytes, **common)


def fit_accumulation(config, topology: str, max_micro_batches: int = 256,
                     on_report=None) -> Report:
  """Doubles train.micro_batches (same global batch) until the step fits; the last report.
  on_report: called with every attempt's report (e.g. to print the ones that did not fit)."""
  report = None
  micro = config.train.micro_batches
  while micro <= max_micro_batches:
    with config.unlocked():
      config.train.micro_batches = micro
    try:
      report = compile_report(config, topology)
    except ValueError as e:  # micro-batch no longer divisible by the data-parallel size
      if "data-parallel" in str(e):
        break
      raise
    if on_report is not None:
      on_report(report)
    if report.fits:
      return report
    micro *= 2
  return report
