"""Ahead-of-time fit check: will a config's jitted steps fit the memory of the hardware it names?

  python -m ilr_jax.compile_check --config=configs/gsm8k.py:ilr --target=v4-8
  python -m ilr_jax.compile_check --config=configs/bird.py:ilr --target=v5e-64 --json=out.json
  python -m ilr_jax.compile_check --config=configs/gsm8k.py:ilr --target=h100x1   # an estimate

Every jitted program the config runs is built on abstract inputs (jax.ShapeDtypeStruct; no weight
is ever allocated) at its worst case shapes: the SFT steps of the supervisor and the student and the
DPO step at their batch and max_len (targets bounded as fit.py bounds them, by max_new_tokens),
the evaluator's train step and its scoring forward at evaluator_train.max_len, and the sampler's
prefill and decode of each decoding the config uses (beam search, sampling with its samples per
prompt) at sampling.batch_size prompts of the longest prompt bucket that leaves room for
max_new_tokens in sft.max_len. Then, per target:

  TPU (v4-8, v4-32, v5e-64, v5p-8): compiled for real by XLA:TPU against a topology description,
    the way MaxText's train_compile.py does from a CPU host (needs `pip install .[aot]`, i.e.
    libtpu; no TPU is needed). Per-device bytes come from the compiled program's
    memory_analysis(): arguments + outputs - aliased (donated) + temporaries + code.
  GPU (h100x1, h100x8): AOT compilation for a GPU needs a GPU, so these are ANALYTIC ESTIMATES:
    the shard sizes of every argument from jax.eval_shape and the shardings (parameters,
    optimizer state, the KV cache), plus activations at the model's remat policy and the logits
    (see `_activation_bytes`). The verdict says 'estimate'.
  cpu: compiled by XLA:CPU on this machine's devices (a cheap end-to-end check of the tool).

A decode program also counts the model the pipeline holds while it decodes (the training-sharded
base the Sampler merged its copy from). The verdict is 'fits' below 90% of the device's memory
(XLA and the runtime need the rest), else 'does not fit'.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags

GIB = 1 << 30
HEADROOM = 0.9  # a program fits when it needs at most this fraction of a device's memory


@dataclasses.dataclass(frozen=True)
class Target:
  """Hardware: how many devices, the memory of each, and how to get its devices."""

  name: str
  platform: str  # 'tpu' (compiled), 'gpu' (estimated), 'cpu' (compiled here)
  num_devices: int
  memory_bytes: int  # per device
  topology: str = ''  # TPU: topology name for get_topology_desc
  chip_config: str = 'default'
  chips_per_host: tuple[int, int, int] = (2, 2, 1)
  what: str = ''


TARGETS = {
  t.name: t
  for t in (
    Target('v4-8', 'tpu', 4, 32 * GIB, 'v4:2x2x1', 'megacore', what='TPU v4, 4 chips, 1 host'),
    Target('v4-32', 'tpu', 16, 32 * GIB, 'v4:2x2x4', 'megacore', what='TPU v4, 16 chips, 4 hosts'),
    Target('v5e-64', 'tpu', 64, 16 * GIB, 'v5e:8x8', what='TPU v5e, 64 chips, 16 hosts'),
    Target('v5p-8', 'tpu', 4, 95 * GIB, 'v5p:2x2x1', 'megacore', what='TPU v5p, 4 chips, 1 host'),
    Target('h100x1', 'gpu', 1, 80 * 10**9, what='1 x H100 80 GB'),
    Target('h100x8', 'gpu', 8, 80 * 10**9, what='8 x H100 80 GB, one host'),
    Target('cpu', 'cpu', 0, 0, what="this machine's CPU devices"),
  )
}


@dataclasses.dataclass
class Program:
  """One jitted step at its worst case shapes, and what it needs per device."""

  name: str
  role: str
  shape: str  # the batch shape, in words
  bytes_per_device: int = 0
  resident_bytes: int = 0  # held by the pipeline beside the program's own arguments
  detail: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def total(self) -> int:
    return self.bytes_per_device + self.resident_bytes


# -- the programs of a config ----------------------------------------------------------------------


@dataclasses.dataclass
class Step:
  """A jitted function with its abstract arguments, ready to compile or to estimate."""

  prog: Program
  fn: Any  # the jax.jit function
  args: tuple
  kind: str  # 'train', 'score', 'prefill', 'decode'
  mcfg: Any  # the model's ModelConfig
  shardings: Any  # train/score: the TrainState shardings; prefill/decode: parameter shardings
  resident: int = 0  # bytes per device the pipeline holds beside this program


def _model_cfg(config, role: str, **overrides):
  from ilr_jax import presets

  m = config[role]
  return presets.get_preset(
    m.preset, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, **overrides
  )


def _abstract_model(cfg):
  from flax import nnx

  from ilr_jax.model import Decoder

  return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def _plain(tree):
  """An nnx abstract state as a pytree of ShapeDtypeStructs (what jit sees of a state)."""
  import jax
  from flax import nnx

  return jax.tree.map(
    lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
    tree,
    is_leaf=lambda x: isinstance(x, (nnx.Variable, jax.ShapeDtypeStruct)),
  )


def prompt_len(config) -> int:
  """The longest prompt bucket (generate.DEFAULT_BUCKETS) that leaves max_new_tokens room in
  sft.max_len: the longest prompts a run of this config decodes."""
  from ilr_jax import generate

  room = config.sft.max_len - config.task.max_new_tokens
  fitting = [b for b in generate.DEFAULT_BUCKETS if b <= room]
  if not fitting:
    raise ValueError(f'sft.max_len={config.sft.max_len} leaves no room for a prompt')
  return fitting[-1]


def _train_steps(config, mesh, name, role, loss, tcfg, num_labels=None, lora=None) -> list[Step]:
  """The train step of one fit (and, for the evaluator, its scoring forward)."""
  import jax
  import jax.numpy as jnp

  from ilr_jax import examples, train
  from ilr_jax import lora as lora_lib
  from ilr_jax import sharding as shd
  from ilr_jax.context import train_config

  cfg = train_config(tcfg, 0, config.fit)
  rank, alpha = lora if lora is not None else (cfg.lora_rank, cfg.lora_alpha)
  cfg = cfg.replace(lora_rank=rank, lora_alpha=alpha)
  overrides = dict(num_labels=num_labels) if num_labels else {}
  if rank:
    overrides.update(lora_rank=rank, lora_alpha=alpha)
  mcfg = _model_cfg(config, role, **overrides)
  tx = train.make_optimizer(cfg, total_steps=1000)
  graphdef, params, frozen = lora_lib.split_trainable(_abstract_model(mcfg))
  opt = jax.eval_shape(tx.init, params)
  state_sh = train.TrainState(
    step=shd.replicated(mesh),
    params=shd.state_shardings(params, mesh),
    frozen=shd.state_shardings(frozen, mesh),
    opt_state=shd.state_shardings(opt, mesh),
  )
  train_step, eval_step, _ = train.jit_steps(graphdef, loss, cfg, tx, state_sh, mesh)
  b, t = cfg.global_batch, cfg.max_len
  shards = shd.batch_size_multiple(mesh)
  if (cfg.micro_batch or b) % shards:
    raise ValueError(
      f'{name}: micro-batches of {cfg.micro_batch or b} rows cannot be split over the '
      f'{shards} batch shards of mesh {dict(mesh.shape)}'
    )
  batch = {}
  for key, ndim in examples.FORMATS[loss].items():
    shape = (b, t) if ndim == 2 else (b,)
    if cfg.accum_steps > 1:
      shape = (cfg.accum_steps, b // cfg.accum_steps) + shape[1:]
    batch[key] = jax.ShapeDtypeStruct(shape, jnp.float32 if key.startswith('ref_') else jnp.int32)
  bound = None if loss == 'classifier' else examples.target_bound(config.task.max_new_tokens, t)
  dyn = (jax.ShapeDtypeStruct((), jnp.int32), _plain(params), _plain(opt))
  frozen = _plain(frozen)
  what = f'{b} x {t}' + (f' in {cfg.accum_steps} micro-batches' if cfg.accum_steps > 1 else '')
  what += f', LoRA r{rank}' if rank else ', all parameters'
  out = [
    Step(
      Program(name, role, what),
      train_step.jitted,
      (dyn, frozen, batch, bound),
      'train',
      mcfg,
      state_sh,
    )
  ]
  if loss == 'classifier':
    # Scoring: the two answers of score_batch_size pairs through the classifier at max_len.
    sb = config.sampling.score_batch_size * 2
    sbatch = {
      k: jax.ShapeDtypeStruct((sb, t) if nd == 2 else (sb,), jnp.int32)
      for k, nd in examples.FORMATS[loss].items()
    }
    state = train.TrainState(dyn[0], dyn[1], frozen, dyn[2])
    out.append(
      Step(
        Program('evaluator scoring', role, f'{sb} x {t} forward'),
        eval_step.jitted,
        (state, sbatch, None),
        'score',
        mcfg,
        state_sh,
      )
    )
  return out


def _decode_steps(config, mesh, role: str, uses: Sequence[str], task) -> list[Step]:
  """Prefill and decode of each distinct decoding `role` runs, at the longest prompts."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from ilr_jax import sampler
  from ilr_jax import sharding as shd

  mcfg = _model_cfg(config, role)
  graphdef, params = nnx.split(_abstract_model(mcfg))
  # The model the pipeline holds while it decodes (training-sharded; the Sampler merges a copy).
  resident = sharded_bytes(_plain(params), shd.state_shardings(params, mesh))
  s = object.__new__(sampler.Sampler)  # a Sampler over abstract weights: nothing is placed
  s.mesh, s.rules, s.cfg, s.graphdef = mesh, shd.DECODE_RULES, mcfg, graphdef
  s.param_shardings = shd.state_shardings(params, mesh, shd.DECODE_RULES)
  s.params, s.head, s.head_sharding = _plain(params), None, None
  b, p = config.sampling.batch_size, prompt_len(config)
  out, seen = [], set()
  for use in uses:
    d = task.decoding[use]
    if use == 'dpo':  # the pipeline samples dpo.num_samples answers per DPO prompt
      d = dataclasses.replace(d, num_samples=config.dpo.num_samples)
    if d.method == 'beam':
      method, n, rows = sampler.BeamSearch(num_beams=d.num_beams), 1, d.num_beams
      raw = sampler._beam_prefill
    else:
      method, n, rows = sampler.Sample(temperature=d.temperature), d.num_samples, d.num_samples
      raw = sampler._sample_prefill
    if (d.method, rows) in seen:
      continue
    seen.add((d.method, rows))
    spec = sampler._Spec(method, d.max_new_tokens, n, tuple(mcfg.eos_token_ids), 0, False)
    prefill, decode = s._functions(spec, b, p)
    tok = jax.ShapeDtypeStruct((b, p), jnp.int32)
    pargs = (
      s.weights,
      tok,
      tok,
      jax.ShapeDtypeStruct((b,), jnp.int32),
      jax.ShapeDtypeStruct((), jnp.uint32),
    )
    state = jax.eval_shape(functools.partial(raw, graphdef, spec=spec), *pargs)
    what = d.method + ('' if rows == 1 else f' x{rows}')
    shape = f'{b} prompts x {p} tokens + {d.max_new_tokens} new'
    for kind, fn, args in (('prefill', prefill, pargs), ('decode', decode, (s.weights, state))):
      prog = Program(f'{kind} ({what}: {use})', role, shape)
      out.append(Step(prog, fn, args, kind, mcfg, s.param_shardings, resident))
  return out


