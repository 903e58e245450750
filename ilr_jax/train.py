"""Losses, optimizers, the train state and the pure train steps, jitted with explicit shardings.

Batches are dicts of right-padded arrays, batch dimension first, of the loss's format
(examples.FORMATS): sft reads tokens, mask, loss_mask (the loss at position t predicts tokens[t]
from position t - 1, for every t with loss_mask[t] = 1); dpo the chosen_ and rejected_ tokens,
mask, loss_mask and ref_chosen_logps, ref_rejected_logps (sums of the reference model's
target-token log-probs from `sequence_logps`, computed once per round, so no second model is held
while training); classifier tokens, mask and labels (the score head is read at the last real
token).
With gradient accumulation every field gets a leading axis: [A, M, ...] for A micro-batches of M.
Rows whose mask is all zero are padding: they weigh nothing (a short last batch is padded so).

Loss weighting. Each loss returns a sum over items and the count it is averaged over, so that A
accumulated micro-batches give exactly the gradient of one batch of A x M:
  sft, average='sequence' (the paper): mean over a sequence's target tokens, then mean over the
    sequences; average='token': mean over all target tokens of the batch.
  dpo: mean over pairs of the sigmoid loss -log s(b m)(1 - e) - log s(-b m) e (e label smoothing),
    m = (pi_c - ref_c) - (pi_r - ref_r) on summed log-probs; 'ipo' (m - 1 / 2b)^2 on log-probs
    averaged over each answer's tokens (as TRL); 'hinge' relu(1 - b m).
  classifier: mean cross-entropy over examples.
Logits are computed only where a loss is taken: with `max_targets` set, the hidden states of the
(at most max_targets) target positions of each row are gathered before the vocabulary projection,
so prompt positions never pay for it. Rows with more targets than max_targets would lose the rest;
callers pass a bound (fit.py derives it from the batch). The projection runs over chunks of
positions sized from a fixed logits budget (or `logits_chunk`), rematerialised in the backward
pass, so no [B, T, V] float32 buffer exists (logprobs.py).

The state is a pytree of the trainable parameters (the adapter under LoRA, else all), the frozen
ones (the base under LoRA; they are not in optimizer state), the optax state and the step. A train
step `(state, batch) -> (state, metrics)` is jitted once per Trainer with in/out shardings from
sharding.py and the state donated; metrics always hold loss, grad_norm (before clipping),
param_norm (of the trainable parameters after the update) and lr (the rate of this update).

Optimizers and schedules: optimizers.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ilr_jax import logprobs
from ilr_jax import lora as lora_lib
from ilr_jax import sharding as shd
from ilr_jax.examples import FORMATS, LOSSES, target_bound
from ilr_jax.model import LORA_TARGETS, Decoder
from ilr_jax.optimizers import OPTIMIZERS, SCHEDULES, current_lr, make_optimizer, make_schedule

Array = jax.Array

DPO_LOSSES = ('sigmoid', 'ipo', 'hinge')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything one training run needs besides the model and the data.

  Optimizer: `optimizer` in OPTIMIZERS, peak `lr`, `schedule` in SCHEDULES after a linear warmup
  of ceil(warmup_ratio x total steps), decoupled `weight_decay` (not on norm scales), `clip_norm`
  on the global gradient norm (None: off; HF's default is 1.0).
  Batching: `global_batch` sequences (or pairs) per update, `micro_batch` per accumulation step
  (None: global_batch, no accumulation); `epochs` may be fractional; data order from `seed`.
  Losses: `sft_average`, `dpo_loss`, `dpo_beta`, `label_smoothing`, `logits_chunk`.
  LoRA: `lora_rank` 0 trains every parameter; > 0 adds a fresh adapter to a base model (or
  continues the model's own adapter of that rank); `lora_dropout` must be 0.
  Fit loop (fit.py): `max_len` (a longer example is an error), `pad_multiple` (length buckets),
  `log_every` (metrics and the finite-loss check), `checkpoint_every` (steps; None: off),
  `checkpoint_fractions` (params snapshots at these fractions of training, e.g. 0.1 ... 1.0),
  `keep_checkpoints` (resumable checkpoints kept), `eval_batch` (validation batch; None: global).
  """

  optimizer: str = 'adamw'
  lr: float = 1e-4
  schedule: str = 'cosine'
  warmup_ratio: float = 0.05
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  rmsprop_decay: float = 0.99
  clip_norm: float | None = 1.0
  epochs: float = 1.0
  global_batch: int = 32
  micro_batch: int | None = None
  seed: int = 0
  sft_average: str = 'sequence'
  dpo_loss: str = 'sigmoid'
  dpo_beta: float = 0.1
  label_smoothing: float = 0.0
  logits_chunk: int | None = None
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_targets: tuple[str, ...] = LORA_TARGETS
  lora_dropout: float = 0.0
  max_len: int = 1024
  pad_multiple: int = 64
  log_every: int = 10
  checkpoint_every: int | None = None
  checkpoint_fractions: tuple[float, ...] = ()
  keep_checkpoints: int = 2
  eval_batch: int | None = None

  def __post_init__(self):
    def need(ok, msg):
      if not ok:
        raise ValueError(f'TrainConfig: {msg}')

    need(self.optimizer in OPTIMIZERS, f'optimizer {self.optimizer!r} not in {OPTIMIZERS}')
    need(self.schedule in SCHEDULES, f'schedule {self.schedule!r} not in {SCHEDULES}')
    need(self.sft_average in ('sequence', 'token'), "sft_average must be 'sequence' or 'token'")
    need(self.dpo_loss in DPO_LOSSES, f'dpo_loss {self.dpo_loss!r} not in {DPO_LOSSES}')
    need(self.lr >= 0, f'lr must be >= 0, got {self.lr}')
    need(0 <= self.warmup_ratio <= 1, f'warmup_ratio must be in [0, 1], got {self.warmup_ratio}')
    need(self.epochs > 0, f'epochs must be > 0, got {self.epochs}')
    need(self.global_batch > 0, f'global_batch must be > 0, got {self.global_batch}')
    mb = self.micro_batch
    need(
      mb is None or (0 < mb <= self.global_batch and self.global_batch % mb == 0),
      f'micro_batch={mb} must divide global_batch={self.global_batch}',
    )
    need(self.clip_norm is None or self.clip_norm > 0, 'clip_norm must be None or > 0')
    need(self.dpo_beta > 0, f'dpo_beta must be > 0, got {self.dpo_beta}')
    need(0 <= self.label_smoothing < 0.5, 'label_smoothing must be in [0, 0.5)')
    need(self.logits_chunk is None or self.logits_chunk > 0, 'logits_chunk must be None or > 0')
    need(self.lora_rank >= 0, f'lora_rank must be >= 0, got {self.lora_rank}')
    lora_lib.check_dropout(self.lora_dropout)
    lora_lib.resolve_targets(self.lora_targets)
    need(self.max_len > 1, f'max_len must be > 1, got {self.max_len}')
    need(self.pad_multiple > 0, f'pad_multiple must be > 0, got {self.pad_multiple}')
    need(self.log_every > 0, f'log_every must be > 0, got {self.log_every}')
    need(
      self.checkpoint_every is None or self.checkpoint_every > 0,
      'checkpoint_every must be None or > 0',
    )
    need(
      all(0 < f <= 1 for f in self.checkpoint_fractions),
      f'checkpoint_fractions must lie in (0, 1], got {self.checkpoint_fractions}',
    )
    need(self.keep_checkpoints >= 1, 'keep_checkpoints must be >= 1')

  @property
  def accum_steps(self) -> int:
    return self.global_batch // (self.micro_batch or self.global_batch)

  def replace(self, **kwargs) -> TrainConfig:
    return dataclasses.replace(self, **kwargs)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f'unknown TrainConfig fields {sorted(unknown)}')
    for key in ('lora_targets', 'checkpoint_fractions'):
      if key in d:
        d[key] = tuple(d[key])
    return cls(**d)


