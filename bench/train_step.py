"""Stage-2 train step on the CPU: cnllama_jax vs PyTorch + PEFT on identical shapes.

    nice python bench/train_step.py [--rounds 5] [--steps 2] [--dropout 0,0.05]
    python bench/train_step.py --profile      # where our step's time goes

The step is the paper's stage 2 (Cui et al. 2023, Sec. 3.1): LoRA r 8 / alpha 32 on q,k,v,o,gate,
up,down plus a trainable embedding and LM head (PEFT `modules_to_save`), AdamW, global-norm clip
1.0. Shapes: hidden 512, 4 layers, 8 heads, FFN 1376, vocabulary 49,954, sequence 512, batch 4,
fp32, synthetic tokens.

  ours     cnllama_jax.build.build(configs/pretrain_stage2.py + the shapes above): the
           jitted, donating train step of a real run.
  theirs   transformers.LlamaForCausalLM (fp32, default attention = sdpa) wrapped by
           peft.get_peft_model(LoraConfig(r=8, lora_alpha=32, lora_dropout, all seven modules,
           modules_to_save=[embed_tokens, lm_head])); torch.optim.AdamW over the trainable params,
           loss.backward(), clip_grad_norm_(1.0), step(), zero_grad().

Both use every core (XLA's Eigen pool; torch.set_num_threads(os.cpu_count())). On a shared
machine the two are timed interleaved, round by round (`--steps` steps each), and reported as
  - the best round of each (wall clock and process CPU time), and
  - the median of the rounds' paired ratios (the two sides of one round saw similar load).
CPU MFU = model FLOPs/s (cnllama_jax.flops.train_flops_per_token: matmuls and attention, no
elementwise work) / fp32 matmul FLOP/s measured in the same run (XLA via
flops.measure_matmul_flops at 1024 and 2048, torch at 1024 and 2048); given against the largest
measured peak. Under contention the wall clock measures the share of the cores a job got, so the
same ratio is also given per CPU-second (model FLOPs per CPU-second of the step / matmul FLOPs per
CPU-second of the peak matmul), which the other jobs on the machine disturb far less.

  --dropout 0,0.05 one comparison per LoRA dropout (PEFT's dropout is expensive on the CPU)
  --attention xla  our model.attention (default auto: the blockwise kernel on the CPU)
First, one layer's attention fwd + bwd at these shapes: ours (auto, xla) vs torch's fused causal
scaled_dot_product_attention, best CPU-ms.
  --vocab 512      both models with a 512-row vocabulary: the transformer body alone
  --prng rbg       bench-only: another JAX PRNG for our dropout keys (the masks are a keyed hash)
  --profile        our step in pieces (forward, loss, gradient, LM head + loss, its GEMMs) and a
                   per-HLO-instruction trace (jax.profiler; best of the traced steps per op),
                   grouped into matmul / copy-transpose / elementwise / ...
Set XLA_FLAGS (e.g. --xla_cpu_use_onednn=true) in the environment to try XLA CPU options.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

SHAPE = dict(vocab_size=49954, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
             num_attention_heads=8)
BATCH, SEQ = 4, 512
ATTENTION = ["auto"]  # our model.attention; --attention sets it
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def stage2_config(dropout: float):
  from cnllama_jax import run_config
  c = run_config.load("pretrain_stage2")
  c.model = run_config.model_fields("mid", SHAPE["vocab_size"])  # "mid" = SHAPE's widths
  c.model.attention = ATTENTION[0]
  c.lora.dropout = dropout
  c.data.kind = "synthetic"
  c.train.update(global_batch_size=BATCH, seq_len=SEQ, micro_batches=1, steps=1000)
  c.mesh.shape = (1, -1, 1)
  return c


def synthetic_batch(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, SHAPE["vocab_size"], size=(BATCH, SEQ), dtype=np.int32)
  return {"input_ids": ids, "labels": ids.copy(), "attention_mask": np.ones_like(ids)}


# --- ours ----------------------------------------------------------------------------------------

class Ours:
  def __init__(self, dropout: float):
    import jax
    from cnllama_jax import build
    self.run = build.build(stage2_config(dropout))
    self.state = self.run.state
    self.batch = jax.device_put(synthetic_batch(), self.run.plan.batch_shardings)
    self.step()  # compile

  def step(self) -> float:
    self.state, metrics = self.run.train_step(self.run.frozen, self.state, self.batch)
    return float(metrics["loss"])  # waits for the step


# --- PyTorch + PEFT ------------------------------------------------------------------------------

class Theirs:
  def __init__(self, dropout: float):
    import peft
    import torch
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(max_position_embeddings=1024, torch_dtype="float32", **SHAPE)
    model = transformers.LlamaForCausalLM(config).float()
    lora = peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS,
                           modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    self.model = peft.get_peft_model(model, lora)
    self.model.train()
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01)
    batch = synthetic_batch()
    self.batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}
    self.attn = self.model.config._attn_implementation  # pylint: disable=protected-access
    self.step()  # warm up

  def step(self) -> float:
    import torch
    loss = self.model(**self.batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return float(loss)

  def trainable(self) -> int:
    return sum(p.numel() for p in self.params)


# --- peaks ---------------------------------------------------------------------------------------

def clocks() -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process: all threads, user + system)."""
  return time.perf_counter(), time.process_time()


