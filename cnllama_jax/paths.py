"""One path layer: a local path, `gs://bucket/key` and any other fsspec URL work alike.

Built on `etils.epath` (what Orbax and tfds use; `gs://` goes through `gcsfs`). This module adds
what epath lacks:
  - `read_into(url, offset, out)`: a byte range straight into a numpy buffer (`pread` locally, one
    ranged GET per call on an object store); nothing else of the file is read.
  - `missing(url, what)`: a one-line FileNotFoundError naming the URL, saying whether the bucket
    itself is missing.
  - publishing: object stores have no atomic rename, so `publish_dir` writes a directory's files
    under an `_INCOMPLETE` marker (created first, removed last) and readers refuse a directory that
    still holds one (`check_complete`); locally it still writes into a temp sibling and renames.
    `write_text` / `write_bytes` replace one file atomically (temp + rename locally; an object
    upload is atomic by itself).
  - one-line errors: a failed request on a URL becomes a `StorageError` naming it and the retries
    spent (bounded by `storage_retries`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
from typing import Callable, Iterator, TypeVar, Union

import numpy as np
from etils import epath

from cnllama_jax.storage_retries import RETRIES_ENV, configure_retries

PathLike = Union[str, os.PathLike]
INCOMPLETE = "_INCOMPLETE"  # present while a published directory is being written
REMOTE_READ_BYTES = 4 << 20  # the largest single GET of read_into (its bytes object is transient)
class StorageError(OSError):
  """An object-store request that failed after its retries (store unreachable, forbidden, ...);
  the message is one line that starts with the URL."""


_F = TypeVar("_F", bound=Callable)
_PASS_THROUGH = (FileNotFoundError, FileExistsError, ValueError, StorageError)


def _names_the_url(fn: _F) -> _F:
  """For a URL (not a local path; the first of fn's path arguments that is one), any failure of
  `fn(url, ...)` other than a missing / existing file or bad data becomes a one-line StorageError
  naming the URL and the retries spent."""

  @functools.wraps(fn)
  def wrapper(url, *args, **kwargs):
    try:
      return fn(url, *args, **kwargs)
    except _PASS_THROUGH:
      raise
    except Exception as err:  # noqa: BLE001 - gcsfs / aiohttp / google-auth errors
      where = next((os.fspath(u) for u in (url, *args)
                    if isinstance(u, (str, os.PathLike)) and not is_local(u)), None)
      if where is None:
        raise
      text = " ".join(str(err).split()) or type(err).__name__
      policy = configure_retries()
      raise StorageError(f"{where}: {fn.__name__} failed: {text} (gave up after "
                         f"{policy.max_retries} retries, each cut after "
                         f"{policy.stall_timeout_s:g} s without a byte; ${RETRIES_ENV} sets "
                         "them)") from err
  return wrapper  # type: ignore[return-value]


def path(url: PathLike) -> epath.Path:
  """The epath.Path of a local path or URL (`gs://b/k`, `memory://x`, ...)."""
  if not is_local(url):  # bounded retries before the first request (idempotent, cheap)
    configure_retries()
  return epath.Path(url)


def is_local(url: PathLike) -> bool:
  return "://" not in os.fspath(url)


def join(url: PathLike, *names: str) -> str:
  """`url/name/...` as a string (local paths stay local, URLs stay URLs)."""
  return os.fspath(path(url).joinpath(*names))


def absolute(url: PathLike) -> str:
  """An absolute local path, or the URL unchanged (never `./gs:/bucket`)."""
  return os.path.abspath(url) if is_local(url) else os.fspath(url)


def _fs(url: str):
  import fsspec  # pylint: disable=import-outside-toplevel
  configure_retries()
  return fsspec.core.url_to_fs(url)


def bucket_of(url: PathLike) -> str | None:
  """'bucket' of 'gs://bucket/key', None for a local path."""
  url = os.fspath(url)
  return None if is_local(url) else url.split("://", 1)[1].split("/", 1)[0]


def missing(url: PathLike, what: str = "no such file or directory") -> FileNotFoundError:
  """A one-line FileNotFoundError for `url`; names a missing bucket as such."""
  url = os.fspath(url)
  bucket = bucket_of(url)
  if bucket is not None:
    try:
      fs, _ = _fs(url)
      bucket_exists = fs.exists(bucket)
    except Exception:  # noqa: BLE001 - credentials, network: report the object itself
      bucket_exists = True
    if not bucket_exists:
      scheme = url.split("://", 1)[0]
      return FileNotFoundError(f"{url}: bucket {scheme}://{bucket} does not exist (or is not "
                               f"visible with these credentials); {what}")
  return FileNotFoundError(f"{url}: {what}")


@_names_the_url
def exists(url: PathLike) -> bool:
  return path(url).exists()


@_names_the_url
def isdir(url: PathLike) -> bool:
  return path(url).is_dir()


@_names_the_url
def isfile(url: PathLike) -> bool:
  p = path(url)
  return p.exists() and not p.is_dir()


@_names_the_url
def listdir(url: PathLike) -> list[str]:
  """Names in a directory (sorted)."""
  return sorted(p.name for p in path(url).iterdir())


@_names_the_url
def size(url: PathLike) -> int:
  """The file's size in bytes."""
  url = os.fspath(url)
  if is_local(url):
    return os.path.getsize(url)
  fs, key = _fs(url)
  return int(fs.size(key))


@_names_the_url
def read_bytes(url: PathLike) -> bytes:
  try:
    return path(url).read_bytes()
  except FileNotFoundError:
    raise missing(url) from None


def read_text(url: PathLike) -> str:
  return read_bytes(url).decode("utf-8")


@_names_the_url
def read_into(url: PathLike, offset: int, out: np.ndarray) -> np.ndarray:
  """Fills the contiguous array `out` with bytes [offset, offset + out.nbytes) of the file."""
  url = os.fspath(url)
  view = memoryview(out.reshape(-1).view(np.uint8))
  if is_local(url):
    with open(url, "rb", buffering=0) as f:
      f.seek(offset)
      done = 0
      while done < len(view):
        n = f.readinto(view[done:])
        if not n:
          raise ValueError(f"{url}: truncated: wanted bytes {offset}..{offset + len(view)}, the "
                           f"file ends at {offset + done}")
        done += n
    return out
  fs, key = _fs(url)
  for start in range(0, len(view), REMOTE_READ_BYTES):  # one GET per block: never 2x the range
    end = min(start + REMOTE_READ_BYTES, len(view))
    data = fs.cat_file(key, start=offset + start, end=offset + end)
    if len(data) != end - start:
      raise ValueError(f"{url}: truncated: wanted bytes {offset}..{offset + len(view)}, the "
                       f"object ends at {offset + start + len(data)}")
    view[start:end] = data
  return out


def read_range(url: PathLike, offset: int, length: int) -> bytes:
  """Bytes [offset, offset + length) of a file."""
  return read_into(url, offset, np.empty(length, np.uint8)).tobytes()


class RangeFile:
  """A read-only, seekable file object over ranged reads (for zipfile, pickle): each read is one
  `read_into`, so nothing but what is read is fetched."""

  def __init__(self, url: PathLike):
    self.url = os.fspath(url)
    self._size = size(self.url)
    self._pos = 0

  def seekable(self) -> bool:
    return True

  def readable(self) -> bool:
    return True

  def tell(self) -> int:
    return self._pos

  def seek(self, offset: int, whence: int = 0) -> int:
    base = {0: 0, 1: self._pos, 2: self._size}[whence]
    self._pos = max(0, base + offset)
    return self._pos

  def read(self, n: int = -1) -> bytes:
    end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
    if end <= self._pos:
      return b""
    data = read_range(self.url, self._pos, end - self._pos)
    self._pos = end
    return data

  def close(self) -> None:
    pass


# --- writing -------------------------------------------------------------------------------------

@_names_the_url
def makedirs(url: PathLike) -> None:
  path(url).mkdir(parents=True, exist_ok=True)


@_names_the_url
def write_bytes(url: PathLike, data: bytes) -> None:
  """Replaces the file with `data` atomically (a reader sees the old or the new file)."""
  url = os.fspath(url)
  if not is_local(url):
    path(url).write_bytes(data)  # one object upload: visible only once complete
    return
  directory = os.path.dirname(os.path.abspath(url))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(url)}.", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, url)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(url: PathLike, text: str) -> None:
  write_bytes(url, text.encode("utf-8"))


