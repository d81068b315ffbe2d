"""When a run should save and stop: SIGTERM on one host, JAX's preemption sync point on several
(every host then stops at the same step)."""
from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
  """Tells the training loop when to save and stop.

  Several processes (jax.distributed is initialised): JAX's preemption sync point, so every host
  stops at the same step (XLA's own SIGTERM handler notices the signal). One process: a SIGTERM
  handler that sets a flag, checked after each step.
  """

  def __init__(self):
    self.signalled = False
    self._previous = None

  @staticmethod
  def _distributed() -> bool:
    return jax.process_count() > 1

  def __enter__(self):
    if not self._distributed() and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.signalled = True

  def reached(self, step: int) -> bool:
    """True when the run should save at `step` and stop (the same step on every host)."""
    if self._distributed():
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is disabled
        return False
    return self.signalled
