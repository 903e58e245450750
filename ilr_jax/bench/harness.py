"""The benchmark harness: shapes, the workload registry, model FLOPs, interleaved timing, records.

Rules (docs/BENCH.md): random init with a fixed seed, random token ids in [3, vocab), float32
unless --dtype says otherwise, 2 untimed warm-up calls per backend, then timed calls interleaved
between the backends (jax, torch, jax, torch, ...), at least --min_reps each and more until
--min_time seconds are timed, at most --max_reps; every timed JAX call ends in block_until_ready.
Interleaving is what makes a ratio meaningful on a shared machine: both backends see the same
load, so only ratios measured in one run are compared.

MFU (accelerators only, --dtype=bfloat16): model FLOPs per call / median time / the device's
dense bf16 peak (PEAK_FLOPS, or --peak_tflops). Model FLOPs (`train_flops`) count matmuls only:
2 x (layer matmul parameters) per token forward, 2 x D x V per position whose logits are taken,
and causal attention 2 x 2 x L x N x H x T / 2 per token; a training step is 3x the forward
(backward 2x) for full fine-tuning, 2x for LoRA (no weight gradients of the frozen base; the
adapter's own FLOPs are counted 3x), plus 1x for a DPO reference forward.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from ilr_jax import lora as lora_lib
from ilr_jax import presets
from ilr_jax import sharding as shd
from ilr_jax.model import Decoder, ModelConfig
from ilr_jax.testing import random_model

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


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  """(fan in, fan out) of each of a layer's seven projections (model.LORA_TARGETS)."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {
    'q': (d, q),
    'k': (d, kv),
    'v': (d, kv),
    'o': (q, d),
    'gate': (d, f),
    'up': (d, f),
    'down': (f, d),
  }


def layer_matmul_params(cfg: ModelConfig) -> int:
  """The weights one layer multiplies each token by (its projections' kernels)."""
  return sum(a * b for a, b in projection_shapes(cfg).values())


def forward_flops(cfg: ModelConfig, tokens: int, seq_len: int, logit_positions: int) -> float:
  """Matmul FLOPs of a forward pass over `tokens` tokens in sequences of `seq_len`."""
  attn = 2 * 2 * cfg.num_heads * cfg.head_dim * seq_len / 2
  per_token = cfg.num_layers * (2 * layer_matmul_params(cfg) + attn)
  return tokens * per_token + 2 * cfg.hidden_size * cfg.vocab_size * logit_positions


def lora_params_per_layer(cfg: ModelConfig, rank: int) -> int:
  """Adapter parameters of one layer with every projection adapted at rank `rank`."""
  return sum(rank * (a + b) for a, b in projection_shapes(cfg).values())


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
    from ilr_jax.bench import torch_peer

    fns['torch'] = (case.torch_fn, lambda _: torch_peer.sync())
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


def jax_model(ctx: BenchContext, lora_rank: int = 0) -> Decoder:
  """The JAX model of a workload: random weights (seeded), with a fresh rank-`lora_rank` adapter
  of alpha 2 x rank when asked (docs/BENCH.md)."""
  if ctx.shape in REAL_SHAPES:
    # Billions of parameters: initialise on the accelerators, already sharded.
    model = shd.create_sharded(lambda: Decoder(ctx.cfg, rngs=nnx.Rngs(ctx.seed)), ctx.mesh)
  else:
    # Drawn on the host: compiling an initialiser would dominate small CPU runs.
    model = random_model(ctx.cfg, ctx.mesh, ctx.seed)
  if lora_rank:
    model = lora_lib.add_lora(model, lora_rank, 2.0 * lora_rank, 'all', rng=ctx.seed)
  return model


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
