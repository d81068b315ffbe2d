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
  lines = _english(60)
  records = [{"instruction": lines[i], "input": "" if i % 2 else lines[i + 1],
              "output": lines[i + 2]} for i in range(24)]
  files = {"text/a.txt": "\n".join(lines[:30]) + "\n", "text/sub/b.txt": "\n".join(lines[30:]),
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
