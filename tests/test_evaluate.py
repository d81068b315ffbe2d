"""Evaluation: perplexity and C-Eval scoring against `transformers` and hand-made expectations.

tests/data/ceval/ holds three subjects in C-Eval's CSV layout (original questions written for these
tests): computer_network and high_school_physics (STEM), logic (Humanities); 5 dev, 3/2/4 val and
2 test questions. A tiny BPE tokenizer is trained on tests/data text, and a tiny random HF LLaMA
with its vocabulary is the model.
"""
import csv
import importlib.util
import io
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import cnllama_jax
from cnllama_jax import ceval, ceval_scoring
from cnllama_jax import evaluate as ev
from tests import hf_models

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
CEVAL = DATA / "ceval"
LLAMA = Path(os.environ.get("CNLLAMA_FIXTURES", REPO.parent / "shared" / "fixtures"))
LLAMA = LLAMA / "tokenizers" / "llama_tokenizer.model"
SUBJECTS = {"computer_network": "计算机网络", "high_school_physics": "高中物理", "logic": "逻辑学"}


def _rows(split, subject):
  with open(CEVAL / split / f"{subject}_{split}.csv", newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def paper_prompt(subject_zh, shots, query, header=True):
  """The paper's template, written out independently of cnllama_jax.evaluate."""
  def item(row):
    return f"{row['question']}\nA. {row['A']}\nB. {row['B']}\nC. {row['C']}\nD. {row['D']}\n答案："
  head = f"以下是中国关于{subject_zh}考试的单项选择题，请选出其中的正确答案。\n\n" if header else ""
  return head + "".join(item(s) + s["answer"] + "\n\n" for s in shots) + item(query)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
  """A tiny LLaMA-like BPE tokenizer (byte fallback) trained on the test texts and prompts."""
  lines = [line for name in ("tokenizer_zh.txt", "tokenizer_en.txt")
           for line in (DATA / name).read_text(encoding="utf-8").splitlines()]
  for subject, zh in SUBJECTS.items():
    lines += paper_prompt(zh, _rows("dev", subject), _rows("val", subject)[0]).splitlines()
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=1200, model_type="bpe",
      byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
      remove_extra_whitespaces=False, split_digits=True, hard_vocab_limit=False, minloglevel=2)
  path.write_bytes(model.getvalue())
  return spm.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope="module")
def tiny(sp, tmp_path_factory):
  """(torch model, HF directory with tokenizer.model, cfg, params loaded on one device).

  The projections are scaled up 8x: at init scale the next token depends almost only on the last
  one ("："), so every question would get the same letter.
  """
  import torch
  model = hf_models.make_hf_llama(seed=7, vocab_size=sp.vocab_size(), num_key_value_heads=2,
                                  max_position_embeddings=1024)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("proj.weight"):
        param.mul_(8.0)
  path = hf_models.save(model, str(tmp_path_factory.mktemp("model")), "safetensors")
  Path(path, "tokenizer.model").write_bytes(sp.serialized_model_proto())
  cfg, params = cnllama_jax.load_hf(path)
  return model, path, cfg, params


# ----------------------------------------------------------------------------- perplexity

