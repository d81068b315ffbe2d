"""The GPU checks of issue 14 in one script, prepared to run once on a lent GPU (a session's device
time is 15 minutes, start-up included); `--smoke` runs the same code here on the CPU at tiny
shapes, with `blockwise` standing in for cuDNN, so the script is known to run before a GPU is lent.

    python bench/gpu_check.py --smoke          # CPU, ~1 min: the plumbing
    python bench/gpu_check.py                  # GPU, ~5 min: the figures

On the device machine (its image has jax[cuda], flax, optax, orbax, torch, transformers, peft;
ml-collections travels as a wheel, bench/README.md says how):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py 2>&1 | tee $OUT/gpu_check.log

1. Parity, bf16: `model.attention` cudnn and xla against an fp32 xla reference on the same inputs:
   the output and the gradients of q, k, v (a random cotangent on real rows), as relative errors
   ||x - ref|| / ||ref||, on causal, left-padded and packed batches, MHA / GQA (32 heads over 8) /
   MQA (one KV head); then a 2-layer bf16 model's logits with cudnn against xla (left-padded). A
   case passes when cudnn's error is at most twice xla's own bf16 error plus 1e-3.
2. Attention speed: one layer's fwd + bwd at 7B's shapes ([batch, seq, 32 heads, 128], bf16) for
   seq 2048 / 4096 / 8192: our cudnn (segment mask), cuDNN causal without a mask (what the mask
   costs: jax makes it a dense bias) and xla (O(seq^2) scores: it may not fit at 8192).
3. Train step: stage 2 (LoRA r 8 on the seven projections + embeddings and LM head, AdamW) on
   7B-shaped layers (hidden 4096, FFN 11008, 32 heads; --layers of them; vocabulary 49,954), bf16,
   no remat, one device: ours (build.build, attention auto -> cudnn) against PyTorch + PEFT
   (transformers LlamaForCausalLM, sdpa, bf16): tokens/s and MFU, the model FLOPs of
   flops.train_flops_per_token against a bf16 matmul peak measured in the same run by each
   framework (8192^3; the datasheet's dense bf16 is ~989 TFLOP/s).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 49954


def rel_err(x, ref, rows=None) -> float:
  """||x - ref|| / ||ref|| in float64, over the rows where `rows` ([batch, seq] bool) is True."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if rows is not None:
    x, ref = x[rows], ref[rows]
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def segment_batches(batch: int, seq: int) -> dict:
  """{name: [batch, seq] int32 segment ids}: causal (one example per row), left-padded (row b
  starts with b * seq / 8 padding tokens), packed (examples of seq/4, seq/3, ... then padding)."""
  left = np.ones((batch, seq), np.int32)
  for row in range(batch):
    left[row, :row * seq // 8] = 0
  packed = np.zeros((batch, seq), np.int32)
  for row in range(batch):
    start, segment = 0, 1
    for length in (seq // 4, seq // 3, seq // 5, seq // 7):
      packed[row, start:start + length] = segment
      start, segment = start + length, segment + 1
  return {"causal": np.ones((batch, seq), np.int32), "left-padded": left, "packed": packed}


def parity(args, cudnn: str) -> bool:
  """Section 1; returns whether every case passed."""
  import jax
  import jax.numpy as jnp
  from cnllama_jax import attention, model as model_lib
  from cnllama_jax.config import LlamaConfig
  batch, seq, heads, head_dim = (2, 128, 4, 32) if args.smoke else (2, 1024, 32, 128)
  rng = np.random.default_rng(0)
  ok = True
  print(f"1. parity, bf16, [batch {batch}, seq {seq}, {heads} heads, head_dim {head_dim}]: "
        f"relative error against fp32 xla ({cudnn} / xla)")
  for kv_heads in sorted({heads, heads // 4, 1}, reverse=True):
    for name, segments in segment_batches(batch, seq).items():
      q = rng.normal(size=(batch, seq, heads, head_dim))
      k, v = (rng.normal(size=(batch, seq, kv_heads, head_dim)) for _ in range(2))
      real = segments > 0
      cotangent = rng.normal(size=q.shape) * real[..., None, None]
      q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
      ids = jnp.asarray(segments)

      def run(impl, dtype, q=q, k=k, v=v, ids=ids, cotangent=cotangent):
        def loss(q, k, v):
          out = attention.attention(q, k, v, ids, impl)
          return jnp.sum(out.astype(jnp.float32) * cotangent), out
        grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(
            *(a.astype(dtype) for a in (q, k, v)))
        return [out] + list(grads)

      ref = run("xla", jnp.float32)
      figures = {impl: run(impl, jnp.bfloat16) for impl in (cudnn, "xla")}
      errors = {impl: [rel_err(x, r, real) for x, r in zip(got, ref)]
                for impl, got in figures.items()}
      passed = all(c <= 2 * x + 1e-3 for c, x in zip(errors[cudnn], errors["xla"]))
      ok &= passed
      print(f"  kv_heads {kv_heads:2d} {name:12s} " + "  ".join(
          f"{part} {c:.1e}/{x:.1e}" for part, c, x in zip(("out", "dq", "dk", "dv"),
                                                           errors[cudnn], errors["xla"]))
            + ("  ok" if passed else "  FAIL"))

  cfg = LlamaConfig(vocab_size=1000, hidden_size=heads * head_dim, intermediate_size=512,
                    num_hidden_layers=2, num_attention_heads=heads,
                    num_key_value_heads=heads // 4, dtype="bfloat16", param_dtype="float32",
                    max_position_embeddings=seq)
  ids = rng.integers(3, 1000, size=(batch, seq)).astype(np.int32)
  mask = (segment_batches(batch, seq)["left-padded"] > 0).astype(np.int32)
  params = model_lib.Llama(cfg).init(jax.random.key(0), jnp.asarray(ids))["params"]
  logits = {}
  for impl, dtype in ((cudnn, "bfloat16"), ("xla", "bfloat16"), ("xla", "float32")):
    logits[(impl, dtype)] = np.asarray(model_lib.logits(
        cfg.replace(attention=impl, dtype=dtype), params, ids, mask))
  ref = logits[("xla", "float32")]
  c, x = (rel_err(logits[(impl, "bfloat16")], ref, mask > 0) for impl in (cudnn, "xla"))
  passed = c <= 2 * x + 1e-3
  ok &= passed
  print(f"  2-layer model logits, left-padded: {cudnn} {c:.1e} / xla {x:.1e}"
        + ("  ok" if passed else "  FAIL"))
  return ok


def attention_speed(args, cudnn: str) -> None:
  """Section 2."""
  import jax
  import jax.numpy as jnp
  from cnllama_jax import attention
  heads, head_dim = (4, 32) if args.smoke else (32, 128)
  lengths = (128, 256) if args.smoke else (2048, 4096, 8192)
  tokens = 512 if args.smoke else 16384
  print(f"2. attention fwd + bwd per layer, bf16, {heads} heads x {head_dim}, {tokens} tokens "
        f"per call (median ms of {args.repeats})")
  for seq in lengths:
    batch = max(tokens // seq, 1)
    rng = np.random.default_rng(seq)
    q, k, v = (jnp.asarray(rng.normal(size=(batch, seq, heads, head_dim)), jnp.bfloat16)
               for _ in range(3))
    ids = jnp.ones((batch, seq), jnp.int32)
    line = f"  seq {seq:5d} batch {batch:2d}:"
    # jax turns a boolean mask into a dense [batch, 1, t, s] bias for cuDNN (jax/_src/cudnn/
    # fused_attention_stablehlo.py, combine_bias_and_mask): "causal only" is cuDNN without our
    # segment mask, what segment offsets / sequence lengths could bring it back to
    plain = "xla" if args.smoke else "cudnn"
    variants = {
        cudnn: lambda q, k, v: attention.attention(q, k, v, ids, cudnn),
        f"{plain} causal only": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=plain),
        "xla": lambda q, k, v: attention.attention(q, k, v, ids, "xla"),
    }
    times = {}
    for impl, fn in variants.items():
      grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                              argnums=(0, 1, 2)))
      try:
        jax.block_until_ready(grad(q, k, v))
      except Exception as e:  # noqa: BLE001  (xla's O(seq^2) scores may not fit)
        line += f"  {impl} failed: {str(e).splitlines()[0][:80]}"
        continue
      runs = []
      for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(grad(q, k, v))
        runs.append(time.perf_counter() - start)
      times[impl] = float(np.median(runs))
      flops = 4 * batch * heads * head_dim * seq * (seq + 1) / 2 * 3.5  # fwd 2 GEMMs, bwd 5
      line += f"  {impl} {times[impl] * 1e3:.2f} ms ({flops / times[impl] / 1e12:.1f} TFLOP/s)"
    if "xla" in times and cudnn in times:
      line += f"  xla / {cudnn} {times['xla'] / times[cudnn]:.2f}x"
    print(line, flush=True)


def matmul_peak_jax(size: int) -> float:
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, a))
  runs = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    runs.append(time.perf_counter() - start)
  return 2 * size ** 3 / min(runs)


