"""Tests for cnllama_jax.tokenizer (vocabulary extension) and launch/build_tokenizer.py.

Self-contained tests train tiny models on tests/data/tokenizer_{en,zh}.txt (original
prose written for these tests) or build hand-made protos whose tokenizations can be
derived by hand.  Tests marked ``@real`` use the paper's files from
$CNLLAMA_FIXTURES/tokenizers (default <repo>/../shared/fixtures), never copied into the
repo, and are skipped when those are absent.  Token counts are
``SentencePieceProcessor.encode(text)``: no BOS/EOS (HF ``encode`` adds BOS: +1).
"""

import json
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from cnllama_jax import paths, tokenizer as tk, tokenizer_hf
from cnllama_jax import tokenizer_stats as tstats

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
FIXTURES = Path(os.environ.get("CNLLAMA_FIXTURES", REPO.parent / "shared" / "fixtures"))
FIXTURES = FIXTURES / "tokenizers"
LLAMA, CHINESE = FIXTURES / "llama_tokenizer.model", FIXTURES / "chinese_sp.model"
real = pytest.mark.skipif(not (LLAMA.is_file() and CHINESE.is_file()),
                          reason=f"no fixtures in {FIXTURES}")
POEM = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
PAPER_EN = "The primary use of LLaMA is research on large language models, including"

LLAMA_LIKE = dict(model_type="bpe", byte_fallback=True, split_digits=True, normalization="identity",
                  remove_extra_whitespaces=False, allow_whitespace_only_pieces=True)


def _lines(name):
  return (DATA / name).read_text(encoding="utf-8").splitlines()


def hand_model(pieces, bpe=True):
  """A loadable model: <unk> <s> </s>, 256 byte pieces if bpe, then NORMAL (piece, score)s."""
  m = sp_pb2.ModelProto()
  m.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE if bpe else sp_pb2.TrainerSpec.UNIGRAM
  m.trainer_spec.byte_fallback = bpe
  m.normalizer_spec.name = "identity"
  m.normalizer_spec.add_dummy_prefix = True
  m.normalizer_spec.remove_extra_whitespaces = False
  for piece, kind in (("<unk>", tk.UNKNOWN), ("<s>", tk.CONTROL), ("</s>", tk.CONTROL)):
    m.pieces.add(piece=piece, type=kind)
  for b in range(256 if bpe else 0):
    m.pieces.add(piece=f"<0x{b:02X}>", type=tk.BYTE)
  for piece, score in pieces:
    m.pieces.add(piece=piece, score=score)
  m.trainer_spec.vocab_size = len(m.pieces)
  return m


def write_model(path, proto):
  path.write_bytes(proto.SerializeToString())
  return path


def hf_tokenizer(directory):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(str(directory))


