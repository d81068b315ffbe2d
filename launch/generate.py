"""Generates with a Hugging Face LLaMA / Alpaca directory: batch from a file, or interactive chat.

  # batch: one instruction per line (.txt), an Alpaca JSON list (.json) or JSON lines (.jsonl)
  python launch/generate.py --model=DIR --input=instructions.txt --output=out.jsonl
  # interactive multi-turn chat, tokens streamed as they are generated
  python launch/generate.py --model=DIR --interactive
  # the paper's releases: a base plus PEFT LoRA(s), merged in order before generating
  python launch/generate.py --model=LLAMA_HF --lora=PLUS_LORA,ALPACA_LORA --interactive

Prompts use the paper's Alpaca template (`--template=none` feeds raw text, for base LLaMA models),
encoded as in training: BOS + SentencePiece ids. Sampling defaults are the paper's (temperature
0.2, top-k 40, top-p 0.9, repetition penalty 1.1, 400 new tokens); `--temperature=0` is greedy.

Chat: the paper's `inference_hf.py --interactive` is single-turn only (each input is templated on
its own); its gradio demo concatenates the previous turns into the prompt. We do the latter: the
template header once, then every earlier turn as
`### Instruction:\\n{q}\\n\\n### Response: {a}\\n\\n`, then the new instruction
(`generate.chat_prompt`). The oldest turns are dropped when the prompt would not leave room for
--max_new_tokens in the --max_len cache (the demo cuts to the last 256 characters instead).
`/reset` clears the history, `/exit` or an empty line quits, `--single_turn` reproduces
inference_hf.py. The cache size is fixed for the whole chat, so every turn reuses one compiled
decode step.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from cnllama_jax import adapters  # noqa: E402
from cnllama_jax import generate as gen  # noqa: E402
from cnllama_jax.data.encode import build_prompt  # noqa: E402
from cnllama_jax.tokenizer import load_processor  # noqa: E402
from cnllama_jax.hf import load_hf  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Hugging Face LLaMA directory (config.json + weights).")
_LORA = flags.DEFINE_list("lora", [], "PEFT LoRA directories merged into --model in this order.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model (default: tokenizer.model "
                                 "of the last --lora that has one, else of --model).")
_INPUT = flags.DEFINE_string("input", None, "Instructions: .txt (one per line), .json (Alpaca "
                             "list) or .jsonl (objects with instruction[, input]).")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL output for --input (default: INPUT stem + "
                              ".generated.jsonl).")
_INTERACTIVE = flags.DEFINE_bool("interactive", False, "Chat in the terminal.")
_SINGLE_TURN = flags.DEFINE_bool("single_turn", False, "Chat without history (as inference_hf.py).")
_TEMPLATE = flags.DEFINE_enum("template", "alpaca", ["alpaca", "none"], "Prompt template.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts generated together in --input mode.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 400, "New tokens per response, at most.")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "KV cache slots (prompt + response); 0: automatic in "
                                "--input mode, max_position_embeddings in chat.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.2, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 40, "0: off.")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "1: off.")
_PENALTY = flags.DEFINE_float("repetition_penalty", 1.1, "1: off.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Param and compute dtype.")


def read_instructions(path: str) -> list[dict]:
  """[{'instruction': str, 'input': str}] from .txt, .json (Alpaca list) or .jsonl."""
  with open(path, encoding="utf-8") as f:
    if path.endswith(".json"):
      records = json.load(f)
    elif path.endswith(".jsonl"):
      records = [json.loads(line) for line in f if line.strip()]
    else:
      records = [{"instruction": line.rstrip("\n")} for line in f if line.strip()]
  for i, record in enumerate(records):
    if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
      raise ValueError(f"{path}: record {i} has no string 'instruction': {str(record)[:200]}")
  return [{"instruction": r["instruction"], "input": r.get("input") or ""} for r in records]


def tokenizer_path() -> str:
  """--tokenizer, else the tokenizer.model of the last --lora holding one (as the paper's scripts,
  whose LoRA releases carry the tokenizer), else --model's."""
  if _TOKENIZER.value:
    return _TOKENIZER.value
  for directory in [*reversed(_LORA.value), _MODEL.value]:
    if os.path.isfile(os.path.join(directory, "tokenizer.model")):
      return os.path.join(directory, "tokenizer.model")
  raise FileNotFoundError(f"no tokenizer.model in {[*_LORA.value, _MODEL.value]}; pass --tokenizer")


