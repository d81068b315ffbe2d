"""Regenerates the README's per-chip TPU memory table from the code (`cnllama_jax.aot`), cell by
cell: 7B / 13B / 33B x stage 1 / stage 2 / SFT (the paper's settings, `configs/<stage>.py:<size>`)
x v5e-16 / v4-32 / v5p-64, each compiled by libtpu on this CPU machine with the smallest gradient
accumulation (doubling from 1) that fits (`aot.fit_accumulation`).

    python bench/aot_table.py                              # every missing cell, then the table
    python bench/aot_table.py --cells '13b:sft:v4-32,7b:*:v5e-16'  # some cells (`*`: any)
    python bench/aot_table.py --table_only --write_readme  # no compiling: README from the JSON

A cell takes seconds to many minutes to compile, so the script is resumable: every finished cell is
stored at once in bench/aot_table.json (beside this file) with the commit, the code it was made
from (git blob hashes of the cnllama_jax modules `aot` imports and of configs/; jax and libtpu
versions) and the compiler's figures, and is skipped on a rerun while that code is unchanged.
The table shows only cells made from the current code; the others say "not regenerated".
`--write_readme` replaces the table between the README's `<!-- aot_table:begin -->` and
`<!-- aot_table:end -->` markers.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODELS = ("7b", "13b", "33b")
STAGES = ("pretrain_stage1", "pretrain_stage2", "sft")
TOPOLOGIES = ("v5e-16", "v4-32", "v5p-64")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_table.json")
BEGIN, END = "<!-- aot_table:begin -->", "<!-- aot_table:end -->"
NOT_REGENERATED = "not regenerated"


def _git(*args: str) -> str:
  return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                        check=True).stdout.strip()


def code_version() -> dict:
  """What a cell's figures are a function of: the files of the cnllama_jax modules that `aot`
  imports and of configs/ (their git blob hashes; None while any has uncommitted changes), jax and
  libtpu; plus the commit, for the reader."""
  from cnllama_jax import aot, run_config  # noqa: F401  pylint: disable=import-outside-toplevel
  modules = [m for name, m in list(sys.modules.items()) if name.split(".")[0] == "cnllama_jax"]
  files = sorted(os.path.relpath(m.__file__, REPO) for m in modules if getattr(m, "__file__", None))
  files += sorted(f"configs/{n}" for n in os.listdir(os.path.join(REPO, "configs"))
                  if n.endswith(".py"))
  dirty = bool(_git("status", "--porcelain", "--", *files))
  blobs = _git("rev-parse", *[f"HEAD:{f}" for f in files]).split()
  code = hashlib.sha1("".join(f"{f} {b}\n" for f, b in zip(files, blobs)).encode()).hexdigest()
  return {"commit": _git("rev-parse", "--short=12", "HEAD") + ("-dirty" if dirty else ""),
          "code": None if dirty else code[:12],
          "jax": importlib.metadata.version("jax"), "libtpu": importlib.metadata.version("libtpu")}


def is_current(cell: dict, version: dict) -> bool:
  return version["code"] is not None and all(
      cell.get(k) == version[k] for k in ("code", "jax", "libtpu"))


def load_results(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def save_results(path: str, results: dict) -> None:
  """Written to a temporary file and renamed: an interrupted run loses at most the cell at hand."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".aot_table.", suffix=".json")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def stage_config(stage: str, model: str):
  """`configs/<stage>.py:<model>`, as `launch/aot_compile.py --config=` loads it."""
  spec = importlib.util.spec_from_file_location(f"aot_table_{stage}",
                                                os.path.join(REPO, "configs", f"{stage}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(model)


def compile_cell(model: str, stage: str, topology: str) -> dict:
  """Compiles one cell (smallest accumulation that fits) and returns its stored record."""
  from cnllama_jax import aot  # pylint: disable=import-outside-toplevel
  attempts = []
  start = time.perf_counter()
  report = aot.fit_accumulation(stage_config(stage, model), topology,
                                on_report=lambda r: attempts.append(r))
  gib = lambda b: round(b / aot.GiB, 2)  # noqa: E731
  rejected = [{"micro_batches": r.micro_batches,
               "why": r.oom or f"{gib(r.total_bytes)} GiB > {gib(r.hbm_bytes)} GiB"}
              for r in attempts if not r.fits]
  return {"micro_batches": report.micro_batches, "fits": report.fits,
          "total_gib": gib(report.total_bytes), "argument_gib": gib(report.argument_bytes),
          "temp_gib": gib(report.temp_bytes), "output_gib": gib(report.output_bytes),
          "hbm_gib": gib(report.hbm_bytes), "oom": report.oom, "rejected": rejected,
          "compile_seconds": round(time.perf_counter() - start, 1),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def format_cell(cell: dict | None, version: dict) -> str:
  """The figure of a cell made from the current code; a cell made from other code is marked
  "not regenerated" with its old figure and commit (never shown as current)."""
  if cell is None:
    return NOT_REGENERATED
  if cell["oom"] or not cell["fits"]:
    figure = f"does not fit (accum {cell['micro_batches']})"
  else:
    figure = f"{cell['total_gib']:.2f} GiB, accum {cell['micro_batches']}, fits"
  if is_current(cell, version):
    return figure
  return f"{NOT_REGENERATED} (was {figure.replace(', fits', '')} at {cell['commit'][:8]})"


def table(results: dict, version: dict) -> str:
  """The markdown table and the line saying what made it."""
  lines = ["| model | stage | " + " | ".join(TOPOLOGIES) + " |",
           "|---|---|" + "---|" * len(TOPOLOGIES)]
  for model in MODELS:
    for stage in STAGES:
      cells = [format_cell(results.get(key(model, stage, t)), version) for t in TOPOLOGIES]
      lines.append(f"| {model.upper()} | {stage} | " + " | ".join(cells) + " |")
  current = [k for k, c in results.items() if is_current(c, version)]
  commits = sorted({results[k]["commit"] for k in current})
  lines += ["", f"Made by `python bench/aot_table.py` at commit {version['commit']} (jax "
                f"{version['jax']}, libtpu {version['libtpu']}): {len(current)} of "
                f"{len(MODELS) * len(STAGES) * len(TOPOLOGIES)} cells compiled from this code"
                + (f" (at {', '.join(commits)})" if commits else "")
                + f"; \"{NOT_REGENERATED}\": no figure from it yet (an older one, where stored, "
                "with the commit it was made at). Per-cell figures, compile times and rejected "
                "accumulations: `bench/aot_table.json`."]
  return "\n".join(lines)


def key(model: str, stage: str, topology: str) -> str:
  return f"{model}:{stage}:{topology}"


def selected(patterns: str) -> list[str]:
  """Cell keys matching comma-separated `model:stage:topology` patterns (`*` wildcards)."""
  keys = [key(m, s, t) for m in MODELS for s in STAGES for t in TOPOLOGIES]
  chosen = [k for k in keys if any(fnmatch.fnmatchcase(k, p.strip()) for p in patterns.split(","))]
  if not chosen:
    raise SystemExit(f"error: --cells {patterns!r} matches no cell; expected model:stage:topology "
                     f"patterns over {MODELS} x {STAGES} x {TOPOLOGIES}")
  return chosen


def write_readme(path: str, text: str) -> None:
  with open(path, encoding="utf-8") as f:
    readme = f.read()
  if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
    raise SystemExit(f"error: {path}: expected one {BEGIN} line before one {END} line")
  head, rest = readme.split(BEGIN)
  tail = rest.split(END)[1]
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")
  os.replace(path + ".tmp", path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cells", default="*",
                      help="model:stage:topology patterns, e.g. 7b:*:v5e-16")
  parser.add_argument("--results", default=RESULTS, help="the JSON file of finished cells")
  parser.add_argument("--table_only", action="store_true", help="compile nothing")
  parser.add_argument("--write_readme", action="store_true",
                      help="replace the README table between its markers")
  parser.add_argument("--readme", default=os.path.join(REPO, "README.md"))
  args = parser.parse_args(argv)
  version = code_version()
  results = load_results(args.results)
  if not args.table_only:
    if version["code"] is None:
      print("warning: the code aot imports (or configs/) has uncommitted changes: cells made now "
            "are stored but never shown as current; commit first", file=sys.stderr)
    todo = [k for k in selected(args.cells)
            if not (k in results and is_current(results[k], version))]
    print(f"{len(todo)} cell(s) to compile: {', '.join(todo) or '-'}", flush=True)
    for number, cell_key in enumerate(todo, 1):
      print(f"[{number}/{len(todo)}] {cell_key} ...", flush=True)
      record = compile_cell(*cell_key.split(":"))
      results[cell_key] = {**record, **version}
      save_results(args.results, results)
      print(f"[{number}/{len(todo)}] {cell_key}: {format_cell(results[cell_key], version)} "
            f"({record['compile_seconds']:.0f} s)", flush=True)
  text = table(results, version)
  print(text)
  if args.write_readme:
    write_readme(args.readme, text)
    print(f"wrote the table into {args.readme}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
