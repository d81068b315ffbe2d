"""Sequence packing: which examples share a row, segment ids, label masks, packed tfds builds."""
import json

import numpy as np
import pytest

from cnllama_jax.data import (IGNORE_INDEX, Loader, best_fit_decreasing, build_pretrain_dataset,
                              build_sft_dataset, document_segments, pack_row, read_instructions)
from tests.test_data import alpaca_records, corpus_lines, tok_path, write_text  # noqa: F401


def segments_of(row: dict) -> list[tuple[list[int], list[int]]]:
  """(input ids, labels) of each segment of a stored row, in segment order."""
  mask = np.asarray(row["attention_mask"])
  return [(np.asarray(row["input_ids"])[mask == s].tolist(),
           np.asarray(row["labels"])[mask == s].tolist()) for s in range(1, mask.max() + 1)]


# --- which examples share a row ------------------------------------------------------------------

def test_best_fit_decreasing_places_longest_first_into_the_tightest_row():
  rows = best_fit_decreasing([3, 7, 5, 2, 4, 1], row_length=8)
  # 7 -> row0 (1 left); 5 -> row1 (3 left); 4 -> row2 (4 left); 3 -> row1 (0 left, closed);
  # 2 -> row2 (2 left); 1 -> row0 (tightest: 1 left, closed).
  assert [r.tolist() for r in rows] == [[1, 5], [2, 0], [4, 3]]


def test_best_fit_decreasing_uses_every_example_once_and_never_overfills():
  lengths = np.random.default_rng(0).integers(1, 65, size=500)
  rows = best_fit_decreasing(lengths, row_length=64)
  assert sorted(np.concatenate(rows).tolist()) == list(range(500))
  assert all(len(r) and lengths[r].sum() <= 64 for r in rows)
  assert len(rows) < 500 * 0.7  # packing actually shares rows
  assert [r.tolist() for r in best_fit_decreasing(lengths, 64)] == [r.tolist() for r in rows]


def test_best_fit_decreasing_rejects_an_example_longer_than_a_row():
  with pytest.raises(ValueError, match=r"example 1 has 9 tokens; packing needs 1 to 8"):
    best_fit_decreasing([3, 9], row_length=8)


# --- one row ------------------------------------------------------------------------------------

def test_pack_row_segment_ids_and_boundary_labels():
  row = pack_row([np.array([1, 11, 12]), np.array([1, 21]), np.array([1, 31, 32])],
                 [np.array([-100, 11, 12]), np.array([5, 21]), np.array([-100, -100, 32])],
                 row_length=10, pad_id=0)
  assert row["input_ids"].tolist() == [1, 11, 12, 1, 21, 1, 31, 32, 0, 0]
  assert row["attention_mask"].tolist() == [1, 1, 1, 2, 2, 3, 3, 3, 0, 0]
  # the first token of segments 2 and 3 takes no loss (even when its label was 5): the step
  # shifts labels by one, so it would be the target of the previous segment's last token.
  assert row["labels"].tolist() == [-100, 11, 12, -100, 21, -100, -100, 32, -100, -100]
  assert all(v.dtype == np.int32 and v.shape == (10,) for v in row.values())


def test_pack_row_of_one_example_is_the_classic_padded_row():
  row = pack_row([np.array([1, 7, 8])], [np.array([7, 7, 8])], row_length=5, pad_id=9)
  assert row["input_ids"].tolist() == [1, 7, 8, 9, 9]
  assert row["attention_mask"].tolist() == [1, 1, 1, 0, 0]
  assert row["labels"].tolist() == [7, 7, 8, -100, -100]


def test_pack_row_that_overflows_is_an_error():
  with pytest.raises(ValueError, match=r"examples of 6 tokens do not fit a row of 5"):
    pack_row([np.arange(3), np.arange(3)], [np.arange(3), np.arange(3)], row_length=5, pad_id=0)


def test_document_segments_restart_at_every_bos():
  ids = np.array([40, 41, 1, 50, 51, 52, 1, 60], np.int32)  # a continued document, then two
  segments, labels = document_segments(ids, bos_id=1)
  assert segments.tolist() == [1, 1, 2, 2, 2, 2, 3, 3]
  assert labels.tolist() == [40, 41, -100, 50, 51, 52, -100, 60]
  segments, labels = document_segments(np.array([1, 5, 6, 1, 7], np.int32), bos_id=1)
  assert segments.tolist() == [1, 1, 1, 2, 2] and labels.tolist() == [1, 5, 6, -100, 7]


# --- packed builds --------------------------------------------------------------------------------

@pytest.fixture()
def instructions(tmp_path):
  records = alpaca_records(40)
  for i in range(0, 40, 7):  # a few long answers, so lengths vary a lot
    records[i]["output"] = records[i]["output"] * (1 + i % 5)
  path = tmp_path / "sft.json"
  path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
  return path


def build_both(path, tok_path, data_dir, **kw):
  kw = dict(max_seq_len=512, pad_id=3, val_fraction=0.1, progress=False, **kw)
  return (build_sft_dataset(path, tok_path, data_dir, pack=False, **kw),
          build_sft_dataset(path, tok_path, data_dir, pack=True, **kw))