@_names_the_url
def rmtree(url: PathLike) -> None:
  p = path(url)
  if p.exists():
    p.rmtree() if p.is_dir() else p.unlink()


@_names_the_url
def copy_tree(src: PathLike, dst: PathLike) -> None:
  """Copies every file under `src` to the same relative path under `dst` (either may be a URL)."""
  target = path(dst)
  target.mkdir(parents=True, exist_ok=True)
  for child in path(src).iterdir():
    if child.is_dir():
      copy_tree(child, target / child.name)
    else:
      (target / child.name).write_bytes(child.read_bytes())


def check_complete(url: PathLike) -> None:
  """Raises a one-line error when `url` is a directory still being written (or left half-written
  by a crash): it holds the `_INCOMPLETE` marker of `publish_dir`."""
  if path(url).joinpath(INCOMPLETE).exists():
    raise ValueError(f"{os.fspath(url)}: incomplete ({INCOMPLETE} marker present: it is being "
                     "written or its writer crashed); write it again")


def _nonempty(p: epath.Path) -> bool:
  return p.exists() and (not p.is_dir() or any(True for _ in p.iterdir()))


@contextlib.contextmanager
def publish_dir(out_dir: PathLike, overwrite: bool = False) -> Iterator[str]:
  """Yields a directory to write into that becomes `out_dir` only when the block succeeds.

  Local: a temp sibling renamed onto `out_dir` (the old one is replaced only then). Object
  store: files are written in place under an `_INCOMPLETE` marker that is created first and
  removed last; with overwrite the old files are deleted after the marker is up. An existing,
  non-empty `out_dir` without `overwrite` is a FileExistsError and nothing is touched. Call it in
  every process; only the writer (process 0) should write files into the yielded directory.
  """
  out = absolute(out_dir)
  if is_local(out) and os.path.isfile(out):
    raise FileExistsError(f"{out} is a file; expected a directory to write into")
  if _nonempty(path(out)) and not overwrite:
    raise FileExistsError(f"{out}: already exists and is not empty; choose a new directory or "
                          "pass overwrite=True (--overwrite)")
  from cnllama_jax.processes import is_writer  # pylint: disable=import-outside-toplevel
  if not is_writer():  # jax is imported only here: tokenizer tools use paths without it
    yield out
    return
  if is_local(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
      yield tmp
      os.chmod(tmp, 0o755)
      if os.path.isdir(out):
        old = tmp + ".old"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
      else:
        os.replace(tmp, out)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    return
  p = path(out)
  p.mkdir(parents=True, exist_ok=True)
  (p / INCOMPLETE).write_text("being written\n")
  for child in p.iterdir():
    if child.name != INCOMPLETE:
      child.rmtree() if child.is_dir() else child.unlink()
  yield out
  (p / INCOMPLETE).unlink()


@_names_the_url
def move(src: PathLike, dst: PathLike) -> None:
  """Moves a file or directory (on an object store: copy + delete, not atomic)."""
  src, dst = os.fspath(src), os.fspath(dst)
  if is_local(src) and is_local(dst):
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    shutil.move(src, dst)
    return
  fs, key = _fs(src)
  fs.mv(key, _fs(dst)[1], recursive=True)


# --- listing and identifying input files ---------------------------------------------------------

def find_files(url: PathLike) -> list[str]:
  """Every file below the directory `url` (recursively), as paths or URLs like `url`, sorted.

  On an object store this is one listing (not one request per directory)."""
  url = os.fspath(url)
  if is_local(url):
    return sorted(os.path.join(root, name) for root, _, names in os.walk(url) for name in names)
  fs, key = _fs(url)
  scheme = url.split("://", 1)[0]
  return sorted(f"{scheme}://{found}" for found in fs.find(key))


def file_version(url: PathLike) -> tuple[int, str]:
  """(size in bytes, a string that changes when the file does) without reading it: the mtime in
  ns locally; an object's content hash (md5 / etag), else its generation or update time."""
  url = os.fspath(url)
  if is_local(url):
    st = os.stat(url)
    return st.st_size, str(st.st_mtime_ns)
  fs, key = _fs(url)
  try:
    info = fs.info(key)
  except FileNotFoundError:
    raise missing(url) from None
  for field in ("md5Hash", "etag", "ETag", "generation", "updated", "mtime", "LastModified"):
    if info.get(field):
      return int(info["size"]), f"{field}={info[field]}"
  return int(info["size"]), ""
