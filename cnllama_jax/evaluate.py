"""Evaluation: perplexity of a text (C-Eval multiple choice is `ceval.py`).

Perplexity. Each non-empty line is a document, encoded as in pre-training (BOS + pieces, no EOS;
`data/encode.py`); the documents are concatenated and cut into NON-OVERLAPPING windows of
`block_size` tokens (the tail window is kept, padded and masked, not dropped). Within a window every
token but the first is predicted from the tokens before it in that window, so a text of T tokens
in W windows scores T - W tokens (BOS tokens inside a window are predicted, as in the pre-training
loss). perplexity = exp(token-weighted mean NLL). Batches have one fixed shape (the last is padded
with masked rows), so the scoring step compiles once.
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

@functools.partial(jax.jit, static_argnames=("cfg", "lora"))
def _nll_sum(params, input_ids, attention_mask, *, cfg, lora):
  """(sum of next-token NLL, number of scored tokens) of one right-padded batch."""
  logits = model.logits(cfg, params, input_ids, attention_mask, lora)[:, :-1]  # [b, l-1, vocab]
  targets = input_ids[:, 1:]  # [batch, length - 1]
  valid = attention_mask[:, 1:] > 0  # [batch, length - 1]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [batch, length - 1]
  nll = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)
  return nll.sum(), valid.sum()


def perplexity(cfg, params, tokenizer, text_path, *, block_size: int = 512, batch_size: int = 8,
               lora=None) -> dict:
  """Perplexity of a UTF-8 text file, local or a URL (one document per line; blank lines
  skipped).

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
  total, count = 0.0, 0
  for start in range(0, rows, batch_size):
    nll, n = _nll_sum(params, ids[start:start + batch_size], mask[start:start + batch_size],
                      cfg=cfg, lora=lora)
    total, count = total + float(nll), count + int(n)
  return {"tokens": count, "nll": total / count, "perplexity": math.exp(total / count),
          "documents": len(docs), "windows": windows, "block_size": block_size}
