"""An OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI + server-sent events).

  GET  /v1/models
  POST /v1/completions        prompt (text) -> continuation; `stream: true` for SSE chunks
  POST /v1/chat/completions   messages -> the assistant's answer, through a chat template

Chat templates: "alpaca" (the paper's: the Alpaca header, previous turns as `### Instruction:` /
`### Response:` blocks, `generate.chat_prompt`; a system message replaces the header) and "llama2"
(LLaMA-2's `[INST] <<SYS>> ... <</SYS>> ... [/INST]`, one BOS ... EOS span per exchanged turn) and
"llama3" (LLaMA-3-Instruct's `<|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>` per
message, in order, then the assistant's header; needs a tokenizer with those special tokens, and
`<|eot_id|>` ends an answer: `generate.template_stop_ids`).
Sampling defaults are the paper's (temperature 0.2, top-k 40, top-p 0.9, repetition penalty 1.1;
`top_k` and `repetition_penalty` are accepted as extra fields); `max_tokens` defaults to 400 or
what the context leaves. A prompt that does not fit the context with max_tokens is refused (400),
never truncated. Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

import fastapi
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cnllama_jax import engine as engine_lib
from cnllama_jax import generate as gen
from cnllama_jax.data.encode import PROMPT_TEMPLATE

TEMPLATES = ("alpaca", "llama2", "llama3")
DEFAULT_MAX_TOKENS = 400
_DEFAULTS = gen.Sampling()


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None,
               code: str | None = None, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error(status: int, message: str, param=None, code=None, kind="invalid_request_error"):
  return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                      status_code=status)


# --- request bodies ---------------------------------------------------------------------------

class _Sampling(BaseModel):
  model: str
  max_tokens: int | None = Field(None, ge=1)
  temperature: float = Field(_DEFAULTS.temperature, ge=0.0)
  top_p: float = Field(_DEFAULTS.top_p, gt=0.0, le=1.0)
  top_k: int = Field(_DEFAULTS.top_k, ge=0)
  repetition_penalty: float = Field(_DEFAULTS.repetition_penalty, gt=0.0)
  stream: bool = False
  seed: int | None = None
  stop: str | list[str] | None = None
  n: int = Field(1, ge=1, le=1)


class CompletionBody(_Sampling):
  prompt: str | list[str]


class Message(BaseModel):
  role: Literal["system", "user", "assistant"]
  content: str


class ChatBody(_Sampling):
  messages: list[Message]


# --- chat templates ------------------------------------------------------------------------------

def chat_ids(tokenizer, messages: list[Message], template: str) -> list[int]:
  """Token ids (BOS included) of a conversation ending with a user turn."""
  if not messages:
    raise ApiError(400, "messages is empty; expected at least one user message", "messages")
  system = [m.content for m in messages if m.role == "system"]
  turns = [m for m in messages if m.role != "system"]
  if not turns or turns[-1].role != "user":
    raise ApiError(400, "the last message must have role 'user'", "messages")
  pairs, query = [], turns[-1].content
  for i in range(0, len(turns) - 1, 2):
    user, answer = turns[i], turns[i + 1] if i + 1 < len(turns) - 1 else None
    if user.role != "user" or answer is None or answer.role != "assistant":
      raise ApiError(400, "messages must alternate user / assistant turns, ending with a user "
                     "turn", "messages")
    pairs.append((user.content, answer.content))
  bos, eos = tokenizer.bos_id(), tokenizer.eos_id()
  if template == "llama3":
    return [bos] + tokenizer.encode(gen.llama3_prompt([(m.role, m.content) for m in messages]))
  if template == "alpaca":
    text = gen.chat_prompt(pairs, query)
    if system:
      header = PROMPT_TEMPLATE[:PROMPT_TEMPLATE.index("### Instruction:")]
      text = "\n".join(system) + "\n\n" + text[len(header):]
    return [bos] + tokenizer.encode(text)
  sys_block = f"<<SYS>>\n{chr(10).join(system)}\n<</SYS>>\n\n" if system else ""
  ids: list[int] = []
  for n, (user, answer) in enumerate([*pairs, (query, None)]):
    user = (sys_block + user) if n == 0 else user
    if answer is None:
      ids += [bos] + tokenizer.encode(f"[INST] {user.strip()} [/INST]")
    else:
      ids += [bos] + tokenizer.encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ") + [eos]
  return ids


# --- the app -------------------------------------------------------------------------------------

class _Detokenizer:
  """Text of a growing token list, released only in whole characters."""

  def __init__(self, tokenizer):
    self.tokenizer, self.ids, self.shown = tokenizer, [], 0

  def add(self, token: int) -> str:
    self.ids.append(token)
    text = self.tokenizer.decode(self.ids)
    if text.endswith("\ufffd"):
      return ""
    new, self.shown = text[self.shown:], len(text)
    return new

  def flush(self) -> str:
    text = self.tokenizer.decode(self.ids)
    new, self.shown = text[self.shown:], len(text)
    return new


def create_app(engine: engine_lib.Engine, tokenizer, model_name: str,
               template: str = "alpaca") -> fastapi.FastAPI:
  """The FastAPI app serving `engine` (started by the caller) under the id `model_name`."""
  if template not in TEMPLATES:
    raise ValueError(f"chat template {template!r}; expected one of {TEMPLATES}")
  gen.template_stop_ids(tokenizer, template)  # the template's special tokens exist
  app = fastapi.FastAPI(title="cnllama_jax", docs_url=None, redoc_url=None)
  created = int(time.time())

  @app.exception_handler(ApiError)
  async def _api_error(_, e: ApiError):
    return _error(e.status, e.message, e.param, e.code, e.kind)

  @app.exception_handler(RequestValidationError)
  async def _invalid(_, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
      return _error(400, "the request body is not valid JSON", None, "invalid_json")
    where = ".".join(loc)
    return _error(400, f"{where}: {first.get('msg', 'invalid value')}" if where else
                  first.get("msg", "invalid request"), where or None)

  @app.exception_handler(StarletteHTTPException)
  async def _http(_, e: StarletteHTTPException):
    return _error(e.status_code, str(e.detail), None, None,
                  "invalid_request_error" if e.status_code < 500 else "server_error")

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "cnllama_jax"}]}

  def check_model(body: _Sampling) -> None:
    if body.model != model_name:
      raise ApiError(404, f"the model '{body.model}' does not exist; this server has "
                     f"'{model_name}'", "model", "model_not_found")

  def max_tokens(body: _Sampling, prompt_len: int) -> int:
    if body.max_tokens is not None:
      wanted = body.max_tokens
    else:
      wanted = min(DEFAULT_MAX_TOKENS, engine.context - prompt_len + 1)
    try:
      engine.check(prompt_len, wanted)
    except ValueError as e:
      raise ApiError(400, str(e), "max_tokens" if body.max_tokens else "messages",
                     "context_length_exceeded") from None
    return wanted

  def start(body: _Sampling, ids: list[int]):
    """Submits the request; returns (request, asyncio queue of (text, finish) items)."""
    limit = max_tokens(body, len(ids))
    loop, items = asyncio.get_running_loop(), asyncio.Queue()
    detok, counted = _Detokenizer(tokenizer), [0]
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

    def on_token(token, finish):  # engine thread
      if token is not None:
        counted[0] += 1
      text = detok.add(token) if token is not None else detok.flush()
      loop.call_soon_threadsafe(items.put_nowait, (text, finish))

    sampling = gen.Sampling(body.temperature, body.top_k, body.top_p, body.repetition_penalty)
    request = engine_lib.Request(ids, limit, on_token, sampling,
                                 seed=body.seed if body.seed is not None else
                                 uuid.uuid4().int % 2**31)
    engine.submit(request)
    return request, items, stops, counted

  async def pieces(request, items, stops):
    """Yields (text, finish) until finished; a stop string ends the text (and is not included)."""
    text, emitted = "", 0
    try:
      while True:
        new, finish = await items.get()
        if finish == "error":
          raise ApiError(500, "generation failed", kind="server_error")
        text += new
        cut = min((text.find(s) for s in stops if s and s in text), default=-1)
        if cut >= 0:
          yield text[emitted:max(cut, emitted)], "stop"
          return
        if len(text) > emitted or finish:
          yield text[emitted:], finish
          emitted = len(text)
        if finish:
          return
    finally:
      request.cancel()  # a client gone mid-stream frees its row at the next step

  def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}

  async def respond(body: _Sampling, ids: list[int], chat: bool):
    request, items, stops, counted = start(body, ids)
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    kind = "chat.completion" if chat else "text_completion"
    now = int(time.time())

    def chunk(text: str, finish, first=False) -> str:
      if chat:
        delta = ({"role": "assistant", "content": text} if first else
                 {"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
      else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
      return json.dumps({"id": ident, "object": kind + ".chunk" if chat else kind, "created": now,
                         "model": model_name, "choices": [choice]}, ensure_ascii=False)

    if body.stream:
      async def events():
        first = True
        async for text, finish in pieces(request, items, stops):
          yield {"data": chunk(text, finish, first)}
          first = False
        yield {"data": "[DONE]"}
      return EventSourceResponse(events(), ping=600)

    parts, finish = [], None
    async for text, finish in pieces(request, items, stops):
      parts.append(text)
    text = "".join(parts)
    if chat:
      choice = {"index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": finish}
    else:
      choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": ident, "object": kind, "created": now, "model": model_name,
            "choices": [choice], "usage": usage(len(ids), counted[0])}

  @app.post("/v1/completions")
  async def completions(body: CompletionBody):
    check_model(body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
      raise ApiError(400, f"prompt: {len(prompts)} prompts; this server takes one per request",
                     "prompt")
    return await respond(body, [tokenizer.bos_id()] + tokenizer.encode(prompts[0]), chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatBody):
    check_model(body)
    return await respond(body, chat_ids(tokenizer, body.messages, template), chat=True)

  return app


def _stopped(signum, frame) -> None:
  del signum, frame
  raise SystemExit(0)


def run(app: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
  """Serves `app` with uvicorn until interrupted. SIGTERM (or SIGINT) shuts the server down
  gracefully, then returns through the caller's cleanup (as SystemExit(0) / KeyboardInterrupt):
  uvicorn re-raises the signal once it has stopped, which by default would kill the process before
  the engine is stopped (and a multi-host engine's followers told to stop)."""
  import signal  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel
  import uvicorn  # pylint: disable=import-outside-toplevel
  if threading.current_thread() is threading.main_thread():  # where handlers can be set
    signal.signal(signal.SIGTERM, _stopped)
  uvicorn.run(app, host=host, port=port, log_level="info")
