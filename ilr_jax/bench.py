"""Benchmark harness: times workloads in JAX and, with --peer=torch, in transformers' PyTorch.

Command (BENCH.md; one JSON line per measurement, then one ratio line per workload):
  python -m ilr_jax.bench --workloads=sft_step,dpo_step --shape=bench-small --peer=torch
  python -m ilr_jax.bench --workloads=sft_step --shape=gemma-2b --arch=gemma --dtype=bfloat16 \\
      --batch=8 --seq_len=512                      # GPU: tokens/s and MFU
  python -m ilr_jax.bench --workloads=sft_step_lora --shape=mistral-7b --dtype=bfloat16

Rules (BENCH.md): random init with a fixed seed, random token ids in [3, vocab), float32 unless
--dtype says otherwise, 2 untimed warm-up calls per backend, then timed calls interleaved between
the backends (jax, torch, jax, torch, ...), at least --min_reps each and more until --min_time
seconds are timed, at most --max_reps; every timed JAX call ends in block_until_ready. Only ratios
measured in one run mean anything on a shared CPU.

Adding a workload: append one self-contained block at the end of this file,

  @workload('my_workload')
  def _my_workload(ctx: BenchContext) -> Case:
    ...build inputs from ctx.cfg / ctx.rng...
    return Case(jax_fn=..., torch_fn=... or None, count=..., unit='tokens' or 'items',
                flops=... or None, fields={...shape parameters...})

`jax_fn` and `torch_fn` take no arguments and do one timed call (the harness blocks on what
`jax_fn` returns); build the PyTorch side only when `ctx.peer == 'torch'`. `torch_model(ctx)`
builds the matching transformers model.

MFU (accelerators only, --dtype=bfloat16): model FLOPs per call / median time / the device's
dense bf16 peak (PEAK_FLOPS, or --peak_tflops). Model FLOPs (`train_flops`) count matmuls only:
2 x (layer matmul parameters) per token forward, 2 x D x V per position whose logits are taken,
and causal attention 2 x 2 x L x N x H x T / 2 per token; a training step is 3x the forward
(backward 2x) for full fine-tuning, 2x for LoRA (no weight gradients of the frozen base; the
adapter's own FLOPs are counted 3x), plus 1x for a DPO reference forward.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from ilr_jax import convert
from ilr_jax import lora as lora_lib
from ilr_jax import sharding as shd
from ilr_jax import train as train_lib
from ilr_jax.model import Decoder, ModelConfig

# name -> (vocab, hidden, intermediate, layers, heads, {arch: kv heads}, head dim); BENCH.md.
SHAPES: dict[str, tuple[int, int, int, int, int, dict[str, int], int]] = {
  'bench-small': (32000, 256, 768, 4, 8, {'mistral': 4, 'gemma': 1}, 32),
  'bench-tiny': (512, 64, 128, 2, 4, {'mistral': 2, 'gemma': 1}, 16),
}
# Real architectures (random weights; accelerators only): the preset names of presets.py.
REAL_SHAPES = ('gemma-2b', 'mistral-7b')
# Dense bf16 peak FLOP/s by device kind (substring of jax's device_kind).
PEAK_FLOPS = {
  'H100': 989.4e12,
  'H200': 989.4e12,
  'A100': 312e12,
  'TPU v4': 275e12,
  'TPU v5 lite': 197e12,
  'TPU v5p': 459e12,
  'TPU v5': 459e12,
  'TPU v6 lite': 918e12,
}


def model_config(shape: str, arch: str, dtype: str = 'float32') -> ModelConfig:
  """The ModelConfig of a benchmark shape for 'mistral' or 'gemma' (BENCH.md)."""
  if arch not in ('mistral', 'gemma'):
    raise ValueError(f"bench arch must be 'mistral' or 'gemma', got {arch!r}")
  if shape in REAL_SHAPES:
    from ilr_jax import presets

    cfg = presets.get_preset(shape, dtype=dtype, param_dtype=dtype)
    if cfg.arch != arch:
      raise ValueError(f'shape {shape} is a {cfg.arch} model; pass --arch={cfg.arch}')
    return cfg
  if shape not in SHAPES:
    raise ValueError(
      f'unknown shape {shape!r}; expected one of {sorted(SHAPES) + list(REAL_SHAPES)}'
    )
  v, d, f, layers, n, kv, h = SHAPES[shape]
  gemma = arch == 'gemma'
  return ModelConfig(
    arch=arch,
    vocab_size=v,
    hidden_size=d,
    intermediate_size=f,
    num_layers=layers,
    num_heads=n,
    num_kv_heads=kv[arch],
    head_dim=h,
    activation='gelu_tanh' if gemma else 'silu',
    norm_offset=gemma,
    embed_scale=gemma,
    tie_embeddings=gemma,
    dtype=dtype,
    param_dtype=dtype,
  )


@dataclasses.dataclass(frozen=True)
class BenchContext:
  """What a workload builder gets: the model config, the run's options and a seeded rng."""

  shape: str
  arch: str
  cfg: ModelConfig
  peer: str | None
  seed: int
  mesh: Any
  batch: int | None = None  # overrides a workload's batch size
  seq_len: int | None = None  # overrides a workload's sequence length

  @property
  def rng(self) -> np.random.Generator:
    return np.random.default_rng(self.seed)

  def tokens(self, *shape: int) -> np.ndarray:
    """Random token ids in [3, vocab) (BENCH.md)."""
    return self.rng.integers(3, self.cfg.vocab_size, size=shape, dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class Case:
  """One workload, ready to time: no-argument callables for each backend."""

  jax_fn: Callable[[], Any]
  torch_fn: Callable[[], Any] | None
  count: int  # tokens or items one call processes
  unit: str  # 'tokens' or 'items'
  flops: float | None = None  # model FLOPs of one call (for MFU)
  fields: dict[str, Any] = dataclasses.field(default_factory=dict)


WORKLOADS: dict[str, Callable[[BenchContext], Case]] = {}


def workload(name: str):
  """Register `fn(ctx) -> Case` as workload `name`."""

  def register(fn):
    if name in WORKLOADS:
      raise ValueError(f'workload {name!r} is registered twice')
    WORKLOADS[name] = fn
    return fn

  return register


# -- FLOPs ---------------------------------------------------------------------------------------


def forward_flops(cfg: ModelConfig, tokens: int, seq_len: int, logit_positions: int) -> float:
  """Matmul FLOPs of a forward pass over `tokens` tokens in sequences of `seq_len`."""
  d, f, n, k, h, layers = (
    cfg.hidden_size,
    cfg.intermediate_size,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.num_layers,
  )
  per_layer = d * n * h * 2 + 2 * d * k * h + 3 * d * f
  attn = 2 * 2 * n * h * seq_len / 2
  return tokens * layers * (2 * per_layer + attn) + 2 * d * cfg.vocab_size * logit_positions


def lora_params_per_layer(cfg: ModelConfig, rank: int) -> int:
  d, f, n, k, h = (
    cfg.hidden_size,
    cfg.intermediate_size,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
  )
  dims = {
    'q': (d, n * h),
    'k': (d, k * h),
    'v': (d, k * h),
    'o': (n * h, d),
    'gate': (d, f),
    'up': (d, f),
    'down': (f, d),
  }
  return sum(rank * (a + b) for a, b in dims.values())


def train_flops(
  cfg: ModelConfig,
  tokens: int,
  seq_len: int,
  logit_positions: int,
  *,
  lora_rank: int = 0,
  ref_forward: bool = False,
) -> float:
  """Model FLOPs of one training step (see the module docstring)."""
  fwd = forward_flops(cfg, tokens, seq_len, logit_positions)
  if lora_rank:
    total = 2 * fwd + 3 * 2 * tokens * cfg.num_layers * lora_params_per_layer(cfg, lora_rank)
  else:
    total = 3 * fwd
  return total + (fwd if ref_forward else 0.0)


def peak_flops(override_tflops: float | None) -> float | None:
  if override_tflops:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind
  if jax.devices()[0].platform == 'cpu':
    return None
  for key in sorted(PEAK_FLOPS, key=len, reverse=True):
    if key in kind:
      return PEAK_FLOPS[key]
  return None


# -- PyTorch peer --------------------------------------------------------------------------------


def torch_model(ctx: BenchContext, lora_rank: int = 0, lora_alpha: float = 0.0):
  """transformers' PyTorch model of ctx.cfg, random init (seeded), train mode, on the device."""
  import torch
  import transformers

  torch.manual_seed(ctx.seed)
  hf_cfg = transformers.AutoConfig.for_model(**convert.hf_config_dict(ctx.cfg))
  dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[ctx.cfg.param_dtype]
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
  model.to(torch_device())
  if lora_rank:
    add_torch_lora(model, lora_rank, lora_alpha)
  model.train()
  return model


def torch_device():
  import torch

  return 'cuda' if torch.cuda.is_available() else 'cpu'


def add_torch_lora(model, rank: int, alpha: float) -> None:
  """PEFT's LoRA on every linear layer of the decoder blocks (A kaiming-uniform, B zero)."""
  import torch

  class LoraLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear):
      super().__init__()
      self.base = base
      self.lora_a = torch.nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype)
      self.lora_b = torch.nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype)
      torch.nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
      torch.nn.init.zeros_(self.lora_b.weight)
      self.scale = alpha / rank

    def forward(self, x):
      return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale

  for p in model.parameters():
    p.requires_grad_(False)
  for layer in model.model.layers:
    for parent in (layer.self_attn, layer.mlp):
      for name, child in list(parent.named_children()):
        if isinstance(child, torch.nn.Linear):
          setattr(parent, name, LoraLinear(child).to(child.weight.device))


