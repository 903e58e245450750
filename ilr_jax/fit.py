"""The fit loop: epochs over a dataset, logging, checkpoints, resume, validation, early stopping.

`fit(model, examples, loss=..., config=TrainConfig(...), workdir=...)` trains and returns
(model, FitResult). Examples are of the loss's format (examples.py); DPO pairs get their
reference log-probs from `with_reference_logps`, run once per round with the reference model
before training (the paper's reference is the previous round's policy, i.e. the model about to be
trained).

Data order: each epoch is a permutation drawn from (seed, epoch). To keep padding low, windows of
50 global batches are sorted by length, cut into global batches, and the batches shuffled; each
batch is padded to a multiple of `pad_multiple` (at most `max_len`; a longer example is an error).
Logits are taken at no more target positions than a batch needs: the smallest of T/4, T/2 and
T - 1 that covers its longest target (train.py). A short last batch is padded with empty rows,
which weigh nothing. Fractional epochs are allowed (steps = round(epochs x batches per epoch)).

Workdir layout (one fit per workdir; rerunning with the same workdir resumes it):
  train_config.json            loss, TrainConfig, model config and data sizes; a rerun with
                               different ones is an error, not a silent restart
  metrics.jsonl, tb/           metrics every `log_every` steps (process 0 only)
  checkpoints/<step>/          resumable orbax checkpoints (trainable params, optimizer state,
                               step, early-stopping record) every `checkpoint_every` steps, at
                               the snapshot steps and at the end; the last `keep_checkpoints` kept
  snapshots/step_<n>/          trainable params at each of `checkpoint_fractions` (n = round(f x
                               total steps)), all kept: `fit_checkpoints(workdir)` lists them and
                               `load_params(model, path)` loads one
  best/                        the best validation params (with early stopping)
  final/                       the params the fit returns (the best ones after early stopping)
  DONE.json                    completion marker and FitResult: a rerun returns at once

Resume: the latest checkpoint restores params, optimizer state and step; the data order is
recomputed from the seed, so a resumed run ends with the same parameters as an uninterrupted one.
At a snapshot step the snapshot is written before the checkpoint, so a checkpoint on disk implies
every snapshot up to its step; a resume also checks that, and resumes from an earlier checkpoint
(or from scratch) when a snapshot is missing, so that it is recomputed. A failed write (a kill, a
full disk) therefore never leaves a fit that a rerun cannot complete.
Finite-loss guard: at every log interval (and before every checkpoint) the pending steps' loss and
gradient norm are fetched; a non-finite value raises FloatingPointError naming the step range,
and no checkpoint is written after it, so the last one on disk holds good parameters.
Validation (val_examples): mean loss over the set after each epoch; with
`early_stopping_patience` p, training stops once p epochs in a row fail to improve it (HF's rule),
and the best epoch's params are restored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ilr_jax import examples as examples_lib
from ilr_jax import lora as lora_lib
from ilr_jax import sharding as shd
from ilr_jax import train as train_lib
from ilr_jax.examples import DpoPair
from ilr_jax.model import Decoder, ModelConfig
from ilr_jax.tokens import pad_batch
from ilr_jax.train import TrainConfig
from ilr_jax.workdir import load

SORT_WINDOW = 50  # global batches sorted by length together
# ModelConfig fields that do not change the parameters (a snapshot loads across them).
_NUMERICS_FIELDS = ('dtype', 'param_dtype', 'remat', 'scan_layers')


@dataclasses.dataclass(frozen=True)
class FitResult:
  """What a finished fit reports (also stored in DONE.json)."""

  workdir: str
  steps: int  # updates done (fewer than total_steps after early stopping)
  total_steps: int
  final_metrics: dict[str, float]  # the means over the last log interval
  val_losses: tuple[float, ...]  # one per finished epoch, when validating
  best_step: int | None  # step of the best validation loss
  stopped_early: bool
  snapshots: tuple[tuple[int, str], ...]  # (step, path) of the fraction snapshots

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> FitResult:
    d = dict(d)
    d['val_losses'] = tuple(d['val_losses'])
    d['snapshots'] = tuple((int(s), p) for s, p in d['snapshots'])
    return cls(**d)


# -- data ----------------------------------------------------------------------------------------


def _prepare(loss: str, examples: Sequence, cfg: TrainConfig, model_cfg: ModelConfig):
  return examples_lib.encode(
    loss, examples, cfg.max_len, model_cfg.vocab_size, model_cfg.num_labels
  )


def epoch_batches(lengths: np.ndarray, global_batch: int, seed: int, epoch: int) -> list:
  """The index arrays of one epoch's global batches (the last may be short); see the docstring."""
  rng = np.random.default_rng([seed, epoch])
  perm = rng.permutation(len(lengths))
  window = global_batch * SORT_WINDOW
  batches = []
  for start in range(0, len(perm), window):
    idx = perm[start : start + window]
    idx = idx[np.argsort(lengths[idx], kind='stable')]
    batches += [idx[i : i + global_batch] for i in range(0, len(idx), global_batch)]
  return [batches[i] for i in rng.permutation(len(batches))]