class Generator:
  """The loaded model, tokenizer and sampling settings; `__call__(prompts) -> texts`."""

  def __init__(self):
    start = time.perf_counter()
    self.cfg, self.params = load_hf(_MODEL.value, dtype=_DTYPE.value)
    if _LORA.value:
      self.cfg, self.params = adapters.merge_loras(self.cfg, self.params, _LORA.value)
    self.cfg = self.cfg.replace(dtype=_DTYPE.value)
    self.sp = load_processor(tokenizer_path())
    if self.sp.get_piece_size() > self.cfg.vocab_size:
      raise ValueError(f"the tokenizer has {self.sp.get_piece_size()} pieces but the model's "
                       f"vocabulary is {self.cfg.vocab_size}: pass the model's own tokenizer")
    self.rng = jax.random.key(_SEED.value)
    merged = f" + LoRA {', '.join(_LORA.value)}" if _LORA.value else ""
    print(f"loaded {_MODEL.value}{merged} (vocab {self.cfg.vocab_size}, "
          f"{self.cfg.num_hidden_layers} layers) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)

  def encode(self, text: str) -> list[int]:
    return [self.sp.bos_id()] + self.sp.encode(text)

  def __call__(self, prompts: list[str], max_len: int | None = None, on_token=None) -> list[str]:
    self.rng, key = jax.random.split(self.rng)
    outputs = gen.generate(
        self.cfg, self.params, [self.encode(p) for p in prompts], max_new_tokens=_MAX_NEW.value,
        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
        repetition_penalty=_PENALTY.value, rng=key, eos_id=self.sp.eos_id(), on_token=on_token,
        max_len=max_len)
    return [self.sp.decode([t for t in ids if t != self.sp.eos_id()]).strip() for ids in outputs]


def template(instruction: str, input: str = "") -> str:
  return build_prompt(instruction, input) if _TEMPLATE.value == "alpaca" else (
      instruction + ("\n" + input if input else ""))


def run_batch(generator: Generator) -> None:
  records = read_instructions(_INPUT.value)
  output = _OUTPUT.value or os.path.splitext(_INPUT.value)[0] + ".generated.jsonl"
  max_len = _MAX_LEN.value or None
  with open(output, "w", encoding="utf-8") as f:
    for start in range(0, len(records), _BATCH.value):
      batch = records[start:start + _BATCH.value]
      t0 = time.perf_counter()
      prompts = [template(r["instruction"], r["input"]) for r in batch]
      prompts += prompts[:1] * (_BATCH.value - len(batch))  # a full last batch: no recompilation
      texts = generator(prompts, max_len)
      for i, (record, text) in enumerate(zip(batch, texts)):
        f.write(json.dumps({**record, "output": text}, ensure_ascii=False) + "\n")
        print(f"======= {start + i} =======\nInput: {record['instruction']}\nOutput: {text}\n")
      f.flush()
      print(f"[{start + len(batch)}/{len(records)}] {time.perf_counter() - t0:.1f} s",
            file=sys.stderr)
  print(f"wrote {len(records)} outputs to {output}", file=sys.stderr)


class Stream:
  """Prints one row's tokens as they arrive (whole characters only: byte-fallback pieces of a
  multi-byte character are held back until it is complete)."""

  def __init__(self, sp):
    self.sp, self.ids, self.shown = sp, [], 0

  def __call__(self, new: list) -> None:
    token = new[0]
    if token is None or token == self.sp.eos_id():
      return
    self.ids.append(token)
    text = self.sp.decode(self.ids)
    if not text.endswith("\ufffd"):
      print(text[self.shown:], end="", flush=True)
      self.shown = len(text)


def fit_chat_prompt(generator: Generator, history: list, query: str, room: int) -> list | None:
  """The prompt text over the most recent turns that fit in `room` tokens (None: not even the
  query alone fits)."""
  while True:
    if _TEMPLATE.value == "alpaca":
      text = gen.chat_prompt(history, query)
    else:
      text = "".join(q + "\n" + a + "\n" for q, a in history) + query
    if len(generator.encode(text)) <= room:
      return text
    if not history:
      return None
    history.pop(0)
    print("(the oldest turn no longer fits and was dropped)", file=sys.stderr)


def run_chat(generator: Generator) -> None:
  max_len = _MAX_LEN.value or generator.cfg.max_position_embeddings
  room = max_len - _MAX_NEW.value + 1
  if room < 2:
    raise app.UsageError(f"--max_len={max_len} leaves no room for a prompt with "
                         f"--max_new_tokens={_MAX_NEW.value}")
  history: list[tuple[str, str]] = []
  print("Chat: /reset clears the history, /exit or an empty line quits."
        + (" Single-turn: no history." if _SINGLE_TURN.value else ""), file=sys.stderr)
  while True:
    try:
      query = input("\n> ").strip()
    except EOFError:
      break
    if query in ("", "/exit"):
      break
    if query == "/reset":
      history.clear()
      print("(history cleared)", file=sys.stderr)
      continue
    prompt = fit_chat_prompt(generator, history, query, room)
    if prompt is None:
      print(f"(the input alone exceeds {room} tokens; raise --max_len or lower --max_new_tokens)",
            file=sys.stderr)
      continue
    stream = Stream(generator.sp)
    t0 = time.perf_counter()
    answer = generator([prompt], max_len, on_token=stream)[0]
    print(f"\n({len(stream.ids)} tokens, {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if not _SINGLE_TURN.value:
      history.append((query, answer))


def main(argv) -> None:
  del argv
  if _INTERACTIVE.value == bool(_INPUT.value):
    raise app.UsageError("give exactly one of --input=FILE or --interactive")
  generator = Generator()
  if _INTERACTIVE.value:
    run_chat(generator)
  else:
    run_batch(generator)


if __name__ == "__main__":
  flags.mark_flags_as_required(["model"])
  app.run(main)