def timed(fn, steps: int = 1) -> tuple[float, float]:
  """(wall, CPU) seconds per call of fn."""
  wall, cpu = clocks()
  for _ in range(steps):
    fn()
  wall2, cpu2 = clocks()
  return (wall2 - wall) / steps, (cpu2 - cpu) / steps


def matmul_peaks(size: int, repeats: int) -> dict:
  """fp32 [size, size] matmul FLOP/s of XLA (flops.measure_matmul_flops, wall clock) and of torch,
  and per CPU-second of each (best of `repeats`)."""
  import jax
  import jax.numpy as jnp
  import torch
  from cnllama_jax import flops
  work = 2 * size ** 3
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  b = torch.ones(size, size)
  b @ b
  xla_cpu = min(timed(lambda: matmul(a, a).block_until_ready())[1] for _ in range(repeats))
  torch_wall, torch_cpu = (min(t) for t in zip(*[timed(lambda: b @ b) for _ in range(repeats)]))
  return {f"xla {size}": flops.measure_matmul_flops(size, repeats),
          f"torch {size}": work / torch_wall,
          f"xla {size} per CPU-s": work / max(xla_cpu, 1e-9),
          f"torch {size} per CPU-s": work / max(torch_cpu, 1e-9)}


def peaks() -> dict:
  return {**matmul_peaks(1024, 10), **matmul_peaks(2048, 4)}


# --- profile of our step -------------------------------------------------------------------------

def _hlo_kinds(hlo_text: str) -> dict:
  """{instruction name: (kind, short description)} from a compiled module's text. kind: 'matmul'
  for dots (alone or fused), else the fusion's most telling op (exp, scatter, rng, reduce, ...)."""
  import re
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.-]+) .*\{$", line)
    if head:
      current = head.group(1)
      bodies[current] = []
    elif line.startswith("}"):
      current = None
    elif current:
      bodies[current].append(line)

  def ops_of(computation, depth=0):
    ops = set()
    for line in bodies.get(computation, []):
      m = re.match(r"\s*(?:ROOT )?%?[\w.-]+ = \S+ ([\w-]+)\(", line)
      if m:
        ops.add(m.group(1))
      for called in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.-]+)", line):
        if depth < 3:
          ops |= ops_of(called, depth + 1)
    return ops

  kinds = {}
  for lines in bodies.values():
    for line in lines:
      m = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = (\S+) ([\w-]+)\(", line)
      if not m:
        continue
      name, shape, op = m.groups()
      ops = {op}
      for called in re.findall(r"calls=%?([\w.-]+)", line):
        ops |= ops_of(called)
      for kind, members in (("matmul", {"dot", "convolution", "custom-call"}),
                            ("rng", {"rng-bit-generator", "rng", "threefry2x32"}),
                            ("scatter", {"scatter"}), ("gather", {"gather"}),
                            ("exp/log (softmax, loss)", {"exponential", "log"}),
                            ("reduce", {"reduce"}), ("copy/transpose", {"copy", "transpose"})):
        if ops & members:
          break
      else:
        kind = "elementwise/other"
      kinds[name] = (kind, f"{op} {shape[:60]}")
  return kinds


def trace_ops(step, steps: int, hlo_text: str, top: int) -> None:
  """Runs `step` under jax.profiler and sums the XLA CPU thunk times by HLO instruction; each
  instruction's time is its best over the `steps` runs (preemption by other jobs inflates some)."""
  import collections
  import glob
  import tempfile
  import jax
  from jax.profiler import ProfileData
  kinds = _hlo_kinds(hlo_text)
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    wall = timed(step, steps)[0]
    jax.profiler.stop_trace()
    data = ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[-1])
  per_run = collections.defaultdict(collections.Counter)  # run id -> op -> seconds
  for line in data.find_plane_with_name("/host:CPU").lines:
    for event in line.events:
      stats = dict(event.stats)
      if "hlo_op" in stats and "step" in str(stats.get("hlo_module", "")):
        per_run[stats.get("run_id")][stats["hlo_op"]] += event.duration_ns / 1e9
  runs = [r for r in per_run.values() if len(r) > 10]
  per_op = {op: min(r.get(op, 0.0) for r in runs) for op in set().union(*runs)}
  total = sum(per_op.values())
  by_kind = collections.Counter()
  for op, t in per_op.items():
    by_kind[kinds.get(op, ("?", ""))[0]] += t
  print(f"  per-op trace: {len(runs)} steps, {wall * 1e3:.0f} ms/step wall; sum over instructions "
        f"of their best time {total * 1e3:.0f} ms")
  for kind, t in by_kind.most_common():
    print(f"    {kind:26s} {t * 1e3:8.1f} ms  {t / total:6.1%}")
  print(f"  top {top} instructions:")
  for op, t in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
    kind, desc = kinds.get(op, ("?", ""))
    print(f"    {op:30s} {t * 1e3:8.1f} ms  {t / total:6.1%}  {kind:14s} {desc}")


