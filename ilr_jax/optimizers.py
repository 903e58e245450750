"""Optimizers and learning-rate schedules, as the released HF Trainer code uses them.

Optimizers match PyTorch's: adamw (torch.optim.AdamW), adafactor (HF with an explicit lr: no
parameter scaling, no relative step), rmsprop (torch.optim.RMSprop: decay 0.99, eps outside the
square root). The schedule is HF's linear warmup over ceil(warmup_ratio x steps) steps then cosine
(or linear, or constant) decay to 0, with lr 0 at the first update as in HF.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# `cfg` below is a train.TrainConfig (read for its optimizer fields; not imported, since train.py
# imports this module).
TrainConfig = Any

Array = jax.Array

OPTIMIZERS = ('adamw', 'adafactor', 'rmsprop')
SCHEDULES = ('cosine', 'linear', 'constant')


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
  return math.ceil(cfg.warmup_ratio * total_steps)


def schedule_value(cfg: TrainConfig, step, warmup, total) -> Array:
  """HF's schedule at `step`: lr x step / warmup, then cosine / linear decay to 0 (or constant).

  `warmup` and `total` may be traced: the train step reads them from the optimizer state, so fits
  of different lengths share one compiled step (and the persistent compilation cache).
  """
  s = jnp.asarray(step, jnp.float32)
  warm = jnp.asarray(warmup, jnp.float32)
  decay_steps = jnp.maximum(1.0, jnp.asarray(total, jnp.float32) - warm)
  progress = jnp.clip((s - warm) / decay_steps, 0.0, 1.0)
  if cfg.schedule == 'cosine':
    after = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  elif cfg.schedule == 'linear':
    after = 1.0 - progress
  else:
    after = jnp.ones_like(progress)
  return cfg.lr * jnp.where(s < warm, s / jnp.maximum(1.0, warm), after)


def make_schedule(cfg: TrainConfig, total_steps: int) -> Callable[[Array], Array]:
  """The schedule of a run of `total_steps` updates as a function of the step."""
  warm = warmup_steps(cfg, total_steps)
  return lambda step: schedule_value(cfg, step, warm, total_steps)


class ScheduleState(NamedTuple):
  """State of `scale_by_schedule`: the update count and the run's schedule lengths (arrays, so
  the compiled step does not depend on the run's length)."""

  count: Array  # int32 []
  warmup: Array  # int32 []
  total: Array  # int32 []


def scale_by_schedule(
  cfg: TrainConfig, total_steps: int, flip_sign: bool = True
) -> optax.GradientTransformation:
  """Scale updates by the schedule's lr (negated, for descent, with `flip_sign`)."""
  warm = warmup_steps(cfg, total_steps)
  sign = -1.0 if flip_sign else 1.0

  def init(params):
    del params
    return ScheduleState(
      jnp.zeros((), jnp.int32), jnp.asarray(warm, jnp.int32), jnp.asarray(total_steps, jnp.int32)
    )

  def update(updates, state, params=None):
    del params
    lr = schedule_value(cfg, state.count, state.warmup, state.total)
    updates = jax.tree.map(lambda u: (sign * lr).astype(u.dtype) * u, updates)
    return updates, state._replace(count=state.count + 1)

  return optax.GradientTransformation(init, update)


def current_lr(cfg: TrainConfig, opt_state) -> Array:
  """The lr the next update of `opt_state` will use (for metrics)."""
  found = [
    x
    for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ScheduleState))
    if isinstance(x, ScheduleState)
  ]
  (sched,) = found
  return schedule_value(cfg, sched.count, sched.warmup, sched.total)


def _decay_mask(params):
  # No weight decay on norm scales (HF excludes LayerNorm weights and biases).
  def one(var):
    if not isinstance(var, nnx.Variable):
      return True
    names = var.get_metadata().get('out_sharding') or ()
    return 'norm' not in names

  return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  """The optax chain: global-norm clipping, then the optimizer with the schedule.

  The optimizers are optax's (adamw, adafactor, rmsprop) built from their parts, with the lr
  scaling replaced by `scale_by_schedule` at the same place in the chain.
  """
  wd = cfg.weight_decay
  lr = scale_by_schedule(cfg, total_steps)
  if cfg.optimizer == 'adamw':
    parts = [
      optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps),
      optax.add_decayed_weights(wd, _decay_mask),
      lr,
    ]
  elif cfg.optimizer == 'adafactor':
    # optax.adafactor(multiply_by_parameter_scale=False): rms scaling, block-rms clipping, lr,
    # then the (lr-free) weight decay and the sign flip.
    parts = [
      optax.scale_by_factored_rms(),
      optax.clip_by_block_rms(1.0),
      scale_by_schedule(cfg, total_steps, flip_sign=False),
    ]
    if wd:
      parts.append(optax.add_decayed_weights(wd, _decay_mask))
    parts.append(optax.scale(-1.0))
  else:
    # torch's RMSprop adds the (coupled) decay to the gradient.
    parts = [optax.add_decayed_weights(wd, _decay_mask)] if wd else []
    parts += [optax.scale_by_rms(decay=cfg.rmsprop_decay, eps=cfg.eps, eps_in_sqrt=False), lr]
  if cfg.clip_norm is not None:
    parts.insert(0, optax.clip_by_global_norm(cfg.clip_norm))
  return optax.chain(*parts)
