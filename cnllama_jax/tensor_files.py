"""Random-access reading of Hugging Face weight files, one tensor slice at a time.

`open_weights(dir)` finds `model.safetensors`, sharded `model-0000k-of-0000n.safetensors` + index,
or `pytorch_model*.bin` (+ index) and returns a `WeightSource` whose `read(key, index)` returns
only the requested slice as numpy. Safetensors files are memory-mapped and parsed here (the
format is an 8-byte header length, a JSON header and raw little-endian data), so bf16 and fp16
need no framework and nothing is read that is not asked for.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
# Looked for in this order; an index wins over a single file.
_LAYOUTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
            "pytorch_model.bin")


class WeightSource:
  """Tensors by HF key across one or more files: `keys()`, `shape(key)`, `read(key, index)`."""

  def __init__(self, files: dict[str, "_File"], key_to_file: dict[str, str]):
    self._files = files
    self._key_to_file = key_to_file

  def keys(self) -> list[str]:
    return sorted(self._key_to_file)

  def file_of(self, key: str) -> str:
    return self._key_to_file[key]

  def shape(self, key: str) -> tuple[int, ...]:
    return self._files[self._key_to_file[key]].shape(key)

  def read(self, key: str, index: tuple = ()) -> np.ndarray:
    """The slice `tensor[index]` as a contiguous numpy array (only that slice is copied)."""
    return np.ascontiguousarray(self._files[self._key_to_file[key]].array(key)[index])


class _SafetensorsFile:
  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes)")
      (header_len,) = struct.unpack("<Q", head)
      if header_len > size - 8:
        raise ValueError(f"{path}: truncated safetensors file (header of {header_len} bytes, "
                         f"file of {size})")
      try:
        header = json.loads(f.read(header_len))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    self._data_start = 8 + header_len
    self._entries = header
    for key, entry in header.items():
      begin, end = entry["data_offsets"]
      if self._data_start + end > size:
        raise ValueError(f"{path}: truncated: tensor {key!r} ends at byte "
                         f"{self._data_start + end} but the file has {size}")
      if entry["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if size else None

  def keys(self) -> Iterable[str]:
    return self._entries.keys()

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._entries[key]["shape"])

  def array(self, key: str) -> np.ndarray:
    entry = self._entries[key]
    begin, end = entry["data_offsets"]
    raw = self._mmap[self._data_start + begin:self._data_start + end]
    return raw.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


class _TorchFile:
  """A `pytorch_model*.bin` state dict, memory-mapped by torch (a test/optional dependency)."""

  def __init__(self, path: str):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ImportError(f"{path}: reading .bin checkpoints needs torch (pip install torch); "
                        "or convert the directory to safetensors") from None
    self.path = path
    try:
      self._state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for damaged files
      raise ValueError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
    self._torch = torch

  def keys(self) -> Iterable[str]:
    return self._state.keys()

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._state[key].shape)

  def array(self, key: str) -> np.ndarray:
    tensor = self._state[key]
    if tensor.dtype == self._torch.bfloat16:
      return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _open_file(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: weight file listed in the index does not exist")
  return _SafetensorsFile(path) if path.endswith(".safetensors") else _TorchFile(path)


def open_file(path: str) -> WeightSource:
  """One weight file (`.safetensors` or a torch `.bin` state dict) as a WeightSource."""
  file = _open_file(path)
  return WeightSource({os.path.basename(path): file},
                      {key: os.path.basename(path) for key in file.keys()})


def open_weights(directory: str) -> WeightSource:
  """Opens the weights of a HF model directory; errors name what was looked for."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: not a directory; expected a Hugging Face model "
                            "directory with config.json and weights")
  for name in _LAYOUTS:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    if name.endswith(".index.json"):
      try:
        with open(path, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: not a valid weight index (expected a 'weight_map'): {e}") from None
      files = {fn: _open_file(os.path.join(directory, fn)) for fn in sorted(set(weight_map.values()))}
      for key, fn in weight_map.items():
        if key not in files[fn].keys():
          raise ValueError(f"{path}: lists {key!r} in {fn}, but {fn} does not contain it")
      return WeightSource(files, dict(weight_map))
    file = _open_file(path)
    return WeightSource({name: file}, {key: name for key in file.keys()})
  raise FileNotFoundError(
      f"{directory}: no weights found; expected one of {list(_LAYOUTS)} "
      "(or sharded model-0000k-of-0000n.safetensors with model.safetensors.index.json)")
