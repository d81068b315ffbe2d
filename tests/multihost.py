"""Several processes of one multi-host run on this machine, for tests of the commands pods run.

  with started(commands, envs) as workers:    # Popen objects; any still alive at exit is killed
    ...                                        # e.g. signal one of them mid-run
    outputs = finish(workers)                  # [(stdout, stderr)], every exit status checked
  host_env(process_id, port): the environment that makes process i of 2 join the others
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Iterator, Sequence

from tests.gcs_emulator import free_port  # noqa: F401  (re-exported: one port per run)


def host_env(process_id: int, port: int, processes: int = 2, devices: int = 2) -> dict[str, str]:
  """os.environ for process `process_id` of `processes`, each with `devices` fake CPU devices,
  joined through the documented JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes),
          "JAX_PROCESS_ID": str(process_id)}


@contextlib.contextmanager
def started(commands: Sequence[Sequence[str]], envs: Sequence[dict[str, str]],
            cwd: str | None = None) -> Iterator[list[subprocess.Popen]]:
  """Starts one process per command (text pipes for stdout and stderr); kills the ones still
  running when the block ends, so a failed test leaves none behind."""
  workers = [subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=cwd, env=env) for command, env in zip(commands, envs)]
  try:
    yield workers
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()


def finish(workers: Sequence[subprocess.Popen], timeout: float = 300) -> list[tuple[str, str]]:
  """Waits for every worker; asserts each exited 0 (the failures' stderr tails in the message)."""
  outputs = [worker.communicate(timeout=timeout) for worker in workers]
  assert [w.returncode for w in workers] == [0] * len(workers), [e[-2000:] for _, e in outputs]
  return outputs