def steps(config, mesh) -> list[Step]:
  """Every jitted program the config's methods run, at their worst case shapes."""
  from ilr_jax import methods as methods_lib
  from ilr_jax.context import make_task

  task = make_task(config.task.to_dict())
  run_methods = methods_lib.of_config(config)
  evaluator = any(m.uses_evaluator for m in run_methods)
  dpo = any(m.family == methods_lib.DPO for m in run_methods)
  out = _train_steps(config, mesh, 'supervisor SFT', 'supervisor', 'sft', config.supervisor_sft)
  out += _train_steps(config, mesh, 'student SFT', 'student', 'sft', config.sft)
  if dpo:
    lora = (config.sft.lora_rank, config.sft.lora_alpha)
    out += _train_steps(config, mesh, 'student DPO', 'student', 'dpo', config.dpo, lora=lora)
  if evaluator:
    out += _train_steps(
      config, mesh, 'evaluator train', 'evaluator', 'classifier', config.evaluator_train, 2
    )
  sup = ['label', 'eval'] + (['evaluator_data'] if evaluator else [])
  out += _decode_steps(config, mesh, 'supervisor', sup, task)
  out += _decode_steps(
    config, mesh, 'student', ['proposal', 'eval'] + (['dpo'] if dpo else []), task
  )
  return out


