"""The OpenAI-compatible server on 127.0.0.1, driven by the real `openai` client: its greedy
answers equal launch/generate.py's, concurrent requests share the decode batch, bad requests get
OpenAI-shaped 4xx errors and the server keeps serving."""
import concurrent.futures
import importlib.util
import io
import socket
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import sentencepiece as spm

from cnllama_jax import engine as engine_lib
from cnllama_jax import generate as gen
from cnllama_jax import serve
from cnllama_jax.data.encode import build_prompt
from tests import hf_models

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
CONTEXT = 160
_sample_rows = jax.jit(engine_lib.sample_rows)  # once for all its tests (eager lax.cond is slow)
PROMPTS = ["今天天气很好", "The quick brown fox", "我们一起学习机器翻译", "Hello", "北京是中国的首都",
           "A model of language", "数据", "Tokenizers split text into pieces"]


def _load(name: str):
  spec = importlib.util.spec_from_file_location(name, REPO / "launch" / f"{name.split('_')[1]}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A tiny random LLaMA with a small byte-fallback SentencePiece tokenizer in one directory."""
  lines = [line for name in ("tokenizer_zh.txt", "tokenizer_en.txt")
           for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=proto, vocab_size=1000, model_type="bpe",
      byte_fallback=True, character_coverage=0.9995, hard_vocab_limit=False, minloglevel=2)
  sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
  model = hf_models.make_hf_llama(seed=11, vocab_size=sp.vocab_size(), num_key_value_heads=2,
                                  max_position_embeddings=256)
  path = hf_models.save(model, str(tmp_path_factory.mktemp("serve") / "tiny-alpaca"),
                        "safetensors")
  Path(path, "tokenizer.model").write_bytes(proto.getvalue())
  return path


@pytest.fixture(scope="module")
def generator(model_dir):
  """launch/generate.py's Generator, greedy (the reference answers)."""
  launch = _load("launch_generate")
  return lambda template, tokens: launch.Generator(launch.Options(
      model=model_dir, template=template, temperature=0.0, max_new_tokens=tokens))


@pytest.fixture(scope="module")
def server(model_dir):
  """(base URL, engine): launch/serve.py's app under uvicorn in a thread on a free port."""
  import uvicorn
  launch = _load("launch_serve")
  args = launch.build_parser().parse_args(["--model", model_dir, "--slots", "4",
                                           "--context", str(CONTEXT)])
  app, engine = launch.build(args)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  started = threading.Event()
  while not server.started and thread.is_alive():
    started.wait(0.01)  # polls the server's own flag
  yield f"http://127.0.0.1:{port}", engine
  server.should_exit = True
  thread.join()
  engine.stop()


@pytest.fixture(scope="module")
def client(server):
  import openai
  return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=300)


def test_models_lists_the_served_model(client):
  assert [m.id for m in client.models.list().data] == ["tiny-alpaca"]


def test_completion_and_its_stream_equal_generate_py_greedy(client, generator):
  expected = generator("none", 12)([PROMPTS[0], PROMPTS[1]])
  for prompt, want in zip(PROMPTS[:2], expected):
    out = client.completions.create(model="tiny-alpaca", prompt=prompt, max_tokens=12,
                                    temperature=0.0)
    assert out.choices[0].text.strip() == want and want
    assert out.usage.completion_tokens <= 12
    chunks = client.completions.create(model="tiny-alpaca", prompt=prompt, max_tokens=12,
                                       temperature=0.0, stream=True)
    pieces = [c.choices[0].text for c in chunks]
    assert len(pieces) > 2 and "".join(pieces) == out.choices[0].text


def test_chat_completion_uses_the_alpaca_template(client, generator):
  want = generator("none", 10)([build_prompt(PROMPTS[2])])[0]
  out = client.chat.completions.create(model="tiny-alpaca", max_tokens=10, temperature=0.0,
                                       messages=[{"role": "user", "content": PROMPTS[2]}])
  assert out.choices[0].message.content.strip() == want
  stream = client.chat.completions.create(model="tiny-alpaca", max_tokens=10, temperature=0.0,
                                          messages=[{"role": "user", "content": PROMPTS[2]}],
                                          stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in stream) == out.choices[0].message.content