# -- log-probs and losses ------------------------------------------------------------------------


class LossTerms(NamedTuple):
  """A loss over a batch as sums, so micro-batches add up: loss = total / count."""

  total: Array  # sum of per-item losses
  count: Array  # what `total` is averaged over (items, or target tokens)
  items: Array  # real rows (sequences, pairs or examples)
  sums: dict[str, Array]  # per-item metric sums, reported divided by `items`


def token_logps(
  model: Decoder,
  tokens_BT: Array,
  mask_BT: Array,
  loss_mask_BT: Array,
  *,
  max_targets: int | None = None,
  logits_chunk: int | None = None,
) -> tuple[Array, Array]:
  """Log-probs of the target tokens and their weights, ([B, P], [B, P]) float32; see
  `logprobs.target_logps` (targets gathered, the LM head in chunks of positions)."""
  return logprobs.target_logps(
    model, tokens_BT, mask_BT, loss_mask_BT, max_targets=max_targets, chunk=logits_chunk
  )


def sft_loss(model: Decoder, batch, cfg: TrainConfig, max_targets: int | None = None) -> LossTerms:
  """Cross-entropy on target tokens (see the module docstring for the weighting)."""
  logps_BP, w_BP = token_logps(
    model,
    batch['tokens'],
    batch['mask'],
    batch['loss_mask'],
    max_targets=max_targets,
    logits_chunk=cfg.logits_chunk,
  )
  n_B = w_BP.sum(-1)
  valid_B = n_B > 0
  nll_B = -logps_BP.sum(-1)
  items = valid_B.sum().astype(jnp.float32)
  if cfg.sft_average == 'sequence':
    total = jnp.where(valid_B, nll_B / jnp.maximum(n_B, 1.0), 0.0).sum()
    count = items
  else:
    total, count = nll_B.sum(), n_B.sum()
  return LossTerms(total, count, items, {'target_tokens': n_B.sum()})