# -- meshes of a target ----------------------------------------------------------------------------


def tpu_devices(target: Target):
  """The devices of a TPU topology (libtpu, no TPU needed); a clear error without libtpu."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise RuntimeError(
      f'target {target.name} compiles with XLA:TPU: install libtpu (pip install -e ".[aot]")'
    ) from None
  import os

  from jax.experimental import topologies

  # Compiling needs no TPU, so several checks may load libtpu at once (it locks it otherwise).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  topo = topologies.get_topology_desc(
    platform='tpu',
    topology_name=target.topology,
    chip_config_name=target.chip_config,
    chips_per_host_bounds=target.chips_per_host,
    num_slices=1,
    wrap=(False, False, False),
  )
  return list(topo.devices)


def mesh_sizes(config, n: int) -> tuple[int, int, int]:
  """The (data, fsdp, tensor) sizes of the config's mesh over n devices; a mesh that cannot be
  made or does not split the batches is the pipeline's own one-line ConfigError."""
  from ilr_jax import schema, sharding

  schema._check_mesh(config, n)
  m = config.mesh
  return sharding.mesh_shape(m.data, m.fsdp, m.tensor, n)


def target_mesh(config, target: Target, estimate_only: bool = False):
  """A concrete mesh (compiled targets) or an AbstractMesh (estimated targets)."""
  import jax

  from ilr_jax import sharding as shd

  if target.platform == 'tpu' and not estimate_only:
    devices = tpu_devices(target)
    return shd.make_mesh(*mesh_sizes(config, len(devices)), devices=devices)
  if target.platform == 'cpu':
    return shd.make_mesh(*mesh_sizes(config, jax.device_count()))
  return jax.sharding.AbstractMesh(mesh_sizes(config, target.num_devices), shd.MESH_AXES)


