"""Inputs and outputs of a whole run on gs:// (the `gcs` emulator fixture in conftest.py): corpora,
the tfds data cache shared by hosts, C-Eval, generation, and a three-stage run equal to the same
run on local disk."""
import json
import os

import numpy as np
import pytest

from cnllama_jax import paths
from cnllama_jax.data import shared_cache

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
  """A SentencePiece BPE model of 131 pieces (BOS 1, EOS 2) in a directory, as tokenizer.model."""
  from cnllama_jax import tokenizer as tok_lib
  directory = tmp_path_factory.mktemp("tok")
  return str(tok_lib.train_sentencepiece(
      [os.path.join(DATA, "tokenizer_en.txt")], str(directory / "tokenizer.model"),
      vocab_size=131, model_type="bpe", character_coverage=1.0, progress=False))


def _english(n: int) -> list[str]:
  with open(os.path.join(DATA, "tokenizer_en.txt"), encoding="utf-8") as f:
    lines = [line.strip() for line in f if line.strip()]
  return [lines[i % len(lines)] for i in range(n)]


def _inputs(root: str) -> dict:
  """The same corpora under `root` (a local dir or a gs:// URL): a text dir (two files, one in a
  subdirectory, one hidden file that is skipped), Alpaca JSON + JSONL, instructions to answer."""
  lines = _english(120)
  words = [line.split() for line in lines]  # short examples: the template alone is ~100 tokens
  records = [{"instruction": " ".join(words[i][:3]), "input": " ".join(words[i + 1][:2]) * (i % 2),
              "output": " ".join(words[i + 2][:4])} for i in range(24)]
  files = {"text/a.txt": "\n".join(lines[:60]) + "\n", "text/sub/b.txt": "\n".join(lines[60:]),
           "text/.hidden/c.txt": "not read\n",
           "sft/alpaca.json": json.dumps(records[:12], ensure_ascii=False),
           "sft/more.jsonl": "".join(json.dumps(r) + "\n" for r in records[12:]),
           "prompts.txt": "Name a fruit.\n\nWhat is the river like?\n"}
  for name, text in files.items():
    paths.write_text(paths.join(root, name), text)
  return {"text": paths.join(root, "text"), "sft": paths.join(root, "sft"),
          "prompts": paths.join(root, "prompts.txt")}


def _rows(source) -> list[dict]:
  return [{k: np.asarray(v).tolist() for k, v in source[i].items()} for i in range(len(source))]


# --- the data cache ------------------------------------------------------------------------------

def test_corpora_and_data_cache_in_a_bucket_equal_the_local_build(gcs, tmp_path, tokenizer,
                                                                   monkeypatch):
  from cnllama_jax import data
  from cnllama_jax.data import sources
  monkeypatch.setenv("CNLLAMA_DATA_CACHE", str(tmp_path / "host0"))
  bucket = gcs.bucket()
  local, remote = _inputs(str(tmp_path / "in")), _inputs(f"{bucket}/in")
  assert [str(f)[len(bucket):] for f in sources.list_files(remote["text"], (".txt",))] == [
      "/in/text/a.txt", "/in/text/sub/b.txt"]
  assert sources.read_instructions(remote["prompts"]) == sources.read_instructions(
      local["prompts"])
  kw = dict(block_size=16, val_fraction=0.1, progress=False)
  want = data.build_pretrain_dataset(local["text"], tokenizer, str(tmp_path / "cache"), **kw)
  got = data.build_pretrain_dataset(remote["text"], tokenizer, f"{bucket}/cache", **kw)
  assert got["path"].startswith(f"{bucket}/cache/cnllama_pretrain_text/")
  assert shared_cache.is_published(got["path"])
  assert "dataset_info.json" in paths.listdir(got["path"])
  assert _rows(got["train"]) == _rows(want["train"]) and len(want["train"]) > 10
  assert _rows(got["validation"]) == _rows(want["validation"])
  assert not got["stats"]["reused"]
  sft_kw = dict(max_seq_len=64, pad_id=0, val_fraction=0.0, progress=False)
  want_sft = data.build_sft_dataset(local["sft"], tokenizer, str(tmp_path / "cache"), **sft_kw)
  got_sft = data.build_sft_dataset(remote["sft"], tokenizer, f"{bucket}/cache", **sft_kw)
  assert _rows(got_sft["train"]) == _rows(want_sft["train"]) and len(want_sft["train"]) == 24

  # Another host (its own empty local disk) finds the build published and only copies it down.
  monkeypatch.setenv("CNLLAMA_DATA_CACHE", str(tmp_path / "host1"))
  monkeypatch.setattr(data.staging, "stage_pretrain", None)  # tokenising again would fail
  again = data.build_pretrain_dataset(remote["text"], tokenizer, f"{bucket}/cache", **kw)
  assert again["stats"]["reused"] and _rows(again["train"]) == _rows(want["train"])
  assert (tmp_path / "host1").is_dir()
  assert _rows(data.load_built(got["path"])["train"]) == _rows(want["train"])


