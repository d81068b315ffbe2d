"""The paper's whole pipeline in one run (`configs/demo.py`): tokenizers -> merge -> stage 0 ->
stage 1 -> stage 2 -> instruction tuning -> a generated answer, each stage starting from the
previous one.

  1. every 20th document of the English and Chinese corpora is held out; a base tokenizer (BPE
     with byte fallback, as LLaMA's) is trained on the rest of the English corpus and a Chinese
     SentencePiece model (unigram, NFKC) on the rest of the Chinese corpus;
  2. the merge (Chinese-LLaMA tokenizer) and the merge with [PAD] (Chinese-Alpaca tokenizer);
  3. stage 0: a tiny base model pre-trained from random init (all weights) on the English text,
     standing in for LLaMA;
  4. stage 1 (embeddings only) and stage 2 (LoRA + embeddings + head) on the Chinese corpus, the
     LoRA merged into the base after stage 2;
  5. instruction tuning on the Chinese instruction data, merged, and an answer generated for a
     Chinese instruction.

`run` prints one progress bar per stage (each stage's own output goes to `<workdir>/<stage>/
log.txt`) and a summary: tokens per character before and after the merge, training and held-out
loss per stage, the generated answer. It writes `demo_summary.json` and `loss.png` to the workdir.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import sys
import time

import jax

from cnllama_jax import build, evaluate, lora as lora_lib, paths, plan as plan_lib
from cnllama_jax import tokenizer as tok_lib, tokenizer_stats, trainer, writers
from cnllama_jax.data import sources, text_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("stage0", "stage1", "stage2", "sft")
HELDOUT_EVERY = 20  # every 20th document (5%) is held out of tokenizer and model training


def resolve(path: str) -> str:
  """A path as given, or relative to the repository when it does not exist as given."""
  if os.path.exists(path) or os.path.isabs(path):
    return path
  return os.path.join(REPO, path)


def split_corpus(path: str, out_dir: str, every: int = HELDOUT_EVERY) -> tuple[str, str]:
  """Writes `out_dir/train/corpus.txt` and `out_dir/heldout.txt` from a text file or directory
  (one document per line): every `every`-th non-empty document is held out.

  Returns (train directory, held-out file).
  """
  docs = list(sources.iter_documents(sources.list_files(resolve(path), sources.TEXT_SUFFIXES)))
  if len(docs) < 2 * every:
    raise ValueError(f"{path}: {len(docs)} documents; the demo needs at least {2 * every} "
                     f"(one line each) to hold out every {every}th")
  train_dir, heldout = os.path.join(out_dir, "train"), os.path.join(out_dir, "heldout.txt")
  os.makedirs(train_dir, exist_ok=True)
  for file, part in ((os.path.join(train_dir, "corpus.txt"),
                      [d for i, d in enumerate(docs) if i % every != every - 1]),
                     (heldout, docs[every - 1::every])):
    paths.write_bytes(file, ("\n".join(part) + "\n").encode("utf-8"))
  return train_dir, heldout


def build_tokenizers(config, workdir: str, english: str, chinese: str, sample: str) -> dict:
  """Trains the base (English) and Chinese models and merges them.

  Returns {'base', 'chinese', 'chinese_llama', 'chinese_alpaca': paths, 'pieces': {name: size},
  'tokens_per_char': {name: tokens per character of `sample` (Chinese held-out text)}}.
  """
  t = config.tokenizers
  base = tok_lib.train_sentencepiece(
      [english], os.path.join(workdir, "base_tokenizer.model"), vocab_size=t.base_vocab_size,
      model_type="bpe", byte_fallback=True, split_digits=True, normalization="identity",
      remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
      hard_vocab_limit=False, progress=False)
  chinese_sp = tok_lib.train_sentencepiece(
      [chinese], os.path.join(workdir, "chinese_sp.model"), vocab_size=t.chinese_vocab_size,
      model_type="unigram", character_coverage=0.9995, hard_vocab_limit=False, progress=False)
  out = {"base": str(base), "chinese": str(chinese_sp)}
  for name, pad in (("chinese_llama", None), ("chinese_alpaca", "[PAD]")):
    directory = os.path.join(workdir, f"{name}_tokenizer")
    if not os.path.isdir(directory):
      tok_lib.merge(base, chinese_sp, directory, pad_piece=pad, new_piece_scores="ordered")
    out[name] = directory
  with open(sample, encoding="utf-8") as f:
    text = f.read()
  out["pieces"], out["tokens_per_char"] = {}, {}
  for name in ("base", "chinese_llama"):
    sp = tok_lib.load_processor(out[name])
    out["pieces"][name] = sp.get_piece_size()
    out["tokens_per_char"][name] = tokenizer_stats.tokenizer_stats(
        sp, text, name=name, min_seconds=0.0).tokens_per_char
  return out


def stage_config(config, name: str, tokenizer: str, data_path: str, base_tokenizer: str = ""):
  """The config of stage `name` with the demo's shared fields (seed, model, mesh) filled in;
  `base_tokenizer` (the stage-0 model's own) is what `vocab.init="subword_mean"` splits new
  pieces with."""
  stage = config[name]
  with stage.unlocked():
    stage.seed = config.seed
    stage.tokenizer = tokenizer
    if base_tokenizer and name != "stage0":
      stage.vocab.base_tokenizer = base_tokenizer
    stage.data.path = data_path
    stage.mesh.shape = config.mesh_shape
    stage.model = config.model
    if name == "stage0":  # a random base with exactly the base tokenizer's vocabulary
      stage.model.vocab_size = plan_lib.tokenizer_size(tokenizer)
  return stage


def trained_params(result: dict) -> tuple:
  """(cfg, params) after a stage with its LoRA merged into the weights."""
  run = result["run"]
  params = lora_lib.combine(run.frozen, result["state"].trainable)
  if run.lora.rank:
    params = lora_lib.merge(params, run.lora)
  params = jax.tree_util.tree_map(lambda x: x.astype(run.cfg.param_dtype), params)
  return run.cfg, params


def start_params(stage, base) -> tuple:
  """(cfg, params) a stage starts from, as its build makes them: `base` (or a random init)
  resized to the stage's tokenizer with its `vocab.init` (fresh adapters, being zero, merged)."""
  stage_plan = plan_lib.plan(stage, base_cfg=None if base is None else base[0])
  params = build.load_params(stage_plan, base)
  return stage_plan.cfg, (lora_lib.merge(params, stage_plan.lora) if stage_plan.lora.rank
                          else params)


def heldout_loss(stage, cfg, params, text_path: str) -> float:
  """Mean next-token loss (nats) of held-out documents under the stage's tokenizer; `params`
  hold no adapters."""
  result = evaluate.perplexity(cfg, params, text_tokenizer.load(stage.tokenizer), text_path,
                               block_size=stage.train.seq_len,
                               batch_size=stage.train.global_batch_size)
  return result["nll"]


class StageConsole(io.TextIOBase):
  """Stand-in for a stage's stdout/stderr: every line goes to the stage's log file, and the
  trainer's `step N/T loss X` lines move a progress bar."""

  STEP = re.compile(r"step (\d+)/\d+ loss (\S+)")

  def __init__(self, log, bar):
    super().__init__()
    self.log, self.bar, self.pending = log, bar, ""

  def writable(self) -> bool:
    return True

  def write(self, text: str) -> int:
    self.log.write(text)
    self.pending += text
    *lines, self.pending = re.split(r"[\r\n]", self.pending)
    for line in lines:
      match = self.STEP.match(line)
      if match:
        self.bar.update(int(match[1]) - self.bar.n)
        self.bar.set_postfix_str(f"loss {float(match[2]):.3f}")
    return len(text)

  def flush(self) -> None:
    self.log.flush()


@contextlib.contextmanager
def stage_console(name: str, description: str, steps: int, log_path: str, out):
  """Redirects the stage's printed output to `log_path` and shows one progress bar on `out`."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  with open(log_path, "a", encoding="utf-8") as log, tqdm(
      total=steps, desc=f"{name:<6} {description:<26}", file=out, ncols=100, mininterval=1.0,
      bar_format="{desc} {bar:20} {n_fmt:>4}/{total_fmt} [{elapsed}{postfix}]") as bar:
    console = StageConsole(log, bar)
    with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
      yield


def run(config, workdir: str, verbose: bool = False, out=None) -> dict:
  """Runs the whole pipeline; prints progress and the summary to `out` (default stdout).

  verbose: the stages print their own logs instead of a progress bar each.
  Returns the summary (also in `<workdir>/demo_summary.json`).
  """
  out = out or sys.stdout
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  english, english_heldout = split_corpus(config.english_text, os.path.join(workdir, "english"))
  chinese, chinese_heldout = split_corpus(config.chinese_text, os.path.join(workdir, "chinese"))
  print("tokenizers: base BPE on English, Chinese unigram, merged ...", file=out, flush=True)
  tokenizers = build_tokenizers(config, workdir, english, chinese, chinese_heldout)
  plan = {"stage0": (tokenizers["base"], english, english_heldout),
          "stage1": (tokenizers["chinese_llama"], chinese, chinese_heldout),
          "stage2": (tokenizers["chinese_llama"], chinese, chinese_heldout),
          "sft": (tokenizers["chinese_alpaca"], resolve(config.instructions), None)}
  stages, base = {}, None
  for name in STAGES:
    tokenizer, data_path, heldout = plan[name]
    stage = stage_config(config, name, tokenizer, data_path, tokenizers["base"])
    stage_dir = os.path.join(workdir, name)
    os.makedirs(stage_dir, exist_ok=True)
    stage_start = time.perf_counter()
    before = None
    init = "random" if base is None else (  # how the stage's new embedding rows start
        stage.vocab.init if plan_lib.tokenizer_size(tokenizer) != base[0].vocab_size else "-")
    if heldout:
      before = heldout_loss(stage, *start_params(stage, base), heldout)
    description = (f"{stage.train.trainable} ({'English' if name == 'stage0' else 'Chinese'})")
    if verbose:
      print(f"== {name}: {description}", file=out, flush=True)
    console = (contextlib.nullcontext() if verbose else
               stage_console(name, description, stage.train.steps,
                             os.path.join(stage_dir, "log.txt"), out))
    with console:
      result = trainer.train(stage, stage_dir, base=base, writers=writers.for_run(
          stage_dir, stage.train.steps, progress=False))
    base = trained_params(result)
    stages[name] = {
        "trainable": stage.train.trainable, "steps": stage.train.steps,
        "vocab_init": init,
        "history": [(h["step"], h["loss"]) for h in result["history"]],
        "heldout_before": before,
        "heldout_after": heldout_loss(stage, *base, heldout) if heldout else None,
        "eval_loss": result["eval"].get("eval_loss"),
        "seconds": time.perf_counter() - stage_start}
  answer = _answer(config, base, tokenizers["chinese_alpaca"])
  summary = {"pieces": tokenizers["pieces"], "tokens_per_char": tokenizers["tokens_per_char"],
             "stages": stages, "instruction": config.generate.instruction, "answer": answer,
             "plot": plot_losses(stages, os.path.join(workdir, "loss.png")),
             "seconds": time.perf_counter() - start}
  paths.write_bytes(os.path.join(workdir, "demo_summary.json"), json.dumps(
      summary, ensure_ascii=False, indent=1).encode("utf-8"))
  print(format_summary(summary), file=out, flush=True)
  return summary


def _arrow(before, after) -> str:
  if before is None or after is None:
    return "-"
  return f"{before:.2f} -> {after:.2f}"


def format_summary(summary: dict) -> str:
  """The demo's closing table as text (one line per tokenizer and per stage)."""
  pieces, tpc = summary["pieces"], summary["tokens_per_char"]
  lines = ["", "tokenizer        pieces  tokens/char (held-out Chinese)"]
  for name in ("base", "chinese_llama"):
    lines.append(f"{name:<15}{pieces[name]:>8}  {tpc[name]:.3f}")
  lines.append(f"merge: {tpc['base'] / tpc['chinese_llama']:.2f}x fewer tokens per character")
  lines += ["", f"{'stage':<7}{'trains':<17}{'init':<8}{'steps':>5}  {'train loss':<15}"
                f"{'held-out loss':<15}{'ppl':>8}"]
  for name, s in summary["stages"].items():
    first, last = (s["history"][0][1], s["history"][-1][1]) if s["history"] else (None, None)
    after = s["heldout_after"] if s["heldout_after"] is not None else s["eval_loss"]
    ppl = f"{math.exp(min(after, 50.0)):.1f}" if after is not None else "-"
    held = _arrow(s["heldout_before"], s["heldout_after"]) if s["heldout_before"] is not None \
        else (f"{after:.2f} (val)" if after is not None else "-")
    lines.append(f"{name:<7}{s['trainable']:<17}{s['vocab_init']:<8}{s['steps']:>5}  "
                 f"{_arrow(first, last):<15}{held:<15}{ppl:>8}")
  lines += ["(stage0 held-out: English; stage1/2: Chinese, step 0 -> end; sft: validation split;"
            " train loss: first -> last logged step)", "",
            f"instruction: {summary['instruction']}", f"answer: {summary['answer']}", "",
            f"loss plot: {summary['plot']}",
            f"demo finished in {summary['seconds']:.0f} s"]
  return "\n".join(lines)


def plot_losses(stages: dict, png_path: str) -> str:
  """Training loss of every stage against the pipeline's cumulative step (Agg canvas, no pyplot
  state), held-out losses as markers; returns the PNG's path."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(8, 4))
  ax = fig.subplots()
  offset = 0
  for i, (name, s) in enumerate(stages.items()):
    color = f"C{i}"
    if s["history"]:
      steps, losses = zip(*s["history"])
      ax.plot([offset + x for x in steps], losses, color=color, label=f"{name} ({s['trainable']})")
    end = s["heldout_after"] if s["heldout_after"] is not None else s["eval_loss"]
    for x, value in ((0, s["heldout_before"]), (s["steps"], end)):
      if value is not None:
        ax.plot(offset + x, value, "o", color=color, markerfacecolor="none")
    offset += s["steps"]
    ax.axvline(offset, color="0.85", linewidth=0.8)
  ax.set_xlabel("step (stages one after another)")
  ax.set_ylabel("loss (nats per token)")
  ax.set_title("demo: training loss per stage; circles: held-out loss (sft: validation)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  paths.write_bytes(png_path, buffer.getvalue())
  return str(png_path)


def _answer(config, base, tokenizer_dir: str) -> str:
  """An answer to the demo instruction in the Alpaca template (the paper's sampling defaults:
  top-k 40, top-p 0.9, with the config's temperature and repetition penalty)."""
  from cnllama_jax import generate  # pylint: disable=import-outside-toplevel
  from cnllama_jax.data import build_prompt  # pylint: disable=import-outside-toplevel
  cfg, params = base
  sp = text_tokenizer.load(tokenizer_dir)  # its tokenizer.model (or a BPE's tokenizer.json)
  prompt = [sp.bos_id()] + sp.encode(build_prompt(config.generate.instruction))
  out = generate.generate(cfg, params, [prompt], max_new_tokens=config.generate.max_new_tokens,
                          temperature=config.generate.temperature,
                          eos_id=generate.tokenizer_stop_ids(cfg, sp.eos_id()),
                          repetition_penalty=config.generate.repetition_penalty,
                          rng=jax.random.key(config.seed))
  return sp.decode(out[0])
