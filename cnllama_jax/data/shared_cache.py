"""A data cache in a bucket (`data.data_dir=gs://...`), built once and read by every host.

ArrayRecord files are read through local file descriptors only, so a build in a bucket is read
from a local mirror (`mirror_dir`): under `$CNLLAMA_DATA_CACHE`, default
`<system temp>/cnllama-data-cache/<scheme>/<bucket>/<key>`. The protocol, run by every process of
a (multi-host) run with the same arguments:

  1. process 0 looks for the build (`<data_dir>/<builder>/<config>/<version>/`, `config` being the
     fingerprint of the inputs) in the bucket. If it is missing or still holds the `_INCOMPLETE`
     marker of `paths.publish_dir`, process 0 tokenises into its local mirror and publishes the
     directory to the bucket (marker first, files, marker removed last);
  2. every process waits for process 0's verdict (`agree`: a broadcast from process 0 over the
     JAX distributed runtime, which is also the barrier); on failure the others stop with a
     one-line error pointing at process 0's log;
  3. the other processes copy the published build into their own local mirror (temp directory
     renamed into place, so a crash leaves no half copy) and read it there, never tokenising.

A later run, on any number of hosts, finds the build published and only copies it down.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Callable

import numpy as np

from cnllama_jax import paths, processes

logger = logging.getLogger(__name__)
INFO_FILE = "dataset_info.json"  # written last by tfds into a finished build directory


def mirror_dir(url: str) -> str:
  """The local directory that mirrors the directory URL `url` on this host."""
  root = os.environ.get("CNLLAMA_DATA_CACHE") or os.path.join(tempfile.gettempdir(),
                                                              "cnllama-data-cache")
  scheme, key = os.fspath(url).split("://", 1)
  return os.path.join(root, scheme, *[part for part in key.split("/") if part])


def is_published(url: str) -> bool:
  """True when the build directory `url` is complete: tfds' info file, no `_INCOMPLETE` marker."""
  return (paths.exists(paths.join(url, INFO_FILE))
          and not paths.exists(paths.join(url, paths.INCOMPLETE)))


def download(url: str, local: str) -> str:
  """Copies the published build `url` to `local` (kept when already there); returns `local`."""
  if os.path.isfile(os.path.join(local, INFO_FILE)):
    return local
  paths.check_complete(url)
  if not paths.exists(paths.join(url, INFO_FILE)):
    raise FileNotFoundError(f"{url}: no {INFO_FILE}: not a finished data build")
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(local)}.tmp-", dir=os.path.dirname(local))
  try:
    paths.copy_tree(url, tmp)
    os.chmod(tmp, 0o755)
    with contextlib.suppress(OSError):  # another process on this machine may have won the race
      os.replace(tmp, local)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  logger.info("copied the data build %s to %s", url, local)
  return local


def upload(local: str, url: str) -> None:
  """Publishes the local build directory `local` at `url` under an `_INCOMPLETE` marker."""
  with paths.publish_dir(url, overwrite=True) as out:
    paths.copy_tree(local, out)
  logger.info("published the data build %s", url)


def broadcast_ok(ok: bool) -> bool:
  """Process 0's `ok`, in every process (a barrier over the JAX distributed runtime)."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def build_once(remote_build: str, local_root: str, local_build: str,
               build_local: Callable[[str], dict], *, writer: bool | None = None,
               agree: Callable[[bool], bool] = broadcast_ok) -> dict:
  """Runs the protocol of this module's docstring for one build.

  Args:
    remote_build: the build directory in the bucket, `<data_dir>/<builder>/<config>/<version>`.
    local_root: the local data_dir mirroring the bucket's (`mirror_dir(data_dir)`).
    local_build: `remote_build`'s mirror under `local_root`.
    build_local: builds into (or reads back from) a local data_dir; returns the datasets dict.
    writer: whether this process builds and publishes (default: process 0).
    agree: every process gets process 0's success flag from it (default `broadcast_ok`).

  Returns:
    `build_local(local_root)`'s result, read from this host's local mirror.
  """
  writer = processes.is_writer() if writer is None else writer
  result, error = None, None
  if writer:
    try:
      if is_published(remote_build):
        download(remote_build, local_build)
      else:
        logger.info("building the data cache %s on this host, then publishing it", remote_build)
        result = build_local(local_root)
        upload(local_build, remote_build)
    except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other processes
      error = err
  ok = agree(error is None)
  if error is not None:
    raise error
  if not ok:
    raise RuntimeError(f"{remote_build}: process 0 failed to build the data cache (see its log); "
                       "fix the error it reports and rerun")
  if not writer:
    download(remote_build, local_build)
  return result if result is not None else build_local(local_root)
