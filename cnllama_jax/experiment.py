"""Assembles a run from its ConfigDict: mesh -> base params -> vocab resize -> LoRA -> split ->
sharded state and jitted step. `launch/train.py` tells the story; this module does the parts.

Everything here is a function of the config (DESIGN.md, decision 6).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from cnllama_jax import hf, lora as lora_lib, model as model_lib, sharding as shd
from cnllama_jax import tokenizer as tok_lib
from cnllama_jax import train as train_lib, vocab as vocab_lib
from cnllama_jax.config import LlamaConfig


@dataclasses.dataclass
class Run:
  """What a training run needs, built once."""
  cfg: LlamaConfig
  lora: lora_lib.LoraConfig
  mesh: Mesh
  rules: tuple
  model: model_lib.Llama
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  state: train_lib.TrainState
  shardings: train_lib.TrainState
  train_step: Any  # jitted (state, batch) -> (state, metrics)
  eval_step: Any  # jitted (state, batch) -> sums
  batch_sharding: Any
  new_rows: tuple[int, int] | None


def lora_config(config) -> lora_lib.LoraConfig:
  c = config.lora
  return lora_lib.LoraConfig(rank=c.rank, alpha=c.alpha, dropout=c.dropout,
                             targets=tuple(c.targets))


def optim_config(config) -> train_lib.OptimConfig:
  t = config.train
  return train_lib.OptimConfig(learning_rate=t.learning_rate, warmup_ratio=t.warmup_ratio,
                               schedule=t.schedule, weight_decay=t.weight_decay, b1=t.b1, b2=t.b2,
                               eps=t.eps, clip_norm=t.clip_norm)


def build_mesh(config, devices=None) -> Mesh:
  return shd.make_mesh(tuple(config.mesh.shape), devices)


def tokenizer_size(path: str) -> int:
  """Ids of a SentencePiece model or byte-level BPE tokenizer.json (a file or a directory)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer {path}: no such file; expected a SentencePiece .model, a "
                            "tokenizer.json or a directory with one")
  return tok_lib.vocab_size(path)


def base_model_config(config, vocab_multiple: int) -> LlamaConfig:
  """The base model's shape: from the HF directory's config.json, else from config.model."""
  from cnllama_jax.config import load_hf_config  # pylint: disable=import-outside-toplevel
  overrides = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                   remat_policy=config.model.remat_policy, vocab_multiple=vocab_multiple,
                   **{k: config.model[k] for k in ("attention", "lm_head_chunk") if k in config.model})
  rope = config.model.get("rope_scaling")
  if rope is not None and rope["rope_type"] != "default":  # context extension of an HF base
    overrides["rope_scaling"] = rope
  if config.base_model:
    return load_hf_config(config.base_model, **overrides)
  return LlamaConfig.from_dict({**config.model.to_dict(), **overrides})


def target_vocab(config, base_vocab: int) -> int:
  return tokenizer_size(config.tokenizer) if config.tokenizer else base_vocab


def load_base(config, mesh: Mesh, rules) -> tuple[LlamaConfig, Any]:
  """The base params on the mesh: HF import of config.base_model, or a random init."""
  cfg = base_model_config(config, vocab_lib.mesh_vocab_multiple(mesh, rules))
  if config.base_model:
    cfg, params = hf.load_hf(config.base_model, mesh=mesh, dtype=cfg.param_dtype, rules=rules)
    return cfg.replace(dtype=config.model.dtype, remat_policy=config.model.remat_policy), params
  shardings = shd.param_shardings(model_lib.abstract_params(cfg), mesh, rules)
  params = jax.jit(lambda key: model_lib.init_params(cfg, key),
                   out_shardings=shardings)(jax.random.key(config.seed))
  return cfg, params


def prepare(config, cfg: LlamaConfig, params, mesh: Mesh, rules):
  """Resizes the vocabulary to config.tokenizer and adds fresh LoRA adapters.

  Returns (cfg, params, (old_vocab, new_vocab) or None when the vocabulary was not resized).
  """
  old_vocab = cfg.vocab_size
  new_vocab = target_vocab(config, old_vocab)
  resized = None
  if new_vocab != old_vocab:
    cfg, params = vocab_lib.resize_vocab(
        cfg, params, new_vocab, init=config.vocab.init, noise_std=config.vocab.noise_std,
        rng=jax.random.key(config.seed + 1),
        vocab_multiple=vocab_lib.mesh_vocab_multiple(mesh, rules), strict=config.vocab.strict,
        sub_pieces=tok_lib.config_sub_pieces(config, old_vocab))
    resized = (old_vocab, new_vocab)
  lora = lora_config(config)
  if lora.rank:
    boxed = model_lib.abstract_params(cfg, lora)
    adapter_shardings = lora_lib.split(shd.param_shardings(boxed, mesh, rules),
                                       _adapter_paths(boxed))[1]
    adapters = jax.jit(lambda key: lora_lib.init_adapters(cfg, lora, key),
                       out_shardings=adapter_shardings)(jax.random.key(config.seed + 2))
    params = lora_lib.combine(params, adapters)
    lora_lib.check_adapters(params, cfg.num_hidden_layers, lora)
  return cfg, params, resized