def profile(ours: Ours, rounds: int, top: int, trace_only: bool = False) -> None:
  """Time pieces of our step (each jitted alone, best of `rounds`): forward logits, loss,
  gradient, full step; the LM head + loss alone and its three GEMMs alone; then a per-op trace."""
  import jax
  import jax.numpy as jnp
  from cnllama_jax import lora as lora_lib, train as train_lib
  run, state = ours.run, ours.state
  model, batch = run.plan.model, ours.batch
  rng = jax.random.key(0)

  def logits_fn(trainable, frozen, batch):
    params = lora_lib.combine(frozen, trainable)
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       rngs={"dropout": rng})

  def loss_fn(trainable, frozen, batch):  # as the step computes it (train.model_loss)
    labels = jnp.concatenate([batch["labels"][:, 1:], jnp.full_like(batch["labels"][:, :1],
                                                                   -100)], axis=1)
    loss, _, count = train_lib.model_loss(model, lora_lib.combine(frozen, trainable), batch,
                                          labels, {"dropout": rng})
    return loss / count

  cfg = run.cfg
  x = jnp.ones((BATCH * SEQ, cfg.hidden_size), jnp.float32) * 0.01
  head = state.trainable["lm_head"]
  labels = jnp.asarray(ours.batch["labels"]).reshape(-1)

  def head_loss(head, x):  # the CPU's fused head + loss (train.model_loss)
    loss, _, count = train_lib.fused_head_cross_entropy(x[None], head, labels[None],
                                                        cfg.vocab_size)
    return loss / count

  def head_matmuls(head, x):  # the LM head's three GEMMs (forward, d input, d head), nothing else
    logits = x @ head
    return jnp.sum(logits @ head.T) + jnp.sum(x.T @ logits)

  params = (state.trainable, run.frozen, batch)
  if trace_only:
    hlo = run.train_step.lower(run.frozen, ours.state, ours.batch).compile().as_text()
    trace_ops(ours.step, max(rounds, 3), hlo, top)
    return
  pieces = {
      "forward (logits)": (jax.jit(logits_fn), params),
      "forward + loss": (jax.jit(loss_fn), params),
      "gradient (fwd + bwd)": (jax.jit(jax.grad(loss_fn)), params),
      "LM head + loss, fwd": (jax.jit(head_loss), (head, x)),
      "LM head + loss, fwd + bwd": (jax.jit(jax.grad(head_loss, argnums=(0, 1))), (head, x)),
      "LM head GEMMs alone (3)": (jax.jit(head_matmuls), (head, x)),
  }
  head_gemm_flops = 3 * 2 * BATCH * SEQ * cfg.hidden_size * cfg.padded_vocab_size
  results = {}
  for name, (fn, args) in pieces.items():
    jax.block_until_ready(fn(*args))
    runs = [timed(lambda fn=fn, args=args: jax.block_until_ready(fn(*args))) for _ in range(rounds)]
    results[name] = tuple(min(t) for t in zip(*runs))
  runs = [timed(ours.step) for _ in range(rounds)]
  results["full step"] = tuple(min(t) for t in zip(*runs))
  print("  piece                          wall ms    CPU ms")
  for name, (wall, cpu) in results.items():
    print(f"  {name:28s} {wall * 1e3:9.1f} {cpu * 1e3:9.1f}")
  wall, cpu = results["LM head GEMMs alone (3)"]
  print(f"  LM head GEMMs: {head_gemm_flops / wall / 1e9:.1f} GFLOP/s wall, "
        f"{head_gemm_flops / cpu / 1e9:.1f} GFLOP per CPU-s")
  hlo = run.train_step.lower(run.frozen, ours.state, ours.batch).compile().as_text()
  trace_ops(ours.step, max(rounds, 3), hlo, top)