def _interleave(a_BT: Array, b_BT: Array) -> Array:
  # [B, 2, T] -> [2B, T]: a pair's two rows stay on the device that holds the pair.
  return jnp.stack([a_BT, b_BT], axis=1).reshape((-1,) + a_BT.shape[1:])


def dpo_loss(model: Decoder, batch, cfg: TrainConfig, max_targets: int | None = None) -> LossTerms:
  """DPO on (chosen, rejected) pairs against stored reference log-probs; one forward for both."""
  get = lambda k: _interleave(batch[f'chosen_{k}'], batch[f'rejected_{k}'])
  logps_2BP, w_2BP = token_logps(
    model,
    get('tokens'),
    get('mask'),
    get('loss_mask'),
    max_targets=max_targets,
    logits_chunk=cfg.logits_chunk,
  )
  seq_B2 = logps_2BP.sum(-1).reshape(-1, 2)
  n_B2 = w_2BP.sum(-1).reshape(-1, 2)
  pol_c, pol_r = seq_B2[:, 0], seq_B2[:, 1]
  ref_c = batch['ref_chosen_logps'].astype(jnp.float32)
  ref_r = batch['ref_rejected_logps'].astype(jnp.float32)
  valid_B = (n_B2[:, 0] > 0) & (n_B2[:, 1] > 0)
  beta = cfg.dpo_beta
  if cfg.dpo_loss == 'ipo':
    # TRL's IPO works on log-probs averaged over each answer's tokens.
    n_c, n_r = jnp.maximum(n_B2[:, 0], 1.0), jnp.maximum(n_B2[:, 1], 1.0)
    m_B = (pol_c / n_c - ref_c / n_c) - (pol_r / n_r - ref_r / n_r)
    losses_B = (m_B - 1.0 / (2.0 * beta)) ** 2
  else:
    m_B = (pol_c - ref_c) - (pol_r - ref_r)
    if cfg.dpo_loss == 'sigmoid':
      e = cfg.label_smoothing
      losses_B = -jax.nn.log_sigmoid(beta * m_B) * (1 - e) - jax.nn.log_sigmoid(-beta * m_B) * e
    else:
      losses_B = jax.nn.relu(1.0 - beta * m_B)
  chosen_B = jax.lax.stop_gradient(beta * (pol_c - ref_c))
  rejected_B = jax.lax.stop_gradient(beta * (pol_r - ref_r))
  on = lambda x: jnp.where(valid_B, x, 0.0).sum()
  items = valid_B.sum().astype(jnp.float32)
  sums = {
    'rewards/chosen': on(chosen_B),
    'rewards/rejected': on(rejected_B),
    'rewards/margin': on(chosen_B - rejected_B),
    'rewards/accuracy': on((chosen_B > rejected_B).astype(jnp.float32)),
    'logps/chosen': on(jax.lax.stop_gradient(pol_c)),
    'logps/rejected': on(jax.lax.stop_gradient(pol_r)),
  }
  return LossTerms(on(losses_B), items, items, sums)


