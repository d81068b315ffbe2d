"""Generation: greedy equals `transformers`, the KV cache equals a full recompute, filters."""
import jax
import numpy as np
import pytest

import cnllama_jax
from cnllama_jax import generate as gen
from cnllama_jax import model as model_lib
from cnllama_jax.config import preset
from jax.sharding import PartitionSpec as P
from cnllama_jax.data.encode import build_prompt
from tests import hf_models

EOS = 2
PROMPTS = [[1, 5, 17, 33, 8], [1, 40, 62, 7, 9, 11, 13, 21, 50, 64, 70, 3], [1, 90],
           [1, 12, 44, 86, 27, 31, 5, 98]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(hf model, cfg, params): a tiny random GQA LLaMA saved by `transformers`, loaded by us."""
  model = hf_models.make_hf_llama(seed=3, num_key_value_heads=2)
  path = hf_models.save(model, str(tmp_path_factory.mktemp("gen") / "m"), "safetensors")
  cfg, params = cnllama_jax.load_hf(path)
  return model, cfg, params


def _hf_greedy(model, prompt, max_new_tokens, penalty):
  import torch
  ids = torch.tensor([prompt])
  out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=max_new_tokens, repetition_penalty=penalty,
                       eos_token_id=EOS, pad_token_id=0)
  return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("penalty", [1.0, 1.1])
def test_greedy_on_a_left_padded_batch_equals_transformers_per_prompt(tiny, penalty):
  model, cfg, params = tiny
  ours = gen.generate(cfg, params, PROMPTS, max_new_tokens=16, temperature=0.0,
                      repetition_penalty=penalty, eos_id=EOS)
  for prompt, row in zip(PROMPTS, ours):
    assert row == _hf_greedy(model, prompt, 16, penalty)
  assert [len(r) for r in ours] != [16] * len(PROMPTS)  # some row stopped on EOS
  assert all(r[-1] == EOS for r in ours if len(r) < 16)


def test_greedy_equals_transformers_batched_left_padded_generate(tiny):
  import torch
  model, cfg, params = tiny
  ids, mask = gen.left_pad(PROMPTS)
  out = model.generate(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                       do_sample=False, max_new_tokens=16, eos_token_id=EOS, pad_token_id=0)
  ours = gen.generate(cfg, params, PROMPTS, max_new_tokens=16, temperature=0.0,
                      repetition_penalty=1.0, eos_id=EOS)
  for row, theirs in zip(ours, out[:, ids.shape[1]:].tolist()):
    assert row == theirs[:len(row)] and all(t == 0 for t in theirs[len(row):])  # HF pads after EOS


def test_cached_decode_equals_full_recompute_at_every_step(tiny):
  _, cfg, params = tiny
  prompts = [PROMPTS[1], PROMPTS[0]]  # row 1 is left-padded by 7, plus 3 more of bucket padding
  ids, mask = gen.left_pad(prompts, bucket=5)
  apply = jax.jit(model_lib.Llama(cfg).apply)
  cache = model_lib.init_cache(cfg, batch=2, max_len=32)
  logits, cache = apply({"params": params}, ids, mask, cache=cache)
  steps = [np.asarray(logits)[:, -1, :cfg.vocab_size]]  # [batch, vocab] per step
  sequences = [list(p) for p in prompts]
  for _ in range(8):
    tokens = steps[-1].argmax(-1)
    for seq, token in zip(sequences, tokens):
      seq.append(int(token))
    logits, cache = apply({"params": params}, tokens[:, None].astype(np.int32),
                          np.ones((2, 1), np.int32), cache=cache)
    steps.append(np.asarray(logits)[:, 0, :cfg.vocab_size])
  assert np.asarray(cache["index"]).tolist() == [15 + 8] * 2
  for row, seq in enumerate(sequences):
    full = np.asarray(cnllama_jax.logits(cfg, params, np.asarray([seq], np.int32)))[0]
    prompt_len = len(prompts[row])
    for step, got in enumerate(steps):
      assert np.abs(got[row] - full[prompt_len - 1 + step]).max() <= 1e-4


def test_padded_vocabulary_is_never_sampled():
  cfg = preset("tiny", vocab_size=99)  # padded to 128
  params = model_lib.init_params(cfg, jax.random.key(7))
  params["lm_head"] = params["lm_head"].at[:, 99:].set(50.0)  # padding would win if it could
  out = gen.generate(cfg, params, [[1, 3, 4], [1, 9]], max_new_tokens=40, temperature=100.0,
                     top_k=0, top_p=1.0, repetition_penalty=1.0, eos_id=-1)
  tokens = np.concatenate(out)
  assert tokens.max() < 99 and len(np.unique(tokens)) > 20  # near-uniform over the real ids


def test_sampling_with_top_k_1_equals_greedy(tiny):
  _, cfg, params = tiny
  greedy = gen.generate(cfg, params, PROMPTS, max_new_tokens=10, temperature=0.0, eos_id=EOS)
  sampled = gen.generate(cfg, params, PROMPTS, max_new_tokens=10, temperature=0.7, top_k=1,
                         eos_id=EOS)
  assert sampled == greedy


def test_generation_stops_at_eos_per_row(tiny):
  _, cfg, params = tiny
  free = gen.generate(cfg, params, PROMPTS, max_new_tokens=12, temperature=0.0, eos_id=-1)
  eos = free[0][3]  # row 0's 4th token, treated as EOS
  assert eos not in free[0][:3]
  calls = []
  stopped = gen.generate(cfg, params, PROMPTS, max_new_tokens=12, temperature=0.0, eos_id=eos,
                         on_token=calls.append)
  for full, row in zip(free, stopped):
    cut = full.index(eos) + 1 if eos in full else len(full)
    assert row == full[:cut]
  assert len(calls) == max(len(r) for r in stopped)  # no step after every row stopped
  assert calls[4][0] is None  # row 0 reports nothing after its EOS at step 3


def test_generation_stops_at_any_of_several_stop_ids_and_at_the_models_own(tiny):
  """LLaMA-3-Instruct ends a turn with <|eot_id|>, not its EOS: a row stops at the first of
  several ids, given as eos_id or as the config's stop_token_ids (config.json's list)."""
  _, cfg, params = tiny
  free = gen.generate(cfg, params, PROMPTS, max_new_tokens=12, temperature=0.0, eos_id=-1)
  first = free[0][3]  # row 0's 4th token, and a later first occurrence in row 1
  second = next(t for i, t in enumerate(free[1]) if i and t not in free[1][:i] + [first])
  want = []
  for full in free:
    hits = [i for i, t in enumerate(full) if t in (first, second)]
    want.append(full[:hits[0] + 1] if hits else full)
  assert gen.generate(cfg, params, PROMPTS, max_new_tokens=12, temperature=0.0,
                      eos_id=[second, first]) == want
  model_stops = cfg.replace(eos_token_id=-1, stop_token_ids=(first, second))
  assert model_stops.stop_ids == (-1, first, second)
  assert gen.generate(model_stops, params, PROMPTS, max_new_tokens=12, temperature=0.0) == want
  with pytest.raises(ValueError, match=r"eos_id=\[\]"):
    gen.generate(cfg, params, PROMPTS, max_new_tokens=2, eos_id=[])


# Hand-made logits: probabilities 0.5, 0.1, 0.3, 0.06, 0.04.
_PROBS = np.log(np.array([[0.5, 0.1, 0.3, 0.06, 0.04]], np.float32))


@pytest.mark.parametrize("top_k, top_p, kept", [
    (2, 1.0, [1, 0, 1, 0, 0]),
    (4, 1.0, [1, 1, 1, 1, 0]),
    (0, 0.5, [1, 0, 0, 0, 0]),  # the top id alone reaches 0.5
    (0, 0.75, [1, 0, 1, 0, 0]),  # 0.5 + 0.3
    (0, 0.85, [1, 1, 1, 0, 0]),  # 0.5 + 0.3 + 0.1
    (0, 0.01, [1, 0, 0, 0, 0]),  # always at least one
    (3, 0.85, [1, 0, 1, 0, 0]),  # after top-3, renormalised: 0.556 + 0.333 already >= 0.85
])
def test_top_k_and_top_p_keep_the_expected_ids(top_k, top_p, kept):
  out = np.asarray(gen.filter_logits(_PROBS, top_k, top_p))[0]
  assert np.isfinite(out).astype(int).tolist() == kept
  np.testing.assert_array_equal(out[np.isfinite(out)], _PROBS[0][np.asarray(kept, bool)])


def test_top_k_keeps_ties_with_the_kth_logit():
  out = np.asarray(gen.filter_logits(np.array([[1.0, 2.0, 2.0, 0.0]], np.float32), top_k=2))
  assert np.isfinite(out).astype(int).tolist() == [[0, 1, 1, 0]]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
  logits = np.array([[2.0, -1.0, 0.5, 3.0]], np.float32)
  seen = np.array([[True, True, False, False]])
  out = gen.apply_repetition_penalty(logits, seen, 2.0)
  np.testing.assert_array_equal(np.asarray(out), [[1.0, -2.0, 0.5, 3.0]])


def test_chat_prompt_concatenates_previous_turns_in_the_alpaca_template():
  assert gen.chat_prompt([], "Hi") == build_prompt("Hi")
  assert gen.chat_prompt([("Hi", "Hello!")], "Bye") == (
      "Below is an instruction that describes a task. "
      "Write a response that appropriately completes the request.\n\n"
      "### Instruction:\nHi\n\n### Response: Hello!\n\n"
      "### Instruction:\nBye\n\n### Response: ")


# ----------------------------------------------------------------------------- sharded


@pytest.fixture(scope="module")
def with_adapter(tiny, tmp_path_factory):
  """(HF directory of `tiny`'s model, PEFT directory of a random rank-4 LoRA on q/v/down)."""
  from cnllama_jax import adapters
  from cnllama_jax.lora import LoraConfig
  model, cfg, _ = tiny
  root = tmp_path_factory.mktemp("sharded")
  path = hf_models.save(model, str(root / "m"), "safetensors")
  lora = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
  params = model_lib.init_params(cfg, jax.random.key(5), lora)
  params = jax.tree_util.tree_map_with_path(  # lora_b is zero at init: make the adapter matter
      lambda p, x: jax.random.normal(jax.random.key(len(str(p))), x.shape) * 0.3
      if "lora_b" in jax.tree_util.keystr(p) else x, params)
  adapters.save_peft(cfg, params, lora, str(root / "adapter"), modules_to_save=())
  return path, str(root / "adapter")


def test_sharded_generation_on_a_2x2x2_mesh_equals_one_device(with_adapter):
  from cnllama_jax import inference, sharding as shd
  path, _ = with_adapter
  cfg, lora, params = inference.load_model(path)
  mesh = shd.make_mesh((2, 2, 2))
  cfg_m, lora_m, params_m = inference.load_model(path, mesh=mesh)
  assert params_m["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
  one = gen.generate(cfg, params, PROMPTS, max_new_tokens=12, temperature=0.0, eos_id=-1)
  sharded = gen.generate(cfg_m, params_m, PROMPTS, max_new_tokens=12, temperature=0.0, eos_id=-1,
                         mesh=mesh)
  assert sharded == one
  assert len({t for row in one for t in row}) > 8  # real text, not one repeated id


def test_base_plus_unmerged_adapter_sharded_equals_one_device(with_adapter):
  from cnllama_jax import inference, sharding as shd
  path, adapter = with_adapter
  cfg, lora, params = inference.load_model(path, loras=[adapter], merge=False)
  assert lora.rank == 4 and "lora_a" in params["layers"]["self_attn"]["q_proj"]
  mesh = shd.make_mesh((2, 2, 2))
  cfg_m, lora_m, params_m = inference.load_model(path, loras=[adapter], merge=False, mesh=mesh)
  run = lambda c, p, **kw: gen.generate(c, p, PROMPTS, max_new_tokens=12, temperature=0.0,  # noqa
                                        eos_id=-1, lora=lora, **kw)
  one, sharded = run(cfg, params), run(cfg_m, params_m, mesh=mesh)
  assert sharded == one
  base = gen.generate(*inference.load_model(path)[::2], PROMPTS, max_new_tokens=12,
                      temperature=0.0, eos_id=-1)
  assert base != one  # the adapter changes the output
  merged_cfg, _, merged = inference.load_model(path, loras=[adapter])
  assert gen.generate(merged_cfg, merged, PROMPTS, max_new_tokens=12, temperature=0.0,
                      eos_id=-1) == one  # unmerged = merged
