"""Small runs shared by the training tests: a tiny config, flat views of trees, a batch, the
repository's config files and a SentencePiece model of a given size."""
import importlib.util
import os

import numpy as np
from flax import traverse_util

from cnllama_jax import build, plan as plan_lib, run_config, sharding as shd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, preset="tiny"):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def tiny_config(**train):
  c = run_config.default()
  c.train.update(dict(global_batch_size=8, seq_len=16, steps=3, learning_rate=1e-2,
                      warmup_ratio=0.0, weight_decay=0.01), **train)
  c.lora.update(rank=4, alpha=8.0, dropout=0.0)
  return c


def flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def real_rows(tree, vocab=99):
  """Flat params with the padded vocabulary rows cut off (padding depends on the mesh)."""
  out = flat(tree)
  out["embed_tokens"] = out["embed_tokens"][:vocab]
  if "lm_head" in out:
    out["lm_head"] = out["lm_head"][:, :vocab]
  return out


def batch_of(config, vocab=99, seed=0):
  ids = np.random.default_rng(seed).integers(3, vocab, size=(
      config.train.global_batch_size, config.train.seq_len)).astype(np.int32)
  labels = ids.copy()
  labels[:, :3] = -100  # a masked prompt, as in SFT
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def build_on(config, mesh):
  """The run of `config` planned on `mesh`."""
  return build.build(plan_lib.plan(config, mesh))


def run_steps(config, mesh, steps=3, batch=None):
  run = build_on(config, mesh)
  batch = batch or batch_of(config)
  state, losses, grad_norms = run.state, [], []
  for _ in range(steps):
    state, metrics = run.train_step(run.frozen, state,
                                    shd.host_to_global(batch, run.plan.batch_shardings))
    losses.append(float(metrics["loss"]))
    grad_norms.append(float(metrics["grad_norm"]))
  return run, state, losses, grad_norms


def sentencepiece_model(tmp_path, size):
  """A SentencePiece model with `size` pieces (only its size matters for the resize)."""
  import sentencepiece as spm
  text = [f"word{i} token{i * 7} piece{i % 13} 中文{i}" for i in range(400)]
  prefix = str(tmp_path / "tok")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=prefix,
                                 vocab_size=size, model_type="bpe", minloglevel=2,
                                 hard_vocab_limit=True, bos_id=1, eos_id=2, unk_id=0)
  return prefix + ".model"