def load_params(config, mesh: Mesh, rules) -> tuple[LlamaConfig, Any, tuple[int, int] | None]:
  """Base params (HF import or random init), resized to the tokenizer, with fresh adapters."""
  return prepare(config, *load_base(config, mesh, rules), mesh, rules)


def _adapter_paths(tree) -> list[str]:
  return [p for p in _flat_paths(tree) if p.endswith(("/lora_a", "/lora_b"))]


def _flat_paths(tree) -> list[str]:
  return ["/".join(k) for k in flax.traverse_util.flatten_dict(
      tree, is_leaf=lambda _, v: isinstance(v, flax.linen.LogicallyPartitioned))]


def flat_shardings(boxed, mesh, rules) -> dict:
  """{'/'-joined param path: NamedSharding} for a tree of logically annotated params."""
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(
      shd.param_shardings(boxed, mesh, rules)).items()}


def build(config, mesh: Mesh | None = None, base=None) -> Run:
  """Builds the run: params on the mesh, split, optimizer, state and the jitted steps.

  base: (cfg, params) to start from instead of config.base_model, e.g. the previous stage's
  merged model (placed on `mesh`, without adapters); it is resized and gets adapters as a
  loaded base would.
  """
  mesh = mesh or build_mesh(config)
  rules = shd.normalize_rules(config.mesh.rules)
  if base is None:
    cfg, params, resized = load_params(config, mesh, rules)
  else:
    cfg, params, resized = prepare(config, *base, mesh, rules)
  lora = lora_config(config)
  stage = config.train.trainable
  new_rows = resized if stage == "lora+new_rows" else None
  if stage == "lora+new_rows" and new_rows is None:
    raise ValueError("train.trainable='lora+new_rows' needs a tokenizer larger than the base "
                     "model's vocabulary (config.tokenizer)")
  frozen, trainable = lora_lib.split(params, lora_lib.trainable_paths(params, stage))
  total_steps = config.train.steps
  optimizer = train_lib.make_optimizer(optim_config(config), total_steps)
  schedule = train_lib.make_schedule(optim_config(config), total_steps)
  model = model_lib.Llama(cfg, lora, mesh=mesh, rules=rules, deterministic=lora.dropout == 0)
  flat_sh = flat_shardings(model_lib.abstract_params(cfg, lora), mesh, rules)
  state_shape = jax.eval_shape(lambda: train_lib.init_state(frozen, trainable, optimizer, 0))
  shardings = train_lib.state_shardings(state_shape, flat_sh, mesh, optimizer)
  state = jax.jit(lambda f, t: train_lib.init_state(f, t, optimizer, config.seed),
                  out_shardings=shardings)(frozen, trainable)
  batch_shape = (config.train.global_batch_size, config.train.seq_len)
  check_batch(config.train.global_batch_size, config.train.micro_batches, mesh, rules)
  batch_sharding = shd.batch_sharding(mesh, rules, batch_shape)
  batch_shardings = {k: batch_sharding for k in ("input_ids", "attention_mask", "labels")}
  step = train_lib.make_train_step(model, optimizer, schedule, config.train.micro_batches,
                                   new_rows)
  train_step = train_lib.jit_train_step(step, shardings, batch_shardings)
  eval_fn = train_lib.make_eval_step(model)
  eval_step = jax.jit(eval_fn, in_shardings=(shardings, batch_shardings))
  return Run(cfg, lora, mesh, rules, model, optimizer, schedule, state, shardings, train_step,
             eval_step, batch_shardings, new_rows)


def check_batch(global_batch: int, micro_batches: int, mesh: Mesh, rules) -> None:
  """The global batch must split into micro-batches that the data-parallel axes divide."""
  data_parallel = math.prod(mesh.shape[a] for a in shd.mesh_axes(rules, "activation_batch"))
  if global_batch % micro_batches or (global_batch // micro_batches) % data_parallel:
    raise ValueError(f"train.global_batch_size={global_batch} with train.micro_batches="
                     f"{micro_batches} gives micro-batches of {global_batch / micro_batches:g} "
                     f"rows, not divisible by the data-parallel size {data_parallel}")


# --- dry run -------------------------------------------------------------------------------------

def count_params(cfg: LlamaConfig, boxed: Any, paths) -> int:
  """Parameters of the given leaves, counting the real vocabulary (not the padding)."""
  flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(
      boxed, is_leaf=lambda _, v: isinstance(v, flax.linen.LogicallyPartitioned)).items()}
  total = 0
  for path in paths:
    shape = list(flat[path].value.shape)
    if path in ("embed_tokens", "lm_head"):
      shape[0 if path == "embed_tokens" else 1] = cfg.vocab_size
    total += math.prod(shape)
  return total


