"""Generates with a Hugging Face LLaMA / Alpaca directory: batch from a file, or interactive chat.

  # batch: one instruction per line (.txt), an Alpaca JSON list (.json) or JSON lines (.jsonl)
  python launch/generate.py --model=DIR --input=instructions.txt --output=out.jsonl
  # interactive multi-turn chat, tokens streamed as they are generated
  python launch/generate.py --model=DIR --interactive
  # the paper's releases: a base plus PEFT LoRA(s), merged in order before generating
  python launch/generate.py --model=LLAMA_HF --lora=PLUS_LORA,ALPACA_LORA --interactive

Prompts use the paper's Alpaca template (`--template=none` feeds raw text, for base LLaMA models;
`--template=llama3` LLaMA-3-Instruct's chat format, ending answers at `<|eot_id|>`), encoded as in
training: BOS + token ids (SentencePiece, or a byte-level BPE tokenizer.json).
Sampling defaults are the paper's (temperature 0.2, top-k 40, top-p 0.9, repetition penalty 1.1,
400 new tokens); `--temperature=0` is greedy.

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

import dataclasses
import json
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from cnllama_jax import cli  # noqa: E402
from cnllama_jax import generate as gen  # noqa: E402
from cnllama_jax import inference, paths, processes  # noqa: E402
from cnllama_jax.data import sources, text_tokenizer  # noqa: E402
from cnllama_jax.data.encode import build_prompt  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Hugging Face LLaMA directory (config.json + weights).")
_LORA = flags.DEFINE_list("lora", [], "PEFT LoRA directories applied to --model in this order.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece .model, byte-level BPE "
                                 "tokenizer.json or a directory with one (default: that of the "
                                 "last --lora that has one, else of --model).")
_INPUT = flags.DEFINE_string("input", None, "Instructions: .txt (one per line), .json (Alpaca "
                             "list) or .jsonl (objects with instruction[, input]); local or gs://.")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL output for --input, local or gs:// (default: "
                              "INPUT stem + .generated.jsonl).")
_INTERACTIVE = flags.DEFINE_bool("interactive", False, "Chat in the terminal.")
_SINGLE_TURN = flags.DEFINE_bool("single_turn", False, "Chat without history (as inference_hf.py).")
_TEMPLATE = flags.DEFINE_enum("template", "alpaca", ["alpaca", "llama3", "none"],
                              "Prompt template (llama3: LLaMA-3-Instruct's chat format).")
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
_MESH = flags.DEFINE_string("mesh_shape", "1,1,1", "data,fsdp,tensor mesh (one may be -1, e.g. "
                            "1,-1,1 shards over every device as training); 1,1,1: one device.")
_MERGE = flags.DEFINE_bool("merge_lora", True, "Merge the --lora adapters (default) or keep the "
                           "last one unmerged beside the base.")


@dataclasses.dataclass(frozen=True)
class Options:
  """Everything a generation run reads (built from the flags in `main` only)."""
  model: str
  loras: tuple[str, ...] = ()
  merge_lora: bool = True
  tokenizer: str | None = None
  template: str = "alpaca"
  batch_size: int = 8
  max_new_tokens: int = 400
  max_len: int = 0
  temperature: float = 0.2
  top_k: int = 40
  top_p: float = 0.9
  repetition_penalty: float = 1.1
  seed: int = 0
  dtype: str = "float32"
  mesh_shape: tuple[int, int, int] = (1, 1, 1)


def options_from_flags() -> Options:
  return Options(model=_MODEL.value, loras=tuple(_LORA.value), merge_lora=_MERGE.value,
                 tokenizer=_TOKENIZER.value, template=_TEMPLATE.value, batch_size=_BATCH.value,
                 max_new_tokens=_MAX_NEW.value, max_len=_MAX_LEN.value,
                 temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                 repetition_penalty=_PENALTY.value, seed=_SEED.value, dtype=_DTYPE.value,
                 mesh_shape=inference.parse_mesh_shape(_MESH.value))


def tokenizer_path(opts: Options) -> str:
  """--tokenizer, else the tokenizer.model (or byte-level BPE tokenizer.json) of the last --lora
  holding one (as the paper's scripts, whose LoRA releases carry the tokenizer), else --model's."""
  return opts.tokenizer or text_tokenizer.find([*reversed(opts.loras), opts.model])


class Generator:
  """The loaded model (on the --mesh_shape mesh), tokenizer and sampling settings;
  `__call__(prompts) -> texts`."""

  def __init__(self, opts: Options):
    start = time.perf_counter()
    self.opts = opts
    self.mesh = inference.build_mesh(opts.mesh_shape)
    self.cfg, self.lora, self.params = inference.load_model(
        opts.model, loras=opts.loras, merge=opts.merge_lora, mesh=self.mesh, dtype=opts.dtype)
    self.sp = text_tokenizer.load(tokenizer_path(opts))  # SentencePiece or byte-level BPE
    if self.sp.vocab_size() > self.cfg.vocab_size:
      raise ValueError(f"the tokenizer has {self.sp.vocab_size()} pieces but the model's "
                       f"vocabulary is {self.cfg.vocab_size}: pass the model's own tokenizer")
    self.rng = jax.random.key(opts.seed)
    self.stop_ids = (gen.tokenizer_stop_ids(self.cfg, self.sp.eos_id())
                     + gen.template_stop_ids(self.sp, opts.template))
    merged = f" + LoRA {', '.join(opts.loras)}" if opts.loras else ""
    log(f"loaded {opts.model}{merged} (vocab {self.cfg.vocab_size}, "
        f"{self.cfg.num_hidden_layers} layers, mesh {tuple(self.mesh.devices.shape)}) in "
        f"{time.perf_counter() - start:.1f} s")

  def encode(self, text: str) -> list[int]:
    return [self.sp.bos_id()] + self.sp.encode(text)

  def __call__(self, prompts: list[str], max_len: int | None = None, on_token=None) -> list[str]:
    o = self.opts
    self.rng, key = jax.random.split(self.rng)
    outputs = gen.generate(
        self.cfg, self.params, [self.encode(p) for p in prompts], max_new_tokens=o.max_new_tokens,
        temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
        repetition_penalty=o.repetition_penalty, rng=key, eos_id=self.stop_ids,
        on_token=on_token, max_len=max_len, lora=self.lora,
        mesh=None if self.mesh.size == 1 else self.mesh)
    return [self.sp.decode([t for t in ids if t not in self.stop_ids]).strip() for ids in outputs]


def log(text: str) -> None:
  """A progress line on stderr (process 0 only)."""
  if jax.process_index() == 0:
    print(text, file=sys.stderr, flush=True)


def template(opts: Options, instruction: str, input: str = "") -> str:
  if opts.template == "alpaca":
    return build_prompt(instruction, input)
  text = instruction + ("\n" + input if input else "")
  return gen.llama3_prompt([("user", text)]) if opts.template == "llama3" else text


def run_batch(generator: Generator, input_path: str, output: str | None) -> None:
  """Generates for every instruction of input_path (a local path or URL); every process computes,
  process 0 writes: into a local temporary file, then renamed onto a local `output` or uploaded
  as one object to a URL when complete, so a crash never leaves a complete-looking output."""
  opts = generator.opts
  records = sources.read_instructions(input_path)  # the project's one instruction reader
  output = output or os.path.splitext(input_path)[0] + ".generated.jsonl"
  writer = jax.process_index() == 0
  local = paths.is_local(output)
  partial = os.devnull
  if writer and local:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    partial = output + ".partial"
  elif writer:
    fd, partial = tempfile.mkstemp(prefix="generated-", suffix=".jsonl.partial")
    os.close(fd)
  try:
    _generate_into(generator, records, partial, writer)
    if writer and local:
      os.replace(partial, output)
    elif writer:
      with open(partial, "rb") as f:
        paths.write_bytes(output, f.read())  # one object upload: visible only once complete
  finally:
    if writer and not local:
      os.remove(partial)
  log(f"wrote {len(records)} outputs to {output}")


def _generate_into(generator: Generator, records: list[dict], partial: str, writer: bool) -> None:
  """Generates the records' outputs batch by batch, appending JSON lines to `partial`."""
  opts = generator.opts
  with open(partial, "w", encoding="utf-8") as f:
    for start in range(0, len(records), opts.batch_size):
      batch = records[start:start + opts.batch_size]
      t0 = time.perf_counter()
      prompts = [template(opts, r["instruction"], r["input"]) for r in batch]
      prompts += prompts[:1] * (opts.batch_size - len(batch))  # a full last batch: one compile
      texts = generator(prompts, opts.max_len or None)
      for i, (record, text) in enumerate(zip(batch, texts)):
        f.write(json.dumps({**record, "output": text}, ensure_ascii=False) + "\n")
        if writer:
          print(f"======= {start + i} =======\nInput: {record['instruction']}\nOutput: {text}\n")
      f.flush()
      log(f"[{start + len(batch)}/{len(records)}] {time.perf_counter() - t0:.1f} s")


class Stream:
  """Prints one row's tokens as they arrive (whole characters only: byte-fallback pieces of a
  multi-byte character are held back until it is complete)."""

  def __init__(self, sp, stop_ids):
    self.sp, self.stop_ids, self.ids, self.shown = sp, frozenset(stop_ids), [], 0

  def __call__(self, new: list) -> None:
    token = new[0]
    if token is None or token in self.stop_ids:  # Generator.stop_ids: the tokenizer's EOS too
      return
    self.ids.append(token)
    text = self.sp.decode(self.ids)
    if not text.endswith("\ufffd"):
      print(text[self.shown:], end="", flush=True)
      self.shown = len(text)


def fit_chat_prompt(generator: Generator, history: list, query: str, room: int) -> str | None:
  """The prompt text over the most recent turns that fit in `room` tokens (None: not even the
  query alone fits)."""
  while True:
    if generator.opts.template == "alpaca":
      text = gen.chat_prompt(history, query)
    elif generator.opts.template == "llama3":
      text = gen.llama3_prompt([t for q, a in history for t in (("user", q), ("assistant", a))]
                               + [("user", query)])
    else:
      text = "".join(q + "\n" + a + "\n" for q, a in history) + query
    if len(generator.encode(text)) <= room:
      return text
    if not history:
      return None
    history.pop(0)
    print("(the oldest turn no longer fits and was dropped)", file=sys.stderr)


def run_chat(generator: Generator, single_turn: bool) -> None:
  opts = generator.opts
  max_len = opts.max_len or generator.cfg.max_position_embeddings
  room = max_len - opts.max_new_tokens + 1
  if room < 2:
    raise app.UsageError(f"--max_len={max_len} leaves no room for a prompt with "
                         f"--max_new_tokens={opts.max_new_tokens}")
  history: list[tuple[str, str]] = []
  print("Chat: /reset clears the history, /exit or an empty line quits."
        + (" Single-turn: no history." if single_turn else ""), file=sys.stderr)
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
    stream = Stream(generator.sp, generator.stop_ids)
    t0 = time.perf_counter()
    answer = generator([prompt], max_len, on_token=stream)[0]
    print(f"\n({len(stream.ids)} tokens, {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if not single_turn:
      history.append((query, answer))


def main(argv) -> None:
  del argv
  if _INTERACTIVE.value == bool(_INPUT.value):
    raise app.UsageError("give exactly one of --input=FILE or --interactive")
  opts = options_from_flags()
  processes.initialize_distributed()  # --input: every host of a slice runs this same command
  if _INTERACTIVE.value and jax.process_count() > 1:
    raise app.UsageError("--interactive runs in one process; use --input on a multi-host slice")
  try:
    generator = Generator(opts)
  except (ValueError, OSError) as err:  # a missing or mismatched model / tokenizer: one line
    cli.fail(cli.one_line(err))
  if _INTERACTIVE.value:
    run_chat(generator, _SINGLE_TURN.value)
  else:
    run_batch(generator, _INPUT.value, _OUTPUT.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["model"])
  app.run(main)