# -- per-device bytes ------------------------------------------------------------------------------


def _leaf_bytes(x, sharding) -> int:
  import numpy as np

  shape = sharding.shard_shape(tuple(x.shape)) if sharding is not None else tuple(x.shape)
  return int(math.prod(shape)) * np.dtype(x.dtype).itemsize


def sharded_bytes(tree, shardings) -> int:
  """Per-device bytes of a pytree of ShapeDtypeStructs placed with a matching sharding pytree."""
  import jax

  leaves = jax.tree.leaves(tree)
  sh = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
  if len(sh) != len(leaves):
    raise ValueError(f'{len(leaves)} arrays but {len(sh)} shardings')
  return sum(_leaf_bytes(x, s) for x, s in zip(leaves, sh))


def compiled_bytes(fn, args) -> tuple[int, dict[str, int]]:
  """Compile `fn` on abstract `args`; per-device bytes from XLA's memory analysis."""
  import re

  import jax

  lowered = fn.lower(*args)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # XLA:TPU refuses a program that cannot fit, naming what it needed: that is the answer.
    found = re.search(r'required for HLO temporaries \(([\d.]+)([KMGT])\)', str(e))
    if 'RESOURCE_EXHAUSTED' not in str(e) or not found:
      raise
    need = int(float(found.group(1)) * 1024 ** ' KMGT'.index(found.group(2)))
    return need, {'temporaries alone (XLA: out of memory at compile time)': need}
  ma = compiled.memory_analysis()
  detail = {
    'arguments': int(ma.argument_size_in_bytes),
    'outputs': int(ma.output_size_in_bytes),
    'aliased': int(ma.alias_size_in_bytes),
    'temporaries': int(ma.temp_size_in_bytes),
    'code': int(ma.generated_code_size_in_bytes),
  }
  total = (
    detail['arguments']
    + detail['outputs']
    - detail['aliased']
    + detail['temporaries']
    + detail['code']
  )
  return total, detail


