"""Test setup: JAX on the CPU with 8 fake devices (real meshes without accelerators)."""
import os
import shutil

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CACHE_ROOT = "CNLLAMA_TESTS_JAX_CACHE"  # set by the process that made (and removes) the root


def _compilation_cache() -> str | None:
  """JAX's persistent compilation cache for this test session, in a temporary directory: the
  many tests and `launch/*.py` subprocesses that compile the same tiny programs (the same run
  on the same mesh) load them instead of compiling them again. One directory per xdist worker
  (inherited by its subprocesses), so no process reads an entry another worker is writing; a
  JAX_COMPILATION_CACHE_DIR set by the user is kept. Returns the root this process made."""
  root = os.environ.get(_CACHE_ROOT)
  made = None
  if root is None:
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
      return None
    import tempfile
    root = made = tempfile.mkdtemp(prefix="cnllama-tests-jax-cache-")
    os.environ[_CACHE_ROOT] = root
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      root, os.environ.get("PYTEST_XDIST_WORKER", "main"))
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return made


_MADE_CACHE_ROOT = _compilation_cache()


def pytest_unconfigure(config):
  del config
  if _MADE_CACHE_ROOT:
    import shutil
    shutil.rmtree(_MADE_CACHE_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def fixtures_dir() -> str:
  """Shared fixtures (real tokenizers); `CNLLAMA_FIXTURES` overrides ../shared/fixtures."""
  return os.environ.get("CNLLAMA_FIXTURES", os.path.join(REPO, "..", "shared", "fixtures"))


@pytest.fixture(scope="session")
def gcs():
  """A GCS emulator on 127.0.0.1 for the session, with tensorstore and gcsfs pointed at it
  (tests/gcs_emulator.py); skips when the fake-gcs-server binary cannot start. Its filesystem
  backend keeps the objects when a test kills it and starts it again (same port)."""
  from tests import gcs_emulator
  try:
    emulator = gcs_emulator.Emulator(backend="filesystem").start()  # restartable
  except (RuntimeError, OSError) as err:
    pytest.skip(f"no GCS emulator: {err}")
  saved = {k: os.environ.get(k) for k in emulator.env()}
  os.environ.update(emulator.env())
  yield emulator
  emulator.stop()
  shutil.rmtree(emulator.root, ignore_errors=True)
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """Under `-n N` with xdist's default `--dist load`: the longest tests first, and the tests that
  share a module-scoped fixture on one worker (tests/scheduling.py); other --dist modes as asked."""
  if config.getvalue("dist") != "load":
    return None
  from tests import scheduling
  return scheduling.make_scheduler(config, log)
