"""Evaluation: perplexity of a text (C-Eval multiple choice is `ceval.py`).

Perplexity. Each non-empty line is a document, encoded as in pre-training (BOS + pieces, no EOS;
`data/encode.py`); the documents are concatenated and cut into NON-OVERLAPPING windows of
`block_size` tokens (the tail window is kept, padded and masked, not dropped). Within a window every
token but the first is predicted from the tokens before it in that window, so a text of T tokens
in W windows scores T - W tokens (BOS tokens inside a window are predicted, as in the pre-training
loss). perplexity = exp(token-weighted mean NLL). Batches have one fixed shape (the last is padded
with masked rows), so the scoring step compiles once. On a mesh the rows of a batch are split over
its data axes and the params laid out as in training (`generate.param_shardings`); every process
of a multi-host run reads the same text and gets the same result.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from cnllama_jax import model
from cnllama_jax.data import sources
from cnllama_jax.data.encode import encode_documents


# ----------------------------------------------------------------------------- perplexity

def _window_nll(logits, input_ids, attention_mask):
  """(sum of next-token NLL, number of scored tokens) from [batch, length, vocab] logits of one
  right-padded batch."""
  logits = logits[:, :-1]  # [batch, length - 1, vocab]
  targets = input_ids[:, 1:]  # [batch, length - 1]
  valid = attention_mask[:, 1:] > 0  # [batch, length - 1]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [batch, length - 1]
  nll = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)
  return nll.sum(), valid.sum()


@functools.partial(jax.jit, static_argnames=("cfg", "lora"))
def _nll_sum(params, input_ids, attention_mask, *, cfg, lora):
  """`_window_nll` of the model's logits, on one device."""
  return _window_nll(model.logits(cfg, params, input_ids, attention_mask, lora), input_ids,
                     attention_mask)


def nll_scorer(cfg, params, lora=None, mesh=None, rules=None):
  """score(input_ids, attention_mask) -> (NLL sum, scored tokens) as Python numbers, for int32
  numpy [batch, length] windows. mesh: rows over the data axes, params placed as in training
  (moved there if they are elsewhere), the two numbers replicated to every process."""
  if mesh is None:
    def score(input_ids, attention_mask):
      nll, count = _nll_sum(params, input_ids, attention_mask, cfg=cfg, lora=lora)
      return float(nll), int(count)
    return score
  # pylint: disable-next=import-outside-toplevel
  from cnllama_jax import generate as gen, sharding as shd
  rules = shd.normalize_rules(rules or shd.DEFAULT_RULES)
  lora_cfg = lora or model.LoraConfig()
  net = model.Llama(cfg, lora_cfg, mesh=mesh, rules=rules)
  param_sh = gen.param_shardings(cfg, lora_cfg, mesh, rules)
  placed = shd.place(params, param_sh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  @functools.lru_cache(maxsize=None)
  def program(batch, length):
    rows = shd.batch_sharding(mesh, rules, (batch, length))
    def nll(p, ids, mask):
      logits = net.apply({"params": p}, ids, mask)[..., :cfg.vocab_size]
      return _window_nll(logits, ids, mask)
    return rows, jax.jit(nll, in_shardings=(param_sh, rows, rows),
                         out_shardings=(replicated, replicated))

  def score(input_ids, attention_mask):
    rows, fn = program(*input_ids.shape)
    nll, count = fn(placed, gen.to_global(input_ids, rows), gen.to_global(attention_mask, rows))
    return float(nll), int(count)
  score.rows_sharding = lambda batch, length: program(batch, length)[0]
  return score


def perplexity(cfg, params, tokenizer, text_path, *, block_size: int = 512, batch_size: int = 8,
               lora=None, mesh=None, rules=None) -> dict:
  """Perplexity of a UTF-8 text file, local or a URL (one document per line; blank lines
  skipped). mesh, rules: score sharded (`nll_scorer`).

  Returns {"tokens": scored tokens, "nll": mean NLL (nats), "perplexity", "documents",
  "windows", "block_size"}.
  """
  if block_size < 2 or batch_size < 1:
    raise ValueError(f"need block_size >= 2 and batch_size >= 1, got {block_size}, {batch_size}")
  docs = list(sources.iter_documents([text_path]))
  if not docs:
    raise ValueError(f"{text_path}: no non-empty lines to evaluate")
  stream = np.concatenate([np.asarray(d, np.int32) for d in encode_documents(tokenizer, docs)])
  if stream.max() >= cfg.vocab_size:
    raise ValueError(f"tokenizer id {stream.max()} is outside the model's vocabulary of "
                     f"{cfg.vocab_size}: use the tokenizer the model was trained with")
  windows = math.ceil(len(stream) / block_size)
  rows = math.ceil(windows / batch_size) * batch_size
  ids = np.zeros((rows, block_size), np.int32)  # [rows, block]; filled row-major
  mask = np.zeros((rows, block_size), np.int32)
  ids.reshape(-1)[:len(stream)] = stream
  mask.reshape(-1)[:len(stream)] = 1
  score = nll_scorer(cfg, params, lora, mesh, rules)
  total, count = 0.0, 0
  for start in range(0, rows, batch_size):
    nll, n = score(ids[start:start + batch_size], mask[start:start + batch_size])
    total, count = total + nll, count + n
  return {"tokens": count, "nll": total / count, "perplexity": math.exp(total / count),
          "documents": len(docs), "windows": windows, "block_size": block_size}
