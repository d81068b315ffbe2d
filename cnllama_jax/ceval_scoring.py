"""Scoring C-Eval prompts with a model (`ceval` builds the prompts and option ids): the summed
last-position logits of each option's token ids, after HF's repetition penalty over the prompt,
on one device or sharded on a mesh; prompts batched by length into few padded shapes."""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnllama_jax import model
from cnllama_jax.generate import apply_repetition_penalty

MIN_BUCKET = 64  # the shortest padded prompt length

# (input_ids [batch, length], attention_mask [batch, length], option_ids [batch, 4, k],
# repetition_penalty) -> option scores [batch, 4]; rows are left-padded, so the next token follows
# position -1. A penalty other than 1.0 applies HF's repetition penalty over the prompt's ids.
Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]


def option_scores(last, input_ids, attention_mask, option_ids, repetition_penalty: float):
  """Summed scores [batch, 4] of each option's token ids, from the last position's logits
  `last` [batch, vocab] after HF's repetition penalty over each row's prompt ids (input_ids,
  attention_mask [batch, length]; padding excluded); option_ids [batch, 4, k]."""
  rows = jnp.arange(input_ids.shape[0])[:, None]  # [batch, 1]
  seen = jnp.zeros(last.shape, jnp.int32).at[rows, input_ids].add(attention_mask) > 0  # prompt ids
  last = apply_repetition_penalty(last, seen, repetition_penalty)  # [batch, vocab]
  flat = option_ids.reshape(option_ids.shape[0], -1)  # [batch, 4 * k]
  picked = jnp.take_along_axis(last, flat, axis=-1)  # [batch, 4 * k]
  return picked.reshape(option_ids.shape).sum(-1)  # [batch, 4]


@functools.partial(jax.jit, static_argnames=("cfg", "lora", "repetition_penalty"))
def _option_scores(params, input_ids, attention_mask, option_ids, *, cfg, lora,
                   repetition_penalty):
  last = model.logits(cfg, params, input_ids, attention_mask, lora)[:, -1]  # [batch, vocab]
  return option_scores(last, input_ids, attention_mask, option_ids, repetition_penalty)


def model_scorer(cfg, params, lora=None, mesh=None, rules=None) -> Scorer:
  """The Scorer of a model: summed last-position logits of each option's token ids, after the
  repetition penalty over each row's prompt ids (1.0: raw logits).

  mesh: score sharded as in training (params in the rules' layout, rows over the data axes,
  scores returned replicated, so every host of a multi-host run gets them all)."""
  if mesh is None:
    def score(input_ids, attention_mask, option_ids, repetition_penalty=1.0):
      return np.asarray(_option_scores(params, input_ids, attention_mask, option_ids, cfg=cfg,
                                       lora=lora, repetition_penalty=float(repetition_penalty)))
    return score
  # pylint: disable-next=import-outside-toplevel
  from cnllama_jax import generate as gen, sharding as shd
  rules = shd.normalize_rules(rules or shd.DEFAULT_RULES)
  lora_cfg = lora or model.LoraConfig()
  net = model.Llama(cfg, lora_cfg, mesh=mesh, rules=rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  placed = shd.place(params, gen.param_shardings(cfg, lora_cfg, mesh, rules))

  @functools.lru_cache(maxsize=None)
  def program(batch, length, repetition_penalty):
    rows = shd.batch_sharding(mesh, rules, (batch, length))
    def scores(p, ids, mask, options):
      last = net.apply({"params": p}, ids, mask)[:, -1, :cfg.vocab_size]  # [batch, vocab]
      return option_scores(last, ids, mask, options, repetition_penalty)
    return rows, jax.jit(scores, out_shardings=replicated, in_shardings=(
        gen.param_shardings(cfg, lora_cfg, mesh, rules), rows, rows, replicated))

  def score(input_ids, attention_mask, option_ids, repetition_penalty=1.0):
    rows, fn = program(*input_ids.shape, float(repetition_penalty))
    return np.asarray(fn(placed, gen.to_global(input_ids, rows),
                         gen.to_global(attention_mask, rows),
                         gen.to_global(option_ids, replicated)))
  return score


def bucket_length(n: int, max_length: int) -> int:
  """Padded length for a batch whose longest prompt has n tokens: a power of two >= MIN_BUCKET,
  capped at max_length (few distinct shapes, so few compilations)."""
  return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max_length)


def score_prompts(scorer: Scorer, prompts: Sequence[Sequence[int]], option_ids: Sequence,
                  *, batch_size: int, max_length: int, pad_id: int = 0,
                  repetition_penalty: float = 1.0) -> np.ndarray:
  """Option scores [n, 4]: prompts sorted by length, left-padded, batches of fixed row count."""
  order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
  out = np.zeros((len(prompts), 4), np.float32)
  k = option_ids[0].shape[-1] if len(prompts) else 1
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    length = bucket_length(len(prompts[rows[0]]), max_length)
    ids = np.full((batch_size, length), pad_id, np.int32)  # [batch, length]
    mask = np.zeros((batch_size, length), np.int32)
    opts = np.zeros((batch_size, 4, k), np.int32)  # [batch, 4, k]
    for r, i in enumerate(rows):
      ids[r, length - len(prompts[i]):] = prompts[i]
      mask[r, length - len(prompts[i]):] = 1
      opts[r] = option_ids[i]
    out[rows] = np.asarray(scorer(ids, mask, opts, repetition_penalty))[:len(rows)]
  return out