def test_packed_and_unpacked_builds_hold_the_same_examples(instructions, tok_path, tmp_path):
  plain, packed = build_both(instructions, tok_path, tmp_path / "tfds")
  assert plain["path"] != packed["path"]
  for split in ("train", "validation"):
    want = sorted((ids, labels) for k in range(len(plain[split]))
                  for ids, labels in [segments_of(plain[split][k])[0]])
    got = []
    for k in range(len(packed[split])):
      for n, (ids, labels) in enumerate(segments_of(packed[split][k])):
        assert n == 0 or labels[0] == IGNORE_INDEX   # boundary masked
        got.append((ids, labels))
    assert sorted(got) == want, split  # same token sequences, none split or lost
  # a packed segment's labels are the example's own (SFT's first token, BOS, is a prompt token)
  stats = packed["stats"]
  assert (stats["train_examples"], stats["validation_examples"]) == (36, 4)
  assert stats["train_rows"] == len(packed["train"]) < 36
  assert stats["rows"] == len(packed["train"]) + len(packed["validation"])
  assert plain["stats"]["examples_per_row"] == 1.0
  assert stats["examples_per_row"] == pytest.approx(40 / stats["rows"], abs=1e-4)
  assert stats["real_token_fraction"] > 2 * plain["stats"]["real_token_fraction"]
  assert stats["real_token_fraction"] == pytest.approx(
      stats["tokens"] / (stats["rows"] * 512), abs=1e-4)


def test_packed_rows_are_never_padding_only_and_ids_are_contiguous(instructions, tok_path,
                                                                   tmp_path):
  _, packed = build_both(instructions, tok_path, tmp_path / "tfds")
  for k in range(len(packed["train"])):
    mask = packed["train"][k]["attention_mask"]
    n_real = int((mask > 0).sum())
    assert n_real > 0
    assert (mask[n_real:] == 0).all()           # padding only at the end
    assert mask[0] == 1 and (np.diff(mask[:n_real]) >= 0).all()
    assert set(np.diff(mask[:n_real]).tolist()) <= {0, 1}
    assert (packed["train"][k]["labels"][n_real:] == IGNORE_INDEX).all()


def test_packed_build_is_deterministic_and_loader_batches_are_pure(instructions, tok_path,
                                                                   tmp_path):
  _, first = build_both(instructions, tok_path, tmp_path / "a")
  _, second = build_both(instructions, tok_path, tmp_path / "b")
  assert len(first["train"]) == len(second["train"])
  for k in range(len(first["train"])):
    for key in ("input_ids", "labels", "attention_mask"):
      np.testing.assert_array_equal(first["train"][k][key], second["train"][k][key])
  a, b = Loader(first["train"], 4, seed=2), Loader(second["train"], 4, seed=2)
  for step in (0, 3, 11):
    for key in ("input_ids", "labels", "attention_mask"):
      np.testing.assert_array_equal(a.batch(step)[key], b.batch(step)[key])


def test_packed_pretraining_blocks_segment_at_documents(tok_path, tmp_path):
  corpus = write_text(tmp_path / "corpus" / "a.txt", corpus_lines(60))
  plain = build_pretrain_dataset(corpus, tok_path, tmp_path / "tfds", 64, val_fraction=0.0,
                                 progress=False)
  packed = build_pretrain_dataset(corpus, tok_path, tmp_path / "tfds", 64, val_fraction=0.0,
                                  pack=True, progress=False)
  assert len(plain["train"]) == len(packed["train"]) and set(plain["train"][0]) == {"input_ids"}
  for k in range(len(packed["train"])):
    row, ids = packed["train"][k], plain["train"][k]["input_ids"]
    np.testing.assert_array_equal(row["input_ids"], ids)  # packing adds and drops no token
    starts = np.flatnonzero(ids == 1)
    expected = np.cumsum(np.isin(np.arange(64), np.union1d([0], starts)))
    np.testing.assert_array_equal(row["attention_mask"], expected)
    np.testing.assert_array_equal(row["labels"], np.where(np.isin(np.arange(64), starts[starts > 0]),
                                                          IGNORE_INDEX, ids))
  assert packed["stats"]["packed"] and not plain["stats"]["packed"]


# --- the one reader of prompts ---------------------------------------------------------------------

def test_read_instructions_reads_txt_json_and_jsonl(tmp_path):
  txt = write_text(tmp_path / "p.txt", ["写一首诗。", "", "  ", "Name a fruit."])
  assert read_instructions(txt) == [{"instruction": "写一首诗。", "input": "", "output": ""},
                                    {"instruction": "Name a fruit.", "input": "", "output": ""}]
  (tmp_path / "p.jsonl").write_text('{"instruction": "翻译", "input": "你好"}\n\n', encoding="utf-8")
  assert read_instructions(tmp_path / "p.jsonl") == [
      {"instruction": "翻译", "input": "你好", "output": ""}]
  (tmp_path / "p.json").write_text('[{"input": "x"}]', encoding="utf-8")
  with pytest.raises(ValueError, match=r"p\.json: example 0: missing field 'instruction' \(need "
                                       r"'instruction'; 'input' is optional\)"):
    read_instructions(tmp_path / "p.json")