def packed_segments():
  """[BATCH, SEQ] segment ids of packed rows: examples of 100 + 7 b tokens in row b (about the
  embedded instructions' length), back to back, then padding."""
  import jax.numpy as jnp
  ids = np.zeros((BATCH, SEQ), np.int32)
  for row in range(BATCH):
    length = 100 + 7 * row
    for segment in range(SEQ // length):
      ids[row, segment * length:(segment + 1) * length] = segment + 1
  return jnp.asarray(ids)


def attention_per_layer(rounds: int) -> None:
  """One layer's attention fwd + bwd at the step's shapes ([4, 512, 8 heads, 64]), fp32, best
  CPU-ms of `rounds`: ours (`auto` on this CPU mesh, and `xla`) against torch's fused causal
  `scaled_dot_product_attention`; and ours `blockwise` on packed rows (`packed_segments`), where
  it skips the tile pairs whose segments cannot meet."""
  import jax
  import jax.numpy as jnp
  import torch
  from cnllama_jax import attention
  heads = SHAPE["num_attention_heads"]
  head_dim = SHAPE["hidden_size"] // heads
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(BATCH, SEQ, heads, head_dim)), jnp.float32)
             for _ in range(3))
  segments = jnp.ones((BATCH, SEQ), jnp.int32)
  results = {}
  for name in ("auto", "xla"):
    chosen = attention.choose(name, None, SEQ, jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v, name=name: jnp.sum(attention.attention(
        q, k, v, segments, name) ** 2), argnums=(0, 1, 2)))
    jax.block_until_ready(grad(q, k, v))
    results[f"ours {name} ({chosen})"] = min(
        timed(lambda: jax.block_until_ready(grad(q, k, v)))[1] for _ in range(rounds))
  packed = packed_segments()
  grad = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(attention.attention(
      q, k, v, s, "blockwise") ** 2), argnums=(0, 1, 2)))
  jax.block_until_ready(grad(q, k, v, packed))
  tiles = int(attention.tiles_computed(packed, attention.BLOCKWISE_BLOCK).sum())
  n = SEQ // attention.BLOCKWISE_BLOCK
  results[f"ours blockwise, packed rows ({tiles} of {n * (n + 1) // 2} tiles)"] = min(
      timed(lambda: jax.block_until_ready(grad(q, k, v, packed)))[1] for _ in range(rounds))
  qt, kt, vt = (torch.randn(BATCH, heads, SEQ, head_dim, requires_grad=True) for _ in range(3))

  def torch_step():
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    (out ** 2).sum().backward()
  torch_step()
  results["torch SDPA (causal)"] = min(timed(torch_step)[1] for _ in range(rounds))
  base = results["torch SDPA (causal)"]
  print("attention fwd+bwd per layer, best CPU-ms: " + ", ".join(
      f"{k} {v * 1e3:.0f} ({base / v:.2f}x torch)" for k, v in results.items()))