def _activation_bytes(mcfg, rows: int, t: int, targets: int, remat: str, tensor: int) -> int:
  """Activations of a train step per device (rows = local micro-batch rows). Saved for the
  backward pass: with remat 'full' each layer's input [rows, T, D]; 'dots' adds the matmul outputs;
  'none' every intermediate. Plus one layer's working set (attention scores in float32, its
  matmul outputs, twice for the backward) and the float32 logits at the target positions with their
  softmax and gradient (three [rows, targets, V] arrays)."""
  d, f, n, k, h = _dims(mcfg)
  a = 2 if mcfg.dtype in ('bfloat16', 'float16') else 4
  per_token = (n * h + 2 * k * h + n * h) // tensor + 3 * f // tensor + 2 * d
  layer_io = rows * t * d * a
  layer_all = rows * t * per_token * a
  scores = rows * (n // max(1, min(n, tensor))) * t * t * 4
  saved = {
    'full': layer_io,
    'dots': layer_io + layer_all,
    'none': layer_io + layer_all + 2 * scores,
  }
  working = 2 * (layer_all + 2 * scores)
  vocab = mcfg.num_labels or mcfg.vocab_size
  logits = 3 * rows * max(targets, 1) * vocab * 4 // (1 if mcfg.num_labels else tensor)
  return mcfg.num_layers * saved[remat] + working + logits


def estimate(step: Step, mesh) -> tuple[int, dict[str, int]]:
  """Analytic per-device bytes of a step (no compilation; see the module docstring)."""
  import jax

  from ilr_jax import sampler

  shards = mesh.shape['data'] * mesh.shape['fsdp']
  tensor = mesh.shape['tensor']
  mcfg, sh = step.mcfg, step.shardings
  if step.kind == 'train':
    dyn, frozen, batch, bound = step.args
    f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, 'float32'), dyn[1])
    leaf = batch[next(iter(batch))]
    micro, t = (leaf.shape[1], leaf.shape[2]) if leaf.ndim == 3 else leaf.shape
    rows = max(1, micro // shards) * (2 if 'chosen_tokens' in batch else 1)
    detail = {
      'trainable': sharded_bytes(dyn[1], sh.params),
      'frozen': sharded_bytes(frozen, sh.frozen),
      'optimizer': sharded_bytes(dyn[2], sh.opt_state),
      'gradients': sharded_bytes(f32, sh.params),
      'batch': sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(batch)) // shards,
      'activations': _activation_bytes(mcfg, rows, t, bound or 1, mcfg.remat, tensor),
    }
  elif step.kind == 'score':
    state, batch, _ = step.args
    leaf = batch['tokens']
    rows = max(1, leaf.shape[0] // shards)
    detail = {
      'weights': sharded_bytes(state.params, sh.params) + sharded_bytes(state.frozen, sh.frozen),
      'activations': _forward_bytes(mcfg, rows, leaf.shape[1], tensor),
    }
  else:
    weights = step.args[0][0]
    detail = {'weights': sharded_bytes(weights, sh)}
    if step.kind == 'decode':
      state = step.args[1]
      detail['decode state (KV cache)'] = sharded_bytes(
        state, sampler._state_shardings(mesh, state, mcfg.num_kv_heads)
      )
      rows = max(1, jax.tree.leaves(state.cache)[0].shape[0] // shards)
      detail['logits'] = 3 * rows * mcfg.vocab_size * 4
    else:
      tok = step.args[1]
      rows = max(1, tok.shape[0] // shards)
      detail['activations'] = _forward_bytes(mcfg, rows, tok.shape[1], tensor)
  return sum(detail.values()), detail


def _dims(mcfg) -> tuple[int, ...]:
  return (
    mcfg.hidden_size,
    mcfg.intermediate_size,
    mcfg.num_heads,
    mcfg.num_kv_heads,
    mcfg.head_dim,
  )


def _forward_bytes(mcfg, rows: int, t: int, tensor: int) -> int:
  """A forward pass without gradients: one layer's working set and the last position's logits."""
  d, f, n, k, h = _dims(mcfg)
  a = 2 if mcfg.dtype in ('bfloat16', 'float16') else 4
  per_token = (2 * n * h + 2 * k * h + 3 * f) // tensor + 2 * d
  return rows * t * per_token * a + rows * (n // tensor or 1) * t * t * 4 + rows * t * d * a


# -- the check -------------------------------------------------------------------------------------


def device_memory(target: Target) -> int:
  """Memory per device of a target (for 'cpu': this host's RAM over its devices)."""
  if target.platform != 'cpu':
    return target.memory_bytes
  import os

  import jax

  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // jax.device_count()


def check(config, target: Target, log=print, estimate_only: bool = False) -> dict[str, Any]:
  """Compile (or estimate) every step of `config` for `target`; a JSON-able summary."""
  import time

  estimate_only = estimate_only and target.platform != 'cpu'
  mesh = target_mesh(config, target, estimate_only)
  memory = device_memory(target)
  method = 'estimate' if target.platform == 'gpu' or estimate_only else 'compiled'
  rows = []
  for step in steps(config, mesh):
    t0 = time.perf_counter()
    if method == 'compiled':
      step.prog.bytes_per_device, step.prog.detail = compiled_bytes(step.fn, step.args)
    else:
      step.prog.bytes_per_device, step.prog.detail = estimate(step, mesh)
    step.prog.resident_bytes = step.resident
    p = step.prog
    fits = p.total <= HEADROOM * memory
    rows.append(
      dict(
        program=p.name,
        role=p.role,
        shape=p.shape,
        bytes_per_device=p.total,
        program_bytes=p.bytes_per_device,
        resident_bytes=p.resident_bytes,
        detail=p.detail,
        fits=fits,
        seconds=round(time.perf_counter() - t0, 1),
      )
    )
    log(
      f'{p.role:10s} {p.name:34s} {p.shape:44s} {p.total / GIB:8.2f} GiB '
      f'({100 * p.total / memory:5.1f}%) {"fits" if fits else "DOES NOT FIT"}'
      f'  [{time.perf_counter() - t0:.0f} s]'
    )
  worst = max(rows, key=lambda r: r['bytes_per_device'])
  fits = all(r['fits'] for r in rows)
  verdict = ('fits' if fits else 'does not fit') + (' (estimate)' if method == 'estimate' else '')
  return dict(
    target=target.name,
    hardware=target.what,
    devices=int(math.prod(mesh.shape.values())),
    mesh=dict(mesh.shape),
    memory_per_device=memory,
    method=method,
    verdict=verdict,
    worst_program=worst['program'],
    worst_bytes=worst['bytes_per_device'],
    programs=rows,
  )


def _define_flags() -> None:
  """The CLI's flags, defined only when run as a program: importing the module defines none, so
  it can share a process with ilr_jax.main (whose --config would clash)."""
  global _CONFIG, _TARGET, _JSON, _ESTIMATE
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/<task>.py:<method>[,switch]')
  _TARGET = flags.DEFINE_enum('target', None, sorted(TARGETS), 'the hardware to check against')
  _JSON = flags.DEFINE_string('json', None, 'also write the summary here')
  _ESTIMATE = flags.DEFINE_bool(
    'estimate', False, 'TPU targets: the analytic estimate instead of compiling (much faster)'
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from ilr_jax import schema

  target = TARGETS[_TARGET.value]
  try:
    schema.validate(_CONFIG.value) if target.platform == 'cpu' else None
    summary = check(_CONFIG.value, target, estimate_only=_ESTIMATE.value)
  except (schema.ConfigError, ValueError, RuntimeError) as e:
    sys.exit(f'ilr_jax.compile_check: {e}')
  gib = summary['worst_bytes'] / GIB
  print(
    f'{target.name} ({target.what}), mesh {summary["mesh"]}, '
    f'{summary["memory_per_device"] / GIB:.1f} GiB per device: {summary["verdict"]} '
    f'(largest: {summary["worst_program"]}, {gib:.2f} GiB per device, {summary["method"]})',
    flush=True,
  )
  if _JSON.value:
    from ilr_jax import workdir

    workdir.write_json(_JSON.value, summary)


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['config', 'target'])
  app.run(main)
