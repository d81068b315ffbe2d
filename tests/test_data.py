"""Data pipelines: SFT encoding, packing, tfds builds (cache, errors, atomicity), loader."""

import json
import os

import numpy as np
import pytest
import sentencepiece as spm

from cnllama_jax.data import (IGNORE_INDEX, Loader, build_pretrain_dataset, build_prompt,
                              build_sft_dataset, encode_sft_example, load_built,
                              measure_throughput, split_indices)
from cnllama_jax.data import staging

EN = [
    "The river was low after the long dry summer.",
    "She planted tomatoes along the south wall of the garden.",
    "Our train stopped for ten minutes at a station with no name.",
    "He fixed the old radio with a paper clip and some patience.",
    "The market opens at six and the best bread is gone by seven.",
    "A small boat crossed the lake while the fog was lifting.",
    "Please write the answer in one short sentence.",
    "The museum keeps a map of the city drawn by hand in 1870.",
    "My neighbour teaches chess to children on Saturday mornings.",
    "Rain on the tin roof made it hard to hear the radio.",
    "The recipe asks for two eggs, a cup of flour and a pinch of salt.",
    "Every spring the swallows return to the same barn.",
]
ZH = [
    "春天的早上，山坡上开满了小黄花。",
    "他每天骑自行车去学校，路上要经过一座木桥。",
    "图书馆的窗户很大，下午的阳光照在书桌上。",
    "奶奶做的饺子皮薄馅多，大家都喜欢吃。",
    "这条小河从村子中间流过，河水清清的。",
    "请用一句话回答这个问题。",
    "老师让我们把今天学的生字写十遍。",
    "秋天到了，树叶慢慢变成了金黄色。",
    "我们在山顶上看日出，风很大，但是很美。",
    "市场里有卖水果的，也有卖鱼和蔬菜的。",
    "下雨的时候，他喜欢坐在窗前读书。",
    "这家小店的面条已经做了三十年。",
]


def corpus_lines(n: int = 240) -> list[str]:
  """Deterministic mixed English/Chinese lines built from the sentences above."""
  lines = []
  for i in range(n):
    a, b = EN[i % len(EN)], ZH[(i * 5) % len(ZH)]
    c = EN[(i * 7 + 3) % len(EN)] if i % 3 else ZH[(i * 11 + 1) % len(ZH)]
    lines.append(" ".join([a, b, c][: 2 + i % 2]))
  return lines


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
  prefix = str(tmp_path_factory.mktemp("tok") / "tiny")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus_lines()), model_prefix=prefix, vocab_size=600,
      model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2,
      unk_id=0, pad_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2,
      normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True)
  return prefix + ".model"


@pytest.fixture(scope="module")
def sp(tok_path) -> spm.SentencePieceProcessor:
  return spm.SentencePieceProcessor(model_file=tok_path)


def write_text(path, lines) -> str:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def alpaca_records(n: int) -> list[dict]:
  return [{"instruction": EN[i % len(EN)], "input": ZH[i % len(ZH)] if i % 2 else "",
           "output": ZH[(i + 3) % len(ZH)]} for i in range(n)]


def pretrain(corpus, tok_path, data_dir, **kw):
  kw.setdefault("progress", False)
  return build_pretrain_dataset(corpus, tok_path, data_dir, **kw)


def sft(path, tok_path, data_dir, **kw):
  kw.setdefault("progress", False)
  kw.setdefault("pad_id", 0)
  return build_sft_dataset(path, tok_path, data_dir, **kw)


# --- SFT encoding --------------------------------------------------------------------------------

# "<s>▁Below is an instruction ... request.\n\n### Instruction:\n" in the tiny tokenizer.
HEAD = [1, 432, 69, 433, 367, 377, 261, 436, 376, 438, 435, 439, 448, 446, 435, 365, 259, 440,
        273, 432, 442, 288, 446, 439, 441, 455, 288, 261, 259, 302, 458, 449, 432, 90, 439, 278,
        433, 261, 275, 288, 444, 437, 436, 438, 433, 259, 440, 273, 261, 444, 444, 439, 335, 439,
        441, 273, 433, 443, 456, 269, 437, 445, 444, 443, 433, 435, 288, 264, 316, 116, 448, 363,
        449, 13, 13, 38, 38, 38, 432, 76, 436, 438, 435, 439, 448, 446, 435, 365, 61, 13]
# "\n\n### Response: " (the trailing space is the last "▁", 432).
TAIL = [13, 13, 38, 38, 38, 432, 518, 288, 444, 437, 436, 438, 433, 61, 432]