def compare(dropout: float, args) -> None:
  """Our step against PyTorch + PEFT at one LoRA dropout, interleaved rounds; prints figures."""
  import jax
  import torch
  from cnllama_jax import flops, lora as lora_lib
  ours = Ours(dropout)
  cfg, lora = ours.run.cfg, ours.run.lora
  stage = lora_lib.STAGES["lora+embeddings"]
  ours_fpt = flops.train_flops_per_token(cfg, SEQ, lora, stage)
  theirs_fpt = flops.train_flops_per_token(cfg.replace(vocab_multiple=1), SEQ, lora, stage)
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"prng {jax.config.jax_default_prng_impl}")
  print(f"stage 2, batch {BATCH} x {SEQ}, fp32, LoRA dropout {dropout}, attention "
        f"{cfg.attention}; model FLOPs/token ours {ours_fpt / 1e6:.1f} M (vocab padded to "
        f"{cfg.padded_vocab_size}), PyTorch+PEFT {theirs_fpt / 1e6:.1f} M")
  if args.profile:
    profile(ours, args.rounds, args.top, args.trace_only)
    return
  theirs = None if args.no_torch else Theirs(dropout)
  if theirs:
    print(f"PEFT: {theirs.trainable()} trainable params, attention {theirs.attn}")

  sides = {"cnllama_jax": (ours, ours_fpt)}
  if theirs:
    sides["PyTorch+PEFT"] = (theirs, theirs_fpt)
  best = {name: [float("inf"), float("inf")] for name in sides}  # wall, CPU seconds per step
  rounds: list = []  # per round {name: (wall, CPU)}
  all_peaks: dict = {}
  for r in range(args.rounds):
    for name, peak in peaks().items():
      all_peaks[name] = max(all_peaks.get(name, 0.0), peak)
    line = f"round {r} (load {os.getloadavg()[0]:.1f}):"
    rounds.append({})
    for name, (side, _) in sides.items():
      wall, cpu = timed(side.step, args.steps)
      rounds[-1][name] = (wall, cpu)
      best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
      line += f"  {name} {wall * 1e3:7.0f} ms/step ({cpu * 1e3:.0f} CPU-ms)"
    print(line, flush=True)

  wall_peaks = {k: v for k, v in all_peaks.items() if "CPU-s" not in k}
  cpu_peaks = {k: v for k, v in all_peaks.items() if "CPU-s" in k}
  print("fp32 matmul peaks, best over rounds: " +
        ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in wall_peaks.items()) + "; " +
        ", ".join(f"{k} {v / 1e9:.1f} GFLOP" for k, v in cpu_peaks.items()))
  tokens = BATCH * SEQ
  for name, (_, fpt) in sides.items():
    wall, cpu = best[name]
    rate, cpu_rate = tokens * fpt / wall, tokens * fpt / cpu
    print(f"{name:12s} {wall * 1e3:7.0f} ms/step  {tokens / wall:7.1f} tokens/s  "
          f"{rate / 1e9:6.1f} GFLOP/s  MFU {rate / max(wall_peaks.values()):.1%} of the best peak "
          f"({', '.join(f'{rate / v:.0%} of {k}' for k, v in wall_peaks.items())})")
    print(f"{'':12s} {cpu * 1e3:7.0f} CPU-ms/step {tokens / cpu:7.1f} tokens/CPU-s  "
          f"{cpu_rate / 1e9:6.1f} GFLOP/CPU-s  CPU-time MFU {cpu_rate / max(cpu_peaks.values()):.1%}"
          f" ({', '.join(f'{cpu_rate / v:.0%} of {k}' for k, v in cpu_peaks.items())})")
  if theirs:
    (ow, oc), (tw, tc) = best["cnllama_jax"], best["PyTorch+PEFT"]
    print(f"ratio ours / PyTorch+PEFT, best round of each: {tw / ow:.2f}x tokens/s (wall), "
          f"{tc / oc:.2f}x tokens per CPU-second")
    pairs = [(r["PyTorch+PEFT"][0] / r["cnllama_jax"][0], r["PyTorch+PEFT"][1] / r["cnllama_jax"][1])
             for r in rounds]
    print(f"ratio ours / PyTorch+PEFT, median of the rounds' paired ratios: "
          f"{np.median([p[0] for p in pairs]):.2f}x wall, {np.median([p[1] for p in pairs]):.2f}x "
          f"per CPU-second (per round: {', '.join(f'{w:.2f}/{c:.2f}' for w, c in pairs)})")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; best counts")
  parser.add_argument("--steps", type=int, default=2, help="steps per round and side")
  parser.add_argument("--dropout", default="0,0.05",
                      help="LoRA dropouts (both sides), comma-separated; each is one comparison")
  parser.add_argument("--attention", default="auto",
                      help="our model.attention (auto | xla | blockwise)")
  parser.add_argument("--profile", action="store_true", help="time the pieces of our step")
  parser.add_argument("--top", type=int, default=25, help="--profile: instructions listed")
  parser.add_argument("--trace_only", action="store_true", help="--profile: only the per-op trace")
  parser.add_argument("--no_torch", action="store_true", help="ours only")
  parser.add_argument("--vocab", type=int, default=SHAPE["vocab_size"],
                      help="vocabulary of both models (e.g. 512: the transformer body alone)")
  parser.add_argument("--prng", default="", help="bench-only: jax_default_prng_impl for ours "
                      "(threefry2x32 default, rbg, unsafe_rbg): draws the dropout masks' keys")
  args = parser.parse_args()

  SHAPE["vocab_size"] = args.vocab
  ATTENTION[0] = args.attention
  import jax
  if args.prng:
    jax.config.update("jax_default_prng_impl", args.prng)
  import torch
  torch.set_num_threads(os.cpu_count())
  if not args.profile and not args.no_torch:
    attention_per_layer(args.rounds)
  for dropout in (float(d) for d in args.dropout.split(",")):
    compare(dropout, args)


if __name__ == "__main__":
  main()
