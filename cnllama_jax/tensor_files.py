"""Ranged reading of Hugging Face weight files, one tensor slice at a time, local or in a bucket.

`open_weights(dir)` finds `model.safetensors`, sharded `model-0000k-of-0000n.safetensors` + index,
or `pytorch_model*.bin` (+ index) in a local directory or a `gs://` (any fsspec) URL and returns a
`WeightSource`. Both formats are parsed here down to "tensor `key` is `shape` of `dtype` at byte
`offset` of file `url`":
  safetensors  an 8-byte header length, a JSON header, raw little-endian data;
  torch .bin   a zip archive (entries stored, not compressed) whose `data.pkl` is unpickled with a
               loader that only records each tensor's storage entry, offset, shape and stride
               (no torch import, no tensor data read).
`read_into(key, index, out)` then reads only the byte ranges of `tensor[index]` (a whole row
range in one read; a column range through row blocks of at most CHUNK_BYTES), casting into `out`.
No file is memory-mapped or downloaded: the process holds the destination plus one block.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from cnllama_jax import paths

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_TORCH_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# Looked for in this order; an index wins over a single file.
_LAYOUTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
            "pytorch_model.bin")
CHUNK_BYTES = 16 << 20  # the most a read of a column range holds beyond its destination
_ROW_RUN_BYTES = 1 << 20  # a column run this long is read row by row instead of whole rows


@dataclasses.dataclass(frozen=True)
class Entry:
  """Where one tensor's data lies: C-contiguous `shape` of `dtype` at byte `offset` of `url`."""
  url: str
  offset: int
  dtype: np.dtype
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _bounds(index: tuple, shape: tuple[int, ...]) -> list[tuple[int, int]]:
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  out = []
  for s, n in zip(index, shape):
    lo, hi, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided slice {s} is not supported")
    out.append((lo, max(lo, hi)))
  return out


