"""Bounded retries and a stall timeout for object-store requests, set in one place for both
libraries that talk to a bucket: gcsfs (everything `paths` reads and writes, Orbax's checkpoint
metadata) and tensorstore (Orbax's array data). The default `Retries()` (overridable by
$CNLLAMA_STORAGE_RETRIES) lets a store that went away fail the run with one line within about a
minute instead of retrying for ten (tensorstore's own default: 32 retries, up to 32 s apart), and
a store that accepts connections but stops answering fail a request after `stall_timeout_s`
without a byte (neither library has such a limit by default: the run would hang).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os

RETRIES_ENV = "CNLLAMA_STORAGE_RETRIES"


@dataclasses.dataclass(frozen=True)
class Retries:
  """How a failed object-store request is retried (sized for a real bucket: a transient error
  survives, a store that stays down fails the request within about a minute).

  max_retries: retries after the first attempt, for tensorstore (Orbax's array data) and gcsfs
  (everything else: checkpoint metadata, metrics, exports, reads; its waits are its own, about 1,
  2, 4, 8 s); initial_delay_s / max_delay_s: tensorstore's exponential backoff between retries.
  stall_timeout_s: a request that connects or receives nothing for this long fails (and counts
  as a try). gcsfs: aiohttp's connect and read timeouts; tensorstore: curl's low-speed limit
  (under 1 byte/s for this many whole seconds; set in the environment, which tensorstore reads
  at its first request, unless already set there).
  """
  max_retries: int = 4
  initial_delay_s: float = 1.0
  max_delay_s: float = 10.0
  stall_timeout_s: float = 60.0

  @classmethod
  def parse(cls, text: str) -> "Retries":
    """From 'max_retries=2,initial_delay_s=0.1,max_delay_s=0.5' (any subset; the format of
    $CNLLAMA_STORAGE_RETRIES); a one-line ValueError for anything else."""
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
      key, _, value = (x.strip() for x in item.partition("="))
      try:
        if key not in names:
          raise ValueError(key)
        values[key] = int(value) if key == "max_retries" else float(value)
        if values[key] < 0:
          raise ValueError(value)
      except ValueError:
        raise ValueError(f"{RETRIES_ENV}={text!r}: bad item {item!r}; expected comma-separated "
                         f"key=value with keys {names} and values >= 0") from None
    return cls(**values)


_applied: list[Retries] = []  # the Retries in force (process-wide: both libraries keep theirs so)


def configure_retries(retries: Retries | None = None) -> Retries:
  """Sets the retries of gcsfs and tensorstore for this process: `retries`, else the applied ones,
  else $CNLLAMA_STORAGE_RETRIES or `Retries()`. Idempotent and cheap; called by `path()` and by
  checkpoint.Checkpoints, so a program only calls it to override."""
  if retries is None:
    if _applied:
      return _applied[0]
    retries = Retries.parse(os.environ.get(RETRIES_ENV, ""))
  if _applied and _applied[0] == retries:
    return retries
  _set_gcsfs_retries(retries.max_retries)
  _set_gcsfs_timeout(retries.stall_timeout_s)
  _set_tensorstore_retries(retries)
  _set_tensorstore_timeout(retries.stall_timeout_s)
  _applied[:] = [retries]
  return retries


def _set_gcsfs_retries(max_retries: int) -> None:
  """gcsfs wraps its request methods in `retry_request(retries=6)` at import; rewrap the
  undecorated methods with our count (attempts = retries + 1)."""
  try:
    from gcsfs import core, retry  # pylint: disable=import-outside-toplevel
  except ImportError:  # no gs:// support installed: nothing to configure
    return
  for name in ("_request", "_get_file_request", "_get_file_concurrent"):
    method = getattr(core.GCSFileSystem, name, None)
    inner = getattr(method, "_cnllama_inner", None) or getattr(method, "__wrapped__", None)
    if inner is None:
      logging.warning("gcsfs.GCSFileSystem.%s is not retry-wrapped as expected; its retries are "
                      "left as they are", name)
      continue
    wrapped = retry.retry_request(retries=max_retries + 1)(inner)
    wrapped._cnllama_inner = inner  # pylint: disable=protected-access
    setattr(core.GCSFileSystem, name, wrapped)


def _set_gcsfs_timeout(seconds: float) -> None:
  """Connect and read (between bytes, not total: a large upload may take long) timeouts for
  every gcsfs filesystem made from now on (fsspec's per-protocol defaults) and already made."""
  try:
    import aiohttp  # pylint: disable=import-outside-toplevel
    import fsspec  # pylint: disable=import-outside-toplevel
    from gcsfs import core  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  timeout = aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds)
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {})["requests_timeout"] = timeout
  classes = [core.GCSFileSystem]  # with its subclasses (gcsfs registers one for gs:// by
  for cls in classes:             # default), each of which caches its own instances
    classes.extend(cls.__subclasses__())
    for instance in list(getattr(cls, "_cache", {}).values()):
      instance.requests_timeout = timeout


def _set_tensorstore_retries(retries: Retries) -> None:
  """Orbax builds every tensorstore Context from two module dicts; a `gcs_request_retries`
  resource there applies to every gs:// array it writes or reads."""
  from orbax.checkpoint._src.serialization import (  # pylint: disable=import-outside-toplevel
      tensorstore_utils as ts_utils)
  resource = {"max_retries": retries.max_retries, "initial_delay": f"{retries.initial_delay_s}s",
              "max_delay": f"{retries.max_delay_s}s"}
  for name in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT"):
    spec = getattr(ts_utils, name, None)
    if isinstance(spec, dict):
      spec["gcs_request_retries"] = dict(resource)
    else:
      logging.warning("orbax tensorstore_utils.%s not found; tensorstore keeps its own gs:// "
                      "retries (32)", name)


def _set_tensorstore_timeout(seconds: float) -> None:
  """curl's low-speed limit for tensorstore: a transfer under 1 byte/s for `seconds` (whole, at
  least 1) fails. Set in the environment, which tensorstore reads at its first request; a value
  already there (the user's) is kept."""
  os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", str(max(1, math.ceil(seconds))))
  os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")
