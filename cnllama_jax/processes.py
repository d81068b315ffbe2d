"""Which process of a multi-host run does what: `is_writer()` (process 0 writes each shared file:
config, metrics, TensorBoard, export metadata) and `process_tag()` / `tag_logs_with_process()`
('process i/n' on log lines)."""
from __future__ import annotations

import logging

import jax


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
