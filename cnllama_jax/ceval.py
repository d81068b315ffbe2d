"""C-Eval multiple choice (zero- or few-shot; scoring a model: `ceval_scoring`); the question files and the results may be in a
bucket (`gs://...`): results are published with `paths.publish_dir`.

C-Eval (the layout of C-Eval's release: `{dev,val,test}/{subject}_{split}.csv`, header
`id,question,A,B,C,D,answer`, dev with an extra `explanation`, test answers empty). The prompt is
the paper's (`scripts/ceval/llama_evaluator.py`, after C-Eval's code):

  以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\\n\\n         (header)
  {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：{answer}\\n\\n   (shot: first k dev rows)
  {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：                 (the query)

with BOS in front. As in the paper's script the header comes only with shots (zero-shot is the bare
query; `zero_shot_header=True` adds it). {subject} is the Chinese name (the scripts pass the
English key, e.g. "logic"; `header_subject="key"` reproduces that). A prompt longer than
`max_length` tokens loses its last shots first; with no shot left it keeps BOS + its last tokens.

The answer is the option whose letter token has the largest next-token logit (constrained
decoding). Option token ids, `option_rule`:
  "context" (default): the token the letter becomes right after this prompt: the last id of
      encode(prompt + "A") when that equals encode(prompt) + [one id]; otherwise the "paper" rule's
      second id. With the LLaMA and Chinese-LLaMA tokenizers the letter after "：" is the piece "A"
      (LLaMA id 29909), not "▁A" (id 319), which is what encode("A") gives.
  "paper": the paper's script (`--constrained_decoding`): the SUM of the scores of encode("A")[0]
      ("▁A") and encode("：A")[-1] ("A"), where the scores are those its `generate()` returns:
      the logits after HF's repetition penalty of 1.1 over the prompt's ids (for every id in the
      prompt, a logit < 0 is multiplied by 1.1, any other divided by it; every letter is in the
      prompt, so the letters' logits all change). Its temperature (0.2) also divides those scores;
      a common positive factor changes no prediction and is not applied.
  "logits": the "paper" rule's two ids on the raw logits (no penalty).
Scores: per subject accuracy; per category and overall ("average") the MEAN OVER SUBJECTS, as
C-Eval reports, with the mean over questions beside it ("accuracy_by_question", what the paper's
script prints). Accuracies are fractions in [0, 1]. The test split has no answers: only predictions.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import os
from typing import Sequence

import numpy as np

from cnllama_jax import paths
from cnllama_jax.ceval_scoring import Scorer, score_prompts

CHOICES = ("A", "B", "C", "D")
CATEGORIES = ("STEM", "Social Science", "Humanities", "Other")
OPTION_RULES = ("context", "paper", "logits")
# The repetition penalty each rule scores with (the paper's evaluator: generate()'s, 1.1).
RULE_PENALTY = {"context": 1.0, "paper": 1.1, "logits": 1.0}
# C-Eval's 52 subjects by category: key -> Chinese name (C-Eval's subject_mapping.json).
_BY_CATEGORY = {
    "STEM": {
        "computer_network": "计算机网络", "operating_system": "操作系统", "computer_architecture": "计算机组成",
        "college_programming": "大学编程", "college_physics": "大学物理", "college_chemistry": "大学化学",
        "advanced_mathematics": "高等数学", "probability_and_statistics": "概率统计",
        "discrete_mathematics": "离散数学", "electrical_engineer": "注册电气工程师",
        "metrology_engineer": "注册计量师", "high_school_mathematics": "高中数学",
        "high_school_physics": "高中物理", "high_school_chemistry": "高中化学",
        "high_school_biology": "高中生物", "middle_school_mathematics": "初中数学",
        "middle_school_biology": "初中生物", "middle_school_physics": "初中物理",
        "middle_school_chemistry": "初中化学", "veterinary_medicine": "兽医学",
    },
    "Social Science": {
        "college_economics": "大学经济学", "business_administration": "工商管理", "marxism": "马克思主义基本原理",
        "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论", "education_science": "教育学",
        "teacher_qualification": "教师资格", "high_school_politics": "高中政治",
        "high_school_geography": "高中地理", "middle_school_politics": "初中政治",
        "middle_school_geography": "初中地理",
    },
    "Humanities": {
        "modern_chinese_history": "近代史纲要", "ideological_and_moral_cultivation": "思想道德修养与法律基础",
        "logic": "逻辑学", "law": "法学", "chinese_language_and_literature": "中国语言文学",
        "art_studies": "艺术学", "professional_tour_guide": "导游资格", "legal_professional": "法律职业资格",
        "high_school_chinese": "高中语文", "high_school_history": "高中历史",
        "middle_school_history": "初中历史",
    },
    "Other": {
        "civil_servant": "公务员", "sports_science": "体育学", "plant_protection": "植物保护",
        "basic_medicine": "基础医学", "clinical_medicine": "临床医学", "urban_and_rural_planner": "注册城乡规划师",
        "accountant": "注册会计师", "fire_engineer": "注册消防工程师",
        "environmental_impact_assessment_engineer": "环境影响评价工程师", "tax_accountant": "税务师",
        "physician": "医师资格",
    },
}
SUBJECTS: dict[str, tuple[str, str]] = {  # key -> (Chinese name, category)
    key: (zh, category) for category, names in _BY_CATEGORY.items() for key, zh in names.items()}



# ----------------------------------------------------------------------------- C-Eval data

@dataclasses.dataclass(frozen=True)
class Question:
  id: str
  question: str
  options: tuple[str, str, str, str]
  answer: str | None  # None in the test split


def check_subject(name: str, where: str = "") -> None:
  if name not in SUBJECTS:
    close = difflib.get_close_matches(name, SUBJECTS, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"C-Eval has {len(SUBJECTS)}, e.g. 'logic'"
    raise ValueError(f"unknown subject '{name}'{where}; {hint}")


def read_questions(path, split: str) -> list[Question]:
  """One C-Eval CSV. dev/val rows need an answer in A-D; test answers are ignored."""
  path = os.fspath(path)
  if not paths.isfile(path):
    raise FileNotFoundError(f"{path}: C-Eval file not found")
  need = ["id", "question", *CHOICES] + (["answer"] if split != "test" else [])
  try:
    with io.StringIO(paths.read_bytes(path).decode("utf-8-sig"), newline="") as f:
      reader = csv.reader(f)
      header = next(reader, [])
      missing = [c for c in need if c not in header]
      if missing:
        raise ValueError(f"{path}: header {','.join(header) or '(empty)'} lacks "
                         f"{','.join(missing)}; C-Eval CSVs start id,question,A,B,C,D,answer")
      col = {name: header.index(name) for name in need}
      out, seen = [], set()
      for n, row in enumerate(reader, start=1):
        if not row:
          continue
        where = f"{path}: row {n} (line {reader.line_num})"
        if len(row) != len(header):
          raise ValueError(f"{where}: {len(row)} fields, expected {len(header)} "
                           f"({','.join(header)})")
        qid = row[col["id"]].strip()
        if qid in seen:
          raise ValueError(f"{where}: duplicate id '{qid}'")
        seen.add(qid)
        answer = None if split == "test" else row[col["answer"]].strip()
        if answer is not None and answer not in CHOICES:
          raise ValueError(f"{where}: answer '{answer}' is not one of A, B, C, D")
        out.append(Question(qid, row[col["question"]], tuple(row[col[c]] for c in CHOICES), answer))
  except UnicodeDecodeError as err:
    raise ValueError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
  if not out:
    raise ValueError(f"{path}: no questions")
  return out


def load_ceval(data_dir, split: str = "val", shots: int = 5,
               subjects: Sequence[str] | None = None) -> dict[str, tuple[list, list]]:
  """{subject: (first `shots` dev questions, questions of `split`)}; every file checked now."""
  if split not in ("val", "test"):
    raise ValueError(f"split must be 'val' or 'test', got '{split}'")
  if shots < 0:
    raise ValueError(f"shots must be >= 0, got {shots}")
  folder = paths.join(data_dir, split)
  if not paths.isdir(folder):
    raise FileNotFoundError(f"{folder}: no such directory (expected C-Eval's layout "
                            f"{data_dir}/{{dev,val,test}}/<subject>_<split>.csv)")
  if subjects:
    for name in subjects:
      check_subject(name)
  else:
    subjects = sorted(n[:-len(f"_{split}.csv")] for n in paths.listdir(folder)
                      if n.endswith(f"_{split}.csv"))
    if not subjects:
      raise FileNotFoundError(f"{folder}: no *_{split}.csv files")
    for name in subjects:
      check_subject(name, f" (from {paths.join(folder, f'{name}_{split}.csv')})")
  data = {}
  for name in subjects:
    dev = []
    if shots:
      dev_path = paths.join(data_dir, "dev", f"{name}_dev.csv")
      dev = read_questions(dev_path, "dev")
      if len(dev) < shots:
        raise ValueError(f"{dev_path}: {len(dev)} dev questions, fewer than the {shots} shots "
                         "asked")
    data[name] = (dev[:shots], read_questions(paths.join(folder, f"{name}_{split}.csv"), split))
  return data


# ----------------------------------------------------------------------------- prompts

def format_question(q: Question, with_answer: bool) -> str:
  text = q.question + "".join(f"\n{c}. {o}" for c, o in zip(CHOICES, q.options)) + "\n答案："
  return text + f"{q.answer}\n\n" if with_answer else text


def build_prompt(subject: str, shots: Sequence[Question], query: Question, *, header: bool = True,
                 header_subject: str = "zh") -> str:
  name = SUBJECTS[subject][0] if header_subject == "zh" else subject
  head = f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n" if header else ""
  return head + "".join(format_question(s, True) for s in shots) + format_question(query, False)


def encode_prompt(tokenizer, subject: str, shots: Sequence[Question], query: Question, *,
                  max_length: int, header: bool = True,
                  header_subject: str = "zh") -> tuple[list[int], int, int, str]:
  """(BOS + ids, shots kept, tokens cut, prompt text) with at most max_length ids: the last shots
  are dropped first, then the prompt's first tokens (BOS stays)."""
  for k in range(len(shots), -1, -1):
    text = build_prompt(subject, shots[:k], query, header=header, header_subject=header_subject)
    ids = [tokenizer.bos_id()] + tokenizer.encode(text)
    if len(ids) <= max_length:
      return ids, k, 0, text
  cut = len(ids) - max_length
  return ids[:1] + ids[1 + cut:], 0, cut, text