def test_perplexity_equals_transformers_mean_nll(sp, tiny, tmp_path):
  model, _, cfg, params = tiny
  text = (DATA / "tokenizer_zh.txt").read_text(encoding="utf-8").splitlines()
  text[3:3] = ["", "   "]  # blank lines are skipped, as in pre-training
  text += (DATA / "tokenizer_en.txt").read_text(encoding="utf-8").splitlines()
  (tmp_path / "t.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
  stream = [i for line in text if line.strip() for i in [sp.bos_id()] + sp.encode(line)]
  block = next(b for b in range(64, 32, -1) if len(stream) % b and -(-len(stream) // b) % 4)
  full = len(stream) // block * block  # independent: the full windows, then the unpadded tail
  total, count = 0.0, 0
  for windows in (np.reshape(stream[:full], (-1, block)), np.asarray([stream[full:]])):
    logits = hf_models.hf_logits(model, windows)[:, :-1].astype(np.float64)  # [w, n-1, vocab]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, windows[:, 1:, None], axis=-1)[..., 0]  # [w, n-1]
    total += float((logz - picked).sum())
    count += windows.size - len(windows)
  compiled = ev._nll_sum._cache_size()
  out = ev.perplexity(cfg, params, sp, tmp_path / "t.txt", block_size=block, batch_size=4)
  assert ev._nll_sum._cache_size() == compiled + 1  # one shape, padded last batch included
  assert out["documents"] == len([line for line in text if line.strip()])
  assert out["windows"] == -(-len(stream) // block)
  assert out["tokens"] == count == len(stream) - out["windows"]
  assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
  assert out["nll"] == pytest.approx(total / count, rel=1e-4)


# ----------------------------------------------------------------------------- C-Eval data

def test_subject_table_is_c_evals_52_subjects_in_four_categories():
  cats = [category for _, category in ceval.SUBJECTS.values()]
  assert len(ceval.SUBJECTS) == 52
  assert {c: cats.count(c) for c in ceval.CATEGORIES} == {
      "STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}
  assert ceval.SUBJECTS["logic"] == ("逻辑学", "Humanities")
  assert ceval.SUBJECTS["clinical_medicine"] == ("临床医学", "Other")


def test_csv_fields_with_commas_quotes_and_newlines_are_read_whole():
  q = ceval.read_questions(CEVAL / "val" / "logic_val.csv", "val")[3]
  assert q.question == "阅读下面的说法，选出正确的一项：\n“且”与“或”, 有何区别？"
  assert q.options[0] == "“且”要求两者都真" and q.answer == "A" and q.id == "3"
  assert [t.answer for t in ceval.read_questions(CEVAL / "test" / "logic_test.csv", "test")] == [
      None, None]


def test_prompt_is_the_papers_template():
  data = ceval.load_ceval(CEVAL, "val", shots=5, subjects=["high_school_physics"])
  dev, val = data["high_school_physics"]
  assert ceval.build_prompt("high_school_physics", dev[:2], val[1]) == (
      "以下是中国关于高中物理考试的单项选择题，请选出其中的正确答案。\n\n"
      "在国际单位制中，力的单位是\nA. 焦耳\nB. 牛顿\nC. 瓦特\nD. 帕斯卡\n答案：B\n\n"
      "物体做自由落体运动时，下列说法正确的是\nA. 速度保持不变\nB. 加速度逐渐增大\n"
      "C. 加速度保持不变\nD. 位移与时间成正比\n答案：C\n\n"
      "关于惯性，下列说法正确的是\nA. 速度越大惯性越大\nB. 质量越大惯性越大\n"
      "C. 静止的物体没有惯性\nD. 失重时物体没有惯性\n答案：")
  assert ceval.build_prompt("high_school_physics", [], val[0], header=False) == (
      "电阻为5 Ω的导体两端电压为10 V，通过它的电流为\nA. 0.5 A\nB. 2 A\nC. 5 A\nD. 50 A\n答案：")
  assert ceval.build_prompt("logic", [], val[0], header_subject="key").startswith("以下是中国关于logic考试")


def test_long_prompt_drops_last_shots_first_then_cuts_from_the_left(sp):
  dev, val = _rows("dev", "logic"), _rows("val", "logic")
  full = [sp.encode(paper_prompt("逻辑学", dev[:k], val[0])) for k in range(6)]  # k shots
  assert all(len(full[k]) < len(full[k + 1]) for k in range(5))
  data = ceval.load_ceval(CEVAL, "val", shots=5, subjects=["logic"])
  shots, query = data["logic"][0], data["logic"][1][0]
  ids, kept, cut, _ = ceval.encode_prompt(sp, "logic", shots, query, max_length=len(full[2]) + 1)
  assert (kept, cut, ids) == (2, 0, [sp.bos_id()] + full[2])
  ids, kept, cut, _ = ceval.encode_prompt(sp, "logic", shots, query, max_length=len(full[0]) - 4)
  assert (kept, cut, ids) == (0, 5, [sp.bos_id()] + full[0][5:])
  ids, kept, cut, _ = ceval.encode_prompt(sp, "logic", shots, query, max_length=4096)
  assert (kept, cut, ids) == (5, 0, [sp.bos_id()] + full[5])


@pytest.mark.skipif(not LLAMA.is_file(), reason=f"no {LLAMA}")
def test_llama_tokenizer_letter_after_colon_is_A_not_space_A():
  llama = spm.SentencePieceProcessor(model_file=str(LLAMA))
  prompt = "1+1=\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
  assert ceval.option_token_ids(llama, prompt, "context").tolist() == [
      [29909], [29933], [29907], [29928]]  # "A" "B" "C" "D"
  assert ceval.option_token_ids(llama, prompt, "paper").tolist() == [
      [319, 29909], [350, 29933], [315, 29907], [360, 29928]]  # ("▁A", "A") ...


# ----------------------------------------------------------------------------- C-Eval scoring

VAL_PLAN = {  # (subject, id) -> the letter the fake model picks; the answer in the CSV after it
    ("computer_network", "0"): "C",  # C right
    ("computer_network", "1"): "C",  # C right
    ("computer_network", "2"): "B",  # A wrong
    ("high_school_physics", "0"): "B",  # B right
    ("high_school_physics", "1"): "B",  # B right
    ("logic", "0"): "A",  # B wrong
    ("logic", "1"): "B",  # B right
    ("logic", "2"): "A",  # D wrong
    ("logic", "3"): "C",  # A wrong
}
TEST_PLAN = {("computer_network", "0"): "C", ("computer_network", "1"): "D",
             ("high_school_physics", "0"): "B", ("high_school_physics", "1"): "A",
             ("logic", "0"): "A", ("logic", "1"): "B"}


def fake_scorer(sp, data, plan):
  """A "model" whose option scores pick plan[(subject, id)] for the question its prompt asks."""
  by_text = {q.question: (s, q.id) for s, (_, qs) in data.items() for q in qs}

  def score(ids, mask, option_ids, repetition_penalty):
    assert repetition_penalty == 1.0  # the default rule scores raw logits
    out = np.zeros((len(ids), 4), np.float32)
    for r in range(len(ids)):
      if mask[r].any():
        assert mask[r, -1] == 1  # left-padded
        assert [sp.id_to_piece(int(i)) for i in option_ids[r, :, 0]] == ["A", "B", "C", "D"]
        query = sp.decode(ids[r][mask[r] > 0].tolist()).rsplit("\n\n", 1)[-1]
        key = [by_text[t] for t in by_text if query.startswith(t + "\nA. ")]
        out[r, "ABCD".index(plan[key[0]])] = 1.0
    return out
  return score


def test_accuracy_and_categories_follow_a_controlled_model(sp, tmp_path):
  data = ceval.load_ceval(CEVAL, "val", shots=5)
  result = ceval.evaluate_ceval(fake_scorer(sp, data, VAL_PLAN), sp, data, shots=5, batch_size=4)
  s = result.summary
  assert {n: (v["correct"], v["num"]) for n, v in s["subjects"].items()} == {
      "computer_network": (2, 3), "high_school_physics": (2, 2), "logic": (1, 4)}
  assert s["subjects"]["computer_network"]["accuracy"] == pytest.approx(2 / 3)
  assert s["subjects"]["logic"]["name_zh"] == "逻辑学"
  assert list(s["categories"]) == ["STEM", "Humanities"]
  stem, hum, avg = s["categories"]["STEM"], s["categories"]["Humanities"], s["average"]
  assert (stem["subjects"], stem["num"], stem["correct"]) == (2, 5, 4)
  assert stem["accuracy"] == pytest.approx(5 / 6)  # mean over subjects: (2/3 + 1) / 2
  assert stem["accuracy_by_question"] == pytest.approx(0.8)
  assert (hum["accuracy"], hum["accuracy_by_question"]) == (0.25, 0.25)
  assert (avg["subjects"], avg["num"], avg["correct"]) == (3, 9, 5)
  assert avg["accuracy"] == pytest.approx(23 / 36)  # (2/3 + 1 + 1/4) / 3
  assert avg["accuracy_by_question"] == pytest.approx(5 / 9)
  assert s["prompts"] == {"num": 9, "fewer_shots": 0, "cut": 0}
  assert all(r["shots"] == 5 for r in result.records)
  paths = ceval.write_ceval(tmp_path, result)
  assert json.loads(paths["summary.json"].read_text(encoding="utf-8"))["average"]["correct"] == 5


def test_test_split_gives_c_evals_submission_format(sp, tmp_path):
  data = ceval.load_ceval(CEVAL, "test", shots=0)
  result = ceval.evaluate_ceval(fake_scorer(sp, data, TEST_PLAN), sp, data, split="test", shots=0)
  ceval.write_ceval(tmp_path, result)
  assert json.loads((tmp_path / "submission.json").read_text(encoding="utf-8")) == {
      "computer_network": {"0": "C", "1": "D"}, "high_school_physics": {"0": "B", "1": "A"},
      "logic": {"0": "A", "1": "B"}}
  summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
  assert summary["average"] == {"subjects": 3, "num": 6}  # no answers, no accuracy
  assert summary["subjects"]["logic"]["accuracy"] is None


@pytest.fixture(scope="module")
def hf_last(tiny):
  """transformers' last-position logits [vocab] of one unpadded prompt, computed once per prompt
  (both option rules score the same prompts)."""
  cache = {}

  def last(ids):
    if tuple(ids) not in cache:
      cache[tuple(ids)] = hf_models.hf_logits(tiny[0], np.asarray([ids]))[0, -1]
    return cache[tuple(ids)]
  return last


@pytest.mark.parametrize("rule", ["context", "logits"])
def test_predictions_and_scores_equal_transformers(sp, tiny, hf_last, rule):
  _, _, cfg, params = tiny
  data = ceval.load_ceval(CEVAL, "val", shots=5)
  result = ceval.evaluate_ceval(ceval_scoring.model_scorer(cfg, params), sp, data, shots=5, max_length=1024,
                                batch_size=4, option_rule=rule)
  got = {(r["subject"], r["id"]): r for r in result.records}
  assert len({r["prediction"] for r in result.records}) >= 3  # the letters vary with the question
  for subject, zh in SUBJECTS.items():
    for row in _rows("val", subject):
      prompt = paper_prompt(zh, _rows("dev", subject), row)
      ids = [sp.bos_id()] + sp.encode(prompt)
      last = hf_last(ids)  # [vocab], unpadded
      if rule == "context":
        options = [[sp.encode(prompt + c)[-1]] for c in "ABCD"]
        assert all(sp.encode(prompt + c)[:-1] == ids[1:] for c in "ABCD")
      else:
        options = [[sp.encode(c)[0], sp.encode("：" + c)[-1]] for c in "ABCD"]
      scores = [float(last[o].sum()) for o in options]
      mine = got[(subject, row["id"])]
      assert mine["tokens"] == len(ids)
      np.testing.assert_allclose(mine["scores"], scores, atol=2e-4)
      assert sorted(scores)[-1] - sorted(scores)[-2] > 1e-3  # no near-tie hides a mismatch
      assert mine["prediction"] == "ABCD"[int(np.argmax(scores))]


def test_paper_rule_scores_with_the_papers_repetition_penalty(sp, tiny):
  """The paper's evaluator reads generate()'s scores: HF's RepetitionPenaltyLogitsProcessor(1.1)
  over the prompt ids, then the two letter ids summed. Zero-shot, the penalty flips a prediction
  of this model (high_school_physics 0: raw logits pick C, the penalised scores B)."""
  import torch
  from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
  model, _, cfg, params = tiny
  data = ceval.load_ceval(CEVAL, "val", shots=0)
  result = ceval.evaluate_ceval(ceval_scoring.model_scorer(cfg, params), sp, data, shots=0, max_length=1024,
                                batch_size=4, option_rule="paper")
  got = {(r["subject"], r["id"]): r for r in result.records}
  penalty = RepetitionPenaltyLogitsProcessor(penalty=1.1)
  flipped = []
  for subject, zh in SUBJECTS.items():
    for row in _rows("val", subject):
      ids = [sp.bos_id()] + sp.encode(paper_prompt(zh, [], row, header=False))
      last = torch.as_tensor(hf_models.hf_logits(model, np.asarray([ids]))[:, -1])  # [1, vocab]
      scored = penalty(torch.as_tensor([ids]), last.clone())[0].numpy()  # [vocab]
      options = [[sp.encode(c)[0], sp.encode("：" + c)[-1]] for c in "ABCD"]
      expected = [float(scored[o].sum()) for o in options]
      raw = [float(last[0, o].sum()) for o in options]
      mine = got[(subject, row["id"])]
      np.testing.assert_allclose(mine["scores"], expected, atol=2e-4)
      assert sorted(expected)[-1] - sorted(expected)[-2] > 5e-4  # no near-tie hides a mismatch
      assert mine["prediction"] == "ABCD"[int(np.argmax(expected))]
      if np.argmax(raw) != np.argmax(expected):
        flipped.append((subject, row["id"], "ABCD"[int(np.argmax(raw))], mine["prediction"]))
  assert flipped == [("high_school_physics", "0", "C", "B")]


# ----------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def cli():
  spec = importlib.util.spec_from_file_location("launch_evaluate", REPO / "launch" / "evaluate.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def test_cli_ceval_on_a_mesh_matches_the_api(cli, sp, tiny, tmp_path, capsys):
  _, path, cfg, params = tiny
  rc = cli(["ceval", "--model", path, "--data", str(CEVAL), "--shots", "5", "--split", "val",
            "--out", str(tmp_path), "--subjects", "logic,computer_network", "--batch_size", "4"])
  assert rc == 0, capsys.readouterr().err
  data = ceval.load_ceval(CEVAL, "val", 5, ["logic", "computer_network"])
  api = ceval.evaluate_ceval(ceval_scoring.model_scorer(cfg, params), sp, data, max_length=1024,
                             batch_size=4)
  assert json.loads((tmp_path / "submission.json").read_text(encoding="utf-8")) == api.submission
  summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
  assert list(summary["subjects"]) == ["computer_network", "logic"]
  assert summary["settings"]["max_length"] == 1024  # the model's max_position_embeddings
  assert "Average" in capsys.readouterr().out


def test_perplexity_on_a_mesh_splits_the_rows_and_matches_one_device(sp, tiny):
  from cnllama_jax import inference
  _, _, cfg, params = tiny
  mesh = inference.build_mesh((1, -1, 1))  # 8 fake devices on fsdp
  score = ev.nll_scorer(cfg, params, mesh=mesh)
  assert score.rows_sharding(8, 64).spec[0] is not None  # rows split, not replicated
  one = ev.perplexity(cfg, params, sp, DATA / "tokenizer_en.txt", block_size=64, batch_size=8)
  sharded = ev.perplexity(cfg, params, sp, DATA / "tokenizer_en.txt", block_size=64,
                          batch_size=8, mesh=mesh)
  assert sharded["tokens"] == one["tokens"]
  assert sharded["nll"] == pytest.approx(one["nll"], rel=1e-5)


@pytest.mark.parametrize("command", ["perplexity", "ceval"])
def test_two_processes_run_an_evaluate_command_on_one_mesh(sp, tiny, tmp_path, command):
  """`launch/evaluate.py` on two hosts (processes joined by the documented
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, 2 CPU devices each): one mesh of
  4 devices with the rows split over it. perplexity: each process prints the one-process API's
  result; ceval: process 0 alone writes the one-process API's submission."""
  from tests import multihost
  _, path, cfg, params = tiny
  text, out_dir = str(DATA / "tokenizer_en.txt"), tmp_path / "ceval_out"
  args = {"perplexity": ["--text", text, "--block_size", "64", "--batch_size", "8"],
          "ceval": ["--data", str(CEVAL), "--shots", "5", "--split", "val", "--subjects", "logic",
                    "--batch_size", "4", "--out", str(out_dir)]}[command]
  argv = [sys.executable, str(REPO / "launch" / "evaluate.py"), command, "--model", path,
          "--mesh_shape", "1,-1,1", *args]
  port = multihost.free_port()
  with multihost.started([argv] * 2, [multihost.host_env(i, port) for i in range(2)]) as workers:
    outputs = multihost.finish(workers)
  for i, (_, err) in enumerate(outputs):  # one mesh over both processes' devices
    assert f"process {i}/2: mesh {{'data': 1, 'fsdp': 4, 'tensor': 1}} over 4 devices" in err, err
  if command == "perplexity":
    api = ev.perplexity(cfg, params, sp, text, block_size=64, batch_size=8)
    for out, _ in outputs:
      got = json.loads(out.strip().splitlines()[-1])
      assert got["tokens"] == api["tokens"]
      assert got["nll"] == pytest.approx(api["nll"], rel=1e-5)
    return
  data = ceval.load_ceval(CEVAL, "val", 5, ["logic"])
  api = ceval.evaluate_ceval(ceval_scoring.model_scorer(cfg, params), sp, data, max_length=1024,
                             batch_size=4)
  assert json.loads((out_dir / "submission.json").read_text(encoding="utf-8")) == api.submission
  assert "wrote " in outputs[0][0] and "wrote " not in outputs[1][0]  # process 0 writes


def test_a_process_count_that_is_not_a_number_is_one_line(cli, tiny, capsys, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  assert cli(["perplexity", "--model", tiny[1], "--text", str(DATA / "tokenizer_en.txt")]) == 1
  assert "JAX_NUM_PROCESSES='two': expected an integer" in capsys.readouterr().err


def test_cli_perplexity_on_a_mesh_matches_the_api(cli, sp, tiny, capsys):
  _, path, cfg, params = tiny
  rc = cli(["perplexity", "--model", path, "--text", str(DATA / "tokenizer_en.txt"),
            "--block_size", "128", "--batch_size", "8"])  # 8 fake devices: batch over fsdp
  assert rc == 0, capsys.readouterr().err
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  api = ev.perplexity(cfg, params, sp, DATA / "tokenizer_en.txt", block_size=128)
  assert out["tokens"] == api["tokens"]
  assert out["perplexity"] == pytest.approx(api["perplexity"], rel=1e-5)


def _broken_ceval(tmp_path, split, subject, text):
  root = tmp_path / "ceval"
  shutil.copytree(CEVAL, root)
  (root / split / f"{subject}_{split}.csv").write_text(text, encoding="utf-8")
  return root


@pytest.mark.parametrize("case, expected", [
    ("no_model", "not_a_dir: model directory not found"),
    ("no_text", "missing.txt: text file not found"),
    ("no_data", "nowhere/val: no such directory"),
    ("bad_header", "logic_val.csv: header id,question,A,B,C,answer lacks D"),
    ("short_row", "logic_val.csv: row 2 (line 3): 6 fields, expected 7"),
    ("bad_answer", "logic_val.csv: row 1 (line 2): answer 'E' is not one of A, B, C, D"),
    ("unknown_subject", "unknown subject 'logics'; did you mean 'logic'?"),
    ("unknown_file", "unknown subject 'cooking' (from"),
    ("few_dev", "logic_dev.csv: 2 dev questions, fewer than the 5 shots asked"),
])
def test_cli_bad_input_is_one_line_naming_the_problem(cli, tiny, tmp_path, capsys, case, expected):
  model, data, subjects = tiny[1], CEVAL, "logic"
  header = "id,question,A,B,C,D,answer\n"
  if case == "no_model":
    model = str(tmp_path / "not_a_dir")
  elif case == "no_data":
    data = tmp_path / "nowhere"
  elif case == "bad_header":
    data = _broken_ceval(tmp_path, "val", "logic", "id,question,A,B,C,answer\n0,q,a,b,c,A\n")
  elif case == "short_row":
    data = _broken_ceval(tmp_path, "val", "logic", header + "0,q,a,b,c,d,A\n1,q,a,b,c,A\n")
  elif case == "bad_answer":
    data = _broken_ceval(tmp_path, "val", "logic", header + "0,q,a,b,c,d,E\n")
  elif case == "unknown_subject":
    subjects = "logics"
  elif case == "unknown_file":
    data, subjects = _broken_ceval(tmp_path, "val", "cooking", header + "0,q,a,b,c,d,A\n"), None
  elif case == "few_dev":
    data = _broken_ceval(tmp_path, "dev", "logic", header + "0,q,a,b,c,d,A\n1,q,a,b,c,d,B\n")
  if case == "no_text":
    argv = ["perplexity", "--model", model, "--text", str(tmp_path / "missing.txt")]
  else:
    argv = ["ceval", "--model", model, "--data", str(data), "--out", str(tmp_path / "out")]
    argv += ["--subjects", subjects] if subjects else []
  assert cli(argv) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err


def test_ceval_on_a_2x2x2_sharded_model_equals_unsharded_predictions(sp, tiny, tmp_path, cli,
                                                                      capsys):
  from cnllama_jax import inference, sharding as shd
  _, path, cfg, params = tiny
  data = ceval.load_ceval(CEVAL, "val", 5)
  one = ceval.evaluate_ceval(ceval_scoring.model_scorer(cfg, params), sp, data, max_length=1024,
                             batch_size=4)
  mesh = shd.make_mesh((2, 2, 2))
  cfg_m, _, params_m = inference.load_model(path, mesh=mesh)
  scorer = ceval_scoring.model_scorer(cfg_m, params_m, mesh=mesh)
  sharded = ceval.evaluate_ceval(scorer, sp, data, max_length=1024, batch_size=4)
  assert sharded.submission == one.submission
  np.testing.assert_allclose([r["scores"] for r in sharded.records],
                             [r["scores"] for r in one.records], atol=1e-4)
  rc = cli(["ceval", "--model", path, "--data", str(CEVAL), "--shots", "5", "--out",
            str(tmp_path), "--batch_size", "4", "--mesh_shape", "2,2,2"])
  assert rc == 0, capsys.readouterr().err
  assert json.loads((tmp_path / "submission.json").read_text(encoding="utf-8")) == one.submission
