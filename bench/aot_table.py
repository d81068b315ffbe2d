"""Regenerates the README's per-chip TPU memory table from the code (`cnllama_jax.aot`), cell by
cell: 7B / 13B / 33B x stage 1 / stage 2 / SFT (the paper's settings, `configs/<stage>.py:<size>`)
x v5e-16 / v4-32 / v5p-64, each compiled by libtpu on this CPU machine with the smallest gradient
accumulation (doubling from 1) that fits (`aot.fit_accumulation`).

    python bench/aot_table.py                              # every missing cell, then the table
    python bench/aot_table.py --cells '13b:sft:v4-32,7b:*:v5e-16'  # some cells (`*`: any)
    python bench/aot_table.py --table_only --write_readme  # no compiling: README from the JSON
    python bench/aot_table.py --cells '7b:pretrain_stage2:v5e-16:4096:*'  # long-context cells

Long context (issue 14): 7B stage 2 at sequence 4,096 and 16,384 x `model.attention` auto (splash
on a TPU mesh) / xla x v5e-16 / v5p-64, keys `model:stage:topology:seq:attention` (a pattern
matches them only when it has five parts, so `*` stays the paper's 27 cells). Same global batch
(1024 rows), `model.lm_head_chunk=512`; the accumulation search starts where a micro-batch holds
16,384 tokens per chip (what the 512-token cells fit with) instead of at 1, because every refused
try is a full compile. Their table (between `<!-- aot_long:begin -->` and `<!-- aot_long:end -->`)
shows every stored figure with the commit it was made at, marked when the code has changed since.

A cell takes seconds to many minutes to compile, so the script is resumable: every finished cell is
stored at once in bench/aot_table.json (beside this file) with the commit, the code it was made
from (git blob hashes of the cnllama_jax modules `aot` imports and of configs/; jax and libtpu
versions), the hash of the program it compiled (`aot.program_hash`: StableHLO without source
locations) and the compiler's figures. A rerun skips a cell while that code is unchanged; when the
files changed, it lowers the cell again (seconds) and keeps the cell, marked verified at the
current commit, if the program is the same (a change that never reaches the TPU program, e.g. to
data loading or the CPU attention kernel, costs no compile).
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
LONG_MODEL, LONG_STAGE = "7b", "pretrain_stage2"
LONG_SEQS = (4096, 16384)
LONG_ATTENTION = ("auto", "xla")
LONG_TOPOLOGIES = ("v5e-16", "v5p-64")
LONG_HEAD_CHUNK = 512  # model.lm_head_chunk: no [tokens, vocab] fp32 logits at long lengths
TOKENS_PER_CHIP = 16384  # per micro-batch where the accumulation search starts (512 cells fit it)
LONG_BEGIN, LONG_END = "<!-- aot_long:begin -->", "<!-- aot_long:end -->"
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


def long_overrides(config, topology: str, seq: int, attention: str) -> dict:
  """The long-context cell's settings on top of `config`: length, attention, chunked head and the
  first micro-batch count tried (a micro-batch of TOKENS_PER_CHIP tokens per chip)."""
  from cnllama_jax import aot  # pylint: disable=import-outside-toplevel
  chips = aot.topology_description(topology)[2]
  rows = config.train.global_batch_size
  return {"seq_len": seq, "attention": attention, "lm_head_chunk": LONG_HEAD_CHUNK,
          "first_micro_batches": max(1, rows * seq // (chips * TOKENS_PER_CHIP))}


def cell_config(model: str, stage: str, topology: str, seq: str | None = None,
                attention: str | None = None):
  """(config, extra record fields) of a cell before the accumulation search."""
  config = stage_config(stage, model)
  extra = {}
  if seq is not None:
    extra = long_overrides(config, topology, int(seq), attention)
    with config.unlocked():
      config.train.seq_len = extra["seq_len"]
      config.train.micro_batches = extra["first_micro_batches"]
      config.model.attention, config.model.lm_head_chunk = attention, LONG_HEAD_CHUNK
  return config, extra


def program_hash(cell_key: str, micro_batches: int) -> str:
  """aot.program_hash of a cell's train step at `micro_batches`, lowered from the current code
  (seconds; nothing is compiled)."""
  from cnllama_jax import aot  # pylint: disable=import-outside-toplevel
  model, stage, topology, *long = cell_key.split(":")
  config, _ = cell_config(model, stage, topology, *long)
  with config.unlocked():
    config.train.micro_batches = micro_batches
  return aot.program_hash(aot.lower_for(config, topology)[1])


def reverify(cell_key: str, cell: dict | None, version: dict) -> bool:
  """True when a finished cell made from other source files still stands: same jax and libtpu,
  and the current code lowers its train step (at its accumulation) to the very program it
  compiled. Then the cell is marked current (`code`, and `verified_at` the commit)."""
  if (not is_done(cell) or not cell.get("program_hash") or version["code"] is None
      or any(cell.get(k) != version[k] for k in ("jax", "libtpu"))):
    return False
  if program_hash(cell_key, cell["micro_batches"]) != cell["program_hash"]:
    return False
  cell.update(code=version["code"], verified_at=version["commit"])
  return True


def compile_cell(model: str, stage: str, topology: str, seq: str | None = None,
                 attention: str | None = None) -> dict:
  """Compiles one cell (smallest accumulation that fits, doubling from the config's or, for a
  long-context cell, from `long_overrides`) and returns its stored record."""
  from cnllama_jax import aot  # pylint: disable=import-outside-toplevel
  attempts = []
  config, extra = cell_config(model, stage, topology, seq, attention)
  start = time.perf_counter()
  ends = []  # when each try's compile ended

  def on_report(r):
    attempts.append(r)
    ends.append(time.perf_counter())
    print(f"  micro_batches={r.micro_batches}: {'fits' if r.fits else 'refused'} after "
          f"{ends[-1] - start:.0f} s", flush=True)
  report = aot.fit_accumulation(config, topology, on_report=on_report)
  gib = lambda b: round(b / aot.GiB, 2)  # noqa: E731
  seconds = [round(b - a, 1) for a, b in zip([start] + ends, ends)]
  rejected = [{"micro_batches": r.micro_batches, "seconds": t,
               "why": r.oom or f"{gib(r.total_bytes)} GiB > {gib(r.hbm_bytes)} GiB"}
              for r, t in zip(attempts, seconds) if not r.fits]
  return {"micro_batches": report.micro_batches, "fits": report.fits,
          "program_hash": report.program_hash,
          "total_gib": gib(report.total_bytes), "argument_gib": gib(report.argument_bytes),
          "temp_gib": gib(report.temp_bytes), "output_gib": gib(report.output_bytes),
          "hbm_gib": gib(report.hbm_bytes), "oom": report.oom, "rejected": rejected,
          "compile_seconds": round(time.perf_counter() - start, 1), **extra,
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def _figure(cell: dict) -> str:
  """'9.65 GiB, accum 16, fits', or 'does not fit at accum 64 (<what the compiler said>)'."""
  if not cell["oom"] and cell["fits"]:
    return f"{cell['total_gib']:.2f} GiB, accum {cell['micro_batches']}, fits"
  figure = f"does not fit at accum {cell['micro_batches']}"
  if cell["oom"]:
    figure += f" ({cell['oom'].replace('Ran out of memory on HBM, the ', '')})"
  return figure


def format_cell(cell: dict | None, version: dict) -> str:
  """The figure of a cell made from the current code; a cell made from other code is marked
  "not regenerated" with its old figure and commit (never shown as current)."""
  if cell is None:
    return NOT_REGENERATED
  figure = _figure(cell)
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
  current = [k for k, c in results.items()
             if k.count(":") == 2 and is_done(c) and is_current(c, version)]
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


def long_key(topology: str, seq: int, attention: str) -> str:
  return f"{LONG_MODEL}:{LONG_STAGE}:{topology}:{seq}:{attention}"


def all_keys() -> list[str]:
  """The paper's cells (three-part keys), then the long-context ones (five parts)."""
  return ([key(m, s, t) for m in MODELS for s in STAGES for t in TOPOLOGIES]
          + [long_key(t, n, a) for n in LONG_SEQS for a in LONG_ATTENTION for t in LONG_TOPOLOGIES])


