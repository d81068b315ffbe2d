"""The processes of a multi-host run: `initialize_distributed()` (every entry point joins the
others before it touches a device), `is_writer()` (process 0 writes each shared file: config,
metrics, TensorBoard, export metadata) and `process_tag()` / `tag_logs_with_process()`
('process i/n' on log lines)."""
from __future__ import annotations

import logging
import os

import jax


def initialize_distributed() -> bool:
  """Joins the other processes when launched on several, before any device is touched: on a TPU
  pod slice (`TPU_WORKER_HOSTNAMES` names several hosts; jax finds the rest), or when
  `JAX_COORDINATOR_ADDRESS` (host:port of process 0) is set, with `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID` (jax itself reads only the address; a SLURM / Open MPI / Kubernetes job may
  leave those two to jax's detection). CPU processes talk through gloo. Returns whether it joined.
  """
  pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if not (os.environ.get("JAX_COORDINATOR_ADDRESS") or pod):
    return False
  if jax.distributed.is_initialized():
    return True
  counts = {}
  for env, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    value = os.environ.get(env, "").strip()
    if value:
      try:
        counts[key] = int(value)
      except ValueError:
        raise ValueError(f"{env}={value!r}: expected an integer") from None
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU backend only
  jax.distributed.initialize(**counts)
  return True


def is_writer() -> bool:
  """True in the process that writes shared files (process 0)."""
  return jax.process_index() == 0


def process_tag() -> str:
  """'process 2/8' for log lines."""
  return f"process {jax.process_index()}/{jax.process_count()}"


class _ProcessTag(logging.Filter):
  def __init__(self, tag: str):
    super().__init__()
    self.tag = tag

  def filter(self, record: logging.LogRecord) -> bool:
    if not str(record.msg).startswith(self.tag):
      record.msg = f"{self.tag}: {record.msg}"
    return True


def tag_logs_with_process() -> None:
  """Prefixes every log line with 'process i/n' when the run spans several processes (for
  entry points, after jax.distributed.initialize)."""
  if jax.process_count() > 1:
    for handler in logging.getLogger().handlers:
      if not any(isinstance(f, _ProcessTag) for f in handler.filters):
        handler.addFilter(_ProcessTag(process_tag()))
