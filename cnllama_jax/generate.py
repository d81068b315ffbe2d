"""Generation: a jitted prefill and a jitted one-token decode step over a KV cache.

    state, first = prefill(prompts)            # writes the prompts' k/v, samples token 1
    state, next  = decode(state, window)       # appends one token per row; called from Python

The cache holds `max_len` slots (model.init_cache; default: padded prompt + new tokens rounded up
to 128, so a call only pays for the context it needs). It is allocated by the prefill and donated
to every step, so a step never changes shape and updates the cache in place. A step attends over
the first `window` slots only (`window_size`: powers of two, so a few compilations per max_len);
its cost follows the context, not the buffer. The loop dispatches step t+1 before reading step t's
tokens, so the device never waits on the host, and each token can be streamed (`on_token`).

Sharded (`mesh=`): the params keep the training layout (sharding.py's logical rules), prompts and
the cache rows are split over the data axes and the cache's kv heads over `tensor`; prefill and
decode are jitted with these shardings explicit, and the sampled tokens come back replicated, so
every host of a multi-host run reads the same tokens.

Prompts are left-padded to a multiple of `prompt_bucket` tokens (fewer prefill compilations);
positions come from the attention mask, so padding changes nothing. Sampling follows `transformers`'
order: repetition penalty (prompt included), temperature, top-k, top-p, then a draw; temperature 0
is greedy (the penalty still applies, as in HF). Padded vocabulary ids are sliced off before
sampling, so they can never be drawn.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cnllama_jax import model as model_lib
from cnllama_jax import sharding as shd
from cnllama_jax.config import LlamaConfig
from cnllama_jax.data.encode import PROMPT_TEMPLATE, build_prompt
from cnllama_jax.lora import LoraConfig, lora_for

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
  """The paper's decoding settings are the defaults. temperature 0: greedy."""
  temperature: float = 0.2
  top_k: int = 40  # 0: off
  top_p: float = 0.9  # 1.0: off
  repetition_penalty: float = 1.1  # 1.0: off

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or \
        self.repetition_penalty <= 0:
      raise ValueError(f"{self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1 and "
                       "repetition_penalty > 0")


# --- logits processing (pure; logits [batch, vocab] fp32) -----------------------------------------