def _torch_sync():
  import torch

  if torch.cuda.is_available():
    torch.cuda.synchronize()


# -- timing --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Timer:
  fn: Callable[[], Any]
  block: Callable[[Any], Any]
  times: list[float] = dataclasses.field(default_factory=list)

  def call(self) -> None:
    t0 = time.perf_counter()
    self.block(self.fn())
    self.times.append(time.perf_counter() - t0)


def time_interleaved(
  fns: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]],
  *,
  warmup: int = 2,
  min_reps: int = 10,
  max_reps: int = 50,
  min_time: float = 1.0,
) -> dict[str, list[float]]:
  """Per backend, the durations of timed calls, taken in turns (see the module docstring)."""
  timers = {name: _Timer(fn, block) for name, (fn, block) in fns.items()}
  for _ in range(warmup):
    for t in timers.values():
      t.block(t.fn())
  while True:
    for t in timers.values():
      t.call()
    done = all(
      len(t.times) >= max_reps or (len(t.times) >= min_reps and sum(t.times) >= min_time)
      for t in timers.values()
    )
    if done:
      return {name: t.times for name, t in timers.items()}


def run_workload(
  name: str,
  ctx: BenchContext,
  *,
  warmup: int = 2,
  min_reps: int = 10,
  max_reps: int = 50,
  min_time: float = 1.0,
  peak: float | None = None,
) -> list[dict[str, Any]]:
  """Build and time one workload; returns its JSON records (one per backend, then the ratio)."""
  if name not in WORKLOADS:
    raise ValueError(f'unknown workload {name!r}; registered: {sorted(WORKLOADS)}')
  case = WORKLOADS[name](ctx)
  fns = {'jax': (case.jax_fn, jax.block_until_ready)}
  if ctx.peer == 'torch':
    if case.torch_fn is None:
      raise ValueError(f'workload {name!r} has no PyTorch peer')
    fns['torch'] = (case.torch_fn, lambda _: _torch_sync())
  times = time_interleaved(
    fns, warmup=warmup, min_reps=min_reps, max_reps=max_reps, min_time=min_time
  )
  records = []
  for backend, ts in times.items():
    med = statistics.median(ts)
    rec = {
      'name': name,
      'arch': ctx.arch,
      'shape': ctx.shape,
      'backend': backend,
      'median_s': med,
      'min_s': min(ts),
      'max_s': max(ts),
      f'{case.unit}_per_s': case.count / med,
      'reps': len(ts),
      'dtype': ctx.cfg.dtype,
      **case.fields,
    }
    if backend == 'jax':
      rec['device'] = jax.devices()[0].device_kind
      if case.flops is not None and peak:
        rec['tflops_per_s'] = case.flops / med / 1e12
        rec['mfu'] = case.flops / med / peak
    records.append(rec)
  if len(records) == 2:
    records.append(
      {
        'name': name,
        'arch': ctx.arch,
        'shape': ctx.shape,
        'ratio': 'torch_median / jax_median',
        'speedup': records[1]['median_s'] / records[0]['median_s'],
        **case.fields,
      }
    )
  return records


