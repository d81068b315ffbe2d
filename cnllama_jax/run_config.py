"""The fields of a run's ConfigDict, with defaults; `configs/*.py` start from `default()` and set
their stage's knobs themselves.

Every field can be overridden on the command line as `--config.a.b=value`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import ml_collections

from cnllama_jax import config as model_config
from cnllama_jax import lora as lora_lib
from cnllama_jax import sharding as shd

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def model_fields(preset: str, vocab_size: int, **overrides) -> ml_collections.ConfigDict:
  """All LlamaConfig fields of a preset (so each is overridable), with None kept explicit."""
  cfg = model_config.preset(preset, vocab_size=vocab_size, **overrides)
  return ml_collections.ConfigDict(dataclasses.asdict(cfg))


def default() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dry_run = False
  c.base_model = ""  # a local HF LLaMA directory; "" = random init of `model` (tiny shapes)
  c.tokenizer = ""  # SentencePiece .model, tokenizer.json or a dir; the vocabulary is resized to it
  c.model = model_fields("tiny", 99)

  # init: normal | mean | subword_mean (each new row the mean of the base rows of the pieces
  # `base_tokenizer`, the base model's own tokenizer, splits the new piece into).
  c.vocab = ml_collections.ConfigDict(dict(init="normal", noise_std=0.0, strict=True,
                                           base_tokenizer=""))
  c.lora = ml_collections.ConfigDict(dict(rank=8, alpha=32.0, dropout=0.05,
                                          targets=tuple(lora_lib.TARGET_MODULES)))
  c.train = ml_collections.ConfigDict(dict(
      trainable="lora+embeddings",  # embeddings | lora+embeddings | lora | full | lora+new_rows
      learning_rate=1e-4, warmup_ratio=0.05, schedule="cosine", weight_decay=0.01,
      b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0,
      global_batch_size=8, micro_batches=1, seq_len=64, steps=20,
      log_every=5, eval_every=0, eval_batches=2, save_every=0, keep_checkpoints=3))
  c.data = ml_collections.ConfigDict(dict(
      kind="synthetic",  # synthetic | text | sft
      path="", data_dir="", val_fraction=0.05,
      pad_id=-1,  # -1: the tokenizer's [PAD] piece, else 0
      pack=False))  # several examples per row, segment ids in attention_mask (data/packing.py)
  # Mesh axes (data, fsdp, tensor); -1 takes the remaining devices. `--config.mesh.shape='(2,2,2)'`.
  c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1), rules=shd.DEFAULT_RULES))
  return c


def with_preset(c: ml_collections.ConfigDict, preset: str, vocab_size: int) -> None:
  """Switches `c.model` to a named shape, keeping the compute/param dtypes and remat."""
  keep = {k: c.model[k] for k in ("dtype", "param_dtype", "remat_policy")}
  c.model = model_fields(preset, vocab_size, **keep)


def paper_scale(c: ml_collections.ConfigDict, preset: str, vocab_size: int,
                global_batch: int) -> None:
  """The paper's settings for a real model size: bf16 compute, bf16 frozen weights, remat,
  sequence length 512, FSDP over all devices."""
  c.model.dtype, c.model.param_dtype, c.model.remat_policy = "bfloat16", "bfloat16", "full"
  model_config.preset(preset)  # an unknown name is a one-line ValueError naming the presets
  # a preset with its own vocabulary (LLaMA-3) keeps it: config.tokenizer resizes it
  with_preset(c, preset, model_config.PRESETS[preset].get("vocab_size", vocab_size))
  c.train.global_batch_size = global_batch
  c.train.seq_len = 512
  c.mesh.shape = (1, -1, 1)


def load(name: str, arg: str = "") -> ml_collections.ConfigDict:
  """`get_config(arg)` of the repository's `configs/<name>.py` (e.g. load("sft", "7b")), for code
  that is not started with `--config` (the demo pipeline, notebooks, benchmarks)."""
  path = os.path.join(CONFIGS, f"{name}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config {path}: no such file; expected one of "
                            f"{sorted(f[:-3] for f in os.listdir(CONFIGS) if f.endswith('.py'))}")
  spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