def test_build_prompt_is_the_papers_template():
  assert build_prompt("Name a fruit.", "") == (
      "Below is an instruction that describes a task. Write a response that appropriately "
      "completes the request.\n\n### Instruction:\nName a fruit.\n\n### Response: ")
  assert build_prompt("翻译", "你好") == build_prompt("翻译\n你好")
  assert build_prompt("翻译", None) == build_prompt("翻译", "")


def test_sft_example_with_input_masks_the_prompt(sp):
  ex = encode_sft_example(sp, "把这句话翻译成英文。", "下雨了。", "It is raining.",
                          max_seq_len=144, pad_id=3)
  # "把这句话翻译成英文。" "\n" "下雨了。"
  middle = [550, 468, 531, 581, 234, 194, 190, 235, 178, 148, 548, 235, 142, 180, 233, 153, 138,
            452, 13, 471, 508, 462, 452]
  target = [432, 76, 435, 377, 275, 311, 364, 449, 2]  # "▁It is raining." + eos (id 2)
  n = len(HEAD) + len(middle) + len(TAIL) + len(target)
  assert n == 137
  assert ex["input_ids"].tolist() == HEAD + middle + TAIL + target + [3] * 7
  assert ex["labels"].tolist() == [-100] * 128 + target + [-100] * 7
  assert ex["attention_mask"].tolist() == [1] * 137 + [0] * 7
  assert not ex["truncated"]
  assert all(ex[k].dtype == np.int32 and ex[k].shape == (144,)
             for k in ("input_ids", "labels", "attention_mask"))


def test_sft_example_without_input(sp):
  ex = encode_sft_example(sp, "Name a fruit.", "", "苹果。", max_seq_len=128, pad_id=0)
  middle = [81, 312, 261, 271, 439, 448, 278, 449]      # "Name a fruit."
  target = [432, 235, 142, 188, 556, 452, 2]            # "▁苹果。" (苹 as 3 bytes) + eos
  assert ex["input_ids"].tolist() == HEAD + middle + TAIL + target + [0] * 8
  assert ex["labels"].tolist() == [-100] * 113 + target + [-100] * 8
  assert ex["attention_mask"].sum() == 120


def test_sft_eos_is_the_eos_id_not_the_spelled_string(sp):
  ex = encode_sft_example(sp, "Name a fruit.", "", "苹果。", max_seq_len=128, pad_id=0)
  supervised = ex["labels"][ex["labels"] != IGNORE_INDEX].tolist()
  assert supervised[-1] == sp.eos_id() == 2
  assert sp.encode("</s>") != [2]  # a bare SentencePiece model would spell "</s>" out
  assert sp.decode(supervised[:-1]) == "苹果。"


def test_sft_overlong_example_is_right_truncated(sp):
  ex = encode_sft_example(sp, "把这句话翻译成英文。", "下雨了。", "It is raining.",
                          max_seq_len=131, pad_id=3)
  assert ex["truncated"]
  assert ex["input_ids"].tolist()[-3:] == [432, 76, 435]
  assert ex["labels"].tolist()[-3:] == [432, 76, 435]  # eos cut off, like the paper
  assert ex["attention_mask"].tolist() == [1] * 131


# --- pre-training builds -------------------------------------------------------------------------


@pytest.fixture()
def corpus(tmp_path):
  """Two text files; one has blank and whitespace-only lines, which are skipped."""
  lines = corpus_lines()
  write_text(tmp_path / "corpus" / "a.txt", lines[:100])
  write_text(tmp_path / "corpus" / "sub" / "b.txt", lines[100:150] + ["", "   "] + lines[150:])
  write_text(tmp_path / "corpus" / "notes.md", ["not a .txt file: ignored"])
  return tmp_path / "corpus"


def test_packing_keeps_every_token_exactly_once(corpus, tok_path, sp, tmp_path):
  out = pretrain(corpus, tok_path, tmp_path / "tfds", block_size=64, val_fraction=0.0)
  expected = np.concatenate([[1] + sp.encode(line) for line in corpus_lines()])
  train = out["train"]
  blocks = [train[i]["input_ids"] for i in range(len(train))]
  assert all(b.shape == (64,) and b.dtype == np.int32 for b in blocks)
  dropped = out["stats"]["dropped_tokens"]
  assert 0 <= dropped < 64 and len(blocks) * 64 + dropped == len(expected)
  np.testing.assert_array_equal(np.concatenate(blocks), expected[:len(expected) - dropped])
  assert out["validation"] is None
  stats = out["stats"]
  assert (stats["files"], stats["documents"], stats["skipped_empty_lines"]) == (2, 240, 2)
  assert stats["tokens"] == len(expected) and stats["blocks"] == len(blocks)
  assert stats["reused"] is False