def mixed_inputs(n=300, seed=0):
  """Lines of both texts, their Chinese clauses and random Chinese/English splices.

  No input starts with whitespace: transformers' LlamaTokenizer (Metaspace, prepend
  "first") does not add the dummy prefix before leading spaces, unlike sentencepiece,
  for LLaMA itself too (a base-tokenizer difference, not one of the merge).
  """
  en, zh = _lines("tokenizer_en.txt"), _lines("tokenizer_zh.txt")
  out = en + zh + [c for line in zh for c in line.replace("，", "。").split("。") if c]
  rng = random.Random(seed)
  for _ in range(n):
    a, b = rng.choice(zh), rng.choice(en)
    i, j = rng.randrange(len(a)), rng.randrange(len(b))
    out.append((a[:i] + " " + b[j:j + rng.randrange(40)] + a[i:i + rng.randrange(30)]).lstrip())
  return [s for s in out if s]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Tiny LLaMA-like BPE base (English) and paper-like unigram Chinese model (~20 ms each)."""
  d = tmp_path_factory.mktemp("tiny")
  tk.train_sentencepiece([DATA / "tokenizer_en.txt"], d / "base.model", vocab_size=600,
                         character_coverage=1.0, hard_vocab_limit=False, progress=False,
                         **LLAMA_LIKE)
  tk.train_sentencepiece([DATA / "tokenizer_zh.txt"], d / "zh.model", vocab_size=500,
                         model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
                         progress=False)
  # "zero" as the paper (a NORMAL [PAD]); "ordered" with a USER_DEFINED [PAD] so sentencepiece
  # maps the literal string as HF does
  merged = {mode: tk.merge(d / "base.model", d / "zh.model", d / f"merged_{mode}",
                           pad_piece="[PAD]", new_piece_scores=mode,
                           pad_type="normal" if mode == "zero" else "user_defined")
            for mode in tk.SCORE_MODES}
  return d, merged


# ----------------------------------------------------------------------------- training


def test_trained_models_have_requested_specs(tiny):
  d, _ = tiny
  base, zh = tk.load_model_proto(d / "base.model"), tk.load_model_proto(d / "zh.model")
  assert [p.piece for p in base.pieces[:3]] == ["<unk>", "<s>", "</s>"]
  assert sum(p.type == tk.BYTE for p in base.pieces) == 256 and base.pieces[3].piece == "<0x00>"
  assert base.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE
  assert base.normalizer_spec.name == "identity"
  assert base.trainer_spec.split_digits and base.trainer_spec.pad_id == -1
  assert zh.trainer_spec.model_type == sp_pb2.TrainerSpec.UNIGRAM
  assert zh.normalizer_spec.name == "nmt_nfkc"
  assert not zh.trainer_spec.byte_fallback and sum(p.type == tk.BYTE for p in zh.pieces) == 0
  assert not list(d.glob(".*"))  # atomic write left nothing behind


def test_train_errors(tmp_path):
  out = tmp_path / "m.model"
  (tmp_path / "empty.txt").write_bytes(b"")
  (tmp_path / "blank.txt").write_bytes(b"  \n\t\n")
  with pytest.raises(tk.CorpusError,
                     match=r"empty input: no non-blank line in .*empty\.txt, .*blank\.txt"):
    tk.train_sentencepiece([tmp_path / "empty.txt", tmp_path / "blank.txt"], out, progress=False)
  # line 2 is 中 then the invalid byte 0xff: column 2
  (tmp_path / "bad.txt").write_bytes("ok\n中".encode() + b"\xff\n")
  with pytest.raises(tk.CorpusError,
                     match=r"bad\.txt:2: not valid UTF-8 \(byte 0xff at column 2\)"):
    tk.train_sentencepiece([DATA / "tokenizer_zh.txt", tmp_path / "bad.txt"], out, progress=False)
  with pytest.raises(tk.CorpusError, match=r"missing\.txt: no such file or directory"):
    tk.train_sentencepiece([tmp_path / "missing.txt"], out, progress=False)
  with pytest.raises(RuntimeError, match="[Vv]ocabulary size"):  # sentencepiece's own error
    tk.train_sentencepiece([DATA / "tokenizer_en.txt"], out, vocab_size=50000, progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "blank.txt", "empty.txt"]


# ----------------------------------------------------------------------------- merging


def test_merge_appends_missing_pieces_in_order(tiny):
  d, merged = tiny
  base, zh = tk.load_model_proto(d / "base.model"), tk.load_model_proto(d / "zh.model")
  out = tk.load_model_proto(d / "merged_zero" / "tokenizer.model")
  base_set = {p.piece for p in base.pieces}
  expected_new = [p.piece for p in zh.pieces if p.piece not in base_set]
  overlap = [p.piece for p in zh.pieces if p.piece in base_set]
  assert {"<unk>", "<s>", "</s>", "▁"} <= set(overlap)  # shared pieces are not appended twice
  triple = lambda p: (p.piece, p.score, p.type)  # noqa: E731
  assert [triple(p) for p in out.pieces[:600]] == [triple(p) for p in base.pieces]
  assert [p.piece for p in out.pieces[600:-1]] == expected_new
  assert all(p.score == 0 and p.type == tk.NORMAL for p in out.pieces[600:-1])
  assert len(out.pieces) == 600 + len(expected_new) + 1 == merged["zero"].num_pieces
  assert len({p.piece for p in out.pieces}) == len(out.pieces)
  assert (out.pieces[-1].piece, out.pieces[-1].type) == ("[PAD]", tk.NORMAL)  # as published
  ordered = tk.load_model_proto(d / "merged_ordered" / "tokenizer.model")
  assert (ordered.pieces[-1].piece, ordered.pieces[-1].type) == ("[PAD]", tk.USER_DEFINED)
  assert merged["zero"].pad_id == len(out.pieces) - 1
  assert merged["zero"].num_added == len(expected_new)
  assert out.trainer_spec == base.trainer_spec and out.normalizer_spec == base.normalizer_spec


def test_ordered_scores_outrank_base_and_decrease(tiny):
  d, _ = tiny
  out = tk.load_model_proto(d / "merged_ordered" / "tokenizer.model")
  new = [p.score for p in out.pieces[600:-1]]
  assert max(p.score for p in out.pieces[:600]) == 0.0  # specials and bytes; NORMAL pieces < 0
  assert new == [float(len(new) - i) for i in range(len(new))]  # n, n-1, ..., 1
  assert out.pieces[-1].score == 0.0


def test_merge_output_loads_in_transformers(tiny):
  d, merged = tiny
  tok = hf_tokenizer(d / "merged_zero")
  n = merged["zero"].num_pieces
  assert type(tok).__name__ == "LlamaTokenizer" and len(tok) == n
  ids = (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
  assert ids == (0, 1, 2, n - 1)
  assert tok.pad_token == "[PAD]" and tok.encode("a")[0] == 1
  assert sorted(p.name for p in (d / "merged_zero").iterdir()) == sorted(tokenizer_hf.HF_FILES)
  special = json.loads((d / "merged_zero" / "special_tokens_map.json").read_text())
  assert special == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                     "pad_token": "[PAD]"}


def test_merge_without_pad(tiny, tmp_path):
  d, _ = tiny
  result = tk.merge(d / "base.model", d / "zh.model", tmp_path / "nopad")
  tok = hf_tokenizer(tmp_path / "nopad")
  assert result.pad_id is None and tok.pad_token_id is None and len(tok) == result.num_pieces
  assert result.num_pieces == tiny[1]["zero"].num_pieces - 1


def test_ordered_hf_matches_sentencepiece_zero_does_not(tiny):
  d, _ = tiny
  inputs = mixed_inputs() + ["我们每一步都走得很稳。OK", "中文[PAD]中文", "中文 and English 混合 text，123。"]
  disagree = {}
  for mode in tk.SCORE_MODES:
    tok = hf_tokenizer(d / f"merged_{mode}")
    sp = spm.SentencePieceProcessor(model_file=str(d / f"merged_{mode}" / "tokenizer.model"))
    disagree[mode] = [s for s in inputs if tok.encode(s, add_special_tokens=False) != sp.encode(s)]
    if mode == "ordered":  # known base-tokenizer difference: text *starting* with a special token
      assert sp.encode("[PAD]x", out_type=str)[:2] == ["▁", "[PAD]"]
      assert tok.tokenize("[PAD]x")[0] == "[PAD]"
  assert len(inputs) > 350
  assert disagree["ordered"] == []
  assert len(disagree["zero"]) > 10  # score-0 ties: position (sentencepiece) vs merge rank (HF)


def test_tie_breaking_hand_made(tmp_path):
  """每一/一步 both score 0: sentencepiece takes the leftmost pair, HF the lower merge rank."""
  base = write_model(tmp_path / "b.model", hand_model([("▁", -1.0), ("a", -2.0)]))
  added = write_model(tmp_path / "a.model", hand_model(
      [("每", -1.0), ("一", -2.0), ("步", -3.0), ("一步", -4.0), ("每一", -5.0)], bpe=False))
  pieces = {}
  for mode in tk.SCORE_MODES:
    tk.merge(base, added, tmp_path / mode, new_piece_scores=mode)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / mode / "tokenizer.model"))
    tok = hf_tokenizer(tmp_path / mode)
    pieces[mode] = (sp.encode("每一步", out_type=str), tok.tokenize("每一步"))
  assert pieces["zero"] == (["▁", "每一", "步"], ["▁", "每", "一步"])
  assert pieces["ordered"] == (["▁", "每", "一步"], ["▁", "每", "一步"])


def test_merge_errors(tiny, tmp_path):
  d, _ = tiny
  (tmp_path / "text.model").write_text("not a model\n")
  (tmp_path / "empty.model").write_bytes(b"")
  for bad in ("text.model", "empty.model", "missing.model"):
    with pytest.raises(tk.InvalidModelError,
                       match=rf"{bad}: (not a valid|cannot read) SentencePiece model"):
      tk.merge(d / "base.model", tmp_path / bad, tmp_path / "out")
  with pytest.raises(ValueError, match="base model must be BPE"):
    tk.merge(d / "zh.model", d / "base.model", tmp_path / "out")
  with pytest.raises(ValueError, match="new_piece_scores"):
    tk.merge(d / "base.model", d / "zh.model", tmp_path / "out", new_piece_scores="random")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not an empty directory"):
    tk.merge(d / "base.model", d / "zh.model", tmp_path / "full")
  assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
  (tmp_path / "emptydir").mkdir()
  tk.merge(d / "base.model", d / "zh.model", tmp_path / "emptydir")  # an empty dir is replaced
  assert (tmp_path / "emptydir" / "tokenizer.model").is_file()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_merge_to_and_load_from_a_bucket(tiny, gcs):
  """`tokenizer="gs://..."` works: a merge written to a bucket is byte-identical to the local one
  and loads (as a directory or as its .model file) with the same ids."""
  d, merged = tiny
  out = gcs.bucket() + "/tok/merged"
  result = tk.merge(d / "base.model", d / "zh.model", out, pad_piece="[PAD]")
  assert (result.out_dir, result.num_pieces) == (out, merged["zero"].num_pieces)
  assert paths.listdir(out) == sorted(tokenizer_hf.HF_FILES)  # no _INCOMPLETE marker left
  local = d / "merged_zero"
  for name in tokenizer_hf.HF_FILES:
    assert paths.read_bytes(paths.join(out, name)) == (local / name).read_bytes(), name
  text = "\n".join(_lines("tokenizer_zh.txt")[:5] + _lines("tokenizer_en.txt")[:5])
  want = tk.load_processor(local).encode(text)
  assert tk.load_processor(out).encode(text) == want
  assert tk.load_processor(out + "/tokenizer.model").encode(text) == want
  assert tk.vocab_size(out) == merged["zero"].num_pieces and tk.base_kind(out) == "sentencepiece"
  with pytest.raises(FileExistsError, match="not an empty directory"):
    tk.merge(d / "base.model", d / "zh.model", out)
  with pytest.raises(tk.InvalidModelError, match=r"/nothing\.model: cannot read SentencePiece"):
    tk.load_processor(gcs.bucket() + "/nothing.model")


# ----------------------------------------------------------------------------- statistics


def test_stats_hand_counted(tmp_path):
  model = write_model(tmp_path / "h.model", hand_model(
      [("ab", -1.0), ("▁ab", -2.0), ("▁", -3.0), ("a", -4.0), ("b", -5.0), ("c", -6.0)]))
  sp = tk.load_processor(model)
  text = "ab c 中文"
  # "▁ab▁c▁中文" -> ▁ab | ▁ | c | ▁ | 3 bytes of 中 | 3 bytes of 文
  assert sp.encode(text, out_type=str)[:4] == ["▁ab", "▁", "c", "▁"]
  s = tstats.tokenizer_stats(sp, text, name="hand", min_seconds=0.01)
  counts = (s.num_chars, s.num_bytes, s.num_tokens, s.num_nonspace_chars, s.num_byte_fallback_chars)
  assert counts == (7, 11, 10, 5, 2)
  assert s.tokens_per_char == pytest.approx(10 / 7) and s.tokens_per_byte == pytest.approx(10 / 11)
  assert s.byte_fallback_share == pytest.approx(0.4) and s.chars_per_second > 0
  assert "hand" in tstats.format_stats_table([s]) and "40.00" in tstats.format_stats_table([s])
  png = tstats.plot_stats([s, s], tmp_path / "plot.png")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_tiny_base_vs_merged(tiny):
  d, _ = tiny
  text = (DATA / "tokenizer_zh.txt").read_text(encoding="utf-8")
  base = tstats.tokenizer_stats(tk.load_processor(d / "base.model"), text, min_seconds=0.01)
  merged = tstats.tokenizer_stats(tk.load_processor(d / "merged_zero"), text, min_seconds=0.01)
  assert not any(c.isascii() and not c.isspace() for c in text)
  assert base.byte_fallback_share == 1.0  # English-only base: every character is bytes
  # The Chinese model is NFKC-normalised, the merged one identity: characters NFKC
  # changes (full-width ，：！ ...) have no piece and still fall back to bytes.
  changed = sum(1 for c in text if unicodedata.normalize("NFKC", c) != c and not c.isspace())
  assert changed > 0 and merged.num_byte_fallback_chars == changed
  assert merged.tokens_per_char < 0.5 * base.tokens_per_char


# ----------------------------------------------------------------------------- CLI


def _cli(*args):
  command = [sys.executable, str(REPO / "launch" / "build_tokenizer.py"), *map(str, args)]
  return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_end_to_end(tmp_path):
  r = _cli("train", "--input", DATA / "tokenizer_en.txt", "--out", tmp_path / "b.model",
           "--vocab_size", 600, "--model_type", "bpe", "--character_coverage", 1.0,
           "--byte_fallback", "--split_digits", "--normalization", "identity",
           "--no-remove_extra_whitespaces", "--allow_whitespace_only_pieces",
           "--no-hard_vocab_limit")
  assert r.returncode == 0, r.stderr
  r = _cli("train", "--input", DATA, "--out", tmp_path / "z.model", "--vocab_size", 500,
           "--no-hard_vocab_limit")
  assert r.returncode == 0, r.stderr
  assert "training unigram model" in r.stderr
  r = _cli("merge", "--base", tmp_path / "b.model", "--add", tmp_path / "z.model",
           "--out", tmp_path / "m", "--pad_piece", "[PAD]", "--new_piece_scores", "ordered")
  assert r.returncode == 0 and "pad id" in r.stdout, r.stderr
  r = _cli("stats", "--tokenizer", tmp_path / "b.model", "--tokenizer", tmp_path / "m",
           "--text", DATA / "tokenizer_zh.txt", "--png", tmp_path / "s.png", "--min_seconds", 0.01)
  assert r.returncode == 0, r.stderr
  assert "tok/char" in r.stdout and "\nb " in r.stdout and "\nm " in r.stdout
  assert (tmp_path / "s.png").is_file()
  r = _cli("merge", "--base", tmp_path / "b.model", "--add", DATA / "tokenizer_zh.txt",
           "--out", tmp_path / "x")
  assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
  assert "tokenizer_zh.txt: not a valid SentencePiece model" in r.stderr
  assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def real_merged(tmp_path_factory):
  d = tmp_path_factory.mktemp("real")
  return {"zero": tk.merge(LLAMA, CHINESE, d / "zero"),
          "ordered": tk.merge(LLAMA, CHINESE, d / "ordered", pad_piece="[PAD]",
                              new_piece_scores="ordered"),
          "alpaca": tk.merge(LLAMA, CHINESE, d / "alpaca", pad_piece="[PAD]")}  # paper's settings


# sha256 of the published Chinese-LLaMA (49,953) and Chinese-Alpaca (49,954) tokenizer.model files
CHINESE_LLAMA_SHA256 = "e2676d4ca29ca1750f6ff203328d73b189321dc5776ceede037cbd36541d70c0"
CHINESE_ALPACA_SHA256 = "2d967e855b1213a439df6c8ce2791f869c84b4f3b6cfacf22b86440b8192a2f8"


@real
def test_real_merges_are_byte_identical_to_published(real_merged):
  import hashlib
  sha = lambda name: hashlib.sha256(  # noqa: E731
      (Path(real_merged[name].out_dir) / "tokenizer.model").read_bytes()).hexdigest()
  assert sha("zero") == CHINESE_LLAMA_SHA256
  assert sha("alpaca") == CHINESE_ALPACA_SHA256
  alpaca = tk.load_model_proto(Path(real_merged["alpaca"].out_dir) / "tokenizer.model")
  pad = alpaca.pieces[49953]
  assert (pad.piece, pad.score, pad.type) == ("[PAD]", 0.0, tk.NORMAL)
  tok = hf_tokenizer(real_merged["alpaca"].out_dir)
  assert len(tok) == 49954 and tok.pad_token == "[PAD]" and tok.pad_token_id == 49953
  assert tok.convert_ids_to_tokens(49953) == "[PAD]"


@real
def test_real_merge_facts(real_merged):
  llama = tk.load_model_proto(LLAMA)
  zero = tk.load_model_proto(Path(real_merged["zero"].out_dir) / "tokenizer.model")
  ordered = tk.load_model_proto(Path(real_merged["ordered"].out_dir) / "tokenizer.model")
  assert len(llama.pieces) == 32000 and len(zero.pieces) == 49953 and len(ordered.pieces) == 49954
  triple = lambda p: (p.piece, p.score, p.type)  # noqa: E731
  assert [triple(p) for p in zero.pieces[:32000]] == [triple(p) for p in llama.pieces]
  assert zero.trainer_spec == llama.trainer_spec and zero.normalizer_spec == llama.normalizer_spec
  assert [p.piece for p in ordered.pieces[:49953]] == [p.piece for p in zero.pieces]
  assert ordered.pieces[49953].piece == "[PAD]" and real_merged["ordered"].pad_id == 49953
  tok = hf_tokenizer(real_merged["ordered"].out_dir)
  ids = (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id)
  assert len(tok) == 49954 and ids == (49953, 1, 2, 0)
  assert len(hf_tokenizer(real_merged["zero"].out_dir)) == 49953


@real
def test_real_token_counts(real_merged):
  llama = tk.load_processor(LLAMA)
  merged = tk.load_processor(real_merged["zero"].out_dir)
  assert len(llama.encode(POEM)) == 37 and len(merged.encode(POEM)) == 21  # no BOS
  assert merged.encode(PAPER_EN) == llama.encode(PAPER_EN)
  # ...but not all English: score-0 Chinese-model pieces outrank every LLaMA merge,
  # and multi-digit pieces undo LLaMA's digit splitting.
  assert llama.encode("people 2023", out_type=str) == ["▁people", "▁", "2", "0", "2", "3"]
  assert merged.encode("people 2023", out_type=str) == ["▁p", "eo", "ple", "▁20", "23"]


@real
def test_real_hf_agrees_with_sentencepiece_when_ordered(real_merged):
  zh = _lines("tokenizer_zh.txt")
  sentences = [POEM, "我们每一步都走得很稳。"] + zh + [c for line in zh for c in line.split("。") if c]
  sentences += mixed_inputs()  # mixed Chinese/English too
  for mode in tk.SCORE_MODES:
    tok = hf_tokenizer(real_merged[mode].out_dir)
    sp = tk.load_processor(real_merged[mode].out_dir)
    bad = [s for s in sentences if tok.encode(s, add_special_tokens=False) != sp.encode(s)]
    if mode == "ordered":
      assert bad == []
    else:
      assert "我们每一步都走得很稳。" in bad and len(bad) > 5
      assert sp.encode("我们每一步", out_type=str) == ["▁我们", "每一", "步"]
      assert tok.tokenize("我们每一步") == ["▁我们", "每", "一步"]
