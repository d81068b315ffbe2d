"""Token-level encodings of the paper: pre-training blocks and Alpaca SFT examples.

Pure functions of a tokenizer and text.  The tokenizer is a plain
``sentencepiece.SentencePieceProcessor`` (``encode(str | list[str]) -> ids``,
``bos_id()``, ``eos_id()``); ``load_tokenizer(path)`` opens one.

Pre-training (``run_clm_pt_with_peft.py``): each document (one line) is encoded
like the Hugging Face LLaMA tokenizer with default settings -- BOS, no EOS --
the documents are concatenated and cut into ``block_size`` blocks; the tail
shorter than a block is dropped (HF ``group_texts``).  Labels = input ids.
The paper's script groups each file in batches of 1,000 lines (the HF ``map``
default) and drops a remainder per batch; we concatenate the whole corpus and
drop one remainder of at most ``block_size - 1`` tokens.

Instruction tuning (``run_clm_sft_with_peft.py``)::

    source = PROMPT_TEMPLATE.format(instruction=instruction [+ "\\n" + input])
    target = output + "</s>"
    input_ids = ([bos] + sp(source) + sp(output) + [eos])[:max_seq_len]
    labels    = ([-100] * (1 + len(sp(source))) + sp(output) + [eos])[:max_seq_len]

then right-padded to ``max_seq_len`` (input ids with ``pad_id``, labels with
-100, attention mask 0).  The paper tokenises the *string* ``output + "</s>"``
with the HF tokenizer, which splits off the special token ``</s>`` and maps it
to the eos id 2; a bare SentencePiece processor would instead spell "</s>" out
as ordinary pieces.  We reproduce the HF result: ``sp.encode(output) + [eos_id]``.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import sentencepiece as spm

IGNORE_INDEX = -100
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: ")


def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
  """Opens a SentencePiece model file; it must define BOS and EOS (LLaMA: 1 and 2)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: tokenizer model not found")
  sp = spm.SentencePieceProcessor()
  try:
    sp.Load(str(path))
  except (OSError, RuntimeError) as err:
    raise ValueError(f"{path}: not a SentencePiece model ({err})") from None
  if sp.bos_id() < 0 or sp.eos_id() < 0:
    raise ValueError(f"{path}: tokenizer has no BOS/EOS (bos={sp.bos_id()}, eos={sp.eos_id()}); "
                     f"LLaMA-style models need both")
  return sp


def build_prompt(instruction: str, input: str | None = None) -> str:
  """The paper's Alpaca prompt; a non-empty ``input`` is joined as ``instruction + "\\n" + input``."""
  if input:
    instruction = instruction + "\n" + input
  return PROMPT_TEMPLATE.format_map({"instruction": instruction})


def combine_sft(source_ids: Sequence[int], target_ids: Sequence[int],
                max_seq_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
  """Concatenates source and target, masks the source, right-truncates.

  Args:
    source_ids: BOS + prompt ids.
    target_ids: output ids + [eos].
  Returns:
    ``(input_ids [n], labels [n], truncated)`` int32 with
    ``n = min(len(source) + len(target), max_seq_len)``.
  """
  ids = np.asarray(list(source_ids) + list(target_ids), np.int32)          # [s + t]
  labels = np.concatenate([np.full(len(source_ids), IGNORE_INDEX, np.int32),
                           np.asarray(target_ids, np.int32)])              # [s + t]
  truncated = len(ids) > max_seq_len
  return ids[:max_seq_len], labels[:max_seq_len], truncated


def pad_sft(input_ids: np.ndarray, labels: np.ndarray, max_seq_len: int,
            pad_id: int) -> dict[str, np.ndarray]:
  """Right-pads one example to ``max_seq_len``; every value is int32 ``[max_seq_len]``."""
  n = len(input_ids)
  out = {
      "input_ids": np.full(max_seq_len, pad_id, np.int32),
      "labels": np.full(max_seq_len, IGNORE_INDEX, np.int32),
      "attention_mask": np.zeros(max_seq_len, np.int32),
  }
  out["input_ids"][:n] = input_ids
  out["labels"][:n] = labels
  out["attention_mask"][:n] = 1
  return out


def encode_sft_example(tokenizer: spm.SentencePieceProcessor, instruction: str, input: str | None,
                       output: str, max_seq_len: int = 512, pad_id: int = 0) -> dict[str, np.ndarray]:
  """One Alpaca example as the paper encodes it.

  Returns ``input_ids``, ``labels``, ``attention_mask`` int32 ``[max_seq_len]``
  and ``truncated`` (bool: the unpadded example was longer than ``max_seq_len``).
  """
  source = [tokenizer.bos_id()] + tokenizer.encode(build_prompt(instruction, input))
  target = tokenizer.encode(output) + [tokenizer.eos_id()]
  ids, labels, truncated = combine_sft(source, target, max_seq_len)
  return {**pad_sft(ids, labels, max_seq_len, pad_id), "truncated": truncated}


def encode_documents(tokenizer: spm.SentencePieceProcessor, texts: Sequence[str],
                     num_threads: int = -1) -> list[list[int]]:
  """BOS + SentencePiece ids for each document (no EOS), as HF ``LlamaTokenizer(text)``."""
  bos = tokenizer.bos_id()
  return [[bos] + ids for ids in tokenizer.encode(list(texts), num_threads=num_threads)]


def pack_blocks(tokens: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Cuts a token stream ``[T]`` into ``(blocks [T // block_size, block_size], remainder [T % block_size])``."""
  n = len(tokens) // block_size
  return tokens[:n * block_size].reshape(n, block_size), tokens[n * block_size:]


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic train/validation split of ``n`` examples.

  ``round(n * val_fraction)`` examples (at least one if ``val_fraction > 0``)
  chosen by a permutation seeded with ``seed`` go to validation; both index
  arrays are sorted (int64).  Raises if no training example would remain.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  n_val = 0 if val_fraction == 0 else max(1, int(round(n * val_fraction)))
  if n - n_val < 1:
    raise ValueError(f"only {n} examples: not enough for a validation fraction of "
                     f"{val_fraction} and at least one training example")
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])
