"""The plan of a run: everything about it that follows from its ConfigDict, computed abstractly.

`plan(config)` allocates nothing: the model config after the tokenizer resize and vocabulary
padding, the LoRA config, the stage's trainable mask (a tree of bools), the params, frozen tree,
TrainState and batch as `jax.ShapeDtypeStruct`s carrying the shardings the run will use, the
optimizer and schedule, the data spec. Everything that needs shapes reads the plan:
`cnllama_jax.build` materialises it, `dry_run` counts it, `cnllama_jax.aot` compiles its step
for a TPU topology, and the export of a training workdir restores into it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cnllama_jax import lora as lora_lib, model as model_lib, sharding as shd
from cnllama_jax import paths, tokenizer as tok_lib
from cnllama_jax import train as train_lib, vocab as vocab_lib
from cnllama_jax.config import LlamaConfig

BATCH_KEYS = ("input_ids", "attention_mask", "labels")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the run reads: config.data with the batch shape and the tokenizer."""
  kind: str  # synthetic | text | sft
  path: str
  data_dir: str  # "" = <workdir>/data
  tokenizer: str
  val_fraction: float
  pad_id: int  # -1: the tokenizer's [PAD] piece, else 0
  pack: bool  # several examples per row, segment ids in attention_mask (data/packing.py)
  global_batch_size: int
  seq_len: int
  seed: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """A run before anything is allocated. Abstract trees carry their shardings on `mesh`."""
  config: Any  # the run's ConfigDict
  mesh: Mesh
  rules: tuple
  base_cfg: LlamaConfig  # the base model before the vocabulary resize
  cfg: LlamaConfig  # the model that trains: vocabulary resized to the tokenizer and padded
  lora: lora_lib.LoraConfig
  stage: str  # config.train.trainable
  new_rows: tuple[int, int] | None  # (old, new vocabulary) when only appended rows train
  model: model_lib.Llama
  params: Any  # ShapeDtypeStructs of the whole model (base + adapters)
  trainable_mask: Any  # bools shaped like `params`: True where the leaf trains
  frozen: Any  # ShapeDtypeStructs of the frozen params (never donated)
  state: train_lib.TrainState  # ShapeDtypeStructs of what trains and what a checkpoint holds
  batch: dict  # {'input_ids', 'attention_mask', 'labels'}: int32 [global batch, seq_len]
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  data: DataSpec

  @property
  def frozen_shardings(self) -> Any:
    return shardings_of(self.frozen)

  @property
  def state_shardings(self) -> train_lib.TrainState:
    return shardings_of(self.state)

  @property
  def batch_shardings(self) -> dict:
    return shardings_of(self.batch)


def shardings_of(tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree, shardings)


# --- config -> parts -----------------------------------------------------------------------------

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
  if not paths.exists(path):
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


