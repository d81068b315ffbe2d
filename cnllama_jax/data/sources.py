"""Reading corpora (local paths or URLs such as `gs://bucket/dir`): the one reader of text lines,
text documents and instruction records.

Public readers (the rest of the project reads files through these):
  `iter_lines(path)`: (line number, text, raw bytes) of one UTF-8 file.
  `iter_documents(files)`: the non-blank lines of text files, one document each (pre-training,
    tokenizer training, perplexity).
  `iter_instruction_records(path)`: validated Alpaca records from a `.json` list or `.jsonl` file.
  `read_instructions(path)`: prompts for generation from `.txt` (one instruction a line),
    `.json` or `.jsonl`; `output` optional.

Every problem is one `ValueError` (or `FileNotFoundError`) line naming the file and the line
number or example index, e.g.:

    data/alpaca.json:17:5: malformed JSON: Expecting ',' delimiter
    data/zh.txt:3: not valid UTF-8 (byte 0xff at column 12); fix the file or pass skip_bad_lines=True
    data/sft.jsonl: example 4 (line 5): missing field 'output' (need 'instruction' and 'output'; 'input' is optional)

With `skip_bad_lines=True` a text or JSONL line that is not UTF-8 (or, in a JSONL file, not valid
JSON) is skipped and counted in `stats["skipped_bad_lines"]` instead.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, MutableMapping, Sequence

from etils import epath

from cnllama_jax import paths

TEXT_SUFFIXES = (".txt",)
INSTRUCTION_SUFFIXES = (".json", ".jsonl")
PathLike = str | os.PathLike
FilePath = Path | epath.Path  # pathlib.Path for a local file, epath.Path for a URL


def as_path(path: PathLike) -> FilePath:
  """pathlib.Path of a local path; epath.Path of a URL (`Path("gs://b/k")` would lose the `//`)."""
  return Path(path) if paths.is_local(path) else epath.Path(path)


def open_binary(path: PathLike) -> IO[bytes]:
  """The file opened for reading bytes (a streamed object for a URL); missing: one-line error."""
  try:
    return open(path, "rb") if paths.is_local(path) else epath.Path(path).open("rb")
  except FileNotFoundError:
    raise paths.missing(path) from None


def _remote_matches(url: str, suffixes: Sequence[str]) -> list[FilePath]:
  """The files below a directory URL with one of `suffixes`, hidden entries skipped (one
  listing)."""
  root = url.rstrip("/") + "/"
  return [epath.Path(f) for f in paths.find_files(url)
          if f.endswith(tuple(suffixes)) and f.startswith(root)
          and not any(part.startswith(".") for part in f[len(root):].split("/"))]


def list_files(files_or_dir: PathLike | Sequence[PathLike],
               suffixes: Sequence[str]) -> list[FilePath]:
  """Expands files and directories into a sorted file list.

  Args:
    files_or_dir: one path or several. A directory contributes every file below it (recursively,
      hidden entries skipped) whose name ends with one of `suffixes`; a file named explicitly is
      taken whatever its suffix.
    suffixes: e.g. `TEXT_SUFFIXES`.

  Returns:
    The files, each directory's sorted, in the order given.

  Raises:
    FileNotFoundError: a path is missing, or a directory holds no matching file.
  """
  items = [files_or_dir] if isinstance(files_or_dir, (str, os.PathLike)) else list(files_or_dir)
  if not items:
    raise FileNotFoundError("no input files given")
  found: list[FilePath] = []
  for item in items:
    path = as_path(item)
    if not paths.is_local(item):
      if not path.exists():
        raise paths.missing(item)
      if path.is_dir():
        matches = _remote_matches(os.fspath(item), suffixes)
        if not matches:
          raise FileNotFoundError(f"{path}: directory has no {'/'.join(suffixes)} files")
        found.extend(matches)
      else:
        found.append(path)
    elif path.is_dir():
      matches = sorted(
          p for p in path.rglob("*")
          if p.is_file() and p.name.endswith(tuple(suffixes))
          and not any(part.startswith(".") for part in p.relative_to(path).parts))
      if not matches:
        raise FileNotFoundError(f"{path}: directory has no {'/'.join(suffixes)} files")
      found.extend(matches)
    elif path.is_file():
      found.append(path)
    else:
      raise FileNotFoundError(f"{path}: no such file or directory")
  return found


def _utf8_error(path: FilePath, lineno: int, err: UnicodeDecodeError, raw: bytes) -> ValueError:
  column = len(raw[:err.start].decode("utf-8", errors="replace")) + 1
  return ValueError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                    f"{column}); fix the file or pass skip_bad_lines=True")


def _count(stats: MutableMapping[str, int] | None, key: str) -> None:
  if stats is not None:
    stats[key] = stats.get(key, 0) + 1


def iter_lines(path: PathLike, *, skip_bad_lines: bool = False,
               stats: MutableMapping[str, int] | None = None) -> Iterator[tuple[int, str, int]]:
  """Yields `(line_number, text, n_bytes)` for each line of a UTF-8 file.

  Line numbers start at 1; the trailing `\n` / `\r\n` is removed, as is a UTF-8 byte-order mark
  on line 1. `n_bytes` is the raw size of the line (for progress bars).

  Raises:
    ValueError: a line is not UTF-8 (naming file, line and column), unless `skip_bad_lines`, which
      skips it and counts it in `stats["skipped_bad_lines"]`.
  """
  path = as_path(path)
  with open_binary(path) as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as err:
        if not skip_bad_lines:
          raise _utf8_error(path, lineno, err, raw) from None
        _count(stats, "skipped_bad_lines")
        continue
      if lineno == 1 and text.startswith("\ufeff"):
        text = text[1:]
      if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
      yield lineno, text, len(raw)


def iter_documents(files: Iterable[PathLike], *, skip_bad_lines: bool = False,
                   stats: MutableMapping[str, int] | None = None,
                   on_bytes: Callable[[int], object] | None = None) -> Iterator[str]:
  """Yields the documents of text files: every non-blank line, in file then line order.

  Lines that are empty or only whitespace are skipped and counted in
  `stats["skipped_empty_lines"]` (the paper's HF "text" loader keeps them, each becoming a lone
  BOS).

  Args:
    files: UTF-8 text files (see `list_files`).
    skip_bad_lines: skip (and count) lines that are not UTF-8 instead of raising.
    stats: counters updated in place: `skipped_empty_lines`, `skipped_bad_lines`.
    on_bytes: called with the raw size of every line read (e.g. a tqdm bar's `update`).
  """
  for path in files:
    for _, text, n_bytes in iter_lines(path, skip_bad_lines=skip_bad_lines, stats=stats):
      if on_bytes is not None:
        on_bytes(n_bytes)
      if text.strip():
        yield text
      else:
        _count(stats, "skipped_empty_lines")


def check_record(obj: object, path: PathLike, index: int, lineno: int | None = None, *,
                 require_output: bool = True) -> dict[str, str]:
  """Validates one instruction example.

  `instruction` (and `output` when `require_output`) must be strings; `input` (and an optional
  `output`) may be missing or null, both read as "". Extra keys are ignored.

  Returns:
    `{"instruction", "input", "output"}`, all strings.

  Raises:
    ValueError: one line naming the file, example index (and line) and the field.
  """
  where = f"{path}: example {index}" + (f" (line {lineno})" if lineno is not None else "")
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: expected a JSON object with 'instruction', 'input', 'output', "
                     f"found {type(obj).__name__}")
  required = ("instruction", "output") if require_output else ("instruction",)
  record = {}
  for key in ("instruction", "output", "input"):
    if key not in obj and key in required:
      need = "'instruction' and 'output'" if require_output else "'instruction'"
      raise ValueError(f"{where}: missing field '{key}' (need {need}; 'input' is optional)")
    value = obj.get(key)
    if value is None and key not in required:
      value = ""
    if not isinstance(value, str):
      found = "null" if value is None else type(value).__name__
      raise ValueError(f"{where}: field '{key}' is {found}, expected a string")
    record[key] = value
  return record


def _first_byte(path: FilePath) -> bytes:
  with open_binary(path) as f:
    while chunk := f.read(4096):
      stripped = chunk.lstrip(b" \t\r\n")
      if stripped.startswith(b"\xef\xbb\xbf"):
        stripped = stripped[3:].lstrip(b" \t\r\n")
      if stripped:
        return stripped[:1]
  return b""


def _iter_json_array(path: FilePath, require_output: bool) -> Iterator[tuple[int, dict, int]]:
  raw = paths.read_bytes(path)
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as err:
    lineno = raw.count(b"\n", 0, err.start) + 1
    line_start = raw.rfind(b"\n", 0, err.start) + 1
    column = len(raw[line_start:err.start].decode("utf-8", errors="replace")) + 1
    raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at "
                     f"column {column}); a JSON array file cannot skip lines, fix the file"
                     ) from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as err:
    raise ValueError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from None
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of examples, found {type(data).__name__}")
  size = max(1, len(raw) // max(1, len(data)))
  for index, obj in enumerate(data):
    yield index, check_record(obj, path, index, require_output=require_output), size


def _iter_jsonl(path: FilePath, skip_bad_lines: bool, stats: MutableMapping[str, int],
                require_output: bool) -> Iterator[tuple[int, dict, int]]:
  index = 0
  for lineno, line, n_bytes in iter_lines(path, skip_bad_lines=skip_bad_lines, stats=stats):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as err:
      if skip_bad_lines:
        _count(stats, "skipped_bad_lines")
        continue
      raise ValueError(f"{path}:{lineno}:{err.colno}: malformed JSON line: {err.msg}; fix the "
                       f"line or pass skip_bad_lines=True") from None
    yield index, check_record(obj, path, index, lineno, require_output=require_output), n_bytes
    index += 1


def iter_instruction_records(path: PathLike, *, skip_bad_lines: bool = False,
                             stats: MutableMapping[str, int] | None = None,
                             require_output: bool = True) -> Iterator[tuple[int, dict, int]]:
  """Yields `(example_index, record, n_bytes)` from an Alpaca JSON or JSONL file.

  A file whose first non-blank character is `[` is one JSON list (Alpaca); anything else is read
  as JSON Lines (one object per line, blank lines ignored). `example_index` counts from 0 within
  the file; `record` is `check_record`'s.
  """
  path = as_path(path)
  stats = {} if stats is None else stats
  if _first_byte(path) == b"[":
    yield from _iter_json_array(path, require_output)
  else:
    yield from _iter_jsonl(path, skip_bad_lines, stats, require_output)


def read_instructions(path: PathLike) -> list[dict[str, str]]:
  """Prompts to answer: `{"instruction", "input", "output"}` records, `output` optional ("").

  A `.txt` file holds one instruction per non-blank line; anything else is an Alpaca `.json`
  list or `.jsonl` file (as `iter_instruction_records`). Errors name file and line or example.
  """
  if os.path.splitext(os.fspath(path))[1] == ".txt":
    return [{"instruction": text, "input": "", "output": ""} for text in iter_documents([path])]
  return [record for _, record, _ in iter_instruction_records(path, require_output=False)]


def total_bytes(files: Iterable[PathLike]) -> int:
  """Sum of file sizes in bytes (for a progress bar)."""
  return sum(paths.size(f) for f in files)