def test_validation_split_is_a_disjoint_part_of_the_blocks(corpus, tok_path, sp, tmp_path):
  out = pretrain(corpus, tok_path, tmp_path / "tfds", block_size=64, val_fraction=0.1)
  expected = np.concatenate([[1] + sp.encode(line) for line in corpus_lines()])
  n = len(expected) // 64
  all_blocks = expected[:n * 64].reshape(n, 64)
  train_idx, val_idx = split_indices(n, 0.1)
  assert len(val_idx) == round(n * 0.1) and not set(train_idx) & set(val_idx)
  assert (out["stats"]["train_examples"], out["stats"]["validation_examples"]) == (
      len(train_idx), len(val_idx))
  for split, idx in (("train", train_idx), ("validation", val_idx)):
    got = np.stack([out[split][k]["input_ids"] for k in range(len(out[split]))])
    np.testing.assert_array_equal(got, all_blocks[idx])


def test_unchanged_source_is_not_retokenised(corpus, tok_path, tmp_path, monkeypatch):
  calls = []
  real = staging.stage_pretrain
  monkeypatch.setattr(staging, "stage_pretrain", lambda *a, **k: calls.append(1) or real(*a, **k))
  first = pretrain(corpus, tok_path, tmp_path / "tfds", block_size=64)
  second = pretrain(corpus, tok_path, tmp_path / "tfds", block_size=64)
  assert len(calls) == 1 and second["stats"]["reused"] and second["path"] == first["path"]
  assert second["stats"]["documents"] == first["stats"]["documents"]
  np.testing.assert_array_equal(second["train"][3]["input_ids"], first["train"][3]["input_ids"])

  with open(corpus / "a.txt", "a", encoding="utf-8") as f:
    f.write("A new line changes the corpus.\n")
  third = pretrain(corpus, tok_path, tmp_path / "tfds", block_size=64)
  assert len(calls) == 2 and not third["stats"]["reused"]
  assert third["path"] != first["path"] and third["stats"]["documents"] == 241
  assert len(first["train"]) > 0 and first["train"][0]["input_ids"].shape == (64,)
  other_length = pretrain(corpus, tok_path, tmp_path / "tfds", block_size=32)
  assert len(calls) == 3 and other_length["path"] != third["path"]


def test_finished_build_reads_back_without_sources(corpus, tok_path, tmp_path):
  out = build_pretrain_dataset(corpus, tok_path, tmp_path / "tfds", 64)  # with progress bars
  again = load_built(out["path"])
  assert len(again["train"]) == len(out["train"])
  assert again["stats"]["blocks"] == out["stats"]["blocks"]
  np.testing.assert_array_equal(again["validation"][0]["input_ids"],
                                out["validation"][0]["input_ids"])


# --- SFT builds ----------------------------------------------------------------------------------


def test_sft_build_matches_encode_sft_example(tok_path, sp, tmp_path):
  records = alpaca_records(12)
  (tmp_path / "sft").mkdir()
  (tmp_path / "sft" / "a.json").write_text(json.dumps(records[:7], ensure_ascii=False, indent=1),
                                           encoding="utf-8")
  (tmp_path / "sft" / "b.jsonl").write_text(
      "\n".join(json.dumps(r, ensure_ascii=False) for r in records[7:]) + "\n\n", encoding="utf-8")
  out = sft(tmp_path / "sft", tok_path, tmp_path / "tfds", max_seq_len=192, pad_id=5,
            val_fraction=0.0)
  assert len(out["train"]) == 12 and out["validation"] is None
  for i, r in enumerate(records):
    want = encode_sft_example(sp, r["instruction"], r["input"], r["output"], 192, pad_id=5)
    got = out["train"][i]
    for key in ("input_ids", "labels", "attention_mask"):
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} of example {i}")
  stats = out["stats"]
  assert (stats["files"], stats["examples"], stats["truncated"]) == (2, 12, 0)
  assert stats["supervised_tokens"] == sum(
      int((out["train"][i]["labels"] != IGNORE_INDEX).sum()) for i in range(12))