def check_batch(global_batch: int, micro_batches: int, mesh: Mesh, rules) -> None:
  """The global batch must split into micro-batches that the data-parallel axes divide."""
  data_parallel = math.prod(mesh.shape[a] for a in shd.mesh_axes(rules, "activation_batch"))
  if global_batch % micro_batches or (global_batch // micro_batches) % data_parallel:
    raise ValueError(f"train.global_batch_size={global_batch} with train.micro_batches="
                     f"{micro_batches} gives micro-batches of {global_batch / micro_batches:g} "
                     f"rows, not divisible by the data-parallel size {data_parallel}")


def data_spec(config) -> DataSpec:
  d, t = config.data, config.train
  return DataSpec(kind=d.kind, path=d.path, data_dir=d.data_dir, tokenizer=config.tokenizer,
                  val_fraction=d.val_fraction, pad_id=d.pad_id, pack=d.get("pack", False),
                  global_batch_size=t.global_batch_size, seq_len=t.seq_len, seed=config.seed)


# --- the plan ------------------------------------------------------------------------------------

def plan(config, mesh: Mesh | None = None, base_cfg: LlamaConfig | None = None) -> Plan:
  """The abstract run of `config` on `mesh` (default: config.mesh over all devices).

  base_cfg: the shape of a base passed in memory (e.g. the previous stage's merged model) instead
  of config.base_model / config.model.
  """
  mesh = mesh or build_mesh(config)
  rules = shd.normalize_rules(config.mesh.rules)
  multiple = vocab_lib.mesh_vocab_multiple(mesh, rules)
  base_cfg = base_cfg or base_model_config(config, multiple)
  cfg = base_cfg
  vocab = tokenizer_size(config.tokenizer) if config.tokenizer else base_cfg.vocab_size
  if vocab != base_cfg.vocab_size:
    vocab_lib.check_pair(base_cfg.vocab_size, vocab, strict=config.vocab.strict)
    cfg = base_cfg.replace(vocab_size=vocab, vocab_multiple=multiple)
  stage = config.train.trainable
  new_rows = None
  if stage == "lora+new_rows":
    if vocab <= base_cfg.vocab_size:
      raise ValueError("train.trainable='lora+new_rows' needs a tokenizer larger than the base "
                       "model's vocabulary (config.tokenizer)")
    new_rows = (base_cfg.vocab_size, vocab)
  lora = lora_config(config)
  boxed = model_lib.abstract_params(cfg, lora)
  params = _abstract(jax.tree_util.tree_map(lambda box: box.value, boxed,
                                            is_leaf=lambda x: hasattr(x, "names")),
                     shd.param_shardings(boxed, mesh, rules))
  mask = lora_lib.trainable_mask(params, stage)
  frozen, trainable = lora_lib.split(params, mask)
  optimizer = train_lib.make_optimizer(optim_config(config), config.train.steps)
  schedule = train_lib.make_schedule(optim_config(config), config.train.steps)
  state_shape = jax.eval_shape(lambda t: train_lib.init_state(t, optimizer, 0), trainable)
  state_sh = train_lib.state_shardings(state_shape, shardings_of(trainable), mesh, optimizer)
  state = _abstract(state_shape, state_sh)
  shape = (config.train.global_batch_size, config.train.seq_len)
  check_batch(shape[0], config.train.micro_batches, mesh, rules)
  batch_sharding = shd.batch_sharding(mesh, rules, shape)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding) for k in BATCH_KEYS}
  model = model_lib.Llama(cfg, lora, mesh=mesh, rules=rules, deterministic=lora.dropout == 0)
  return Plan(config=config, mesh=mesh, rules=rules, base_cfg=base_cfg, cfg=cfg, lora=lora,
              stage=stage, new_rows=new_rows, model=model, params=params, trainable_mask=mask,
              frozen=frozen, state=state, batch=batch, optimizer=optimizer, schedule=schedule,
              data=data_spec(config))


def jit_steps(p: Plan) -> tuple[Callable, Callable]:
  """(train_step, eval_step), each jitted once with the plan's explicit shardings.

  train_step(frozen, state, batch) -> (state, metrics) donates the state, never the frozen tree;
  eval_step(frozen, state, batch) -> {loss_sum, correct, tokens}.
  """
  in_shardings = (p.frozen_shardings, p.state_shardings, p.batch_shardings)
  step = train_lib.make_train_step(p.model, p.optimizer, p.schedule,
                                   p.config.train.micro_batches, p.new_rows)
  train_step = jax.jit(step, in_shardings=in_shardings, out_shardings=(p.state_shardings, None),
                       donate_argnums=1)
  eval_step = jax.jit(train_lib.make_eval_step(p.model), in_shardings=in_shardings)
  return train_step, eval_step


# --- dry run -------------------------------------------------------------------------------------

def _real_size(path, x, vocab_size: int) -> int:
  """Elements of a param leaf, counting the real vocabulary rows (not the padding)."""
  shape = list(x.shape)
  name = str(getattr(path[0], "key", path[0]))
  if name in ("embed_tokens", "lm_head"):
    shape[0 if name == "embed_tokens" else 1] = vocab_size
  return math.prod(shape)


def _bytes_per_device(tree: Any) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def dry_run(p: Plan) -> dict:
  """Parameter counts (real vocabulary) and bytes per device of the plan; nothing allocated."""
  sizes = jax.tree_util.tree_map_with_path(lambda path, x: _real_size(path, x, p.cfg.vocab_size),
                                           p.params)
  total = sum(jax.tree_util.tree_leaves(sizes))
  trainable = sum(jax.tree_util.tree_leaves(lora_lib.split(sizes, p.trainable_mask)[1]))
  return {"total": total, "trainable": trainable, "percent": 100.0 * trainable / total,
          "param_bytes_per_device": _bytes_per_device((p.frozen, p.state.trainable)),
          "opt_bytes_per_device": _bytes_per_device(p.state.opt_state),
          "devices": p.mesh.size}