def matmul_peak_torch(size: int, device: str) -> float:
  import torch
  a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
  a @ a
  runs = []
  for _ in range(5):
    sync(device)
    start = time.perf_counter()
    a @ a
    sync(device)
    runs.append(time.perf_counter() - start)
  return 2 * size ** 3 / min(runs)


def sync(device: str) -> None:
  import torch
  if device == "cuda":
    torch.cuda.synchronize()


def train_step(args) -> None:
  """Section 3."""
  import jax
  import torch
  from cnllama_jax import build, flops, lora as lora_lib, run_config
  layers, batch, seq = (2, 2, 128) if args.smoke else (args.layers, args.batch, args.seq)
  preset, vocab = ("mid", 2048) if args.smoke else ("7b", VOCAB)  # torch's CPU bf16 is slow
  c = run_config.load("pretrain_stage2")
  c.model = run_config.model_fields(preset, vocab, num_hidden_layers=layers, dtype="bfloat16",
                                    param_dtype="bfloat16", remat_policy="none",
                                    max_position_embeddings=max(seq, 2048))
  c.data.kind = "synthetic"
  c.train.update(global_batch_size=batch, seq_len=seq, micro_batches=1, steps=1000)
  c.mesh.shape = (1, -1, 1)
  run = build.build(c)
  cfg = run.cfg
  rng = np.random.default_rng(0)
  ids = rng.integers(3, vocab, size=(batch, seq), dtype=np.int32)
  host_batch = {"input_ids": ids, "labels": ids.copy(), "attention_mask": np.ones_like(ids)}
  device_batch = jax.device_put(host_batch, run.plan.batch_shardings)
  state = run.state

  def ours_step():
    nonlocal state
    state, metrics = run.train_step(run.frozen, state, device_batch)
    return float(metrics["loss"])

  device = "cpu" if args.smoke else "cuda"
  torch.manual_seed(0)
  import peft
  import transformers
  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=layers, num_attention_heads=cfg.num_attention_heads,
      max_position_embeddings=max(seq, 2048), attn_implementation="sdpa")
  with torch.device(device):
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=8, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
      modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"))
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
  torch_batch = {k: torch.from_numpy(v.astype(np.int64)).to(device) for k, v in host_batch.items()}

  def theirs_step():
    loss = model(**torch_batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return float(loss)

  peak_size = 512 if args.smoke else 8192
  peaks = {"jax": matmul_peak_jax(peak_size), "torch": matmul_peak_torch(peak_size, device)}
  stage = lora_lib.STAGES["lora+embeddings"]
  fpt = {"cnllama_jax": flops.train_flops_per_token(cfg, seq, run.lora, stage),
         "PyTorch+PEFT": flops.train_flops_per_token(cfg.replace(vocab_multiple=1), seq,
                                                     run.lora, stage)}
  print(f"3. stage-2 train step, {layers} layers of {preset} shape (hidden {cfg.hidden_size}, "
        f"FFN {cfg.intermediate_size}, {cfg.num_attention_heads} heads), vocabulary {vocab}, "
        f"batch {batch} x {seq}, bf16, attention ours {cfg.attention}, torch sdpa; bf16 matmul "
        f"{peak_size}^3 peak: jax {peaks['jax'] / 1e12:.1f}, torch {peaks['torch'] / 1e12:.1f} "
        f"TFLOP/s")
  best = {}
  for name, step in (("cnllama_jax", ours_step), ("PyTorch+PEFT", theirs_step)):
    losses = [step() for _ in range(2)]  # compile / warm up
    runs = []
    for _ in range(args.steps):
      start = time.perf_counter()
      losses.append(step())
      runs.append(time.perf_counter() - start)
    best[name] = float(np.median(runs))
    rate = batch * seq / best[name]
    print(f"  {name:13s} {best[name] * 1e3:8.1f} ms/step (median of {args.steps})  "
          f"{rate:9.0f} tokens/s  MFU {rate * fpt[name] / max(peaks.values()):.1%} of the "
          f"larger peak  (losses {losses[0]:.3f} -> {losses[-1]:.3f})", flush=True)
  print(f"  ratio ours / PyTorch+PEFT: {best['PyTorch+PEFT'] / best['cnllama_jax']:.2f}x tokens/s")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, blockwise for cudnn")
  parser.add_argument("--sections", default="1,2,3", help="which of 1 parity, 2 speed, 3 step")
  parser.add_argument("--layers", type=int, default=8, help="section 3: 7B-shaped layers")
  parser.add_argument("--batch", type=int, default=4, help="section 3: rows per step")
  parser.add_argument("--seq", type=int, default=2048, help="section 3: tokens per row")
  parser.add_argument("--steps", type=int, default=10, help="section 3: timed steps per side")
  parser.add_argument("--repeats", type=int, default=10, help="section 2: timed calls")
  args = parser.parse_args(argv)
  if args.smoke:
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  platform = jax.devices()[0].platform
  if not args.smoke and platform != "gpu":
    sys.exit(f"gpu_check: the default JAX device is {platform!r}, not a GPU; use --smoke here")
  cudnn = "blockwise" if args.smoke else "cudnn"
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {cudnn} against xla")
  sections = set(args.sections.split(","))
  ok = True
  for section, fn in (("1", parity), ("2", attention_speed), ("3", train_step)):
    if section not in sections:
      continue
    start = time.perf_counter()
    try:
      result = fn(args, cudnn) if section != "3" else fn(args)
      ok &= result is not False
    except Exception as e:  # noqa: BLE001  (one section's failure must not hide the others)
      ok = False
      print(f"  section {section} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    print(f"  (section {section}: {time.perf_counter() - start:.0f} s)", flush=True)
  print("gpu_check: all parity cases passed" if ok else "gpu_check: FAILURES above")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