def test_other_processes_read_what_process_0_published_and_stop_if_it_failed(gcs, tmp_path):
  """The protocol of data/shared_cache.py with process 0's broadcast stood in for by `agree`."""
  remote = gcs.bucket() + "/cache/b/cfg/1.0.0"
  built = []

  def build_local(root):  # what datasets._build does in a local data_dir
    build = os.path.join(root, "b", "cfg", "1.0.0")
    if not os.path.isfile(os.path.join(build, "dataset_info.json")):
      os.makedirs(build)
      for name in ("dataset_info.json", "x.array_record-00000-of-00001"):
        with open(os.path.join(build, name), "w", encoding="utf-8") as f:
          f.write(name)
      built.append(root)
    return {"root": root}

  def host(name, writer, ok=True):
    root = str(tmp_path / name)
    return shared_cache.build_once(remote, root, os.path.join(root, "b", "cfg", "1.0.0"),
                                   build_local, writer=writer, agree=lambda mine: ok and mine)

  with pytest.raises(RuntimeError, match=f"^{remote}: process 0 failed to build the data cache"):
    host("h1", writer=False, ok=False)  # process 0 reported a failure: nothing read
  assert not paths.exists(remote) and not built
  assert host("h0", writer=True) == {"root": str(tmp_path / "h0")}
  assert built == [str(tmp_path / "h0")] and shared_cache.is_published(remote)
  assert host("h1", writer=False) == {"root": str(tmp_path / "h1")}
  assert built == [str(tmp_path / "h0")]  # host 1 copied the build; it never built
  assert sorted(os.listdir(tmp_path / "h1" / "b" / "cfg" / "1.0.0")) == sorted(
      paths.listdir(remote))

  # A half-published build (its writer died) is rebuilt by process 0, never read by the others.
  paths.write_text(paths.join(remote, paths.INCOMPLETE), "")
  with pytest.raises(ValueError, match=f"^{remote}: incomplete"):
    shared_cache.download(remote, str(tmp_path / "h2"))
  boom = RuntimeError("tokenizer exploded")

  def failing(root):
    raise boom

  with pytest.raises(RuntimeError, match="tokenizer exploded"):
    shared_cache.build_once(remote, str(tmp_path / "h3"), str(tmp_path / "h3" / "x"), failing,
                            writer=True, agree=lambda mine: mine)
  assert host("h4", writer=True) and shared_cache.is_published(remote)


# --- a whole run on gs:// ------------------------------------------------------------------------

