"""Continuous batching: requests join one running decode batch between steps.

The engine owns a batch of `slots` rows and one KV cache of `context` slots per row (the layout of
`model.init_cache`). A background thread loops:

  1. admit: each waiting request takes a free row: its prompt is prefilled into that row alone
     (the row's cache is reset, the other rows are untouched) and its first token sampled;
  2. step: one decode step for all rows at once (rows that are free are masked: they write nothing
     that is ever attended and do not advance); each active row's token goes to its request.

A request is finished by EOS, by its `max_tokens`, or by `cancel()` (a client that went away); its
row is free for the next waiting request at once. So a request waits for a free row at most, never
for another request to finish, and a long answer never holds up a short one.

Sampling settings are per row (arrays, not compile-time constants), so requests with different
temperatures share a step; the rules are `generate.next_tokens`' (penalty, temperature, top-k,
top-p; temperature 0 greedy), and a greedy request gets exactly `generate.generate`'s tokens.

Several hosts (a mesh over more than one process): process 0 takes the requests and runs the loop
above; every other process calls `follow()`, which runs the same programs on the same inputs.
Before each admission and each step process 0 broadcasts what it decided (the admitted row, its
prompt and sampling settings; the active rows and the attention window), so all processes make
the same calls in the same order; an idle process 0 still broadcasts that there is nothing to do,
every 50 ms, and `stop()` broadcasts the end. Only process 0 delivers tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cnllama_jax import generate as gen
from cnllama_jax import model as model_lib
from cnllama_jax import sharding as shd
from cnllama_jax.config import LlamaConfig
from cnllama_jax.lora import LoraConfig, lora_for

Array = jax.Array
CANDIDATES = 64  # rows with 0 < top_k <= this draw among the top candidates only (no full sort)


@dataclasses.dataclass(eq=False)
class Request:
  """One prompt to continue. on_token(token, finish) is called from the engine thread: with each
  new token id and finish=None, then once with token=None and finish 'stop' (EOS, not passed on) or
  'length' (max_tokens reached). Cancelled requests get no further calls."""
  prompt: list[int]
  max_tokens: int
  on_token: Callable[[int | None, str | None], None]
  sampling: gen.Sampling = gen.Sampling()
  seed: int = 0
  cancelled: bool = False

  def cancel(self) -> None:
    self.cancelled = True


# --- per-row sampling (arrays [rows]) --------------------------------------------------------------

def sample_rows(logits: Array, seen: Array, temperature: Array, top_k: Array, top_p: Array,
                penalty: Array, keys: Array) -> Array:
  """generate.next_tokens with a setting per row. logits [rows, vocab] fp32, seen [rows, vocab]
  bool, temperature/top_p/penalty [rows] f32, top_k [rows] int32 (0: off), keys [rows] typed keys.
  Returns ids [rows] int32. As in generate.next_tokens, when every sampling row has
  0 < top_k <= CANDIDATES the draw is among the top-k candidates (ties beyond k not included);
  otherwise over the whole vocabulary after one full sort (top_k 0 or large)."""
  penalty = penalty[:, None]
  logits = jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  scaled_all = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]

  def draw_candidates():  # every sampled row has 0 < top_k <= CANDIDATES: no full sort
    k = min(CANDIDATES, logits.shape[-1])
    top, ids = jax.lax.top_k(scaled_all, k)  # [rows, k], descending
    ranks = jnp.arange(k)[None, :]
    top = jnp.where(ranks < top_k[:, None], top, -jnp.inf)
    probs = jax.nn.softmax(top, axis=-1)
    above = jnp.cumsum(probs, axis=-1) - probs
    top = jnp.where((above < top_p[:, None]) | (ranks == 0), top, -jnp.inf)
    choice = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, top)
    drawn = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)

  def draw():
    vocab = logits.shape[-1]
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    ranked = -jnp.sort(-scaled, axis=-1)  # [rows, vocab], descending
    ranks = jnp.arange(vocab)[None, :]
    use_k = (top_k > 0)[:, None]
    kth = jnp.take_along_axis(ranked, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    scaled = jnp.where(use_k & (scaled < kth), -jnp.inf, scaled)
    ranked = jnp.where(use_k & (ranked < kth), -jnp.inf, ranked)  # ties with the k-th stay
    probs = jax.nn.softmax(ranked, axis=-1)
    above = jnp.cumsum(probs, axis=-1) - probs  # mass of the ids ranked above each
    keep = (above < top_p[:, None]) | (ranks == 0)
    cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)  # [rows, 1]
    scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled)
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)

  small_k = jnp.all((temperature == 0) | ((top_k > 0) & (top_k <= CANDIDATES)))
  return jax.lax.cond(jnp.all(temperature == 0), lambda: greedy,
                      lambda: jax.lax.cond(small_k, draw_candidates, draw))


# --- the jitted programs -------------------------------------------------------------------------

def empty_state(cfg: LlamaConfig, rows: int, context: int) -> dict:
  f32 = lambda value: jnp.full((rows,), value, jnp.float32)  # noqa: E731
  return dict(cache=model_lib.init_cache(cfg, rows, context),
              seen=jnp.zeros((rows, cfg.vocab_size), bool), tokens=jnp.zeros((rows,), jnp.int32),
              temperature=f32(0.0), top_p=f32(1.0), penalty=f32(1.0),
              top_k=jnp.zeros((rows,), jnp.int32), keys=jax.random.split(jax.random.key(0), rows),
              step=jnp.zeros((rows,), jnp.int32))


@functools.lru_cache(maxsize=16)
def _programs(cfg: LlamaConfig, lora: LoraConfig, rows: int, context: int, mesh, rules):
  """(admit, step) jitted, the state donated; with a mesh, explicit shardings."""
  model = model_lib.Llama(cfg, lora, mesh=mesh, rules=rules)

  def sample(state, logits, rows_keys):
    return sample_rows(logits[:, 0, :cfg.vocab_size], state["seen"], state["temperature"],
                       state["top_k"], state["top_p"], state["penalty"], rows_keys)

  def admit(params, state, row, ids, mask, settings, key):
    """Prefills ids, mask [1, T] (left-padded) into `row` and samples its first token."""
    one = lambda x: jax.lax.dynamic_slice_in_dim(x, row, 1, axis=0)  # noqa: E731
    cache = state["cache"]
    row_cache = dict(k=jax.lax.dynamic_slice_in_dim(cache["k"], row, 1, axis=1),
                     v=jax.lax.dynamic_slice_in_dim(cache["v"], row, 1, axis=1),
                     mask=jnp.zeros_like(one(cache["mask"])), index=jnp.zeros((1,), jnp.int32))
    logits, row_cache = model.apply({"params": params}, ids, mask, cache=row_cache,
                                    last_only=True, window=ids.shape[1])
    seen = jnp.zeros((1, cfg.vocab_size), jnp.int32).at[0, ids[0]].add(mask[0]) > 0
    temperature, top_k, top_p, penalty = settings
    row_state = dict(seen=seen, temperature=temperature[None], top_k=top_k[None],
                     top_p=top_p[None], penalty=penalty[None], keys=key[None],
                     step=jnp.zeros((1,), jnp.int32))
    token = sample(row_state, logits, jax.random.fold_in(key, 0)[None])
    row_state.update(tokens=token, seen=seen.at[0, token[0]].set(True),
                     step=jnp.ones((1,), jnp.int32))
    put = lambda full, part, axis=0: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        full, part.astype(full.dtype), row, axis=axis)
    new = {name: put(state[name], value) for name, value in row_state.items()}
    new["cache"] = dict(k=put(cache["k"], row_cache["k"], 1), v=put(cache["v"], row_cache["v"], 1),
                        mask=put(cache["mask"], row_cache["mask"]),
                        index=put(cache["index"], row_cache["index"]))
    return new, token[0]

  def step(params, state, active, window):
    """One token for every row; rows not `active` [rows] bool are masked and do not advance."""
    last = state["tokens"][:, None]  # [rows, 1]
    logits, cache = model.apply({"params": params}, last, active[:, None].astype(jnp.int32),
                                cache=state["cache"], window=window)
    cache["index"] = jnp.where(active, cache["index"], state["cache"]["index"])
    keys = jax.vmap(jax.random.fold_in)(state["keys"], state["step"])
    tokens = sample(state, logits, keys)
    rows_ = jnp.arange(tokens.shape[0])
    seen = state["seen"].at[rows_, tokens].set(state["seen"][rows_, tokens] | active)
    return dict(state, cache=cache, tokens=tokens, seen=seen,
                step=state["step"] + active.astype(jnp.int32)), tokens

  if mesh is None:
    return (jax.jit(admit, donate_argnums=(1,)),
            jax.jit(step, donate_argnums=(1,), static_argnums=(3,)),
            functools.partial(empty_state, cfg, rows, context))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params_sh = gen.param_shardings(cfg, lora, mesh, rules)
  base = gen.state_shardings(cfg, rows, context, mesh, rules)
  row_sh = base["tokens"]
  state_sh = dict(cache=base["cache"], seen=base["seen"], tokens=row_sh, temperature=row_sh,
                  top_p=row_sh, penalty=row_sh, top_k=row_sh, keys=row_sh, step=row_sh)
  admit = jax.jit(admit, donate_argnums=(1,), out_shardings=(state_sh, replicated),
                  in_shardings=(params_sh, state_sh, replicated, replicated, replicated,
                                replicated, replicated))
  step = jax.jit(step, donate_argnums=(1,), static_argnums=(3,),
                 in_shardings=(params_sh, state_sh, replicated),
                 out_shardings=(state_sh, replicated))
  init = jax.jit(functools.partial(empty_state, cfg, rows, context), out_shardings=state_sh)
  return admit, step, init


class Engine:
  """Serves Requests from a background thread with continuous batching (see the module doc).

  cfg, params, lora: the model (params placed on `mesh` when given, e.g. by inference.load_model).
  slots: rows decoded together; context: cache slots per row (prompt + answer), default the
  model's max_position_embeddings; eos_id: one id or several, default cfg.stop_ids (negative:
  never stops).
  """

  def __init__(self, cfg: LlamaConfig, params: Any, *, slots: int = 8, context: int | None = None,
               lora: LoraConfig | None = None, eos_id: int | Sequence[int] | None = None,
               mesh=None, rules=shd.DEFAULT_RULES, prompt_bucket: int = 64):
    self.cfg, self.lora = cfg, lora_for(params, lora)
    self.slots, self.context = slots, context or cfg.max_position_embeddings
    self.stop_ids = frozenset(gen.stop_ids_of(cfg, eos_id))
    self.mesh, self.rules = mesh, shd.normalize_rules(rules)
    self.prompt_bucket = prompt_bucket
    self.params = params if mesh is None else shd.place(
        params, gen.param_shardings(cfg, self.lora, mesh, self.rules))
    self._admit, self._step, self._init = _programs(cfg, self.lora, slots, self.context, mesh,
                                                    self.rules)
    self._state = self._init()
    self._rows: list[Request | None] = [None] * slots
    self._made: list[int] = [0] * slots  # tokens produced per row
    self._filled = [0] * slots  # each row's cache index (slots written), kept on the host
    self.leader = jax.process_index() == 0
    self.hosts = jax.process_count()
    self.failed = False  # a multi-host engine stops at its first error (see _loop)
    self._waiting: queue.Queue = queue.Queue()
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.most_active = 0  # the largest number of rows decoded in one step so far

  # -- the public side (any thread) ---------------------------------------------------------------

  def check(self, prompt_tokens: int, max_tokens: int) -> None:
    """Raises ValueError when a prompt of that length plus max_tokens does not fit the context."""
    if prompt_tokens < 1:
      raise ValueError("the prompt is empty")
    if max_tokens < 1:
      raise ValueError(f"max_tokens={max_tokens}; expected >= 1")
    if prompt_tokens + max_tokens - 1 > self.context:
      raise ValueError(f"the prompt has {prompt_tokens} tokens and max_tokens={max_tokens}: "
                       f"together more than the context of {self.context} tokens; shorten the "
                       "prompt or lower max_tokens")

  def submit(self, request: Request) -> Request:
    if self.failed:
      raise ValueError("the engine stopped after an error (see the server log); restart it")
    self.check(len(request.prompt), request.max_tokens)
    self._waiting.put(request)
    self._wake.set()
    return request

  def start(self) -> "Engine":
    self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()
    self._wake.set()
    if self._thread is not None:
      self._thread.join()

  # -- the engine thread --------------------------------------------------------------------------

  def _loop(self) -> None:
    while not self._stop.is_set():
      try:
        busy = self.run_once()
      except Exception:  # pylint: disable=broad-except  # keep serving; fail the active requests
        logging.exception("engine step failed; failing the active requests")
        for row, request in enumerate(self._rows):
          if request is not None and not request.cancelled:
            request.on_token(None, "error")
          self._rows[row] = None
        if self.hosts > 1:  # the other processes cannot be brought back in step: stop serving
          self.failed = True
          break
        self._state, self._filled = self._init(), [0] * self.slots
        busy = False
      if not busy:
        self._wake.wait(0.05)
        self._wake.clear()
    if self.hosts > 1:
      try:
        self._share(np.asarray([0, 1], np.int32))  # tells the followers to return
      except Exception:  # pylint: disable=broad-except  # a follower is gone already
        logging.exception("could not tell the other processes to stop")

  def follow(self) -> None:
    """A process other than 0 of a multi-host engine: makes process 0's calls until it stops."""
    if self.leader:
      raise ValueError("follow() is for processes other than 0; process 0 calls start()")
    while self.run_once() is not None:
      pass

  def _share(self, record: np.ndarray) -> np.ndarray:
    """Process 0's `record` on every process (int32 numpy of a shape all processes know)."""
    if self.hosts == 1:
      return record
    return np.asarray(multihost_utils.broadcast_one_to_all(record, is_source=self.leader))

  def _finish(self, row: int, reason: str | None) -> None:
    request = self._rows[row]
    self._rows[row] = None
    if reason is not None and not request.cancelled:
      request.on_token(None, reason)

  def _deliver(self, row: int, token: int) -> None:
    request = self._rows[row]
    if request.cancelled:
      return self._finish(row, None)
    if token in self.stop_ids:
      return self._finish(row, "stop")
    self._made[row] += 1
    request.on_token(token, None)
    if self._made[row] >= request.max_tokens:
      self._finish(row, "length")
    return None

  def _admissions(self) -> list[tuple[int, Request]]:
    """Process 0: waiting requests paired with free rows (cancelled ones dropped)."""
    pairs = []
    for row in range(self.slots):
      if self._rows[row] is not None:
        continue
      request = None
      while request is None:
        try:
          request = self._waiting.get_nowait()
        except queue.Empty:
          return pairs
        if request.cancelled:
          request = None
      pairs.append((row, request))
      self._rows[row] = request  # taken (delivery starts after its prefill)
    return pairs

  def _admission_record(self, row: int, request: Request | None) -> np.ndarray:
    """[row, seed, top_k, prompt length, max_tokens, temperature, top_p, penalty (float32
    bits), prompt ids padded to the context]: one admission, as process 0 broadcasts it."""
    record = np.zeros((8 + self.context,), np.int32)
    if request is not None:
      s = request.sampling
      record[:5] = (row, request.seed, s.top_k, len(request.prompt), request.max_tokens)
      record[5:8] = np.asarray([s.temperature, s.top_p, s.repetition_penalty],
                               np.float32).view(np.int32)
      record[8:8 + len(request.prompt)] = request.prompt
    return record

  def _admit_from(self, record: np.ndarray) -> int:
    """Prefills one admission record into its row; returns the first token."""
    row, seed, top_k, length, max_tokens = (int(v) for v in record[:5])
    temperature, top_p, penalty = (float(v) for v in record[5:8].view(np.float32))
    room = self.context - max_tokens + 1
    ids, mask = gen.left_pad([record[8:8 + length].tolist()], self.prompt_bucket,
                             max_length=room)
    settings = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                jnp.float32(penalty))
    if self.mesh is not None:
      rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      ids, mask = gen.to_global(ids, rep), gen.to_global(mask, rep)
    self._state, token = self._admit(self.params, self._state, jnp.int32(row), ids, mask,
                                     settings, jax.random.key(seed))
    self._filled[row] = ids.shape[1]
    return int(token)

  def run_once(self) -> bool | None:
    """Admits waiting requests into free rows, then one decode step. False: nothing to do;
    None: (multi-host) process 0 has stopped."""
    pairs = self._admissions() if self.leader else []
    count, stop = self._share(np.asarray([len(pairs), 0], np.int32)).tolist()
    if stop:
      return None
    for i in range(count):
      row, request = pairs[i] if self.leader else (0, None)
      token = self._admit_from(self._share(self._admission_record(row, request)))
      if self.leader:
        self._made[row] = 0
        self._deliver(row, token)
    active = np.asarray([r is not None and not r.cancelled for r in self._rows])
    if self.leader:
      for row in np.flatnonzero(~active):
        if self._rows[row] is not None:
          self._finish(row, None)
    # slots in use after this step: the rows' cache indices (kept on the host) + 1
    window = gen.window_size(max(self._filled) + 1, self.context)
    shared = self._share(np.asarray([*active, window], np.int32))
    active, window = shared[:-1].astype(bool), int(shared[-1])
    if not active.any():
      return False
    self.most_active = max(self.most_active, int(active.sum()))
    self._state, tokens = self._step(self.params, self._state, jnp.asarray(active), window)
    self._filled = [n + int(a) for n, a in zip(self._filled, active)]
    if self.leader:
      for row, token in enumerate(np.asarray(tokens).tolist()):
        if active[row] and self._rows[row] is not None:
          self._deliver(row, token)
    return True