def dry_run(config, mesh: Mesh | None = None) -> dict:
  """Shapes only (jax.eval_shape, nothing allocated): parameter counts and bytes per device."""
  mesh = mesh or build_mesh(config)
  rules = shd.normalize_rules(config.mesh.rules)
  multiple = vocab_lib.mesh_vocab_multiple(mesh, rules)
  cfg = base_model_config(config, multiple)
  cfg = cfg.replace(vocab_size=target_vocab(config, cfg.vocab_size)) if config.tokenizer else cfg
  lora = lora_config(config)
  boxed = model_lib.abstract_params(cfg, lora)
  all_paths = _flat_paths(boxed)
  trainable = lora_lib.trainable_paths(_as_tree(all_paths), config.train.trainable)
  flat_sh = flat_shardings(boxed, mesh, rules)
  flat_box = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(
      boxed, is_leaf=lambda _, v: isinstance(v, flax.linen.LogicallyPartitioned)).items()}

  def shard_bytes(path, dtype):
    shape = flat_sh[path].shard_shape(flat_box[path].value.shape)
    return math.prod(shape) * jnp.dtype(dtype).itemsize

  param_bytes = sum(shard_bytes(p, flat_box[p].value.dtype if p not in trainable else jnp.float32)
                    for p in all_paths)
  opt_bytes = 2 * sum(shard_bytes(p, jnp.float32) for p in trainable)  # AdamW mu and nu
  total, n_train = count_params(cfg, boxed, all_paths), count_params(cfg, boxed, trainable)
  return {"total": total, "trainable": n_train, "percent": 100.0 * n_train / total,
          "param_bytes_per_device": param_bytes, "opt_bytes_per_device": opt_bytes,
          "devices": mesh.size}


def _as_tree(paths):
  return flax.traverse_util.unflatten_dict({tuple(p.split("/")): np.zeros(()) for p in paths})


# --- data ----------------------------------------------------------------------------------------

def synthetic_examples(num: int, seq_len: int, vocab_size: int, seed: int) -> list[dict]:
  """Random token rows (for benchmarks and smoke runs): labels = input_ids, no padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab_size, size=(num, seq_len), dtype=np.int32)
  return [{"input_ids": row, "labels": row, "attention_mask": np.ones_like(row)} for row in ids]


def pad_id(tokenizer_path: str) -> int:
  """The tokenizer's [PAD] piece (the Alpaca tokenizer's last id) or, without one, 0 (<unk>)."""
  from cnllama_jax.tokenizer import load_processor  # pylint: disable=import-outside-toplevel
  sp = load_processor(tokenizer_path)
  pad = sp.piece_to_id("[PAD]")
  return pad if pad != sp.unk_id() else 0


def datasets(config, cfg: LlamaConfig, workdir: str) -> dict:
  """{'train': source, 'validation': source or None, 'stats': ...}; a source has len() and
  [i] -> example of int32 [seq_len] arrays. Text and SFT data are built once into
  data.data_dir (default <workdir>/data) and read back without tokenising again."""
  from cnllama_jax import data  # pylint: disable=import-outside-toplevel
  kind, length = config.data.kind, config.train.seq_len
  if kind == "synthetic":
    examples = synthetic_examples(4 * config.train.global_batch_size, length, cfg.vocab_size,
                                  config.seed)
    return {"train": examples, "validation": examples[: config.train.global_batch_size]}
  if kind not in ("text", "sft"):
    raise ValueError(f"data.kind={kind!r}; expected synthetic, text or sft")
  if not config.tokenizer or not config.data.path:
    raise ValueError(f"data.kind={kind!r} needs config.tokenizer and config.data.path "
                     f"(got tokenizer={config.tokenizer!r}, data.path={config.data.path!r})")
  data_dir = config.data.data_dir or os.path.join(workdir, "data")
  tokenizer = (os.path.join(config.tokenizer, "tokenizer.model") if os.path.isdir(config.tokenizer)
               else config.tokenizer)
  if kind == "text":
    return data.build_pretrain_dataset(config.data.path, tokenizer, data_dir, block_size=length,
                                       val_fraction=config.data.val_fraction,
                                       pack=config.data.get("pack", False))
  pad = config.data.pad_id if config.data.pad_id >= 0 else pad_id(tokenizer)
  return data.build_sft_dataset(config.data.path, tokenizer, data_dir, max_seq_len=length,
                                pad_id=pad, val_fraction=config.data.val_fraction,
                                pack=config.data.get("pack", False))