def selected(patterns: str) -> list[str]:
  """Cell keys matching comma-separated `model:stage:topology` patterns, or for long-context
  cells `model:stage:topology:seq:attention` ones (`*` wildcards; a pattern only matches keys
  with five parts only when it has five)."""
  chosen = [k for k in all_keys()
            if any((p.count(":") == 4) == (k.count(":") == 4) and fnmatch.fnmatchcase(k, p.strip())
                   for p in patterns.split(","))]
  if not chosen:
    raise SystemExit(f"error: --cells {patterns!r} matches no cell; expected model:stage:topology "
                     f"patterns over {MODELS} x {STAGES} x {TOPOLOGIES}, or "
                     f"{LONG_MODEL}:{LONG_STAGE}:topology:seq:attention over {LONG_TOPOLOGIES} x "
                     f"{LONG_SEQS} x {LONG_ATTENTION}")
  return chosen


def is_done(cell: dict | None) -> bool:
  """A stored compile result (not just the marker of a compile that started)."""
  return cell is not None and "total_gib" in cell


def format_long_cell(cell: dict | None, version: dict) -> str:
  """A long-context figure always with its commit (and compile time); marked when the code has
  changed since; a compile that started and stored nothing says so."""
  if cell is None:
    return "not compiled"
  if not is_done(cell):
    return (f"not compiled: started {cell['started']} at {cell['commit'][:8]}, no result "
            "(stopped or still running)")
  figure = _figure(cell)
  note = "" if is_current(cell, version) else ", code changed since"
  seconds = cell["compile_seconds"]
  took = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
  return f"{figure} [{took}, {cell['commit'][:8]}{note}]"