def option_token_ids(tokenizer, text: str, rule: str = "context") -> np.ndarray:
  """Token ids scored for A-D after the prompt `text`: [4, 1] ("context") or [4, 2] ("paper",
  "logits")."""
  paper = [[tokenizer.encode(c)[0], tokenizer.encode("：" + c)[-1]] for c in CHOICES]
  if rule in ("paper", "logits"):
    return np.asarray(paper, np.int32)
  if rule != "context":
    raise ValueError(f"option_rule must be one of {OPTION_RULES}, got '{rule}'")
  base, out = tokenizer.encode(text), []
  for c, (_, fallback) in zip(CHOICES, paper):
    ids = tokenizer.encode(text + c)
    agree = len(ids) == len(base) + 1 and ids[:-1] == base
    out.append([ids[-1] if agree else fallback])
  return np.asarray(out, np.int32)


def summarize(counts: dict[str, tuple[int | None, int]]) -> dict:
  """{subject: (correct or None, questions)} -> per subject, per category and overall scores."""
  subjects = {}
  for name, (correct, num) in sorted(counts.items()):
    zh, category = SUBJECTS[name]
    subjects[name] = {"name_zh": zh, "category": category, "num": num, "correct": correct,
                      "accuracy": None if correct is None else correct / num}

  def group(names):
    num = sum(subjects[n]["num"] for n in names)
    if any(subjects[n]["correct"] is None for n in names):
      return {"subjects": len(names), "num": num}
    correct = sum(subjects[n]["correct"] for n in names)
    return {"subjects": len(names), "num": num, "correct": correct,
            "accuracy": sum(subjects[n]["accuracy"] for n in names) / len(names),
            "accuracy_by_question": correct / num}

  categories = {c: group([n for n in subjects if subjects[n]["category"] == c])
                for c in CATEGORIES if any(s["category"] == c for s in subjects.values())}
  return {"subjects": subjects, "categories": categories, "average": group(list(subjects))}


