"""Vocabulary extension of a byte-level BPE base (LLaMA-3 style tokenizer.json): cnllama_jax.bpe,
the dispatch in cnllama_jax.tokenizer and launch/build_tokenizer.py.

The base is trained here on tests/data/tokenizer_en.txt (English only) with four special tokens
added after its vocabulary, as LLaMA-3's (ids 128,000-128,255 after 128,000 BPE tokens); the
Chinese BPE is trained on tests/data/tokenizer_zh.txt.
"""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from cnllama_jax import bpe, paths
from cnllama_jax import tokenizer as tk
from cnllama_jax import tokenizer_stats as tstats
from cnllama_jax.data import text_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|eot_id|>"]
BASE_VOCAB = 500  # BPE tokens of the English base; its special tokens are ids 500..503


def _lines(name):
  return (DATA / name).read_text(encoding="utf-8").splitlines()


def _english_base(directory: Path) -> Path:
  """A LLaMA-3-like base directory: byte-level BPE, specials after the vocabulary, HF configs."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_lines("tokenizer_en.txt"), trainer)
  tok.add_special_tokens(SPECIALS)
  directory.mkdir()
  tok.save(str(directory / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0],
            "eos_token": SPECIALS[1], "clean_up_tokenization_spaces": False,
            "model_max_length": 8192}
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  d = tmp_path_factory.mktemp("bpe")
  base = _english_base(d / "base")
  zh = bpe.train([DATA / "tokenizer_zh.txt"], d / "zh.json", vocab_size=700, min_frequency=2,
                 progress=False)
  result = tk.merge(base, zh, d / "merged")  # dispatched to bpe.merge by the base's kind
  return d, base, zh, result


def _hf(directory):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(str(directory))


def test_byte_alphabet_matches_tokenizers():
  assert sorted(bpe.BYTE_CHAR) == sorted(pre_tokenizers.ByteLevel.alphabet())
  pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  text = "中文 a\tb\x7f\xa0é"
  (joined, _), = pre.pre_tokenize_str(text)
  assert bpe.token_bytes(joined) == text.encode("utf-8")
  assert bpe.token_bytes("Ġä¸Ń") == " 中".encode("utf-8")


def test_train_bpe_is_byte_level_with_all_bytes(built):
  d, _, zh, _ = built
  doc = json.loads(zh.read_text(encoding="utf-8"))
  assert doc["model"]["type"] == "BPE" and doc["pre_tokenizer"]["type"] == "ByteLevel"
  assert set(bpe.BYTE_CHAR) <= set(doc["model"]["vocab"])
  assert 256 < len(doc["model"]["vocab"]) <= 700  # a small corpus stops early
  words = [bpe.token_bytes(t).decode("utf-8", "replace") for t in doc["model"]["vocab"]]
  assert sum(len(w) >= 2 and all("\u4e00" <= c <= "\u9fff" for c in w) for w in words) >= 40  # Chinese words
  assert not list(d.glob(".*.tmp"))


def test_merge_keeps_base_ids_specials_and_ascii_tokenization(built):
  _, base, _, result = built
  base_doc = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
  merged_doc = json.loads((Path(result.out_dir) / "tokenizer.json").read_text(encoding="utf-8"))
  vocab = merged_doc["model"]["vocab"]
  base_ids = {t: i for t, i in base_doc["model"]["vocab"].items()}
  assert all(vocab[t] == i for t, i in base_ids.items())  # the first N ids unchanged
  assert merged_doc["added_tokens"] == base_doc["added_tokens"]  # specials unchanged
  assert [t["id"] for t in merged_doc["added_tokens"]] == [500, 501, 502, 503]
  n = len(merged_doc["model"]["merges"])
  assert merged_doc["model"]["merges"][:len(base_doc["model"]["merges"])] == \
      base_doc["model"]["merges"]
  assert n > len(base_doc["model"]["merges"])
  new_ids = sorted(i for t, i in vocab.items() if t not in base_ids and t not in SPECIALS)
  assert new_ids == list(range(504, 504 + result.num_added))  # after the specials, no gap
  assert [vocab[t] for t in SPECIALS] == [500, 501, 502, 503]  # held in the BPE vocabulary too
  assert (result.num_base, result.num_pieces) == (504, 504 + result.num_added)
  assert result.num_added > 100 and result.pad_id is None
  new_tokens = [t for t in vocab if t not in base_ids and t not in SPECIALS]
  assert all(max(bpe.token_bytes(t)) >= 0x80 for t in new_tokens)
  base_tok = _hf(base)
  merged_tok = _hf(result.out_dir)
  assert len(merged_tok) == result.num_pieces and len(base_tok) == 504
  ascii_lines = _lines("tokenizer_en.txt") + ["Hello, world! 12345 <|eot_id|> tabs\tand  spaces"]
  for line in ascii_lines:
    assert merged_tok.encode(line) == base_tok.encode(line)
  assert merged_tok.convert_tokens_to_ids(SPECIALS) == [500, 501, 502, 503]
  assert merged_tok.encode("<|eot_id|>x<|begin_of_text|>", add_special_tokens=False)[::2] == \
      [503, 500]
  assert merged_tok.bos_token == SPECIALS[0] and merged_tok.eos_token_id == 501


def test_merge_chinese_needs_fewer_tokens_and_round_trips(built):
  _, base, _, result = built
  base_tok, merged_tok = _hf(base), _hf(result.out_dir)
  zh = _lines("tokenizer_zh.txt")
  base_count = sum(len(base_tok.encode(s)) for s in zh)
  merged_count = sum(len(merged_tok.encode(s)) for s in zh)
  assert merged_count < 0.6 * base_count, (merged_count, base_count)
  mixed = zh + _lines("tokenizer_en.txt") + ["中文 and English 混合 text，123。", "  前导空格\n换行"]
  for line in mixed:
    ids = merged_tok.encode(line, add_special_tokens=False)
    assert merged_tok.decode(ids) == line


def test_merge_does_not_append_duplicates(built, tmp_path):
  d, _, zh, result = built
  merged_doc = json.loads((Path(result.out_dir) / "tokenizer.json").read_text(encoding="utf-8"))
  tokens = list(merged_doc["model"]["vocab"])
  assert len(tokens) == len(set(tokens)) == len(set(merged_doc["model"]["vocab"].values()))
  merges = [tuple(m) for m in merged_doc["model"]["merges"]]
  assert len(merges) == len(set(merges))
  again = tk.merge(result.out_dir, zh, tmp_path / "again")  # everything is already there
  assert again.num_added == 0 and again.num_pieces == result.num_pieces


def test_sentencepiece_pieces_merge_into_a_bpe_base(built, tmp_path):
  """A SentencePiece Chinese model (unigram, as the paper's) merged into a byte-level BPE base:
  each appended piece is reachable (BPE of its bytes gives it back, and the piece's text alone
  encodes to its one id), base ids and ASCII text are unchanged, Chinese needs fewer tokens."""
  _, base, _, _ = built
  zh = tk.train_sentencepiece([DATA / "tokenizer_zh.txt"], tmp_path / "zh.model", vocab_size=500,
                              character_coverage=1.0, hard_vocab_limit=False, progress=False)
  result = tk.merge(base, zh, tmp_path / "merged")
  base_doc = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
  doc = json.loads((tmp_path / "merged" / "tokenizer.json").read_text(encoding="utf-8"))
  assert all(doc["model"]["vocab"][t] == i for t, i in base_doc["model"]["vocab"].items())
  assert doc["model"]["merges"][:len(base_doc["model"]["merges"])] == base_doc["model"]["merges"]
  merged = Tokenizer.from_str(json.dumps(doc))
  base_tok = Tokenizer.from_file(str(base / "tokenizer.json"))
  token_of = {i: t for t, i in doc["model"]["vocab"].items()}
  appended = [token_of[i] for i in range(504, result.num_pieces)]
  assert len(appended) == result.num_added > 300
  sp = spm.SentencePieceProcessor(model_file=str(zh))
  pieces = {sp.id_to_piece(i).replace("\u2581", " ") for i in range(sp.get_piece_size())}
  whole = [t for t in appended if bpe.token_bytes(t).decode("utf-8", "replace") in pieces]
  assert len(whole) > 400  # the rest: prefixes of pieces the merges pass through
  assert all(any(w.startswith(t) for w in whole) for t in set(appended) - set(whole))
  for token in appended:
    assert [t.value for t in merged.model.tokenize(token)] == [token]
  for token in whole:
    text = bpe.token_bytes(token).decode("utf-8")
    assert merged.encode(text, add_special_tokens=False).tokens == [token], text
  for line in _lines("tokenizer_en.txt"):
    assert merged.encode(line).ids == base_tok.encode(line).ids
  text = "\n".join(_lines("tokenizer_zh.txt"))
  n_base, n_merged = (len(t.encode(text, add_special_tokens=False).ids) for t in (base_tok, merged))
  assert n_merged < 0.6 * n_base
  assert merged.decode(merged.encode(text).ids) == text


def test_merge_with_pad_and_stats(built, tmp_path):
  _, base, zh, result = built
  padded = tk.merge(base, zh, tmp_path / "pad", pad_piece="<|pad|>")
  tok = _hf(tmp_path / "pad")
  assert padded.pad_id == result.num_pieces and tok.pad_token_id == padded.pad_id
  assert tk.vocab_size(tmp_path / "pad") == result.num_pieces + 1 == len(tok)
  text = "\n".join(_lines("tokenizer_zh.txt"))
  stats = {name: tstats.tokenizer_stats(tk.load(path), text, name=name, min_seconds=0.0)
           for name, path in (("base", base), ("merged", result.out_dir))}
  assert stats["merged"].num_tokens < stats["base"].num_tokens
  assert stats["base"].num_tokens == len(_hf(base).encode(text, add_special_tokens=False))
  # every Chinese character of the English base is split across byte-level tokens
  assert stats["base"].byte_fallback_share > 0.9
  assert stats["merged"].byte_fallback_share < stats["base"].byte_fallback_share


def test_sub_pieces_are_the_base_split(built):
  _, base, _, result = built
  split = tk.sub_pieces(base, result.out_dir, 504)
  assert len(split) == result.num_added
  base_tok = Tokenizer.from_file(str(base / "tokenizer.json"))
  merged_doc = json.loads((Path(result.out_dir) / "tokenizer.json").read_text(encoding="utf-8"))
  token_of = {i: t for t, i in merged_doc["model"]["vocab"].items()}
  base_token = {i: t for t, i in json.loads((base / "tokenizer.json").read_text(
      encoding="utf-8"))["model"]["vocab"].items()}
  words = 0
  for k, ids in enumerate(split):
    token = token_of[504 + k]
    assert "".join(base_token[i] for i in ids) == token and all(i < 500 for i in ids)
    text = bpe.token_bytes(token).decode("utf-8", errors="replace")
    if text.lstrip(" ").isalpha():  # one pre-token: the base's own encoding of the text
      assert ids == base_tok.encode(text).ids
      words += 1
  assert words > 50
  with pytest.raises(ValueError, match=r"has 504 ids but the base model's embedding has 510 rows"):
    tk.sub_pieces(base, result.out_dir, 510)


def test_base_on_a_bucket_loads_and_merges_as_locally(built, gcs):
  _, base, zh, result = built
  bucket = gcs.bucket()
  paths.copy_tree(base, bucket + "/base")
  text = "\n".join(_lines("tokenizer_zh.txt")[:3] + _lines("tokenizer_en.txt")[:3])
  assert tk.base_kind(bucket + "/base") == "bpe" and tk.vocab_size(bucket + "/base") == 504
  assert tk.load(bucket + "/base").encode(text).ids == tk.load(base).encode(text).ids
  remote_data = text_tokenizer.load(bucket + "/base")  # BOS/EOS from its tokenizer_config.json
  assert (remote_data.bos_id(), remote_data.eos_id()) == (500, 501)
  assert remote_data.encode(text) == tk.load(base).encode(text, add_special_tokens=False).ids
  remote = tk.merge(bucket + "/base", zh, bucket + "/merged")
  assert (remote.num_pieces, remote.num_added) == (result.num_pieces, result.num_added)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert paths.read_bytes(f"{bucket}/merged/{name}") == (Path(result.out_dir) / name).read_bytes()


def test_bad_bases_are_one_line_errors(built, tmp_path):
  _, base, zh, _ = built
  wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
  wordpiece.save(str(tmp_path / "wordpiece.json"))
  with pytest.raises(bpe.UnsupportedTokenizerError,
                     match=r"wordpiece\.json: tokenizer model type 'WordPiece'; expected a "
                           r"SentencePiece \.model or a byte-level BPE"):
    tk.merge(tmp_path / "wordpiece.json", zh, tmp_path / "out1")
  metaspace = Tokenizer(models.BPE())
  metaspace.normalizer = normalizers.NFKC()
  metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
  metaspace.save(str(tmp_path / "metaspace.json"))
  with pytest.raises(bpe.UnsupportedTokenizerError,
                     match=r"metaspace\.json: a BPE tokenizer but not byte-level \(pre-tokenizer "
                           r"'Metaspace'\)"):
    tk.merge(base, tmp_path / "metaspace.json", tmp_path / "out2")
  (tmp_path / "broken.json").write_text("{not json")
  with pytest.raises(bpe.UnsupportedTokenizerError, match=r"broken\.json: not a tokenizer\.json"):
    tk.merge(tmp_path / "broken.json", zh, tmp_path / "out3")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json", "metaspace.json",
                                                         "wordpiece.json"]


def _cli(capsys, *args) -> subprocess.CompletedProcess:
  """launch/build_tokenizer.py's main in this process (test_tokenizer.py runs it as a script)."""
  spec = importlib.util.spec_from_file_location("build_tokenizer",
                                                REPO / "launch" / "build_tokenizer.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  code = module.main([str(a) for a in args])
  out = capsys.readouterr()
  return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_cli_bpe_train_merge_stats(built, tmp_path, capsys):
  _, base, _, _ = built
  r = _cli(capsys, "train", "--model_type", "bpe", "--input", DATA / "tokenizer_zh.txt",
           "--vocab_size", 600, "--out", tmp_path / "zh.json")
  assert r.returncode == 0, r.stderr
  r = _cli(capsys, "merge", "--base", base, "--add", tmp_path / "zh.json", "--out", tmp_path / "m")
  assert r.returncode == 0, r.stderr
  assert "504 base + " in r.stdout
  r = _cli(capsys, "stats", "--tokenizer", base, "--tokenizer", tmp_path / "m", "--text",
           DATA / "tokenizer_zh.txt", "--min_seconds", 0)
  assert r.returncode == 0, r.stderr
  rows = [line.split() for line in r.stdout.splitlines()[2:]]
  assert [row[:2] for row in rows] == [["base", "(bpe)"], ["m", "(bpe)"]]
  assert float(rows[1][4]) < float(rows[0][4])  # tokens/char falls
  r = _cli(capsys, "merge", "--base", tmp_path / "zh.json", "--add", DATA / "tokenizer_zh.txt",
           "--out", tmp_path / "x")
  assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
  assert ("tokenizer_zh.txt: neither a byte-level BPE tokenizer.json nor a SentencePiece model"
          in r.stderr)


# --- a LLaMA-3-shaped base: preset, HF parity, stage 1 -> SFT with the merged BPE tokenizer -------

LLAMA3_8B_CONFIG_JSON = {  # the published Meta-Llama-3-8B config.json
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256}


def test_llama3_preset_is_the_published_config():
  from cnllama_jax import config as config_lib
  cfg = config_lib.preset("llama3-8b")
  assert cfg == config_lib.from_hf_dict(LLAMA3_8B_CONFIG_JSON)
  assert (cfg.vocab_size, cfg.num_key_value_heads, cfg.rope_theta) == (128256, 8, 500000.0)
  assert not cfg.tie_word_embeddings and cfg.padded_vocab_size == 128256
  tiny = config_lib.preset("tiny-llama3", vocab_size=504)
  assert tiny.tie_word_embeddings and tiny.rope_theta == 500000.0 and tiny.num_key_value_heads == 2


def test_llama3_instruct_stop_ids_come_from_config_and_generation_config(tmp_path):
  """Meta-Llama-3-8B-Instruct: config.json eos 128001 (<|end_of_text|>), generation_config.json
  [128001, 128009] (<|eot_id|> ends a turn); 3.1 lists three ids in config.json itself. Both are
  read, written back as lists, and read by transformers the same way."""
  import json
  import transformers
  from cnllama_jax import config as config_lib, export
  three = config_lib.from_hf_dict({**LLAMA3_8B_CONFIG_JSON,
                                   "eos_token_id": [128001, 128008, 128009]})
  assert (three.eos_token_id, three.stop_token_ids) == (128001, (128008, 128009))
  assert three.stop_ids == (128001, 128008, 128009)
  (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG_JSON))
  assert config_lib.load_hf_config(str(tmp_path)).stop_ids == (128001,)
  (tmp_path / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": 128000, "eos_token_id": [128001, 128009]}))
  cfg = config_lib.load_hf_config(str(tmp_path))
  assert cfg.stop_ids == (128001, 128009) and cfg.eos_token_id == 128001
  hf = config_lib.to_hf_dict(cfg)
  assert hf["eos_token_id"] == [128001, 128009]
  assert export.generation_config_dict(cfg)["eos_token_id"] == [128001, 128009]
  out = tmp_path / "out"
  out.mkdir()
  (out / "config.json").write_text(json.dumps(hf))
  assert config_lib.load_hf_config(str(out)) == cfg
  assert transformers.LlamaConfig.from_pretrained(str(out)).eos_token_id == [128001, 128009]
  for bad in ([], ["</s>"]):
    with pytest.raises(ValueError, match=r"^m/config.json: eos_token_id=.*expected an id or a"):
      config_lib.from_hf_dict({**LLAMA3_8B_CONFIG_JSON, "eos_token_id": bad},
                              source="m/config.json")


def test_tiny_llama3_logits_match_transformers(tmp_path):
  import cnllama_jax
  from cnllama_jax import config as config_lib
  from tests import hf_models
  import numpy as np
  hf = config_lib.to_hf_dict(config_lib.preset("tiny-llama3", vocab_size=504))
  fields = {k: hf[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                               "rope_theta", "rms_norm_eps", "tie_word_embeddings")}
  model = hf_models.make_hf_llama(seed=5, **fields)
  cfg, params = cnllama_jax.load_hf(hf_models.save(model, str(tmp_path / "m"), "safetensors"))
  assert cfg == config_lib.preset("tiny-llama3", vocab_size=504).replace(
      max_position_embeddings=cfg.max_position_embeddings, bos_token_id=cfg.bos_token_id,
      eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
  ids = np.random.default_rng(0).integers(0, 504, (2, 9))
  ours = np.asarray(cnllama_jax.logits(cfg, params, ids))
  assert np.abs(ours - hf_models.hf_logits(model, ids)).max() <= 1e-4


def test_text_and_sft_data_on_a_bpe_tokenizer(built, tmp_path):
  """The data builders take a byte-level BPE directory: ids are tokenizers' own encode with the
  base's <|begin_of_text|> / <|end_of_text|> as BOS / EOS, the prompt is masked out of the loss,
  and the pad id is the merge's pad_token."""
  import numpy as np
  from cnllama_jax import data, run_data
  from cnllama_jax.data import builders
  _, base, zh, _ = built
  merged = Path(tk.merge(base, zh, tmp_path / "tok", pad_piece="<|pad|>").out_dir)
  own = Tokenizer.from_file(str(merged / "tokenizer.json"))
  bos, eos, pad = (own.token_to_id(t) for t in (SPECIALS[0], SPECIALS[1], "<|pad|>"))
  assert (bos, eos) == (500, 501)
  assert run_data.pad_id(str(merged)) == pad == tk.vocab_size(merged) - 1

  text = data.build_pretrain_dataset(DATA / "tokenizer_zh.txt", merged, tmp_path / "data",
                                     block_size=32, val_fraction=0.0, progress=False)
  stream = [i for line in _lines("tokenizer_zh.txt") if line.strip()
            for i in [bos] + own.encode(line, add_special_tokens=False).ids]
  blocks = np.stack([text["train"][k]["input_ids"] for k in range(len(text["train"]))])
  assert blocks.shape == (len(stream) // 32, 32)  # [blocks, block_size]
  assert blocks.reshape(-1).tolist() == stream[:blocks.size]

  records = [{"instruction": "把这句话翻译成英文。", "input": "下雨了。",
              "output": "It is raining."},
             {"instruction": "Name a fruit.", "input": "", "output": "苹果。"}]
  (tmp_path / "sft.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
  sft = data.build_sft_dataset(tmp_path / "sft.json", merged, tmp_path / "data", max_seq_len=128,
                               pad_id=pad, val_fraction=0.0, progress=False)
  for k, r in enumerate(records):
    prompt = data.build_prompt(r["instruction"], r["input"])
    source = [bos] + own.encode(prompt, add_special_tokens=False).ids
    target = own.encode(r["output"], add_special_tokens=False).ids + [eos]
    n = len(source) + len(target)
    assert n < 128  # not truncated
    row = sft["train"][k]
    assert row["input_ids"].tolist() == source + target + [pad] * (128 - n)
    assert row["labels"].tolist() == [-100] * len(source) + target + [-100] * (128 - n)
    assert row["attention_mask"].tolist() == [1] * n + [0] * (128 - n)
  # the build's name hashes the tokenizer_config.json that names BOS / EOS / pad, not only the
  # tokenizer.json: an edited config builds anew instead of reading rows made with other ids
  name = builders.fingerprint("text", [], merged, length=32)[0]
  config = merged / "tokenizer_config.json"
  config.write_text(config.read_text(encoding="utf-8") + "\n", encoding="utf-8")
  assert builders.fingerprint("text", [], merged, length=32)[0] != name


def test_stage1_then_sft_on_a_llama3_shaped_base(built, tmp_path):
  """Stage 1 (embeddings, subword_mean rows) on Chinese text then SFT (LoRA + embeddings) on the
  demo's instructions, on tiny-llama3 with the merged byte-level BPE tokenizer: the datasets are
  built with it. One device keeps the compiles short (the sharded resize is tested in
  test_vocab.py)."""
  import jax
  import numpy as np
  from cnllama_jax import pipeline, run_config, trainer
  from cnllama_jax import sharding as shd
  _, base, _, result = built
  stages = {"stage1": run_config.load("pretrain_stage1"), "sft": run_config.load("sft")}
  data_paths = {"stage1": ("text", DATA / "tokenizer_zh.txt", 16),
                "sft": ("sft", REPO / "data" / "demo" / "zh_instructions.json", 128)}
  previous, first_loss = None, {}
  for name, c in stages.items():
    c.model = run_config.model_fields("tiny-llama3", vocab_size=504)
    c.tokenizer = result.out_dir
    c.vocab.update(init="subword_mean", base_tokenizer=str(base))
    kind, path, seq_len = data_paths[name]
    c.data.update(kind=kind, path=str(path))
    c.train.update(steps=2, global_batch_size=4, seq_len=seq_len, log_every=1, learning_rate=1e-2,
                   warmup_ratio=0.0, eval_every=0)
    out = trainer.train(c, str(tmp_path / name), mesh=shd.single_device_mesh(), base=previous)
    run = out["run"]
    assert run.cfg.vocab_size == result.num_pieces and run.cfg.tie_word_embeddings
    assert run.cfg.rope_theta == 500000.0 and run.cfg.num_key_value_heads == 2
    losses = [h["loss"] for h in out["history"]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    first_loss[name] = losses[0]
    if name == "stage1":  # the new rows started as their sub-piece means
      embed = np.asarray(jax.device_get(out["state"].trainable["embed_tokens"]))
      assert embed.shape[0] % 128 == 0 and not embed[result.num_pieces:].any()
    previous = pipeline.trained_params(out)
  assert set(first_loss) == {"stage1", "sft"}


def _launch(name: str):
  """launch/NAME.py as a module (registered in sys.modules: its dataclasses look it up there)."""
  import sys
  spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_generate_and_serve_find_and_use_a_bpe_tokenizer(built, tmp_path):
  """A tiny-llama3 exported with a byte-level BPE tokenizer: launch/generate.py and
  launch/serve.py find its tokenizer.json (after a --lora without a tokenizer; tokenizer.model
  wins where both are); generate.py's prompt ids are tokenizers' own encode after
  <|begin_of_text|> and its answer is tokenizers' decode of the ids it generated (one compile:
  the ids come from its own on_token)."""
  import jax
  import numpy as np
  from cnllama_jax import export
  from cnllama_jax import model as model_lib
  from cnllama_jax.config import preset
  _, base, _, _ = built
  own = Tokenizer.from_file(str(base / "tokenizer.json"))
  cfg = preset("tiny-llama3", vocab_size=BASE_VOCAB + len(SPECIALS))
  rng = np.random.default_rng(5)  # numpy params: a flax init here costs seconds of eager ops
  params = jax.tree_util.tree_map_with_path(
      lambda key, s: np.ones(s.shape, s.dtype) if "norm" in jax.tree_util.keystr(key) else
      rng.normal(0, 0.02, s.shape).astype(s.dtype),
      jax.eval_shape(lambda k: model_lib.init_params(cfg, k), jax.random.key(0)))
  path = Path(export.save_hf(cfg, params, str(tmp_path / "m"), tokenizer_dir=str(base)))
  assert not (path / "tokenizer.model").exists()
  lora = tmp_path / "lora"
  lora.mkdir()
  generate, serve = _launch("generate"), _launch("serve")
  want = str(path / "tokenizer.json")
  assert generate.tokenizer_path(generate.Options(model=str(path), loras=(str(lora),))) == want
  assert serve.tokenizer_path(str(path), [str(lora)], None) == want
  (lora / "tokenizer.json").write_text('{"model": {"type": "Unigram"}}')  # not byte-level BPE:
  assert serve.tokenizer_path(str(path), [str(lora)], None) == want  # passed over for the base's
  (lora / "tokenizer.model").write_bytes(b"")  # only looked up here, never loaded
  assert serve.tokenizer_path(str(path), [str(lora)], None) == str(lora / "tokenizer.model")
  with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json in"):
    serve.tokenizer_path(str(tmp_path), [], None)

  generator = generate.Generator(generate.Options(model=str(path), template="none",
                                                  temperature=0.0, max_new_tokens=8))
  assert isinstance(generator.sp, text_tokenizer.BpeTokenizer)
  prompt = "The weather in 北京"
  ids = [500] + own.encode(prompt, add_special_tokens=False).ids
  assert generator.encode(prompt) == ids and len(ids) > 3
  new = []
  answer = generator([prompt], on_token=lambda step: new.append(step[0]))
  assert len(new) == 8 and all(t is None or 0 <= t < BASE_VOCAB + len(SPECIALS) for t in new)
  text = own.decode([t for t in new if t is not None], skip_special_tokens=True).strip()
  assert answer == [text] and text
  hello = own.encode("你好", add_special_tokens=False).ids  # special tokens never reach the text
  assert generator.sp.decode([500] + hello + [501, 502]) == "你好" == own.decode(hello)
