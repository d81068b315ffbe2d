"""What every command-line entry point in `launch/` shares: known errors become one line.

A problem with the input or the environment (a missing file, a bad value, a full disk) is printed
as `error: <one line>` on stderr with exit status 1, never as a traceback.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Callable


def one_line(err: BaseException, *, storage: bool = False) -> str:
  """The error's message on one line (a KeyError's key without its quotes).

  storage: for a storage failure (Orbax / TensorStore), lead with the OS error it names ("No space
  left on device (errno 28): ...") and keep a long message to ~300 characters (start and end).
  """
  text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
  text = " ".join(str(text).split()) or type(err).__name__
  if not storage:
    return text
  code = re.search(r"os_error_code='(\d+)'", text)
  if code:
    text = f"{os.strerror(int(code.group(1)))} (errno {code.group(1)}): {text}"
  return text if len(text) <= 300 else text[:250] + " ... " + text[-45:]


def fail(message: str) -> None:
  """Prints `error: message` to stderr and exits 1."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def run_reporting_errors(run: Callable[[Any], Any], args: Any,
                         errors: tuple[type[BaseException], ...] = (ValueError, OSError,
                                                                    RuntimeError)) -> int:
  """Runs `run(args)` with INFO logging; returns 0, or 1 after printing a known error."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  try:
    run(args)
  except errors as err:
    print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
    return 1
  return 0