@dataclasses.dataclass
class CevalResult:
  summary: dict  # summarize(...) plus "settings" and "prompts" (truncation counts)
  submission: dict  # C-Eval's submission format: {subject: {id: "A".."D"}}
  records: list  # per question: subject, id, prediction, answer, scores [4], shots, tokens, cut


def evaluate_ceval(scorer: Scorer, tokenizer, data: dict, *, split: str = "val", shots: int = 5,
                   max_length: int = 2048, batch_size: int = 8, option_rule: str = "context",
                   header_subject: str = "zh", zero_shot_header: bool = False) -> CevalResult:
  """Scores `data` (from load_ceval with the same shots) with `scorer`."""
  if option_rule not in OPTION_RULES:
    raise ValueError(f"option_rule must be one of {OPTION_RULES}, got '{option_rule}'")
  if header_subject not in ("zh", "key"):
    raise ValueError(f"header_subject must be 'zh' or 'key', got '{header_subject}'")
  items, prompts, options = [], [], []
  for subject, (dev, questions) in data.items():
    for q in questions:
      ids, kept, cut, text = encode_prompt(
          tokenizer, subject, dev[:shots], q, max_length=max_length,
          header=bool(shots) or zero_shot_header, header_subject=header_subject)
      items.append((subject, q, kept, cut))
      prompts.append(ids)
      options.append(option_token_ids(tokenizer, text, option_rule))
  scores = score_prompts(scorer, prompts, options, batch_size=batch_size, max_length=max_length,
                         repetition_penalty=RULE_PENALTY[option_rule])
  submission, records, counts = {}, [], {}
  for (subject, q, kept, cut), ids, row in zip(items, prompts, scores):
    pred = CHOICES[int(np.argmax(row))]
    submission.setdefault(subject, {})[q.id] = pred
    records.append({"subject": subject, "id": q.id, "prediction": pred, "answer": q.answer,
                    "scores": [float(s) for s in row], "shots": kept, "tokens": len(ids),
                    "cut": cut})
    correct, num = counts.get(subject, (0, 0))
    counts[subject] = (None if q.answer is None else correct + (pred == q.answer), num + 1)
  summary = summarize(counts)
  summary["settings"] = {"split": split, "shots": shots, "max_length": max_length,
                         "option_rule": option_rule, "header_subject": header_subject,
                         "zero_shot_header": zero_shot_header}
  summary["prompts"] = {"num": len(records),
                        "fewer_shots": sum(r["shots"] < min(shots, len(data[r["subject"]][0]))
                                           for r in records),
                        "cut": sum(r["cut"] > 0 for r in records)}
  return CevalResult(summary, submission, records)


def write_ceval(out_dir, result: CevalResult, *, overwrite: bool = False) -> dict:
  """summary.json, submission.json and predictions.jsonl (one record per question) in out_dir (a
  local path or URL), published whole (`paths.publish_dir`: a temp dir renamed into place, or an
  `_INCOMPLETE` marker in a bucket); an existing non-empty out_dir needs `overwrite`.

  Returns {file name: its epath.Path}."""
  texts = {name: json.dumps(obj, ensure_ascii=False, indent=2) + "\n"
           for name, obj in (("summary.json", result.summary),
                             ("submission.json", result.submission))}
  texts["predictions.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                       for r in result.records)
  with paths.publish_dir(out_dir, overwrite=overwrite) as tmp:
    for name, text in texts.items():
      paths.write_text(paths.join(tmp, name), text)
  return {name: paths.path(paths.join(paths.absolute(out_dir), name)) for name in texts}