def test_sixteen_concurrent_clients_are_all_answered_correctly(client, server, generator):
  prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]
  expected = generator("none", 8)(prompts)

  def ask(prompt):
    return client.completions.create(model="tiny-alpaca", prompt=prompt, max_tokens=8,
                                     temperature=0.0).choices[0].text.strip()
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(ask, prompts))
  assert answers == expected
  assert server[1].most_active > 1  # requests shared decode steps


@pytest.mark.parametrize("case, status, code", [
    ("invalid_json", 400, "invalid_json"),
    ("unknown_model", 404, "model_not_found"),
    ("max_tokens_beyond_context", 400, "context_length_exceeded"),
    ("prompt_beyond_context", 400, "context_length_exceeded"),
    ("empty_messages", 400, None),
    ("bad_temperature", 400, None),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, case,
                                                                     status, code):
  import httpx
  url = server[0]
  bodies = {
      "unknown_model": ("/v1/completions", {"model": "gpt-5", "prompt": "hi"}),
      "max_tokens_beyond_context": ("/v1/completions", {"model": "tiny-alpaca", "prompt": "hi",
                                                         "max_tokens": CONTEXT + 1}),
      "prompt_beyond_context": ("/v1/completions", {"model": "tiny-alpaca",
                                                     "prompt": "hello world " * CONTEXT}),
      "empty_messages": ("/v1/chat/completions", {"model": "tiny-alpaca", "messages": []}),
      "bad_temperature": ("/v1/completions", {"model": "tiny-alpaca", "prompt": "hi",
                                              "temperature": -1}),
  }
  if case == "invalid_json":
    response = httpx.post(url + "/v1/completions", content=b'{"model": "tiny-alpaca", "prompt":',
                          headers={"content-type": "application/json"}, timeout=60)
  else:
    path, body = bodies[case]
    response = httpx.post(url + path, json=body, timeout=60)
  assert response.status_code == status, response.text
  error = response.json()["error"]
  assert set(error) == {"message", "type", "param", "code"} and error["message"]
  assert error["type"] == "invalid_request_error" and error["code"] == code
  out = client.completions.create(model="tiny-alpaca", prompt="ok", max_tokens=2, temperature=0)
  assert out.choices[0].finish_reason in ("length", "stop")


def test_a_client_leaving_mid_stream_frees_its_row(server, client):
  import httpx
  url, engine = server
  body = {"model": "tiny-alpaca", "prompt": PROMPTS[1], "max_tokens": 60, "temperature": 0,
          "stream": True}
  with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
    assert response.status_code == 200
    lines = response.iter_lines()
    assert next(line for line in lines if line.startswith("data:"))
  # the row is given back within a few decode steps, and new requests are served
  out = client.completions.create(model="tiny-alpaca", prompt="ok", max_tokens=3, temperature=0)
  assert out.choices[0].text is not None
  deadline = time.monotonic() + 60
  while any(engine._rows) and time.monotonic() < deadline:  # pylint: disable=protected-access
    threading.Event().wait(0.01)
  assert not any(engine._rows)  # pylint: disable=protected-access


def test_two_processes_generate_an_input_file_on_one_mesh(model_dir, generator, tmp_path):
  """`launch/generate.py --input` on two hosts (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID, 2 CPU devices each): both compute on one 4-device mesh, process 0 alone writes,
  and the answers equal one process's greedy answers."""
  import json
  import os
  from tests import multihost
  instructions = ["请介绍一下北京", "What is a tokenizer?", "写一首短诗"]
  (tmp_path / "in.txt").write_text("\n".join(instructions) + "\n", encoding="utf-8")
  out = tmp_path / "out.jsonl"
  port = multihost.free_port()
  command = [sys.executable, str(REPO / "launch" / "generate.py"), f"--model={model_dir}",
             f"--input={tmp_path / 'in.txt'}", f"--output={out}", "--batch_size=2",
             "--max_new_tokens=6", "--temperature=0", "--mesh_shape=1,-1,1"]
  with multihost.started([command] * 2, [multihost.host_env(i, port) for i in range(2)]) as workers:
    outputs = multihost.finish(workers)
  assert "mesh (1, 4, 1)" in outputs[0][1], outputs[0][1][-2000:]  # process 0 logs
  launch = sys.modules["launch_generate"]
  one = generator("alpaca", 6)
  want = one([launch.template(one.opts, i) for i in instructions[:2]])
  want += one([launch.template(one.opts, instructions[2])] * 2)[:1]
  got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
  assert [r["instruction"] for r in got] == instructions
  assert [r["output"] for r in got] == want
  assert sorted(os.listdir(tmp_path)) == ["in.txt", "out.jsonl"]  # no partial file left


# Meta-Llama-3-8B-Instruct's chat template (its tokenizer_config.json), for the parity below.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_llama3_chat_template_gives_transformers_ids_and_stops_at_eot(tmp_path, model_dir):
  import json
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from cnllama_jax.data import text_tokenizer
  specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
              "<|eot_id|>"]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator((DATA / "tokenizer_en.txt").read_text(encoding="utf-8").splitlines(),
                          trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens(specials)
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0],
      "eos_token": specials[1], "chat_template": LLAMA3_CHAT_TEMPLATE}))
  ours, theirs = text_tokenizer.load(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(
      str(tmp_path))
  conversations = [
      [("user", " What is a tokenizer? ")],
      [("system", "Answer briefly."), ("user", "Hello there")],
      [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a story.")],
  ]
  for turns in conversations:
    want = theirs.apply_chat_template([{"role": r, "content": c} for r, c in turns],
                                      add_generation_prompt=True)
    want = want["input_ids"] if not isinstance(want, list) else want
    got = serve.chat_ids(ours, [serve.Message(role=r, content=c) for r, c in turns], "llama3")
    assert got == list(want)
  assert gen.template_stop_ids(ours, "llama3") == (theirs.convert_tokens_to_ids("<|eot_id|>"),)
  assert gen.template_stop_ids(ours, "alpaca") == ()
  launch = sys.modules.get("launch_generate") or _load("launch_generate")  # absl flags: once
  # launch/generate.py --template llama3: one user turn, the same ids
  opts = launch.Options(model="", template="llama3")
  want = theirs.apply_chat_template([{"role": "user", "content": "Translate\nhello"}],
                                    add_generation_prompt=True)
  want = want["input_ids"] if not isinstance(want, list) else want
  assert [ours.bos_id()] + ours.encode(launch.template(opts, "Translate", "hello")) == list(want)
  sentencepiece = text_tokenizer.load(model_dir)  # no LLaMA-3 special tokens
  with pytest.raises(ValueError, match=r"^chat template 'llama3' needs a tokenizer with the "):
    gen.template_stop_ids(sentencepiece, "llama3")


def test_two_processes_serve_one_engine_and_stop_together(model_dir, generator):
  """launch/serve.py on two hosts (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
  2 CPU devices each, one 4-device mesh): process 0 answers over HTTP, process 1 follows its
  engine; concurrent answers equal one process's greedy ones, and stopping process 0 (SIGTERM)
  ends process 1 too."""
  import signal
  import urllib.request
  import openai
  from tests import multihost
  http, coordinator = multihost.free_port(), multihost.free_port()
  command = [sys.executable, str(REPO / "launch" / "serve.py"), "--model", model_dir, "--port",
             str(http), "--slots", "2", "--context", str(CONTEXT), "--mesh_shape", "1,-1,1"]
  with multihost.started([command] * 2,
                         [multihost.host_env(i, coordinator) for i in range(2)]) as workers:
    deadline = time.monotonic() + 240
    while True:  # until process 0 listens
      assert workers[0].poll() is None and workers[1].poll() is None, "a server process exited"
      try:
        urllib.request.urlopen(f"http://127.0.0.1:{http}/v1/models", timeout=5).read()
        break
      except OSError:
        assert time.monotonic() < deadline, "process 0 never listened"
        time.sleep(0.5)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="none",
                           max_retries=0, timeout=120)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # 3 requests for 2 rows
      answers = list(pool.map(lambda p: client.completions.create(
          model="tiny-alpaca", prompt=p, max_tokens=8, temperature=0.0).choices[0].text,
                              PROMPTS[:3]))
    workers[0].send_signal(signal.SIGTERM)
    outputs = multihost.finish(workers, timeout=120)
  assert "process 1/2: following process 0's engine" in outputs[1][1], outputs[1][1][-2000:]
  assert [a.strip() for a in answers] == generator("none", 8)(PROMPTS[:3])


def test_engine_lets_a_short_request_finish_before_an_earlier_long_one(model_dir):
  from cnllama_jax import inference
  cfg, _, params = inference.load_model(model_dir)
  engine = engine_lib.Engine(cfg, params, slots=2, context=CONTEXT, eos_id=-1)
  order, tokens = [], {"long": [], "short": []}

  def collect(name):
    def on_token(token, finish):
      if token is not None:
        tokens[name].append(token)
      else:
        order.append(name)
    return on_token
  greedy = gen.Sampling(0.0, 0, 1.0, 1.1)
  engine.submit(engine_lib.Request([1, 5, 9, 30], 30, collect("long"), greedy))
  engine.run_once()
  engine.run_once()  # the long one is two tokens in when the short one arrives
  engine.submit(engine_lib.Request([1, 7, 8], 3, collect("short"), greedy))
  while len(order) < 2:
    engine.run_once()
    # the host's copy of the cache indices (it sets the attention window) follows the device's
    index = engine._state["cache"]["index"]  # pylint: disable=protected-access
    assert np.asarray(index).tolist() == engine._filled  # pylint: disable=protected-access
  assert order == ["short", "long"] and len(tokens["long"]) == 30
  assert tokens["long"] == gen.generate(cfg, params, [[1, 5, 9, 30]], max_new_tokens=30,
                                        temperature=0.0, eos_id=-1)[0]
  assert tokens["short"] == gen.generate(cfg, params, [[1, 7, 8]], max_new_tokens=3,
                                         temperature=0.0, eos_id=-1)[0]


def test_engine_stops_a_request_at_any_of_the_models_stop_ids(model_dir):
  from cnllama_jax import inference
  cfg, _, params = inference.load_model(model_dir)
  free = gen.generate(cfg, params, [[1, 5, 9, 30]], max_new_tokens=8, temperature=0.0,
                      eos_id=-1)[0]
  stop = free[2]
  cut = free[:free.index(stop)]
  engine = engine_lib.Engine(cfg.replace(stop_token_ids=(stop,)), params, slots=2,
                             context=CONTEXT)
  assert engine.stop_ids == {cfg.eos_token_id, stop}
  got, finish = [], []
  engine.submit(engine_lib.Request([1, 5, 9, 30], 8, lambda t, f: got.append(t) if t is not None
                                   else finish.append(f), gen.Sampling(0.0, 0, 1.0, 1.1)))
  while not finish:
    engine.run_once()
  assert (got, finish) == (cut, ["stop"])  # the stop id itself is not passed on


def test_per_row_sampling_with_top_k_1_is_greedy_and_top_k_keeps_ties():
  import jax
  import numpy as np
  logits = np.array([[1.0, 2.0, 2.0, 0.0], [3.0, 1.0, 0.5, 0.2]], np.float32)
  seen = np.zeros_like(logits, bool)
  keys = jax.random.split(jax.random.key(0), 2)
  f32 = lambda *v: np.asarray(v, np.float32)  # noqa: E731
  out = _sample_rows(logits, seen, f32(0.7, 0.7), np.asarray([2, 1], np.int32),
                               f32(1.0, 1.0), f32(1.0, 1.0), keys)
  assert np.asarray(out)[0] in (1, 2) and np.asarray(out)[1] == 0
  draws = {int(np.asarray(_sample_rows(
      logits, seen, f32(5.0, 0.0), np.asarray([2, 0], np.int32), f32(1.0, 1.0), f32(1.0, 1.0),
      jax.random.split(jax.random.key(i), 2)))[0]) for i in range(40)}
  assert draws == {1, 2}  # the two tied ids, nothing else, at a high temperature


@pytest.mark.parametrize("top_k, kept", [
    (3, [0, 1]),  # renormalised over the top 3: 0.556 + 0.333 already >= 0.85 (as filter_logits)
    (0, [0, 1, 2]),  # over the whole vocabulary: 0.5 + 0.3 < 0.85, + 0.1 reaches it
])
def test_per_row_sampling_draws_only_within_top_k_and_top_p(top_k, kept):
  import jax
  import numpy as np
  probs = np.array([0.5, 0.3, 0.1, 0.06, 0.04], np.float32)
  logits = np.log(np.stack([probs, probs[::-1]]))
  seen = np.zeros_like(logits, bool)
  f32 = lambda *v: np.asarray(v, np.float32)  # noqa: E731
  draws = [np.asarray(_sample_rows(
      logits, seen, f32(1.0, 1.0), np.asarray([top_k, top_k], np.int32), f32(0.85, 0.85),
      f32(1.0, 1.0), jax.random.split(jax.random.key(i), 2))) for i in range(60)]
  assert sorted({int(d[0]) for d in draws}) == kept  # row 1 is the mirror image
  assert sorted({4 - int(d[1]) for d in draws}) == kept
