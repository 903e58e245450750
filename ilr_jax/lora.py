"""LoRA adapters on the decoder: add a fresh one, merge it into the base, split trainable/frozen.

The adapter lives in the model itself (model.Linear creates `lora_a` [.., in, R] and `lora_b`
[R, ..out] as `nnx.LoRAParam` when `cfg.lora_rank > 0`), so a LoRA model is an ordinary Decoder
whose config names the rank, alpha and targets. The layer computes W x + (alpha / R) B(A x).

  * `add_lora(model, rank, alpha, targets, rng)`: the same base parameters (the arrays are reused,
    not copied) plus a fresh adapter: A from PEFT's kaiming_uniform(a=sqrt(5)), i.e.
    U(+-1/sqrt(fan_in)), B zero, so the new model's outputs equal the base model's. The adapter
    is created already sharded.
  * `merge_lora(model)`: W + (alpha / R) A @ B for every adapted kernel; the result has
    `lora_rank=0` and exports to Hugging Face like any base model.
  * `trainable_filter(cfg)` / `split_trainable(model)`: with an adapter only the LoRAParams train
    and the base is frozen (it is not held in optimizer state); without one every Param trains.

Continuing from an earlier adapter (DPO continues the previous round's policy) needs nothing
special: pass the LoRA model itself to `fit.fit`, which trains the adapter it already has. A saved
adapter comes back with `fit.load_params(base_model, path)`, which adds it to a base model.

Dropout on the adapter input is not implemented: `check_dropout` rejects a rate other than 0 (the
paper uses none), rather than silently training without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ilr_jax import sharding as shd
from ilr_jax.model import LORA_TARGETS, Decoder, lora_a_bound

LORA_NAMES = ('lora_a', 'lora_b')


def resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
  """'all' (the paper's choice) or a list of LORA_TARGETS names -> a tuple of names."""
  if isinstance(targets, str):
    if targets == 'all':
      return LORA_TARGETS
    targets = [t.strip() for t in targets.split(',') if t.strip()]
  targets = tuple(targets)
  bad = sorted(set(targets) - set(LORA_TARGETS))
  if bad or not targets:
    raise ValueError(f"LoRA targets {bad or '()'} invalid; use 'all' or names from {LORA_TARGETS}")
  return targets


def check_dropout(rate: float) -> None:
  """LoRA dropout is not implemented; only 0 (the paper's setting) is accepted."""
  if rate != 0.0:
    raise ValueError(f'lora_dropout={rate} is not supported; only 0 is (the paper uses no dropout)')


def trainable_filter(cfg) -> type[nnx.Variable]:
  """What trains: the LoRA parameters when the model has an adapter, else every parameter."""
  return nnx.LoRAParam if cfg.lora_rank else nnx.Param


def split_trainable(model: Decoder) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable, frozen) states; `nnx.merge(graphdef, trainable, frozen)` rebuilds it."""
  return nnx.split(model, trainable_filter(model.cfg), ...)


def add_lora(
  model: Decoder,
  rank: int,
  alpha: float,
  targets: str | Sequence[str] = 'all',
  rng: int = 0,
  *,
  mesh=None,
  rules=shd.TRAIN_RULES,
) -> Decoder:
  """A new Decoder: `model`'s base parameters plus a fresh rank-`rank` adapter on `targets`.

  Args:
    model: a base model (no adapter; merge an existing one first).
    rank, alpha: the adapter's rank R and alpha (scale alpha / R).
    targets: 'all' or names from model.LORA_TARGETS.
    rng: seed of the adapter's A matrices (numpy, drawn on the host).
    mesh: where the adapter is created (default: the mesh the base parameters live on).
  Returns:
    the LoRA model; its outputs equal the base model's until B moves away from zero.
  """
  if model.cfg.lora_rank:
    raise ValueError(
      f'the model already has a rank-{model.cfg.lora_rank} adapter; merge_lora it first'
    )
  if rank <= 0:
    raise ValueError(f'LoRA rank must be > 0, got {rank}')
  cfg = model.cfg.replace(
    lora_rank=int(rank), lora_alpha=float(alpha), lora_targets=resolve_targets(targets)
  )
  mesh = shd.model_mesh(model, mesh)

  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_lora, _ = nnx.split(abstract, nnx.LoRAParam, ...)
  shardings = shd.state_shardings(abstract_lora, mesh, rules)
  # Drawn on the host: A ~ U(+-1/sqrt(fan_in)) as model.Linear and PEFT do, B = 0, then each
  # array is placed straight into its sharding (every process draws the same values, so this
  # holds on multi-host slices too; no initialiser is compiled).
  gen = np.random.default_rng(rng)
  flat_sh = dict(nnx.to_flat_state(shardings))
  out = {}
  for path, var in nnx.to_flat_state(abstract_lora):
    if path[-1] == 'lora_a':
      lead = 1 if (var.get_metadata().get('out_sharding') or (None,))[0] == 'layers' else 0
      bound = lora_a_bound(math.prod(var.shape[lead:-1]))
      value = gen.uniform(-bound, bound, var.shape).astype(np.float32)
    else:
      value = np.zeros(var.shape, np.float32)
    out[path] = var.replace(shd.put(value.astype(var.dtype), flat_sh[path]))
  lora_state = nnx.from_flat_state(out)
  return nnx.merge(graphdef, lora_state, nnx.state(model))


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """kernel + scale * A @ B for kernel lead+in+out, A lead+in+(R,), B lead+(R,)+out."""
  n_lead = (a.ndim - 1) + (b.ndim - 1) - kernel.ndim
  lead = kernel.shape[:n_lead]
  rank = a.shape[-1]
  a2 = a.astype(jnp.float32).reshape(lead + (-1, rank))
  b2 = b.astype(jnp.float32).reshape(lead + (rank, -1))
  delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)
  return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merge_lora(model: Decoder, *, mesh=None, rules=shd.TRAIN_RULES) -> Decoder:
  """The base model with the adapter folded into its kernels (`lora_rank=0`), for export."""
  cfg = model.cfg
  if not cfg.lora_rank:
    raise ValueError('the model has no LoRA adapter to merge')
  new_cfg = cfg.replace(lora_rank=0, lora_alpha=0.0)
  mesh = shd.model_mesh(model, mesh)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(new_cfg, rngs=nnx.Rngs(0))))
  shardings = shd.state_shardings(abstract, mesh, rules)
  scale = cfg.lora_scale

  def merge(state):
    flat = dict(nnx.to_flat_state(state))
    out = {}
    for path, var in flat.items():
      if path[-1] in LORA_NAMES:
        continue
      lora_a = flat.get(path[:-1] + ('lora_a',))
      if path[-1] == 'kernel' and lora_a is not None:
        lora_b = flat[path[:-1] + ('lora_b',)]
        var = var.replace(merged_kernel(var[...], lora_a[...], lora_b[...], scale))
      out[path] = var
    return nnx.from_flat_state(out)

  state = jax.jit(merge, out_shardings=shardings)(nnx.state(model))
  return nnx.merge(graphdef, state)