def _launch_generate():
  """launch/generate.py as a module (under the name tests/test_serve.py uses: absl flags may be
  defined only once per process)."""
  import importlib.util
  import sys
  if "launch_generate" not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        "launch_generate", os.path.join(os.path.dirname(DATA), "..", "launch", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["launch_generate"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
  return sys.modules["launch_generate"]


def _three_stages(root: str, base: str, tokenizer: str, inputs: dict) -> dict:
  """Stage 1 (embeddings, from `base`) -> stage 2 (LoRA + embeddings) -> SFT, each on the previous
  one's merged HF export as its base_model, then the SFT workdir exported by launch/convert.py and
  greedy answers to the prompts by launch/generate.py --input --output; every path under `root`
  (local or gs://). Returns {stage: [loss per step]} and the answers."""
  import jax
  from jax.sharding import Mesh
  from cnllama_jax import export, pipeline, run_config, trainer
  from launch import convert
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  losses = {}
  for stage, (trainable, kind, rank, length) in {"stage1": ("embeddings", "text", 0, 192),
                                                 "stage2": ("lora+embeddings", "text", 4, 192),
                                                 "sft": ("lora+embeddings", "sft", 4, 192)}.items():
    config = run_config.default()
    config.base_model, config.tokenizer = base, tokenizer
    config.train.update(dict(trainable=trainable, global_batch_size=8, seq_len=length, steps=2,
                             log_every=1, learning_rate=1e-2, warmup_ratio=0.0))
    config.lora.update(dict(rank=rank, alpha=8.0, dropout=0.0))
    # one data cache for the run: stage 2 finds stage 1's build and reads it back
    config.data.update(dict(kind=kind, path=inputs[kind if kind == "sft" else "text"],
                            val_fraction=0.0, data_dir=paths.join(root, "data")))
    config.vocab.strict = stage != "stage1"  # stage 1 resizes the base's 99 rows to 131
    workdir = paths.join(root, "runs", stage)
    result = trainer.train(config, workdir, mesh=mesh)  # one device: the fastest compiles
    losses[stage] = [row["loss"] for row in result["history"]]
    if stage != "sft":  # the next stage's base: this one merged (convert.py merges the same way)
      base = export.save_hf(*pipeline.trained_params(result), paths.join(root, stage))
  model = paths.join(root, "export")
  assert convert.main(["export", "--format", "hf", "--workdir", workdir, "--out", model,
                       "--dtype", "float32"]) == 0
  generate = _launch_generate()
  generator = generate.Generator(generate.Options(model=model, temperature=0.0, max_new_tokens=3,
                                                  batch_size=2))
  answers = paths.join(root, "answers.jsonl")
  generate.run_batch(generator, inputs["prompts"], answers)
  return {"losses": losses, "answers": [json.loads(line) for line in
                                        paths.read_text(answers).splitlines()]}


@pytest.fixture
def compile_once(tmp_path):
  """JAX's persistent compilation cache, for one test: a second run of the same programs (the
  gs:// run after the local one) loads them instead of compiling them again."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  saved = {key: getattr(jax.config, key) for key in keys}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax-cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  yield
  for key, value in saved.items():
    jax.config.update(key, value)
  compilation_cache.reset_cache()


def test_three_stage_run_with_every_path_in_a_bucket_equals_the_local_run(gcs, tmp_path, tokenizer,
                                                                           monkeypatch,
                                                                           compile_once):
  from tests import hf_models
  monkeypatch.setenv("CNLLAMA_DATA_CACHE", str(tmp_path / "mirror"))
  base = hf_models.save(hf_models.make_hf_llama(seed=31, max_position_embeddings=256),
                        str(tmp_path / "local" / "base"), "safetensors")
  local_tok = str(tmp_path / "local" / "tokenizer")
  paths.copy_tree(os.path.dirname(tokenizer), local_tok)
  bucket = gcs.bucket()
  paths.copy_tree(base, f"{bucket}/base")
  paths.copy_tree(local_tok, f"{bucket}/tokenizer")
  local = _three_stages(str(tmp_path / "local"), base, local_tok,
                        _inputs(str(tmp_path / "local" / "in")))
  remote = _three_stages(bucket, f"{bucket}/base", f"{bucket}/tokenizer",
                         _inputs(f"{bucket}/in"))
  assert [len(v) for v in local["losses"].values()] == [2, 2, 2]
  assert remote["losses"] == local["losses"]
  assert remote["answers"] == local["answers"] and len(local["answers"]) == 2
  for stage in ("stage1", "stage2", "sft"):  # workdirs, the data cache and exports in the bucket
    assert "checkpoints" in paths.listdir(f"{bucket}/runs/{stage}")
  for builder in ("cnllama_pretrain_text", "cnllama_sft"):  # one build each (stage 2 reused 1's)
    [name] = paths.listdir(f"{bucket}/data/{builder}")
    assert shared_cache.is_published(f"{bucket}/data/{builder}/{name}/1.0.0")
  for export in ("stage1", "stage2", "export"):
    assert "config.json" in paths.listdir(f"{bucket}/{export}")
    assert not paths.exists(f"{bucket}/{export}/{paths.INCOMPLETE}")
  assert not os.path.exists(os.path.join(os.getcwd(), "gs:"))


# --- C-Eval --------------------------------------------------------------------------------------

def test_ceval_questions_from_a_bucket_and_results_published_there(gcs):
  from cnllama_jax import ceval
  bucket = gcs.bucket()
  paths.copy_tree(os.path.join(DATA, "ceval"), f"{bucket}/ceval")
  for split, shots in (("val", 5), ("test", 0)):
    assert ceval.load_ceval(f"{bucket}/ceval", split, shots) == ceval.load_ceval(
        os.path.join(DATA, "ceval"), split, shots)
  data = ceval.load_ceval(f"{bucket}/ceval", "test", 0)
  result = ceval.evaluate_ceval(  # a scorer that always prefers C
      lambda ids, mask, options, penalty: np.tile([0.0, 0.0, 1.0, 0.0], (len(ids), 1)),
      _FakeTokenizer(), data, split="test", shots=0)
  out = f"{bucket}/results"
  written = ceval.write_ceval(out, result)
  assert sorted(paths.listdir(out)) == ["predictions.jsonl", "submission.json", "summary.json"]
  assert json.loads(written["submission.json"].read_text()) == result.submission
  assert set(json.loads(paths.read_text(f"{out}/submission.json"))["logic"].values()) == {"C"}
  with pytest.raises(FileExistsError, match=f"^{out}: already exists and is not empty"):
    ceval.write_ceval(out, result)
  with pytest.raises(FileNotFoundError, match=f"^{bucket}/nowhere/val: no such directory"):
    ceval.load_ceval(f"{bucket}/nowhere")


class _FakeTokenizer:
  """Characters as ids: enough for C-Eval's prompt building and option ids."""

  def bos_id(self) -> int:
    return 1

  def encode(self, text: str) -> list[int]:
    return [3 + ord(c) % 90 for c in text]