def classifier_loss(model: Decoder, batch, cfg: TrainConfig, max_targets=None) -> LossTerms:
  """C-class cross-entropy of the score head at each row's last real token."""
  del cfg, max_targets
  logits_BC = model.score(batch['tokens'], batch['mask'])
  labels_B = batch['labels']
  valid_B = batch['mask'].sum(-1) > 0
  logp_BC = jax.nn.log_softmax(logits_BC, axis=-1)
  nll_B = -jnp.take_along_axis(logp_BC, labels_B[:, None], axis=-1)[:, 0]
  correct_B = (jnp.argmax(logits_BC, axis=-1) == labels_B).astype(jnp.float32)
  items = valid_B.sum().astype(jnp.float32)
  total = jnp.where(valid_B, nll_B, 0.0).sum()
  return LossTerms(total, items, items, {'accuracy': jnp.where(valid_B, correct_B, 0.0).sum()})


LOSS_FNS: dict[str, Callable[..., LossTerms]] = {
  'sft': sft_loss,
  'dpo': dpo_loss,
  'classifier': classifier_loss,
}


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_targets', 'logits_chunk'))
def _sequence_logps(graphdef, state, tokens, mask, loss_mask, max_targets, logits_chunk):
  model = nnx.merge(graphdef, state)
  logps, _ = token_logps(
    model, tokens, mask, loss_mask, max_targets=max_targets, logits_chunk=logits_chunk
  )
  return logps.sum(-1)


def sequence_logps(
  model: Decoder,
  tokens_BT,
  mask_BT,
  loss_mask_BT,
  *,
  max_targets: int | None = None,
  logits_chunk: int | None = None,
) -> Array:
  """Sum of each row's target-token log-probs [B] float32 (jitted; DPO reference log-probs).

  Without `max_targets` the bound comes from the batch (`examples.target_bound`)."""
  if max_targets is None:
    w = jnp.asarray(loss_mask_BT)[:, 1:] * jnp.asarray(mask_BT)[:, 1:]
    longest = int(jax.device_get(w.sum(-1).max()))
    max_targets = target_bound(longest, tokens_BT.shape[1])
  graphdef, state = nnx.split(model)
  return _sequence_logps(
    graphdef, state, tokens_BT, mask_BT, loss_mask_BT, max_targets, logits_chunk
  )


# -- state and steps -----------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything a step changes or reads; a pytree that crosses the jit boundary."""

  step: Array  # int32 scalar: updates done
  params: nnx.State  # trainable
  frozen: nnx.State  # not trained, not in optimizer state
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The jitted step functions of one run and the shardings they were compiled for.

  train_step(state, batch, max_targets=None) -> (state, metrics): the state is donated, except
    its frozen params (shared with the model the trainer was made from).
  eval_step(state, batch, max_targets=None) -> LossTerms of the batch (no update).
  """

  graphdef: nnx.GraphDef
  loss: str
  cfg: TrainConfig
  mesh: jax.sharding.Mesh
  total_steps: int
  tx: optax.GradientTransformation
  schedule: Callable[[Array], Array]
  state_shardings: TrainState
  batch_shardings: dict[str, jax.sharding.NamedSharding]
  train_step: Callable
  eval_step: Callable

  def model(self, state: TrainState) -> Decoder:
    """The Decoder holding `state`'s parameters (shares their buffers)."""
    return nnx.merge(self.graphdef, state.params, state.frozen)

  def shard_batch(self, batch: dict) -> dict:
    """Place a host batch with this trainer's batch shardings."""
    missing = set(self.batch_shardings) - set(batch)
    if missing:
      raise ValueError(f'{self.loss} batch lacks fields {sorted(missing)}')
    return {k: shd.put(batch[k], s) for k, s in self.batch_shardings.items()}

  def eval_shardings(self) -> dict[str, jax.sharding.NamedSharding]:
    return batch_shardings(self.loss, self.mesh, accum=False)


