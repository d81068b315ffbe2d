"""The paper's whole pipeline in one run (`configs/demo.py`): tokenizers -> merge -> stage 1 ->
stage 2 -> instruction tuning -> a generated answer, each stage starting from the previous one.

  1. a base tokenizer (BPE with byte fallback, as LLaMA's) trained on English text available
     offline (the docstrings of Python's standard library), and a Chinese SentencePiece model
     (unigram, NFKC) trained on the Chinese corpus;
  2. the merge (Chinese-LLaMA tokenizer) and the merge with [PAD] (Chinese-Alpaca tokenizer), and
     tokens per character on Chinese text before and after;
  3. a tiny random base model with the base vocabulary;
  4. stage 1 (embeddings only) and stage 2 (LoRA + embeddings + head) on the Chinese corpus, the
     LoRA merged into the base after stage 2;
  5. instruction tuning on the Chinese instruction data, merged, and an answer generated for a
     Chinese instruction.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import time

import jax

from cnllama_jax import lora as lora_lib, tokenizer as tok_lib, tokenizer_stats, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve(path: str) -> str:
  """A path as given, or relative to the repository when it does not exist as given."""
  if os.path.exists(path) or os.path.isabs(path):
    return path
  return os.path.join(REPO, path)


def stdlib_english(out_path: str, max_chars: int = 400_000) -> str:
  """Writes English prose from the docstrings of Python's standard library (always offline)."""
  paragraphs, total = [], 0
  names = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder is not None
                 and "site-packages" not in str(getattr(m.module_finder, "path", "")))
  for name in names:
    if name.startswith(("_", "test", "idlelib", "tkinter", "turtle", "antigravity", "this")):
      continue
    try:
      module = importlib.import_module(name)
    except Exception:  # pylint: disable=broad-except  # some stdlib modules need a display etc.
      continue
    for obj in [module] + [v for _, v in sorted(vars(module).items()) if inspect.isclass(v)
                           or inspect.isfunction(v)]:
      for block in (inspect.getdoc(obj) or "").split("\n\n"):
        text = " ".join(block.split())
        if len(text) > 60 and text[0].isalpha() and ">>>" not in text:
          paragraphs.append(text)
          total += len(text)
    if total >= max_chars:
      break
  with open(out_path, "w", encoding="utf-8") as f:
    f.write("\n".join(dict.fromkeys(paragraphs)) + "\n")
  return out_path


def build_tokenizers(config, workdir: str) -> dict:
  """Trains the base and Chinese models, merges them, and prints the efficiency gain."""
  t = config.tokenizers
  english = t.english_text or stdlib_english(os.path.join(workdir, "english.txt"))
  base = tok_lib.train_sentencepiece(
      [resolve(english)], os.path.join(workdir, "base_tokenizer.model"), vocab_size=t.base_vocab_size,
      model_type="bpe", byte_fallback=True, split_digits=True, normalization="identity",
      character_coverage=1.0, hard_vocab_limit=False, progress=False)
  chinese = tok_lib.train_sentencepiece(
      [resolve(config.chinese_text)], os.path.join(workdir, "chinese_sp.model"),
      vocab_size=t.chinese_vocab_size, model_type="unigram", character_coverage=0.9995,
      hard_vocab_limit=False, progress=False)
  out = {"base": str(base), "chinese": str(chinese)}
  for name, pad in (("chinese_llama", None), ("chinese_alpaca", "[PAD]")):
    directory = os.path.join(workdir, f"{name}_tokenizer")
    if not os.path.isdir(directory):
      tok_lib.merge(base, chinese, directory, pad_piece=pad, new_piece_scores="ordered")
    out[name] = directory
  sample = _sample_text(resolve(config.chinese_text))
  rows = [tokenizer_stats.tokenizer_stats(tok_lib.load_processor(path), sample, name=name)
          for name, path in (("base", out["base"]), ("chinese_llama", out["chinese_llama"]))]
  print(tokenizer_stats.format_stats_table(rows), flush=True)
  before, after = rows[0].tokens_per_char, rows[1].tokens_per_char
  print(f"tokens per character on Chinese text: {before:.3f} -> {after:.3f} "
        f"({before / after:.2f}x fewer tokens)", flush=True)
  return out