def read_entry(entry: Entry, index: tuple, out: np.ndarray) -> np.ndarray:
  """Reads `tensor[index]` (unit-step slices) into the C-contiguous `out`, cast to out.dtype."""
  bounds = _bounds(index, entry.shape)
  want = tuple(hi - lo for lo, hi in bounds)
  if out.shape != want or not out.flags.c_contiguous:
    raise ValueError(f"{entry.url}: destination {out.shape} (contiguous: "
                     f"{out.flags.c_contiguous}) for a slice of shape {want}")
  if not out.size:
    return out
  item = np.dtype(entry.dtype).itemsize
  if entry.shape == () or len(entry.shape) == 1:
    lo, hi = bounds[0] if bounds else (0, 1)
    _read_rows(entry, entry.offset + lo * item, hi - lo, item, out.reshape(-1, 1))
    return out
  # Rows: the first axis; a row is everything after it (contiguous).
  rows, inner = bounds[0], bounds[1:]
  row_shape = entry.shape[1:]
  row_elems = int(np.prod(row_shape, dtype=np.int64))
  if all((lo, hi) == (0, n) for (lo, hi), n in zip(inner, row_shape)):
    _read_rows(entry, entry.offset + rows[0] * row_elems * item, rows[1] - rows[0],
               row_elems * item, out.reshape(out.shape[0], -1))
    return out
  if len(entry.shape) != 2:
    raise ValueError(f"{entry.url}: column slices of {len(entry.shape)}-d tensors are not "
                     "supported")
  (c0, c1), cols = inner[0], entry.shape[1]
  row_bytes = cols * item
  if (c1 - c0) * item >= _ROW_RUN_BYTES:  # long runs: one read per row, only the run
    block = np.empty(c1 - c0, entry.dtype)
    for r in range(*rows):
      paths.read_into(entry.url, entry.offset + (r * cols + c0) * item, block)
      out[r - rows[0]] = block
    return out
  step = max(1, CHUNK_BYTES // row_bytes)  # short runs: whole rows in blocks, then the columns
  for r0 in range(rows[0], rows[1], step):
    r1 = min(r0 + step, rows[1])
    block = np.empty((r1 - r0, cols), entry.dtype)
    paths.read_into(entry.url, entry.offset + r0 * row_bytes, block)
    out[r0 - rows[0]:r1 - rows[0]] = block[:, c0:c1]
  return out


def _read_rows(entry: Entry, start: int, count: int, row_bytes: int, out: np.ndarray):
  """`count` contiguous rows of `row_bytes` from byte `start` into out [count, ...]."""
  same = np.dtype(out.dtype) == np.dtype(entry.dtype)
  if same and out.flags.c_contiguous:
    return paths.read_into(entry.url, start, out)  # straight into the destination
  step = max(1, CHUNK_BYTES // max(row_bytes, 1))
  flat = out.reshape(count, -1)
  for r0 in range(0, count, step):
    r1 = min(r0 + step, count)
    block = np.empty((r1 - r0, flat.shape[1]), entry.dtype)
    paths.read_into(entry.url, start + r0 * row_bytes, block)
    flat[r0:r1] = block
  return out


class WeightSource:
  """Tensors by HF key across one or more files: `keys()`, `shape(key)`, `read(key, index)`,
  `read_into(key, index, out)`, `file_of(key)`."""

  def __init__(self, entries: dict[str, Entry], key_to_file: dict[str, str]):
    self._entries = entries
    self._key_to_file = key_to_file

  def keys(self) -> list[str]:
    return sorted(self._entries)

  def file_of(self, key: str) -> str:
    return self._key_to_file[key]

  def shape(self, key: str) -> tuple[int, ...]:
    return self._entries[key].shape

  def dtype(self, key: str) -> np.dtype:
    return np.dtype(self._entries[key].dtype)

  def entry(self, key: str) -> Entry:
    return self._entries[key]

  def read_into(self, key: str, index: tuple, out: np.ndarray) -> np.ndarray:
    """Reads `tensor[index]` into `out` (C-contiguous, the slice's shape, any dtype)."""
    return read_entry(self._entries[key], index, out)

  def read(self, key: str, index: tuple = ()) -> np.ndarray:
    """The slice `tensor[index]` as a new numpy array in the file's dtype."""
    entry = self._entries[key]
    shape = tuple(hi - lo for lo, hi in _bounds(index, entry.shape))
    return read_entry(entry, index, np.empty(shape, entry.dtype))


# --- safetensors ---------------------------------------------------------------------------------

def _safetensors_entries(url: str) -> dict[str, Entry]:
  total = paths.size(url)
  if total < 8:
    raise ValueError(f"{url}: truncated safetensors file ({total} bytes)")
  (header_len,) = struct.unpack("<Q", paths.read_range(url, 0, 8))
  if header_len > total - 8:
    raise ValueError(f"{url}: truncated safetensors file (header of {header_len} bytes, file of "
                     f"{total})")
  try:
    header = json.loads(paths.read_range(url, 8, header_len))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{url}: corrupt safetensors header ({e})") from None
  header.pop("__metadata__", None)
  start = 8 + header_len
  entries = {}
  for key, meta in header.items():
    begin, end = meta["data_offsets"]
    if start + end > total:
      raise ValueError(f"{url}: truncated: tensor {key!r} ends at byte {start + end} but the file "
                       f"has {total}")
    if meta["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{url}: tensor {key!r} has unsupported dtype {meta['dtype']}")
    entries[key] = Entry(url, start + begin, np.dtype(_SAFETENSORS_DTYPES[meta["dtype"]]),
                         tuple(meta["shape"]))
  return entries


# --- torch .bin (zip + pickle) -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Storage:
  key: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _LazyTensor:
  storage: _Storage
  offset: int  # elements
  shape: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  del unused
  return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a torch state dict into _LazyTensors; any other global is refused (like
  torch.load(weights_only=True))."""

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _TORCH_STORAGES:
      return name
    raise pickle.UnpicklingError(f"unsupported object {module}.{name} in a state dict")

  def persistent_load(self, pid):
    kind, storage_type, key, _location, _numel = pid
    if kind != "storage" or storage_type not in _TORCH_STORAGES:
      raise pickle.UnpicklingError(f"unsupported storage {pid!r}")
    return _Storage(str(key), np.dtype(_TORCH_STORAGES[storage_type]))


def _contiguous_strides(shape) -> tuple[int, ...]:
  strides, n = [], 1
  for dim in reversed(shape):
    strides.append(n)
    n *= dim
  return tuple(reversed(strides))


def _torch_entries(url: str) -> dict[str, Entry]:
  source = paths.RangeFile(url)
  try:
    archive = zipfile.ZipFile(source)
  except zipfile.BadZipFile:
    raise ValueError(f"{url}: not a zip-format PyTorch checkpoint (saved by torch < 1.6?); "
                     "re-save it with torch.save or convert it to safetensors") from None
  names = archive.namelist()
  pickles = [n for n in names if n.endswith("data.pkl")]
  if not pickles:
    raise ValueError(f"{url}: no data.pkl in the archive; not a PyTorch checkpoint")
  prefix = pickles[0][:-len("data.pkl")]
  try:
    state = _StateDictUnpickler(archive.open(pickles[0])).load()
  except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as e:
    raise ValueError(f"{url}: cannot read PyTorch checkpoint ({e})") from None
  if not isinstance(state, dict):
    raise ValueError(f"{url}: holds a {type(state).__name__}, expected a state dict")
  data_starts: dict[str, int] = {}
  entries = {}
  for key, tensor in state.items():
    if not isinstance(tensor, _LazyTensor):
      continue
    name = f"{prefix}data/{tensor.storage.key}"
    if name not in data_starts:
      info = archive.getinfo(name)
      if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{url}: tensor storage {name} is compressed; expected torch.save's "
                         "uncompressed archive")
      local = paths.read_range(url, info.header_offset, 30)
      name_len, extra_len = struct.unpack("<HH", local[26:30])
      data_starts[name] = info.header_offset + 30 + name_len + extra_len
    sized = [(n, s) for n, s in zip(tensor.shape, tensor.stride) if n != 1]
    if sized != [(n, s) for n, s in zip(tensor.shape, _contiguous_strides(tensor.shape))
                 if n != 1]:
      raise ValueError(f"{url}: tensor {key!r} is not contiguous (stride {tensor.stride}); "
                       "re-save with contiguous tensors or convert to safetensors")
    item = tensor.storage.dtype.itemsize
    entries[key] = Entry(url, data_starts[name] + tensor.offset * item, tensor.storage.dtype,
                         tensor.shape)
  return entries


# --- directories ---------------------------------------------------------------------------------

def _file_entries(url: str) -> dict[str, Entry]:
  if not paths.isfile(url):
    raise paths.missing(url, "weight file does not exist")
  return _safetensors_entries(url) if url.endswith(".safetensors") else _torch_entries(url)


def open_file(url: str) -> WeightSource:
  """One weight file (`.safetensors` or a torch `.bin` state dict) as a WeightSource."""
  url = os.fspath(url)
  entries = _file_entries(url)
  name = os.path.basename(url)
  return WeightSource(entries, {key: name for key in entries})


def open_weights(directory: str) -> WeightSource:
  """Opens the weights of a HF model directory (local or URL); errors name what was looked for."""
  directory = os.fspath(directory)
  if not paths.isdir(directory):
    raise paths.missing(directory, "not a directory; expected a Hugging Face model directory "
                        "with config.json and weights")
  paths.check_complete(directory)
  present = set(paths.listdir(directory))
  for name in _LAYOUTS:
    if name not in present:
      continue
    url = paths.join(directory, name)
    if name.endswith(".index.json"):
      try:
        weight_map = json.loads(paths.read_text(url))["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{url}: not a valid weight index (expected a 'weight_map'): {e}") from None
      entries: dict[str, Entry] = {}
      for fn in sorted(set(weight_map.values())):
        found = _file_entries(paths.join(directory, fn))
        for key, file in weight_map.items():
          if file == fn and key not in found:
            raise ValueError(f"{url}: lists {key!r} in {fn}, but {fn} does not contain it")
        entries.update({key: found[key] for key, file in weight_map.items() if file == fn})
      return WeightSource(entries, dict(weight_map))
    entries = _file_entries(url)
    return WeightSource(entries, {key: name for key in entries})
  raise FileNotFoundError(
      f"{directory}: no weights found; expected one of {list(_LAYOUTS)} "
      "(or sharded model-0000k-of-0000n.safetensors with model.safetensors.index.json)")