# -- shared pieces of the train-step workloads ---------------------------------------------------


def host_random_model(cfg: ModelConfig, mesh, seed: int) -> Decoder:
  """A Decoder with N(0, 0.02) kernels drawn by numpy and placed shard by shard (norm scales as
  Decoder's init): no initialiser to compile, which dominates small CPU runs."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  shardings = shd.state_shardings(abstract, mesh)
  rng = np.random.default_rng(seed)

  def fill(var, sharding):
    if 'norm' in (var.get_metadata().get('out_sharding') or ()):
      value = np.full(var.shape, 0.0 if cfg.norm_offset else 1.0, np.float32)
    else:
      value = rng.normal(0.0, 0.02, var.shape).astype(np.float32)
    return var.replace(shd.put(value.astype(var.dtype), sharding))

  is_var = lambda x: isinstance(x, nnx.Variable)
  return nnx.merge(graphdef, jax.tree.map(fill, abstract, shardings, is_leaf=is_var))


def _jax_model(ctx: BenchContext, lora_rank: int) -> Decoder:
  if ctx.shape in REAL_SHAPES:
    # Billions of parameters: initialise on the accelerators, already sharded.
    model = shd.create_sharded(lambda: Decoder(ctx.cfg, rngs=nnx.Rngs(ctx.seed)), ctx.mesh)
  else:
    model = host_random_model(ctx.cfg, ctx.mesh, ctx.seed)
  if lora_rank:
    model = lora_lib.add_lora(model, lora_rank, 2.0 * lora_rank, 'all', rng=ctx.seed)
  return model


def _bench_train_config(lora_rank: int) -> train_lib.TrainConfig:
  # BENCH.md: AdamW lr 5e-5, no clipping, no schedule.
  return train_lib.TrainConfig(
    optimizer='adamw',
    lr=5e-5,
    schedule='constant',
    warmup_ratio=0.0,
    clip_norm=None,
    lora_rank=lora_rank,
    lora_alpha=2.0 * lora_rank,
  )


def _torch_optimizer(model):
  import torch

  params = [p for p in model.parameters() if p.requires_grad]
  return torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)


def _sft_case(ctx: BenchContext, lora_rank: int) -> Case:
  b, t = ctx.batch or 8, ctx.seq_len or 128
  p = t // 2  # loss on the last half of each sequence
  tokens = ctx.tokens(b, t)
  mask = np.ones((b, t), np.int32)
  loss_mask = np.zeros((b, t), np.int32)
  loss_mask[:, t - p :] = 1
  model = _jax_model(ctx, lora_rank)
  trainer, state_box = train_lib.make_trainer(
    model, 'sft', _bench_train_config(lora_rank), 1000, mesh=ctx.mesh
  )
  batch = trainer.shard_batch({'tokens': tokens, 'mask': mask, 'loss_mask': loss_mask})
  box = [state_box]
  del model

  def jax_fn():
    box[0], metrics = trainer.train_step(box[0], batch, p)
    return metrics['loss']

  torch_fn = None
  if ctx.peer == 'torch':
    import torch

    tm = torch_model(ctx, lora_rank, 2.0 * lora_rank)
    opt = _torch_optimizer(tm)
    dev = torch_device()
    tt = torch.as_tensor(tokens, dtype=torch.long, device=dev)

    def torch_fn():
      opt.zero_grad(set_to_none=True)
      logits = tm(input_ids=tt).logits.float()  # all positions, as HF's Trainer computes them
      lp = torch.log_softmax(logits[:, t - p - 1 : t - 1], dim=-1)
      nll = -lp.gather(-1, tt[:, t - p :, None])[..., 0]
      loss = nll.mean(-1).mean()
      loss.backward()
      opt.step()
      return loss

  flops = train_flops(ctx.cfg, b * t, t, b * p, lora_rank=lora_rank)
  fields = {'batch': b, 'seq_len': t, 'loss_tokens': p, 'lora_rank': lora_rank}
  return Case(jax_fn, torch_fn, b * t, 'tokens', flops, fields)


def _dpo_case(ctx: BenchContext, lora_rank: int) -> Case:
  pairs, t = (ctx.batch or 8) // 2, ctx.seq_len or 128
  p = t // 2  # shared prompt of t/2, answers of t/2
  prompt = ctx.tokens(pairs, t - p)
  rng = ctx.rng
  answers = rng.integers(3, ctx.cfg.vocab_size, size=(2, pairs, p), dtype=np.int32)
  chosen = np.concatenate([prompt, answers[0]], axis=1)
  rejected = np.concatenate([prompt, answers[1]], axis=1)
  mask = np.ones((pairs, t), np.int32)
  loss_mask = np.zeros((pairs, t), np.int32)
  loss_mask[:, t - p :] = 1
  model = _jax_model(ctx, lora_rank)
  ref_graphdef, ref_state = nnx.split(model)
  ref_state = jax.tree.map(jnp.copy, ref_state)  # the reference: a frozen copy of the start
  cfg = _bench_train_config(lora_rank)
  trainer, state0 = train_lib.make_trainer(model, 'dpo', cfg, 1000, mesh=ctx.mesh)
  del model
  host = {
    'chosen_tokens': chosen,
    'chosen_mask': mask,
    'chosen_loss_mask': loss_mask,
    'rejected_tokens': rejected,
    'rejected_mask': mask,
    'rejected_loss_mask': loss_mask,
  }
  sh = trainer.batch_shardings
  batch = {k: shd.put(v, sh[k]) for k, v in host.items()}
  two_b = lambda k: jnp.concatenate([batch[f'chosen_{k}'], batch[f'rejected_{k}']])

  @jax.jit
  def ref_logps(ref_state, batch):
    tokens, m, lm = (two_b(k) for k in ('tokens', 'mask', 'loss_mask'))
    model = nnx.merge(ref_graphdef, ref_state)
    logps, _ = train_lib.token_logps(model, tokens, m, lm, max_targets=p)
    return {'ref_chosen_logps': logps.sum(-1)[:pairs], 'ref_rejected_logps': logps.sum(-1)[pairs:]}

  box = [state0]

  def jax_fn():
    ref = ref_logps(ref_state, batch)
    box[0], metrics = trainer.train_step(box[0], {**batch, **ref}, p)
    return metrics['loss']

  torch_fn = None
  if ctx.peer == 'torch':
    import torch
    import torch.nn.functional as F

    policy = torch_model(ctx, lora_rank, 2.0 * lora_rank)
    reference = copy.deepcopy(policy).eval()
    opt = _torch_optimizer(policy)
    dev = torch_device()
    both = torch.as_tensor(np.concatenate([chosen, rejected]), dtype=torch.long, device=dev)

    def seq_logps(m, ids):
      logits = m(input_ids=ids).logits.float()
      lp = torch.log_softmax(logits[:, t - p - 1 : t - 1], dim=-1)
      return lp.gather(-1, ids[:, t - p :, None])[..., 0].sum(-1)

    def torch_fn():
      with torch.no_grad():
        ref = seq_logps(reference, both)
      opt.zero_grad(set_to_none=True)
      pol = seq_logps(policy, both)
      margin = (pol[:pairs] - ref[:pairs]) - (pol[pairs:] - ref[pairs:])
      loss = -F.logsigmoid(0.1 * margin).mean()
      loss.backward()
      opt.step()
      return loss

  n = 2 * pairs
  flops = train_flops(ctx.cfg, n * t, t, n * p, lora_rank=lora_rank, ref_forward=True)
  fields = {'pairs': pairs, 'seq_len': t, 'answer_tokens': p, 'lora_rank': lora_rank}
  return Case(jax_fn, torch_fn, n * t, 'tokens', flops, fields)


# -- CLI -----------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags (defined on demand: importing the module defines none)."""
  flags.DEFINE_list('workloads', ['sft_step', 'dpo_step'], 'workloads to time (see WORKLOADS)')
  flags.DEFINE_string('shape', 'bench-small', 'bench-small, bench-tiny, gemma-2b or mistral-7b')
  flags.DEFINE_list('arch', ['mistral', 'gemma'], 'architectures (mistral, gemma)')
  flags.DEFINE_enum('peer', None, ['torch'], 'also time the PyTorch reference, interleaved')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'parameter and compute dtype')
  flags.DEFINE_integer('batch', None, 'override the workload batch size')
  flags.DEFINE_integer('seq_len', None, 'override the workload sequence length')
  flags.DEFINE_enum('remat', 'none', ['none', 'full', 'dots'], 'rematerialisation of the layers')
  flags.DEFINE_integer('seed', 0, 'seed of weights and tokens')
  flags.DEFINE_integer('warmup', 2, 'untimed calls per backend')
  flags.DEFINE_integer('min_reps', 10, 'timed calls per backend, at least')
  flags.DEFINE_integer('max_reps', 50, 'timed calls per backend, at most')
  flags.DEFINE_float('min_time', 1.0, 'seconds timed per backend, at least (until max_reps)')
  flags.DEFINE_float('peak_tflops', None, 'device peak for MFU (default: PEAK_FLOPS by kind)')
  flags.DEFINE_string('mesh', '-1,1,1', 'data,fsdp,tensor mesh sizes')
  flags.DEFINE_string('out', None, 'also append the JSON lines to this file')