def test_sft_overlong_examples_are_truncated_and_counted(tok_path, tmp_path):
  path = tmp_path / "long.json"
  records = alpaca_records(4)
  records[1]["output"] = "很长的回答。" * 40
  records[3]["input"] = "很长的问题。" * 60  # the prompt alone fills max_seq_len
  path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
  out = sft(path, tok_path, tmp_path / "tfds", max_seq_len=192, val_fraction=0.25)
  assert (out["stats"]["truncated"], out["stats"]["fully_masked"]) == (2, 1)
  assert (len(out["train"]), len(out["validation"])) == (3, 1)


# --- bad input -----------------------------------------------------------------------------------


def test_malformed_json_names_file_and_line(tok_path, tmp_path):
  path = tmp_path / "bad.json"
  path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]',
                  encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad\.json:3:\d+: malformed JSON: Expecting ','"):
    sft(path, tok_path, tmp_path / "tfds")


def test_malformed_jsonl_line_names_file_and_line(tok_path, tmp_path):
  path = tmp_path / "bad.jsonl"
  good = json.dumps({"instruction": "a", "output": "b"})
  path.write_text("\n".join([good, good, '{"instruction": "a", "output": ', good]) + "\n",
                  encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad\.jsonl:3:\d+: malformed JSON line"):
    sft(path, tok_path, tmp_path / "tfds")
  out = sft(path, tok_path, tmp_path / "tfds", skip_bad_lines=True, val_fraction=0.0)
  assert out["stats"]["skipped_bad_lines"] == 1 and len(out["train"]) == 3


def test_missing_field_names_field_example_and_file(tok_path, tmp_path):
  path = tmp_path / "missing.json"
  path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]),
                  encoding="utf-8")
  with pytest.raises(ValueError, match=r"missing\.json: example 1: missing field 'output'"):
    sft(path, tok_path, tmp_path / "tfds")
  jsonl = tmp_path / "missing.jsonl"
  jsonl.write_text('{"output": "b"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"missing\.jsonl: example 0 \(line 1\): missing field "
                                       r"'instruction'"):
    sft(jsonl, tok_path, tmp_path / "tfds")


def test_non_string_field_is_an_error(tok_path, tmp_path):
  path = tmp_path / "types.json"
  path.write_text(json.dumps([{"instruction": "a", "input": 3, "output": "b"}]), encoding="utf-8")
  with pytest.raises(ValueError, match=r"types\.json: example 0: field 'input' is int"):
    sft(path, tok_path, tmp_path / "tfds")


def test_empty_corpus_is_an_error(tok_path, tmp_path):
  write_text(tmp_path / "empty" / "a.txt", ["", "  ", ""])
  with pytest.raises(ValueError, match=r"empty corpus: no non-empty lines in .*a\.txt"):
    pretrain(tmp_path / "empty", tok_path, tmp_path / "tfds")
  (tmp_path / "none.json").write_text("[]", encoding="utf-8")
  with pytest.raises(ValueError, match=r"empty corpus: no instruction examples in .*none\.json"):
    sft(tmp_path / "none.json", tok_path, tmp_path / "tfds")
  (tmp_path / "nothing").mkdir()
  with pytest.raises(FileNotFoundError, match=r"nothing: directory has no \.txt files"):
    pretrain(tmp_path / "nothing", tok_path, tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match=r"absent\.txt: no such file"):
    pretrain(tmp_path / "absent.txt", tok_path, tmp_path / "tfds")