def collate(data: examples_lib.Encoded, idx: np.ndarray, rows: int, cfg: TrainConfig):
  """Host batch of examples `idx` padded to `rows` rows and its target bound (examples.py)."""
  return examples_lib.collate(data, idx, rows, cfg.max_len, cfg.pad_multiple)


def _train_batch(data: examples_lib.Encoded, idx: np.ndarray, cfg: TrainConfig, rows: int):
  batch, bound = collate(data, idx, rows, cfg)
  accum = cfg.accum_steps
  if accum > 1:
    batch = {k: v.reshape((accum, rows // accum) + v.shape[1:]) for k, v in batch.items()}
  return batch, bound


# -- params snapshots ----------------------------------------------------------------------------


def _checkpointer() -> ocp.Checkpointer:
  # Synchronous: a snapshot is complete on disk when save returns.
  return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def save_params(model: Decoder, path: str | pathlib.Path, *, force: bool = False) -> pathlib.Path:
  """Save the trainable params (the adapter under LoRA, else all) and the model config."""
  path = pathlib.Path(path).absolute()
  _, trainable, _ = lora_lib.split_trainable(model)
  _checkpointer().save(path / 'params', trainable, force=force)
  if jax.process_index() == 0:
    # Last and atomic: a snapshot counts (fit_checkpoints) only once its params are complete.
    tmp = path / 'model_config.json.tmp'
    tmp.write_text(json.dumps(model.cfg.to_dict(), indent=1))
    os.replace(tmp, path / 'model_config.json')
  return path


def _arch(cfg: ModelConfig) -> dict[str, Any]:
  d = cfg.to_dict()
  for k in _NUMERICS_FIELDS:
    d.pop(k)
  return d


def load_params(model: Decoder, path: str | pathlib.Path) -> Decoder:
  """`model` with the params saved at `path` (a snapshot, best/ or final/ of a fit).

  A saved adapter is added to a base model first (so a LoRA snapshot loads into the base it was
  trained from); everything not saved (the frozen base) comes from `model`.
  """
  path = pathlib.Path(path).absolute()
  saved = load(
    path / 'model_config.json',
    lambda p: ModelConfig.from_dict(json.loads(p.read_text())),
    'the model config of saved params',
  )
  if saved.lora_rank and not model.cfg.lora_rank:
    model = lora_lib.add_lora(model, saved.lora_rank, saved.lora_alpha, saved.lora_targets)
  if _arch(saved) != _arch(model.cfg):
    diff = sorted(k for k, v in _arch(saved).items() if _arch(model.cfg)[k] != v)
    raise ValueError(f'params at {path} belong to a different model (config fields {diff} differ)')
  graphdef, trainable, frozen = lora_lib.split_trainable(model)
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trainable
  )
  restored = load(path / 'params', lambda p: _checkpointer().restore(p, target), 'saved params')
  return nnx.merge(graphdef, restored, frozen)


def fit_checkpoints(workdir: str | pathlib.Path) -> list[tuple[int, pathlib.Path]]:
  """(step, path) of a fit's fraction snapshots, by step; load one with `load_params`."""
  root = pathlib.Path(workdir) / 'snapshots'
  if not root.is_dir():
    return []
  found = []
  for p in root.iterdir():
    if p.name.startswith('step_') and (p / 'model_config.json').exists():
      found.append((int(p.name[len('step_') :]), p))
  return sorted(found)


# -- DPO reference log-probs ---------------------------------------------------------------------


def with_reference_logps(
  model: Decoder, pairs: Sequence[DpoPair], *, batch_size: int = 32, pad_multiple: int = 64
) -> list[DpoPair]:
  """`pairs` with ref_chosen_logps / ref_rejected_logps from `model` (the DPO reference).

  Run once per round, before training, with the model the policy starts from.
  """
  mesh = shd.model_mesh(model)
  shards = shd.batch_size_multiple(mesh)
  rows = -(-batch_size // shards) * shards
  out: list[DpoPair] = []
  for start in range(0, len(pairs), rows):
    chunk = pairs[start : start + rows]
    seqs = [s for p in chunk for s in (p.chosen, p.rejected)]
    masks = [m for p in chunk for m in (p.chosen_loss_mask, p.rejected_loss_mask)]
    n = 2 * rows
    longest = max(len(s) for s in seqs)
    length = -(-longest // pad_multiple) * pad_multiple
    empty = [np.zeros(0, np.int32)] * (n - len(seqs))
    tokens, mask = pad_batch(seqs + empty, length=length)
    loss_mask, _ = pad_batch(masks + empty, length=length)
    placed = shd.shard_batch({'t': tokens, 'm': mask, 'l': loss_mask}, mesh)
    # Gathered on every process: the rows are sharded over all hosts' devices.
    logps = shd.to_host(train_lib.sequence_logps(model, placed['t'], placed['m'], placed['l']))
    for j, p in enumerate(chunk):
      out.append(
        dataclasses.replace(
          p, ref_chosen_logps=float(logps[2 * j]), ref_rejected_logps=float(logps[2 * j + 1])
        )
      )
  return out


# -- the loop ------------------------------------------------------------------------------------


def _prepare_model(model: Decoder, cfg: TrainConfig) -> Decoder:
  have = model.cfg.lora_rank
  if cfg.lora_rank and not have:
    return lora_lib.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
  if have and not cfg.lora_rank:
    raise ValueError(
      f'the model has a rank-{have} LoRA adapter but TrainConfig.lora_rank=0; set lora_rank={have} '
      'to continue training it, or merge_lora it first for full fine-tuning'
    )
  if have and have != cfg.lora_rank:
    raise ValueError(
      f'the model has a rank-{have} adapter but TrainConfig.lora_rank={cfg.lora_rank}'
    )
  return model


class _Logger:
  """JSON lines and TensorBoard in the workdir, process 0 only."""

  def __init__(self, workdir: pathlib.Path, resume_step: int):
    self.on = jax.process_index() == 0
    self.path = workdir / 'metrics.jsonl'
    self.tb = None
    if not self.on:
      return
    if self.path.exists():
      # Steps after the checkpoint we resume from are redone; drop their old lines.
      lines = self.path.read_text().splitlines()
      keep = [ln for ln in lines if ln and json.loads(ln)['step'] <= resume_step]
      self.path.write_text(''.join(ln + '\n' for ln in keep))
    from tensorboardX import SummaryWriter

    self.tb = SummaryWriter(str(workdir / 'tb'))

  def write(self, step: int, record: dict[str, Any]) -> None:
    if not self.on:
      return
    with open(self.path, 'a') as fh:
      fh.write(json.dumps({'step': step, **record}) + '\n')
    for k, v in record.items():
      if isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _run_record(loss: str, cfg: TrainConfig, model: Decoder, n: int, n_val: int, patience) -> dict:
  return {
    'loss': loss,
    'train_config': cfg.to_dict(),
    'model_config': _arch(model.cfg),
    'num_examples': n,
    'num_val_examples': n_val,
    'early_stopping_patience': patience,
  }


# TrainConfig fields that decide when to log and save, never what is computed: a fit may resume
# with other values of these (a resumed fit ends bitwise equal to an uninterrupted one).
BOOKKEEPING = ('log_every', 'checkpoint_every', 'keep_checkpoints')


def _comparable(record: dict) -> dict:
  tc = {k: v for k, v in record.get('train_config', {}).items() if k not in BOOKKEEPING}
  return {**record, 'train_config': tc}


def _check_run(workdir: pathlib.Path, record: dict) -> None:
  f = workdir / 'train_config.json'
  record = json.loads(json.dumps(record))  # tuples -> lists, as stored
  if f.exists():
    old = _comparable(json.loads(f.read_text()))
    if old != _comparable(record):
      record = _comparable(record)
      keys = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
      raise ValueError(
        f'{workdir} holds a fit with a different setup ({keys} differ); use a new workdir'
      )
  elif jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(record, indent=1))


def _resume_step(manager: ocp.CheckpointManager, workdir: pathlib.Path, snap_steps) -> int:
  """The latest checkpoint step whose snapshots up to it are all on disk (0: start afresh).

  Checkpoints after it are deleted, since the resumed run writes them again.
  """
  have = {s for s, _ in fit_checkpoints(workdir)}
  steps = sorted(manager.all_steps())
  missing = [s for s in snap_steps if s not in have]
  ok = [s for s in steps if not any(m <= s for m in missing)]
  start = ok[-1] if ok else 0
  for s in steps:
    if s > start:
      manager.delete(s)  # collective: orbax deletes on the primary host and syncs
  return start


def _validate(trainer, state, val: examples_lib.Encoded, cfg: TrainConfig, rows: int) -> float:
  order = np.argsort(val.lengths, kind='stable')
  shardings = trainer.eval_shardings()
  total = count = 0.0
  for start in range(0, len(order), rows):
    batch, bound = collate(val, order[start : start + rows], rows, cfg)
    placed = {k: shd.put(v, shardings[k]) for k, v in batch.items()}
    terms = jax.device_get(trainer.eval_step(state, placed, bound))
    total += float(terms.total)
    count += float(terms.count)
  return total / max(count, 1.0)


def _interval_means(pending: list[tuple[int, dict]]) -> dict[str, float]:
  out = {}
  for k in pending[-1][1]:
    vals = [float(m[k]) for _, m in pending]
    out[k] = vals[-1] if k == 'lr' else float(np.mean(vals))
  return out


def fit(
  model: Decoder,
  examples: Sequence,
  *,
  loss: str,
  config: TrainConfig,
  workdir: str | pathlib.Path,
  mesh=None,
  val_examples: Sequence | None = None,
  early_stopping_patience: int | None = None,
  on_checkpoint: Callable[[int, pathlib.Path], None] | None = None,
  on_log: Callable[[int, dict[str, float]], None] | None = None,
  progress: bool = True,
  after_save: Callable[[str, int], None] | None = None,
) -> tuple[Decoder, FitResult]:
  """Train `model` on `examples`; resumable through `workdir` (see the module docstring).

  Args:
    model: the Decoder to train. With config.lora_rank > 0 a base model gets a fresh adapter
      (seeded by config.seed) and a model with that adapter continues it; else all params train.
    examples: training examples of `loss` (module docstring).
    loss: 'sft', 'dpo' or 'classifier'.
    config: TrainConfig.
    workdir: this fit's directory.
    mesh: device mesh (default: the one the model's params live on).
    val_examples: validation examples (same kind); their mean loss is computed each epoch.
    early_stopping_patience: stop after this many epochs without a better validation loss and
      restore the best params (needs val_examples).
    on_checkpoint: called as (step, path) after each fraction snapshot is written.
    on_log: called as (step, interval metric means) at each log interval.
    progress: show a tqdm bar (process 0).
    after_save: a test hook called as ('snapshot' | 'checkpoint', step) right after each write is
      on disk (pipeline's `debug.kill_at=STAGE:checkpoint_N` kills there).
  Returns:
    (the trained model, FitResult).
  """
  if loss not in train_lib.LOSSES:
    raise ValueError(f'loss {loss!r} not in {train_lib.LOSSES}')
  if early_stopping_patience is not None and not val_examples:
    raise ValueError('early_stopping_patience needs val_examples')
  cfg = config
  workdir = pathlib.Path(workdir).absolute()
  model = _prepare_model(model, cfg)
  data = _prepare(loss, examples, cfg, model.cfg)
  val = _prepare(loss, val_examples, cfg, model.cfg) if val_examples else None
  _check_run(
    workdir,
    _run_record(loss, cfg, model, len(data), len(val) if val else 0, early_stopping_patience),
  )
  done_file = workdir / 'DONE.json'
  if done_file.exists():
    result = load(done_file, lambda p: FitResult.from_json(json.loads(p.read_text())), 'fit record')
    return load_params(model, workdir / 'final'), result

  g = cfg.global_batch
  per_epoch = -(-len(data) // g)
  total = max(1, round(cfg.epochs * per_epoch))
  trainer, state = train_lib.make_trainer(model, loss, cfg, total, mesh=mesh)
  shards = shd.batch_size_multiple(trainer.mesh)
  if (cfg.micro_batch or g) % shards:
    raise ValueError(
      f'micro_batch {cfg.micro_batch or g} is not a multiple of the {shards} batch shards of '
      f'the mesh {dict(trainer.mesh.shape)}'
    )
  eval_rows = cfg.eval_batch or cfg.micro_batch or g
  if eval_rows % shards:
    raise ValueError(f'eval_batch {eval_rows} is not a multiple of the {shards} batch shards')
  snap_steps = {max(1, round(f * total)) for f in cfg.checkpoint_fractions}
  every = cfg.checkpoint_every
  ckpt_steps = snap_steps | {total} | (set(range(every, total + 1, every)) if every else set())

  manager = ocp.CheckpointManager(
    workdir / 'checkpoints',
    options=ocp.CheckpointManagerOptions(
      max_to_keep=cfg.keep_checkpoints, create=True, enable_async_checkpointing=False
    ),
  )
  record = {'best_val': None, 'best_step': None, 'bad_epochs': 0, 'val_losses': []}
  record.update(stopped_early=False, seed=cfg.seed)
  start = _resume_step(manager, workdir, snap_steps)
  if start:
    # The freshly created state is already placed as the trainer's shardings say.
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = load(
      workdir / 'checkpoints' / str(start),
      lambda _: manager.restore(
        start,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
      ),
      'training checkpoint',
    )
    state, record = restored.state, restored.meta
    if record['seed'] != cfg.seed:
      raise ValueError(f'checkpoint at step {start} was written with seed {record["seed"]}')
    if jax.process_index() == 0:
      print(f'[ilr_jax] {workdir}: resumed at step {start} of {total}', flush=True)

  logger = _Logger(workdir, start)
  from tqdm import tqdm

  bar = tqdm(
    total=total,
    initial=start,
    disable=not progress or jax.process_index() != 0,
    desc=f'fit {loss}',
  )
  pending: list[tuple[int, dict]] = []
  last_metrics: dict[str, float] = {}
  orders: dict[int, list] = {}
  t_last = time.perf_counter()

  def flush(step: int) -> None:
    nonlocal pending, last_metrics, t_last
    if not pending:
      return
    host = jax.device_get(pending)
    for s, m in host:
      if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
        last = manager.latest_step()
        raise FloatingPointError(
          f'non-finite loss between steps {host[0][0]} and {host[-1][0]} (first at step {s}: '
          f'loss={float(m["loss"])}, grad_norm={float(m["grad_norm"])}); last good checkpoint: '
          + (f'step {last} in {workdir / "checkpoints"}' if last else 'none')
        )
    now = time.perf_counter()
    means = _interval_means(host)
    means['steps_per_s'] = len(host) / max(now - t_last, 1e-9)
    means['epoch'] = step / per_epoch
    t_last = now
    pending, last_metrics = [], means
    logger.write(step, means)
    bar.set_postfix(loss=f'{means["loss"]:.4f}')
    if on_log is not None:
      on_log(step, means)

  stop = record['stopped_early']
  step = start
  try:
    for s in range(start, total):
      if stop:
        break
      epoch, i = divmod(s, per_epoch)
      if epoch not in orders:
        orders = {epoch: epoch_batches(data.lengths, g, cfg.seed, epoch)}
      host, bound = _train_batch(data, orders[epoch][i], cfg, g)
      state, metrics = trainer.train_step(state, trainer.shard_batch(host), bound)
      step = s + 1
      pending.append((step, metrics))
      bar.update(1)
      epoch_end = step % per_epoch == 0 or step == total
      if step % cfg.log_every == 0 or step in ckpt_steps or epoch_end:
        flush(step)
      if epoch_end and val is not None:
        v = _validate(trainer, state, val, cfg, eval_rows)
        record['val_losses'].append(v)
        logger.write(step, {'val_loss': v, 'epoch': step / per_epoch})
        if record['best_val'] is None or v < record['best_val']:
          record.update(best_val=v, best_step=step, bad_epochs=0)
          save_params(trainer.model(state), workdir / 'best', force=True)
        else:
          record['bad_epochs'] += 1
          if (
            early_stopping_patience is not None and record['bad_epochs'] >= early_stopping_patience
          ):
            stop = record['stopped_early'] = True
      if step in snap_steps:  # before the checkpoint of this step (module docstring: Resume)
        path = save_params(trainer.model(state), workdir / 'snapshots' / f'step_{step}', force=True)
        if after_save is not None:
          after_save('snapshot', step)
        if on_checkpoint is not None:
          on_checkpoint(step, path)
      if step in ckpt_steps or stop:
        manager.save(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record)
          ),
        )
        if after_save is not None:
          after_save('checkpoint', step)
    flush(step)
  finally:
    bar.close()
    logger.close()
    manager.close()

  final = trainer.model(state)
  if early_stopping_patience is not None and record['best_step'] is not None:
    final = load_params(final, workdir / 'best')
  save_params(final, workdir / 'final', force=True)
  result = FitResult(
    workdir=str(workdir),
    steps=step,
    total_steps=total,
    final_metrics=last_metrics,
    val_losses=tuple(record['val_losses']),
    best_step=record['best_step'],
    stopped_early=bool(record['stopped_early']),
    snapshots=tuple((s, str(p)) for s, p in fit_checkpoints(workdir)),
  )
  if jax.process_index() == 0:
    done_file.write_text(json.dumps(result.to_json(), indent=1))
  return final, result