def long_table(results: dict, version: dict) -> str:
  """The long-context markdown table (7B stage 2) and the line saying what made it."""
  lines = ["| sequence | attention | " + " | ".join(LONG_TOPOLOGIES) + " |",
           "|---|---|" + "---|" * len(LONG_TOPOLOGIES)]
  for seq in LONG_SEQS:
    for attention in LONG_ATTENTION:
      cells = [format_long_cell(results.get(long_key(t, seq, attention)), version)
               for t in LONG_TOPOLOGIES]
      lines.append(f"| {seq:,} | {attention} | " + " | ".join(cells) + " |")
  lines += ["", f"Made by `python bench/aot_table.py --cells '{LONG_MODEL}:{LONG_STAGE}:*:*:*'` "
                f"(table at commit {version['commit']}; jax {version['jax']}, libtpu "
                f"{version['libtpu']}). In brackets: wall time of the cell's compiles on a "
                "shared 2-core machine and the commit it was compiled at. Per-cell figures and "
                "refused accumulations: `bench/aot_table.json`."]
  return "\n".join(lines)


def write_readme(path: str, text: str, begin: str = BEGIN, end: str = END) -> None:
  with open(path, encoding="utf-8") as f:
    readme = f.read()
  if readme.count(begin) != 1 or readme.count(end) != 1 or readme.index(begin) > readme.index(end):
    raise SystemExit(f"error: {path}: expected one {begin} line before one {end} line")
  head, rest = readme.split(begin)
  tail = rest.split(end)[1]
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(f"{head}{begin}\n{text}\n{end}{tail}")
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
            if not (is_done(results.get(k)) and is_current(results[k], version))]
    still = [k for k in todo if reverify(k, results.get(k), version)]  # same program: no compile
    if still:
      save_results(args.results, results)
      print(f"{len(still)} cell(s) lower to the program they compiled: {', '.join(still)}")
    todo = [k for k in todo if k not in still]
    print(f"{len(todo)} cell(s) to compile: {', '.join(todo) or '-'}", flush=True)
    for number, cell_key in enumerate(todo, 1):
      print(f"[{number}/{len(todo)}] {cell_key} ...", flush=True)
      if cell_key.count(":") == 4 and not is_done(results.get(cell_key)):
        # a marker, so an interrupted long compile shows in the table instead of vanishing
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        results[cell_key] = {"started": started, **version}
        save_results(args.results, results)
      record = compile_cell(*cell_key.split(":"))
      results[cell_key] = {**record, **version}
      save_results(args.results, results)
      shown = (format_long_cell if cell_key.count(":") == 4 else format_cell)(results[cell_key],
                                                                              version)
      print(f"[{number}/{len(todo)}] {cell_key}: {shown} ({record['compile_seconds']:.0f} s)",
            flush=True)
  text, long_text = table(results, version), long_table(results, version)
  print(text + "\n\n" + long_text)
  if args.write_readme:
    write_readme(args.readme, text)
    if LONG_BEGIN in open(args.readme, encoding="utf-8").read():
      write_readme(args.readme, long_text, LONG_BEGIN, LONG_END)
    print(f"wrote the table(s) into {args.readme}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
