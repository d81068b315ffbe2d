"""Materialises a plan: base params on the mesh (HF import, a base passed in memory, or a random
init) -> vocabulary resized to the tokenizer -> fresh LoRA adapters -> frozen / trainable split ->
TrainState on the mesh and the jitted steps. Every shape and sharding comes from the plan.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from cnllama_jax import checkpoint, hf, lora as lora_lib, model as model_lib
from cnllama_jax import plan as plan_lib, sharding as shd, tokenizer as tok_lib
from cnllama_jax import train as train_lib, vocab as vocab_lib
from cnllama_jax.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class Run:
  """A plan made real: the frozen params and a fresh state on the mesh, and the jitted steps."""
  plan: plan_lib.Plan
  frozen: Any  # the frozen params; read by every step, never donated
  state: train_lib.TrainState  # step 0: fp32 trainable params, fresh optimizer state
  train_step: Callable  # (frozen, state, batch) -> (state, metrics); donates the state
  eval_step: Callable  # (frozen, state, batch) -> {loss_sum, correct, tokens}
  base_source: str  # where the frozen base came from (checkpoint meta and messages)

  @property
  def cfg(self) -> LlamaConfig:
    return self.plan.cfg

  @property
  def lora(self) -> lora_lib.LoraConfig:
    return self.plan.lora


def _base_params(p: plan_lib.Plan, base) -> tuple[LlamaConfig, Any]:
  config = p.config
  if base is not None:
    return base
  if config.base_model:
    cfg, params = hf.load_hf(config.base_model, mesh=p.mesh, dtype=p.base_cfg.param_dtype,
                             rules=p.rules)
    return cfg.replace(dtype=config.model.dtype, remat_policy=config.model.remat_policy), params
  shardings = shd.param_shardings(model_lib.abstract_params(p.base_cfg), p.mesh, p.rules)
  params = jax.jit(lambda key: model_lib.init_params(p.base_cfg, key),
                   out_shardings=shardings)(jax.random.key(config.seed))
  return p.base_cfg, params


def _check_against_plan(params: Any, p: plan_lib.Plan) -> None:
  got = jax.tree_util.tree_map(lambda x: (x.shape, jax.numpy.dtype(x.dtype)), params)
  want = jax.tree_util.tree_map(lambda x: (x.shape, jax.numpy.dtype(x.dtype)), p.params)
  if got != want:
    raise ValueError(f"the base params do not match the plan of the run: {got} != {want}")


def load_params(p: plan_lib.Plan, base=None) -> Any:
  """The whole model's params on the mesh: the base (base=(cfg, params), else config.base_model,
  else a random init) resized to the tokenizer, with fresh adapters; shaped as `p.params`."""
  config = p.config
  cfg, params = _base_params(p, base)
  if p.cfg.vocab_size != cfg.vocab_size:
    cfg, params = vocab_lib.resize_vocab(
        cfg, params, p.cfg.vocab_size, init=config.vocab.init, noise_std=config.vocab.noise_std,
        rng=jax.random.key(config.seed + 1), vocab_multiple=p.cfg.vocab_multiple,
        strict=config.vocab.strict, sub_pieces=tok_lib.config_sub_pieces(config, cfg.vocab_size))
  if p.lora.rank:
    shardings = lora_lib.split(plan_lib.shardings_of(p.params),
                               lora_lib.trainable_mask(p.params, "lora"))[1]
    adapters = jax.jit(lambda key: lora_lib.init_adapters(p.cfg, p.lora, key),
                       out_shardings=shardings)(jax.random.key(config.seed + 2))
    params = lora_lib.combine(params, adapters)
    lora_lib.check_adapters(params, p.cfg.num_hidden_layers, p.lora)
  _check_against_plan(params, p)
  return params


def build(plan_or_config, base=None) -> Run:
  """Builds the run of a plan (or of a ConfigDict, planned on its own mesh).

  base: (cfg, params) to start from instead of config.base_model, e.g. the previous stage's
  merged model (placed on the plan's mesh, without adapters); it is resized and gets adapters as
  a loaded base would.
  """
  p = plan_or_config
  if not isinstance(p, plan_lib.Plan):
    p = plan_lib.plan(p, base_cfg=None if base is None else base[0])
  frozen, trainable = lora_lib.split(load_params(p, base), p.trainable_mask)
  seed = p.config.seed
  state = jax.jit(lambda t: train_lib.init_state(t, p.optimizer, seed),
                  out_shardings=p.state_shardings)(trainable)
  train_step, eval_step = plan_lib.jit_steps(p)
  return Run(plan=p, frozen=frozen, state=state, train_step=train_step, eval_step=eval_step,
             base_source=checkpoint.base_source(p.config, base is not None))