def apply_repetition_penalty(logits: Array, seen: Array, penalty: float) -> Array:
  """As HF's RepetitionPenaltyLogitsProcessor: for ids already in the sequence (seen [batch, vocab]
  bool), positive logits are divided by `penalty`, negative ones multiplied by it."""
  if penalty == 1.0:
    return logits
  penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
  return jnp.where(seen, penalised, logits)


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Top-k then top-p (nucleus) filtering as HF's warpers; removed ids get -inf.

  top-k keeps ids whose logit is >= the k-th largest (ties kept). top-p keeps the smallest set of
  most-likely ids whose probability mass reaches top_p: an id stays if the mass of the ids ranked
  above it is < top_p (so at least the top id stays).
  """
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    top = jax.lax.top_k(logits, top_k)[0]  # [batch, k], descending
  elif top_p < 1.0:
    top = -jnp.sort(-logits, axis=-1)  # [batch, vocab], descending
  else:
    return logits
  # Without the barrier XLA:CPU fuses top-k into its elementwise users and re-sorts (~50x slower).
  top = jax.lax.optimization_barrier(top)
  if 0 < top_k < vocab:
    logits = jnp.where(logits < top[:, -1:], -jnp.inf, logits)
  if top_p < 1.0:
    log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # over the ids top-k kept
    probs = jnp.exp(top - log_norm)  # [batch, k or vocab]
    above = jnp.cumsum(probs, axis=-1) - probs  # mass of the ids ranked above each
    keep = (above < top_p) | (jnp.arange(top.shape[-1]) == 0)
    cutoff = jnp.min(jnp.where(keep, top, jnp.inf), axis=-1, keepdims=True)  # [batch, 1]
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def next_tokens(logits: Array, seen: Array, sampling: Sampling, key: Array) -> Array:
  """logits [batch, vocab] (real vocabulary only), seen [batch, vocab] bool -> ids [batch] int32.

  With top-k on, the draw is made among the k candidates only (top-p applied to them, then one
  categorical draw over k values instead of the whole vocabulary): the distribution of
  `filter_logits`, except that ids tied with the k-th logit beyond k are not candidates."""
  logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, sampling.repetition_penalty)
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if 0 < sampling.top_k < logits.shape[-1]:
    top, ids = jax.lax.top_k(logits, sampling.top_k)  # [batch, k], descending
    top = top / sampling.temperature
    if sampling.top_p < 1.0:
      probs = jax.nn.softmax(top, axis=-1)
      above = jnp.cumsum(probs, axis=-1) - probs  # mass of the candidates ranked above each
      keep = (above < sampling.top_p) | (jnp.arange(top.shape[-1]) == 0)
      top = jnp.where(keep, top, -jnp.inf)
    choice = jax.random.categorical(key, top, axis=-1)  # [batch]
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# --- the jitted prefill and decode step -----------------------------------------------------------

def _record(state: dict, tokens: Array, stop_ids: Array) -> dict:
  """Marks `tokens` [batch] as seen (for the penalty) and rows that emitted a stop id (any of
  `stop_ids` [n]) as done."""
  rows = jnp.arange(tokens.shape[0])
  stopped = jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)
  return dict(state, tokens=tokens, seen=state["seen"].at[rows, tokens].set(True),
              done=state["done"] | stopped, step=state["step"] + 1)


def stop_ids_of(cfg: LlamaConfig, eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
  """The ids that end a row: `eos_id` (one id or several; negative ids never match), default
  cfg.stop_ids (eos_token_id and LLaMA-3's other end-of-turn ids)."""
  if eos_id is None:
    return cfg.stop_ids
  ids = tuple(int(i) for i in np.atleast_1d(np.asarray(eos_id)))
  if not ids:
    raise ValueError("eos_id=[]; expected an id, a list of ids, or None for the model's")
  return ids


def tokenizer_stop_ids(cfg: LlamaConfig, tokenizer_eos: int) -> tuple[int, ...]:
  """What the command-line tools stop on: the tokenizer's EOS (-1: none), then the model's
  stop ids (config.json / generation_config.json), without repeats."""
  return tuple(dict.fromkeys(i for i in (tokenizer_eos, *cfg.stop_ids) if i >= 0)) or (-1,)


def window_size(filled: int, max_len: int, smallest: int = 256) -> int:
  """Cache slots a decode step attends over when `filled` slots are in use: the next power of two
  (at least `smallest`), capped at max_len. Few distinct sizes, so few decode compilations, and the
  attention cost follows the context rather than the buffer."""
  return min(max_len, max(smallest, 1 << max(filled - 1, 0).bit_length()))


def state_shardings(cfg: LlamaConfig, batch: int, max_len: int, mesh, rules) -> dict:
  """NamedShardings of the decode state: cache rows over the batch axes, kv heads over `tensor`."""
  spec = lambda axes, shape: NamedSharding(  # noqa: E731
      mesh, shd.logical_to_spec(axes, rules, mesh, shape))
  kv_shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
  rows = spec(("activation_batch",), (batch,))
  return dict(cache=dict(k=spec(model_lib.CACHE_AXES, kv_shape),
                         v=spec(model_lib.CACHE_AXES, kv_shape),
                         mask=spec(shd.BATCH, (batch, max_len)), index=rows),
              seen=spec(("activation_batch", None), (batch, cfg.vocab_size)), done=rows,
              step=NamedSharding(mesh, PartitionSpec()), tokens=rows)


def param_shardings(cfg: LlamaConfig, lora: LoraConfig, mesh, rules) -> Any:
  """The training layout of the params (model.abstract_params + sharding rules) on `mesh`."""
  return shd.param_shardings(model_lib.abstract_params(cfg, lora), mesh, rules)


@functools.lru_cache(maxsize=64)
def _programs(cfg: LlamaConfig, lora: LoraConfig, sampling: Sampling, max_len: int, batch: int,
              mesh, rules) -> tuple[Callable, Callable]:
  """(prefill, decode(window)) jitted for one shape; with a mesh, with explicit shardings."""
  model = model_lib.Llama(cfg, lora, mesh=mesh, rules=rules)

  def prefill(params, ids, mask, rng, stop_ids):
    """ids, mask: [batch, prompt] left-padded. Returns the decode state and the first tokens."""
    cache = model_lib.init_cache(cfg, batch, max_len)
    logits, cache = model.apply({"params": params}, ids, mask, cache=cache, last_only=True,
                                window=ids.shape[1])  # [batch, 1, padded_vocab]
    seen = jnp.zeros((batch, cfg.vocab_size), jnp.int32)
    seen = seen.at[jnp.arange(batch)[:, None], ids].add(mask) > 0  # prompt ids, no padding
    tokens = next_tokens(logits[:, 0, :cfg.vocab_size], seen, sampling, jax.random.fold_in(rng, 0))
    state = dict(cache=cache, seen=seen, done=jnp.zeros((batch,), bool), step=jnp.int32(0))
    return _record(state, tokens, stop_ids), tokens

  def decode(params, state, rng, stop_ids, window):
    """Feeds each row's last token, returns the next ones [batch] (a stop id again for finished
    rows)."""
    last = state["tokens"][:, None]  # [batch, 1]
    logits, cache = model.apply({"params": params}, last, jnp.ones_like(last),
                                cache=state["cache"], window=window)
    tokens = next_tokens(logits[:, 0, :cfg.vocab_size], state["seen"], sampling,
                         jax.random.fold_in(rng, state["step"]))
    tokens = jnp.where(state["done"], jnp.maximum(stop_ids[0], 0), tokens)
    return _record(dict(state, cache=cache), tokens, stop_ids), tokens

  if mesh is None:
    return jax.jit(prefill), jax.jit(decode, donate_argnums=(1,), static_argnums=(4,))
  replicated = NamedSharding(mesh, PartitionSpec())
  params_sh = param_shardings(cfg, lora, mesh, rules)
  state_sh = state_shardings(cfg, batch, max_len, mesh, rules)
  rows_sh = state_sh["cache"]["mask"]  # [batch, length] like the prompts
  prefill = jax.jit(prefill, in_shardings=(params_sh, rows_sh, rows_sh, replicated, replicated),
                    out_shardings=(state_sh, replicated))
  decode = jax.jit(decode, in_shardings=(params_sh, state_sh, replicated, replicated),
                   out_shardings=(state_sh, replicated), donate_argnums=(1,), static_argnums=(4,))
  return prefill, decode


def to_global(array: np.ndarray, sharding) -> Array:
  """A host array that every process holds whole -> a global array with `sharding` (each process
  fills only its own devices' shards: works on one host and across hosts alike)."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def left_pad(prompts: Sequence[Sequence[int]], bucket: int = 1, pad_id: int = 0,
             max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """ids, mask: int32 [batch, length], length = the longest prompt rounded up to `bucket` (but not
  beyond `max_length` unless the longest prompt is)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (e.g. BOS)")
  longest = max(len(p) for p in prompts)
  length = -(-longest // bucket) * bucket
  if max_length is not None:
    length = max(longest, min(length, max_length))
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, length - len(prompt):] = prompt
    mask[row, length - len(prompt):] = 1
  return ids, mask


def generate(cfg: LlamaConfig, params: Any, prompt_ids: Sequence[Sequence[int]], *,
             max_new_tokens: int = 400, temperature: float = 0.2, top_k: int = 40,
             top_p: float = 0.9, repetition_penalty: float = 1.1, rng: Array | None = None,
             eos_id: int | Sequence[int] | None = None, lora: LoraConfig | None = None,
             on_token: Callable[[list[int | None]], None] | None = None,
             max_len: int | None = None, prompt_bucket: int = 64, mesh=None,
             rules=shd.DEFAULT_RULES) -> list[list[int]]:
  """Continues each prompt (token ids, BOS included) by up to `max_new_tokens` tokens.

  Returns the new tokens of each row, ending with the stop id the row stopped on, if any. eos_id:
  one id or several (`stop_ids_of`), default cfg.stop_ids; a negative value never stops early.
  on_token(new) is called once per step with the token each row just produced (None for rows
  that had already stopped). max_len: cache slots (default: padded prompt + max_new_tokens,
  rounded up to 128); a fixed value lets prompts of any length up to it reuse one compiled decode
  step. Params holding LoRA adapters need `lora`.

  mesh (a `sharding.make_mesh` mesh) and rules: run sharded as in training: params in the layout
  of `param_shardings` (moved there if they are elsewhere), the batch over the data axes, the cache
  over batch and kv heads. Multi-host: every process calls this with the same prompts and gets
  the same outputs.
  """
  lora = lora_for(params, lora)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 1")
  sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
  if temperature == 0:  # greedy ignores top-k/top-p: one compilation for every such call
    sampling = dataclasses.replace(sampling, top_k=0, top_p=1.0)
  stop_ids = stop_ids_of(cfg, eos_id)
  room = None if max_len is None else max_len - max_new_tokens + 1  # the longest prompt that fits
  ids, mask = left_pad(prompt_ids, prompt_bucket, max_length=room)
  needed = ids.shape[1] + max_new_tokens - 1  # the last token is never fed back
  if max_len is None:
    max_len = -(-needed // 128) * 128
  elif needed > max_len:
    raise ValueError(f"a prompt of {ids.shape[1]} tokens + {max_new_tokens} new tokens "
                     f"needs {needed} cache slots but max_len={max_len}; shorten the prompt, "
                     "lower max_new_tokens or raise max_len")
  rng = jax.random.key(0) if rng is None else rng
  stop = jnp.asarray(stop_ids, jnp.int32)
  rules = shd.normalize_rules(rules)
  prefill, decode = _programs(cfg, lora, sampling, max_len, ids.shape[0], mesh, rules)
  if mesh is not None:
    params = shd.place(params, param_shardings(cfg, lora, mesh, rules))
    rows = state_shardings(cfg, ids.shape[0], max_len, mesh, rules)["cache"]["mask"]
    ids, mask = to_global(ids, rows), to_global(mask, rows)

  state, pending = prefill(params, ids, mask, rng, stop)
  outputs: list[list[int]] = [[] for _ in prompt_ids]
  stopped = [False] * len(prompt_ids)
  for step in range(max_new_tokens):
    if step + 1 < max_new_tokens:  # dispatch the next step before waiting on this one
      # this step writes slot ids.shape[1] + step and attends over every slot up to it
      window = window_size(ids.shape[1] + step + 1, max_len)
      state, following = decode(params, state, rng, stop, window)
    new: list[int | None] = []
    for row, token in enumerate(np.asarray(pending).tolist()):
      new.append(None if stopped[row] else token)
      if not stopped[row]:
        outputs[row].append(token)
        stopped[row] = token in stop_ids
    if on_token is not None:
      on_token(new)
    if all(stopped):
      break
    if step + 1 < max_new_tokens:
      pending = following
  return outputs


# --- prompts --------------------------------------------------------------------------------

_TURN = "### Instruction:"


def chat_prompt(history: Sequence[tuple[str, str]], query: str) -> str:
  """The Alpaca template over a conversation: the header once, then every previous turn as
  `### Instruction:\\n{q}\\n\\n### Response: {a}\\n\\n`, then the new query's instruction block
  (the paper's gradio demo concatenates turns this way). No history: exactly `build_prompt(query)`.
  """
  header = PROMPT_TEMPLATE[:PROMPT_TEMPLATE.index(_TURN)]
  turn = lambda q: build_prompt(q)[len(header):]  # noqa: E731  "### Instruction:\n{q}...Response: "
  past = "".join(turn(q) + a + "\n\n" for q, a in history)
  return header + past + turn(query)


LLAMA3_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def llama3_prompt(turns: Sequence[tuple[str, str]]) -> str:
  """LLaMA-3-Instruct's chat text after BOS: each (role, content) turn in order as
  `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>` (content stripped, as
  Meta's template does), then the assistant's header. A LLaMA-3 tokenizer encodes the special
  tokens in it as their ids."""
  text = "".join(f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"
                 for role, content in turns)
  return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def template_stop_ids(tokenizer, template: str) -> tuple[int, ...]:
  """The ids that end an answer in a chat `template` beside the model's own: llama3's
  `<|eot_id|>`. A one-line ValueError when the tokenizer lacks the template's special tokens."""
  if template != "llama3":
    return ()
  ids = {token: tokenizer.encode(token) for token in LLAMA3_SPECIALS}
  missing = [token for token, pieces in ids.items() if len(pieces) != 1]
  if missing:
    raise ValueError(f"chat template 'llama3' needs a tokenizer with the special tokens "
                     f"{', '.join(missing)} (a LLaMA-3 tokenizer.json); this one splits them")
  return (ids["<|eot_id|>"][0],)