def batch_shardings(loss: str, mesh, accum: bool) -> dict[str, jax.sharding.NamedSharding]:
  """Per-field shardings of a `loss` batch; with `accum` fields are [A, M, ...] (M split)."""
  extra = 1 if accum else 0
  return {
    k: shd.batch_sharding(mesh, ndim + extra, batch_axis=extra) for k, ndim in FORMATS[loss].items()
  }


def _as_f32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def _step_fn(graphdef, loss_fn, tx, cfg: TrainConfig, param_shardings, accum: bool):
  def step(state: TrainState, batch, max_targets=None):
    def objective(params, mb):
      terms = loss_fn(nnx.merge(graphdef, params, state.frozen), mb, max_targets)
      return terms.total, terms

    grad_fn = jax.grad(objective, has_aux=True)
    if accum:

      def body(acc, mb):
        grads, terms = grad_fn(state.params, mb)
        grads = jax.lax.with_sharding_constraint(_as_f32(grads), param_shardings)
        return jax.tree.map(jnp.add, acc, (grads, terms)), None

      first = jax.tree.map(lambda x: x[0], batch)
      shapes = jax.eval_shape(lambda: _as_f32(grad_fn(state.params, first)))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      zeros = (jax.lax.with_sharding_constraint(zeros[0], param_shardings), zeros[1])
      (grads, terms), _ = jax.lax.scan(body, zeros, batch)
    else:
      grads, terms = grad_fn(state.params, batch)
      grads = _as_f32(grads)
    count = jnp.maximum(terms.count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    items = jnp.maximum(terms.items, 1.0)
    metrics = {
      'loss': terms.total / count,
      'grad_norm': grad_norm,
      'param_norm': optax.tree.norm(params),
      'lr': current_lr(cfg, state.opt_state),
      'items': terms.items,
      **{k: v / items for k, v in terms.sums.items() if k != 'target_tokens'},
    }
    if 'target_tokens' in terms.sums:
      metrics['target_tokens'] = terms.sums['target_tokens']
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return step


def create_state(
  model: Decoder, tx: optax.GradientTransformation, mesh, rules=shd.TRAIN_RULES
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, state, state shardings): parameters placed by the rules, optimizer state created
  already sharded (each moment like its parameter)."""
  graphdef, params, frozen = lora_lib.split_trainable(model)
  param_sh = shd.state_shardings(params, mesh, rules)
  frozen_sh = shd.state_shardings(frozen, mesh, rules)
  frozen = jax.device_put(frozen, frozen_sh)
  opt_sh = shd.state_shardings(jax.eval_shape(tx.init, params), mesh, rules)
  rep = shd.replicated(mesh)

  def init(params):
    # The trainable params are copied, since steps donate them: the caller's model stays usable
    # (the pipeline trains several models from one base). The frozen ones are shared, not donated.
    return jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params), tx.init(params)

  step, params, opt_state = jax.jit(init, out_shardings=(rep, param_sh, opt_sh))(params)
  state = TrainState(step=step, params=params, frozen=frozen, opt_state=opt_state)
  shardings = TrainState(step=rep, params=param_sh, frozen=frozen_sh, opt_state=opt_sh)
  return graphdef, state, shardings


def make_trainer(
  model: Decoder,
  loss: str,
  cfg: TrainConfig,
  total_steps: int,
  *,
  mesh=None,
  rules=shd.TRAIN_RULES,
) -> tuple[Trainer, TrainState]:
  """Jitted train/eval steps for `model` (its adapter, if any, is what trains) and the state.

  Args:
    model: the Decoder; with `cfg.lora_rank` > 0 it must already carry that adapter (fit.py adds
      a fresh one to a base model).
    loss: one of LOSSES.
    cfg: the TrainConfig (optimizer, schedule, loss options, accumulation).
    total_steps: number of updates (for the schedule).
    mesh: the device mesh (default: the one the parameters live on, else one device).
  """
  if loss not in LOSSES:
    raise ValueError(f'loss {loss!r} not in {LOSSES}')
  if (loss == 'classifier') != bool(model.cfg.num_labels):
    raise ValueError(
      f'loss {loss!r} needs a model with '
      + ('a score head' if loss == 'classifier' else 'an LM head')
    )
  if cfg.lora_rank and model.cfg.lora_rank != cfg.lora_rank:
    raise ValueError(
      f'TrainConfig.lora_rank={cfg.lora_rank} but the model has lora_rank={model.cfg.lora_rank}'
    )
  mesh = shd.model_mesh(model, mesh)
  tx = make_optimizer(cfg, total_steps)
  schedule = make_schedule(cfg, total_steps)
  graphdef, state, state_sh = create_state(model, tx, mesh, rules)
  train_step, eval_step, b_sh = jit_steps(graphdef, loss, cfg, tx, state_sh, mesh)
  trainer = Trainer(
    graphdef=graphdef,
    loss=loss,
    cfg=cfg,
    mesh=mesh,
    total_steps=total_steps,
    tx=tx,
    schedule=schedule,
    state_shardings=state_sh,
    batch_shardings=b_sh,
    train_step=train_step,
    eval_step=eval_step,
  )
  return trainer, state


def jit_steps(graphdef, loss: str, cfg: TrainConfig, tx, state_sh: TrainState, mesh):
  """(train_step, eval_step, batch shardings) of a state with shardings `state_sh`; each step has
  `.jitted`, the jax.jit function (compile_check lowers it on abstract inputs)."""
  accum = cfg.accum_steps > 1
  b_sh = batch_shardings(loss, mesh, accum)
  loss_fn = functools.partial(_call_loss, LOSS_FNS[loss], cfg)
  step = _step_fn(graphdef, loss_fn, tx, cfg, state_sh.params, accum)
  rep = shd.replicated(mesh)

  # Everything but the frozen params is donated (those belong to the caller's base model and
  # pass through unchanged); max_targets is static (it sets the gathered shape).
  def split_step(dynamic, frozen, batch, max_targets):
    step_, params, opt_state = dynamic
    state = TrainState(step=step_, params=params, frozen=frozen, opt_state=opt_state)
    new, metrics = step(state, batch, max_targets)
    return (new.step, new.params, new.opt_state), metrics

  dyn_sh = (state_sh.step, state_sh.params, state_sh.opt_state)
  train_jit = jax.jit(
    split_step,
    in_shardings=(dyn_sh, state_sh.frozen, b_sh),
    out_shardings=(dyn_sh, rep),
    static_argnums=(3,),
    donate_argnums=(0,),
  )

  def evaluate(state: TrainState, batch, max_targets) -> LossTerms:
    return loss_fn(nnx.merge(graphdef, state.params, state.frozen), batch, max_targets)

  eval_jit = jax.jit(
    evaluate,
    in_shardings=(state_sh, batch_shardings(loss, mesh, accum=False)),
    out_shardings=rep,
    static_argnums=(2,),
  )

  def train_step(state: TrainState, batch, max_targets: int | None = None):
    dynamic = (state.step, state.params, state.opt_state)
    (step_, params, opt_state), metrics = train_jit(dynamic, state.frozen, batch, max_targets)
    new = TrainState(step=step_, params=params, frozen=state.frozen, opt_state=opt_state)
    return new, metrics

  def eval_step(state: TrainState, batch, max_targets: int | None = None) -> LossTerms:
    return eval_jit(state, batch, max_targets)

  train_step.jitted = train_jit
  eval_step.jitted = eval_jit
  return train_step, eval_step, b_sh


def _call_loss(fn, cfg, model, batch, max_targets):
  return fn(model, batch, cfg, max_targets)