def format_table(records: list[dict[str, Any]]) -> str:
  """A markdown table of the timing records (and speedups) for notes."""
  rows = [
    '| workload | arch | shape | backend | median s | min s | max s | tokens/s | reps | speedup |',
    '|---|---|---|---|---:|---:|---:|---:|---:|---:|',
  ]
  speed = {(r['name'], r['arch']): r['speedup'] for r in records if 'speedup' in r}
  for r in records:
    if 'backend' not in r:
      continue
    rate = r.get('tokens_per_s', r.get('items_per_s', 0.0))
    s = speed.get((r['name'], r['arch'])) if r['backend'] == 'torch' else None
    rows.append(
      f'| {r["name"]} | {r["arch"]} | {r["shape"]} | {r["backend"]} | {r["median_s"]:.4f} '
      f'| {r["min_s"]:.4f} | {r["max_s"]:.4f} | {rate:,.0f} | {r["reps"]} '
      f'| {f"{s:.2f}x" if s else ""} |'
    )
  return '\n'.join(rows)


def main(argv):
  del argv
  if FLAGS.shape in REAL_SHAPES and jax.devices()[0].platform == 'cpu':
    raise SystemExit(
      f'bench: --shape={FLAGS.shape} is a real model size for accelerators (GPU / TPU); on CPU '
      'use bench-small or bench-tiny'
    )
  if FLAGS.peer == 'torch':
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
  sizes = [int(x) for x in FLAGS.mesh.split(',')]
  mesh = shd.make_mesh(*sizes)
  peak = peak_flops(FLAGS.peak_tflops) if FLAGS.dtype == 'bfloat16' else None
  records = []
  for arch in FLAGS.arch:
    if FLAGS.shape in REAL_SHAPES and not FLAGS.shape.startswith(arch):
      continue
    cfg = model_config(FLAGS.shape, arch, FLAGS.dtype).replace(remat=FLAGS.remat)
    ctx = BenchContext(
      FLAGS.shape, arch, cfg, FLAGS.peer, FLAGS.seed, mesh, FLAGS.batch, FLAGS.seq_len
    )
    for name in FLAGS.workloads:
      for rec in run_workload(
        name,
        ctx,
        warmup=FLAGS.warmup,
        min_reps=FLAGS.min_reps,
        max_reps=FLAGS.max_reps,
        min_time=FLAGS.min_time,
        peak=peak,
      ):
        line = json.dumps(rec)
        print(line, flush=True)
        if FLAGS.out and jax.process_index() == 0:
          with open(FLAGS.out, 'a') as fh:
            fh.write(line + '\n')
        records.append(rec)
  print(format_table(records), file=sys.stderr)