def _sample_text(path: str, max_chars: int = 20_000) -> str:
  files = sorted(os.path.join(path, f) for f in os.listdir(path)) if os.path.isdir(path) else [path]
  text = ""
  for file in files:
    with open(file, encoding="utf-8") as f:
      text += f.read()
    if len(text) >= max_chars:
      break
  return text[:max_chars]


def _stage_config(config, name: str, tokenizer: str, data_path: str):
  stage = config[name]
  with stage.unlocked():
    stage.seed = config.seed
    stage.tokenizer = tokenizer
    stage.data.path = resolve(data_path)
    stage.mesh.shape = config.mesh_shape
    stage.model = config.model
  return stage


def _trained_params(result: dict) -> tuple:
  """(cfg, params) after a stage with its LoRA merged into the weights."""
  run = result["run"]
  params = lora_lib.combine(run.state.frozen, run.state.trainable)
  if run.lora.rank:
    params = lora_lib.merge(params, run.lora)
  params = jax.tree_util.tree_map(lambda x: x.astype(run.cfg.param_dtype), params)
  return run.cfg, params


def run(config, workdir: str) -> dict:
  """Runs the whole pipeline; returns the stages' histories and the generated answer."""
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  print("== tokenizers: train base (English) and Chinese models, merge", flush=True)
  tokenizers = build_tokenizers(config, workdir)
  histories, base = {}, None
  for name, tokenizer, data_path in (
      ("stage1", tokenizers["chinese_llama"], config.chinese_text),
      ("stage2", tokenizers["chinese_llama"], config.chinese_text),
      ("sft", tokenizers["chinese_alpaca"], config.instructions)):
    print(f"== {name}: trainable={config[name].train.trainable}", flush=True)
    stage = _stage_config(config, name, tokenizer, data_path)
    result = trainer.fit(stage, os.path.join(workdir, name), base=base)
    histories[name] = [(h["step"], h["loss"]) for h in result["history"]]
    base = _trained_params(result)
  answer = _answer(config, base, tokenizers["chinese_alpaca"])
  summary = {"histories": histories, "instruction": config.generate.instruction,
             "answer": answer, "seconds": time.perf_counter() - start}
  with open(os.path.join(workdir, "demo_summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, ensure_ascii=False, indent=1)
  for name, history in histories.items():
    print(f"{name} loss: {history[0][1]:.3f} -> {history[-1][1]:.3f}", flush=True)
  print(f"instruction: {config.generate.instruction}\nanswer: {answer}", flush=True)
  print(f"demo finished in {summary['seconds']:.0f} s", flush=True)
  return summary


def _answer(config, base, tokenizer_dir: str) -> str:
  """An answer to the demo instruction in the Alpaca template (the paper's sampling defaults:
  top-k 40, top-p 0.9, with the config's temperature and repetition penalty)."""
  from cnllama_jax import generate  # pylint: disable=import-outside-toplevel
  from cnllama_jax.data import build_prompt  # pylint: disable=import-outside-toplevel
  cfg, params = base
  sp = tok_lib.load_processor(os.path.join(tokenizer_dir, "tokenizer.model"))
  prompt = [sp.bos_id()] + sp.encode(build_prompt(config.generate.instruction))
  out = generate.generate(cfg, params, [prompt], max_new_tokens=config.generate.max_new_tokens,
                          temperature=config.generate.temperature, eos_id=sp.eos_id(),
                          repetition_penalty=config.generate.repetition_penalty,
                          rng=jax.random.key(config.seed))
  return sp.decode(out[0])