def test_non_utf8_line_is_an_error_or_skipped(tok_path, tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes("\n".join(corpus_lines()[:30]).encode() + "\ncaf\xe9 au lait\n".encode("latin-1")
                   + "\n".join(corpus_lines()[30:60]).encode() + b"\n")
  with pytest.raises(ValueError, match=r"latin1\.txt:31: not valid UTF-8 \(byte 0xe9 at column 4\)"):
    pretrain(path, tok_path, tmp_path / "tfds", block_size=32)
  out = pretrain(path, tok_path, tmp_path / "tfds", block_size=32, skip_bad_lines=True)
  assert out["stats"]["skipped_bad_lines"] == 1 and out["stats"]["documents"] == 60
  bad_json = tmp_path / "bad_bytes.json"
  bad_json.write_bytes(b'[\n{"instruction": "a",\n "output": "\xff"}]')
  with pytest.raises(ValueError, match=r"bad_bytes\.json:3: not valid UTF-8"):
    sft(bad_json, tok_path, tmp_path / "tfds")


def test_failed_build_keeps_the_previous_build(corpus, tok_path, tmp_path):
  data_dir = tmp_path / "tfds"
  good = pretrain(corpus, tok_path, data_dir, block_size=64)
  first_block = good["train"][0]["input_ids"].copy()
  before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
  (corpus / "c.txt").write_bytes(b"fine line\nbroken \xff line\n")
  with pytest.raises(ValueError, match=r"c\.txt:2: not valid UTF-8"):
    pretrain(corpus, tok_path, data_dir, block_size=64)
  assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*")) == before
  np.testing.assert_array_equal(good["train"][0]["input_ids"], first_block)
  np.testing.assert_array_equal(load_built(good["path"])["train"][0]["input_ids"], first_block)
  (corpus / "c.txt").unlink()
  assert pretrain(corpus, tok_path, data_dir, block_size=64)["stats"]["reused"]


# --- loader --------------------------------------------------------------------------------------


def toy_source(n: int, length: int = 4) -> list[dict]:
  """Example i is [i, i, ...]: a batch shows which examples it holds."""
  return [{"input_ids": np.full(length, i, np.int32)} for i in range(n)]


def rows(batch) -> list[int]:
  return batch["input_ids"][:, 0].tolist()


def test_same_seed_and_step_give_the_same_batch():
  a, b = Loader(toy_source(50), 8, seed=3), Loader(toy_source(50), 8, seed=3)
  for step in (0, 5, 17, 1000):
    for key in ("input_ids", "labels", "attention_mask"):
      np.testing.assert_array_equal(a.batch(step)[key], b.batch(step)[key])
  assert rows(a.batch(0)) != rows(Loader(toy_source(50), 8, seed=4).batch(0))


def test_resume_from_step_k_equals_the_uninterrupted_stream():
  loader = Loader(toy_source(37), 8, seed=0)
  stream = [rows(b) for b in loader.iterate(0, num_steps=20)]
  resumed = Loader(toy_source(37), 8, seed=0)
  assert [rows(b) for b in resumed.iterate(11, num_steps=9)] == stream[11:]
  assert [rows(loader.batch(s)) for s in range(20)] == stream


def test_each_epoch_is_a_permutation():
  n, batch = 37, 8  # batches straddle epoch boundaries
  loader = Loader(toy_source(n), batch, seed=7)
  stream = np.concatenate([rows(loader.batch(s)) for s in range(3 * n // batch + 1)])
  epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
  for order in epochs:
    assert sorted(order.tolist()) == list(range(n))
  assert epochs[0].tolist() != epochs[1].tolist()
  assert loader.steps_per_epoch == 4 and loader.steps_for_epochs(3) == 14 and len(loader) == 37


@pytest.mark.parametrize("process_count", [2, 4])
def test_host_slices_are_disjoint_and_cover_the_global_batch(process_count):
  source = toy_source(29)
  whole = Loader(source, 8, seed=1)
  hosts = [Loader(source, 8, seed=1, process_index=i, process_count=process_count)
           for i in range(process_count)]
  for step in (0, 3, 9):
    parts = [h.batch(step) for h in hosts]
    assert all(p["input_ids"].shape == (8 // process_count, 4) for p in parts)
    for key in ("input_ids", "labels", "attention_mask"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                    whole.batch(step)[key])
    assert rows(whole.batch(step)) == whole.global_indices(step).tolist()


def test_global_batch_must_divide_by_process_count():
  with pytest.raises(ValueError, match=r"global batch size 10 is not divisible by the process "
                                       r"count 4"):
    Loader(toy_source(20), 10, seed=0, process_index=0, process_count=4)


def test_pretraining_batches_have_labels_and_full_mask():
  batch = Loader(toy_source(10, length=6), 4, seed=0).batch(2)
  assert set(batch) == {"input_ids", "labels", "attention_mask"}
  assert all(v.dtype == np.int32 and v.shape == (4, 6) for v in batch.values())
  np.testing.assert_array_equal(batch["labels"], batch["input_ids"])
  assert batch["attention_mask"].min() == 1


def test_loader_reads_tfds_sources(corpus, tok_path, tmp_path):
  out = pretrain(corpus, tok_path, tmp_path / "tfds", block_size=64)
  loader = Loader(out["train"], 8, seed=0, process_index=1, process_count=2)
  batch = loader.batch(5)
  want = np.stack([out["train"][int(i)]["input_ids"] for i in loader.indices(5)])
  np.testing.assert_array_equal(batch["input_ids"], want)
  assert batch["input_ids"].shape == (4, 64)
  assert measure_throughput(loader, num_steps=3)["tokens_per_s"] > 0