if __name__ == '__main__':
  # Run the module as imported under its own name, so that every workload block below (appended
  # after this guard) is registered before main starts.
  from ilr_jax import bench as _bench

  _bench.define_flags()
  app.run(_bench.main)


# -- workloads (append new ones below, one block each) ------------------------------------------


@workload('sft_step')
def _sft_step(ctx: BenchContext) -> Case:
  return _sft_case(ctx, lora_rank=0)


@workload('sft_step_lora')
def _sft_step_lora(ctx: BenchContext) -> Case:
  return _sft_case(ctx, lora_rank=64)


@workload('dpo_step')
def _dpo_step(ctx: BenchContext) -> Case:
  return _dpo_case(ctx, lora_rank=0)


@workload('dpo_step_lora')
def _dpo_step_lora(ctx: BenchContext) -> Case:
  return _dpo_case(ctx, lora_rank=64)


# -- evaluator workloads: classify_batched, classify_single, pair_scorer (evaluator.py) ----------


def _evaluator_setup(ctx: BenchContext):
  """A random 2-class evaluator (JAX scorer and, with --peer=torch, transformers' model) and 64
  random prompts of 192 tokens (BENCH.md: classify_*); --batch sets prompts per batch."""
  import logging

  from ilr_jax import evaluator
  from ilr_jax.tokens import Tokenizer

  # The scorer logs its throughput on every call; the harness reports timings itself.
  logging.getLogger(evaluator.__name__).setLevel(logging.WARNING)
  # pad id 0 never occurs in the prompts (ids in [3, vocab)), so HF reads the last token too.
  cfg = ctx.cfg.replace(num_labels=2, pad_token_id=0)
  batch, t, n = ctx.batch or 16, ctx.seq_len or 192, 64
  tokens = ctx.tokens(n, t)
  tok = Tokenizer(
    encode=list,
    decode=str,
    bos_id=1,
    eos_id=2,
    pad_id=0,
    vocab_size=cfg.vocab_size,
    source='bench',
  )
  model = shd.create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(ctx.seed)), ctx.mesh)
  scorer = evaluator.EvaluatorScorer(model, tok, batch_size=batch // 2, bucket=t, progress=False)
  torch_cls = None
  if ctx.peer == 'torch':
    import torch
    import transformers

    torch.manual_seed(ctx.seed)
    hf_cfg = transformers.AutoConfig.for_model(**convert.hf_config_dict(cfg))
    dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[cfg.param_dtype]
    torch_cls = transformers.AutoModelForSequenceClassification.from_config(hf_cfg, dtype=dtype)
    torch_cls.to(torch_device()).eval()
  fields = {'prompts': n, 'seq_len': t, 'batch': batch}
  flops = forward_flops(cfg, n * t, t, 0)
  return scorer, torch_cls, tokens, batch, fields, flops


def _torch_classify(model, ids_BT):
  import torch

  with torch.inference_mode():
    ids = torch.as_tensor(ids_BT, dtype=torch.long, device=torch_device())
    return torch.softmax(model(input_ids=ids).logits.float(), dim=-1)


@workload('classify_batched')
def _classify_batched(ctx: BenchContext) -> Case:
  scorer, torch_cls, tokens, batch, fields, flops = _evaluator_setup(ctx)
  n, t = tokens.shape
  mask = np.ones((batch, t), np.int32)
  placed = [(scorer.place(tokens[s : s + batch]), scorer.place(mask)) for s in range(0, n, batch)]

  def jax_fn():
    return [jax.nn.softmax(scorer.classify(x, m), axis=-1) for x, m in placed]

  torch_fn = None
  if torch_cls is not None:

    def torch_fn():
      return [_torch_classify(torch_cls, tokens[s : s + batch]) for s in range(0, n, batch)]

  return Case(jax_fn, torch_fn, n, 'items', flops, fields)


@workload('classify_single')
def _classify_single(ctx: BenchContext) -> Case:
  scorer, torch_cls, tokens, _, fields, flops = _evaluator_setup(ctx)
  n, t = tokens.shape
  mask = np.ones((1, t), np.int32)
  placed_mask = scorer.place(mask)
  placed = [scorer.place(tokens[i : i + 1]) for i in range(n)]

  def jax_fn():
    return [jax.nn.softmax(scorer.classify(x, placed_mask), axis=-1) for x in placed]

  torch_fn = None
  if torch_cls is not None:

    def torch_fn():
      return [_torch_classify(torch_cls, tokens[i : i + 1]) for i in range(n)]

  return Case(jax_fn, torch_fn, n, 'items', flops, {**fields, 'batch': 1})


@workload('pair_scorer')
def _pair_scorer(ctx: BenchContext) -> Case:
  """The two-order pair scorer on 32 pairs (the 64 prompts: first and second orders), host-side
  bucketing included, against the released code's loop: one prompt per PyTorch call."""
  scorer, torch_cls, tokens, _, fields, flops = _evaluator_setup(ctx)
  pairs = tokens.shape[0] // 2
  firsts, seconds = [list(r) for r in tokens[:pairs]], [list(r) for r in tokens[pairs:]]

  def jax_fn():
    return scorer.score_ids(firsts, seconds)

  torch_fn = None
  if torch_cls is not None:

    def torch_fn():
      out = np.zeros(pairs)
      for i in range(pairs):
        p_ab = _torch_classify(torch_cls, tokens[i : i + 1])[0].cpu().numpy()
        p_ba = _torch_classify(torch_cls, tokens[pairs + i : pairs + i + 1])[0].cpu().numpy()
        out[i] = 0.5 * (p_ab[1] + p_ba[0])
      return out

  return Case(jax_fn, torch_fn, pairs, 'items', flops, {**fields, 'pairs': pairs})


# -- generation workloads: generate_greedy, generate_sample, generate_beam4 (sampler.py) --------
# One timed call decodes a batch of random prompts (prefill included) to exactly --seq_len new
# tokens (default 64, as long as the prompts) on both sides: ours with no stop token, transformers'
# `generate` with min_new_tokens = max_new_tokens. On an accelerator each record also carries the
# memory-bandwidth bound of the decode steps (weights plus the mean KV cache read once per step):
# tokens_per_s / bw_bound_tokens_per_s is the fraction of the bound reached.

# HBM bandwidth in bytes/s by device kind (substring of jax's device_kind).
HBM_BYTES_PER_S = {'H100': 3.35e12, 'H200': 4.8e12, 'A100': 2.0e12}


def _decode_bound(cfg: ModelConfig, prompts: int, rows: int, prompt: int, new: int) -> float | None:
  """New tokens/s (of the prompts) if each decode step only read the weights and the mean KV
  cache of its rows once from memory."""
  kind = jax.devices()[0].device_kind
  bw = next((v for k, v in HBM_BYTES_PER_S.items() if k in kind), None)
  if bw is None or jax.devices()[0].platform == 'cpu':
    return None
  itemsize = jnp.dtype(cfg.dtype).itemsize
  d, f, n, k, h, layers = (
    cfg.hidden_size,
    cfg.intermediate_size,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.num_layers,
  )
  weights = layers * (2 * d * n * h + 2 * d * k * h + 3 * d * f) + d * cfg.vocab_size
  cache = 2 * layers * rows * (prompt + new / 2) * k * h
  return prompts / ((weights + cache) * itemsize / bw)


def _generate_case(ctx: BenchContext, method, prompts: int) -> Case:
  from ilr_jax import sampler as sampler_lib

  b, p = ctx.batch or prompts, ctx.seq_len or 64
  m = p
  tokens = ctx.tokens(b, p)
  mask = np.ones((b, p), np.int32)
  sampler = sampler_lib.Sampler(_jax_model(ctx, 0), mesh=ctx.mesh)
  beam = isinstance(method, sampler_lib.BeamSearch)

  def jax_fn():
    # Tokens only, as transformers' `generate` returns them (it computes no log-probs unless
    # output_scores=True); beam search scores its beams either way.
    return sampler(tokens, mask, method, max_new_tokens=m, stop_ids=(), scores=False).tokens

  torch_fn = None
  if ctx.peer == 'torch':
    import torch

    tm = torch_model(ctx).eval()
    ids = torch.as_tensor(tokens, dtype=torch.long, device=torch_device())
    am = torch.ones_like(ids)
    if isinstance(method, sampler_lib.Sample):
      kw = dict(do_sample=True, temperature=method.temperature, top_k=0, top_p=method.top_p)
    elif beam:
      kw = dict(
        do_sample=False,
        num_beams=method.num_beams,
        length_penalty=method.length_penalty,
        early_stopping=method.early_stopping,
      )
    else:
      kw = dict(do_sample=False)

    def torch_fn():
      with torch.inference_mode():
        return tm.generate(
          ids, attention_mask=am, max_new_tokens=m, min_new_tokens=m, pad_token_id=0, **kw
        )

  rows = b * (method.num_beams if beam else 1)
  flops = forward_flops(ctx.cfg, rows * (p + m), p + m, rows * m)
  fields = {'prompts': b, 'prompt_len': p, 'new_tokens': m, 'rows': rows}
  bound = _decode_bound(ctx.cfg, b, rows, p, m)
  if bound:
    fields['bw_bound_tokens_per_s'] = bound
  return Case(jax_fn, torch_fn, b * m, 'tokens', flops, fields)


@workload('generate_greedy')
def _generate_greedy(ctx: BenchContext) -> Case:
  from ilr_jax.sampler import Greedy

  return _generate_case(ctx, Greedy(), 16)


@workload('generate_sample')
def _generate_sample(ctx: BenchContext) -> Case:
  from ilr_jax.sampler import Sample

  return _generate_case(ctx, Sample(temperature=0.7, top_k=0, top_p=1.0), 16)


@workload('generate_sample_top_p')
def _generate_sample_top_p(ctx: BenchContext) -> Case:
  # Not in BENCH.md: generate_sample with top-p 0.9, a common setting, whose filter is the one
  # step of token choice that could need a sort of the vocabulary (ours bisects instead).
  from ilr_jax.sampler import Sample

  return _generate_case(ctx, Sample(temperature=0.7, top_k=0, top_p=0.9), 16)


@workload('generate_beam4')
def _generate_beam4(ctx: BenchContext) -> Case:
  from ilr_jax.sampler import BeamSearch

  return _generate_case(ctx, BeamSearch(num_beams=4, length_penalty=1.0), 4)
