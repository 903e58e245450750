"""The pipeline's config schema: every field `python -m ilr_jax.main` reads, with the paper's
values (`base_config`), the method arg of a config file (`parse_arg`), and `validate`, which turns a
value that cannot run into a one-line ConfigError naming the `--config.` flag before any work.

Config files (configs/*.py) start from `base_config(method, task)` and fill in the task's models,
data and sizes; pipeline.py runs what they describe.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
from ml_collections import config_dict

METHODS = ('sft', 'ilr', 'naive', 'dpo', 'orailr', 'oradpo', 'cororailr', 'cororadpo')
COMPARE_METHODS = ('sft', 'ilr', 'naive', 'dpo')
ILR_METHODS = ('ilr', 'naive', 'orailr', 'cororailr')
DPO_METHODS = ('dpo', 'oradpo', 'cororadpo')
EVALUATOR_METHODS = ('ilr', 'dpo')  # the only methods that ask the trained evaluator
INITS = ('hf', 'checkpoint', 'pretrain')
OPTIMIZERS = ('adamw', 'adafactor', 'rmsprop', 'sgd')
ALPHA_SCOPES = ('disagreeing', 'all')


class ConfigError(ValueError):
  """A config value that cannot run; the message names the `--config.` flag to fix."""


# Config keys that say where a resource is or how fast to use it, never what a stage computes:
# they are left out of every stage's fingerprint (workdir.py), so setting a forgotten database
# folder or another worker count never invalidates finished work.
NO_RESULT_KEYS = (
  'task.db_root',
  'task.num_workers',
  'task.timeout_s',
  'task.judge.base_url',
  'task.judge.num_threads',
  'task.embedder.base_url',
)


# -- config schema ---------------------------------------------------------------------------------


def parse_arg(arg: str, known_switches: Sequence[str] = ()) -> tuple[str, tuple[str, ...]]:
  """'method[,switch,...]' -> (method, switches); unknown parts are a one-line error."""
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  if not parts:
    raise ConfigError(f'config arg is empty; give one of {METHODS + ("compare",)}')
  method, switches = parts[0], tuple(parts[1:])
  if method not in METHODS + ('compare',):
    raise ConfigError(
      f'unknown method {method!r} in config arg; expected one of {METHODS + ("compare",)}'
    )
  bad = [s for s in switches if s not in known_switches]
  if bad:
    raise ConfigError(f'unknown config switches {bad}; this config knows {list(known_switches)}')
  return method, switches


def _model(preset: str, init: str = 'hf') -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.preset = preset  # the architecture, looked up by name (presets.py); `pretrain` builds it
  m.init = init  # 'hf' (model_dir is an HF dir), 'checkpoint' (ours), 'pretrain' (arith)
  m.model_dir = config_dict.placeholder(str)
  # An HF dir or a SentencePiece .model file; unset, `resolve` makes it model_dir. A field of its
  # own (not a reference to model_dir), so setting one of the two never changes the other.
  m.tokenizer = config_dict.placeholder(str)
  m.dtype = 'float32'
  m.param_dtype = 'float32'
  m.remat = 'none'
  m.pretrain_steps = 0  # init='pretrain' only
  return m


def _train(lr: float, epochs: float, batch_size: int, optimizer: str = 'adamw'):
  t = ml_collections.ConfigDict()
  t.lr = lr
  t.epochs = epochs
  t.batch_size = batch_size  # global batch
  t.optimizer = optimizer
  t.warmup_frac = 0.05
  t.weight_decay = 0.0
  t.lora_rank = 64  # 0: full fine-tune
  t.lora_alpha = 128.0
  t.max_len = 1024  # longest training sequence in tokens (longer examples are an error)
  t.pad_multiple = 64  # batches are padded to a multiple of this (length buckets)
  return t


def base_config(method: str, task: str) -> ml_collections.ConfigDict:
  """Every field the pipeline reads, with the paper's values; task files fill in the rest.

  Linked values are FieldReferences: a model's tokenizer defaults to its model_dir, and the
  evaluator's base model to the supervisor's (the paper uses one Gemma-2B for both).
  """
  c = ml_collections.ConfigDict()
  c.methods = COMPARE_METHODS if method == 'compare' else (method,)
  c.seed = 0
  c.num_rounds = 6
  c.compile_cache = True  # JAX's persistent compilation cache (results do not depend on it)
  c.compile_cache_dir = ''  # '' is <workdir>/jax_cache; runs of equal shapes (seeds) may share one

  c.task = ml_collections.ConfigDict()
  c.task.name = task
  c.task.train_limit = config_dict.placeholder(int)  # first n train rows only (smoke runs)
  c.task.test_limit = config_dict.placeholder(int)
  # Every other field of c.task is an option of tasks.get_task (data_dir, hub_id, ...).

  c.supervisor = _model('gemma-2b')
  c.evaluator = _model('gemma-2b')
  c.student = _model('mistral-7b')
  for field in ('preset', 'init', 'model_dir', 'tokenizer'):
    c.evaluator[field] = c.supervisor.get_ref(field)

  # Supervisor SFT on half A (also the evaluator-data model), student SFT; paper: LoRA r64 a128.
  c.supervisor_sft = _train(5e-4, 2, 32)
  c.sft = _train(1e-4, 2, 32)

  c.evaluator_train = ml_collections.ConfigDict()
  c.evaluator_train.lr = 1e-6
  c.evaluator_train.batch_size = 16
  c.evaluator_train.max_epochs = 5
  c.evaluator_train.patience = 1
  c.evaluator_train.optimizer = 'adamw'
  c.evaluator_train.warmup_frac = 0.05
  c.evaluator_train.val_frac = 0.1
  c.evaluator_train.num_checkpoints = 10  # checkpoints of the half-A model that sample answers
  c.evaluator_train.max_len = 2048
  c.evaluator_train.too_long = 'truncate'
  c.evaluator_train.swap_second_order = True  # False: the released DPO code's bug (ablation)

  c.ilr = ml_collections.ConfigDict()
  c.ilr.alpha = 0.15
  c.ilr.alpha_scope = 'disagreeing'  # the released code; 'all' caps replacements of all labels
  c.ilr.floor = 0.5

  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1
  c.dpo.lr = 1e-6
  c.dpo.optimizer = 'rmsprop'
  c.dpo.epochs = 2
  c.dpo.batch_size = 32
  c.dpo.warmup_frac = 0.05
  c.dpo.num_samples = 6
  c.dpo.keep_frac = 0.15  # the policy continues the student's adapter (sft.lora_rank)

  c.sampling = ml_collections.ConfigDict()
  c.sampling.batch_size = 64  # prompts per generate call
  c.sampling.score_batch_size = 32  # evaluator pairs per call

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.pretrain = ml_collections.ConfigDict()  # arith only (models with init='pretrain')
  c.pretrain.corpus_size = 0
  c.pretrain.steps = 0
  c.pretrain.lr = 3e-3
  c.pretrain.batch_size = 32
  c.pretrain.max_len = 128
  c.pretrain.solved_frac = 0.0  # arith.make_corpus: fraction of solved problems
  c.pretrain.chat_frac = 0.0  # ... of which this fraction is in the prompt format

  # When fits save: never part of a stage's fingerprint, since a fit resumed from any checkpoint
  # ends bitwise equal to an uninterrupted one (fit.BOOKKEEPING).
  c.fit = ml_collections.ConfigDict()
  c.fit.checkpoint_every = 100  # steps between resumable checkpoints (a kill loses at most these)
  c.fit.log_every = 10  # steps between metrics lines and finite-loss checks

  c.debug = ml_collections.ConfigDict()
  c.debug.kill_at = ''  # test hook: SIGKILL after stage 'NAME' (or 'NAME:outputs'), see workdir
  return c


# -- validation (before any work) ------------------------------------------------------------------


def _need(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def _mesh_batch_divisor(config, num_devices: int) -> int:
  sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
  _need(
    sizes.count(-1) <= 1, f'at most one of --config.mesh.data/fsdp/tensor may be -1, got {sizes}'
  )
  _need(all(s == -1 or s >= 1 for s in sizes), f'mesh sizes must be >= 1 or -1, got {sizes}')
  known = 1
  for s in sizes:
    known *= s if s != -1 else 1
  if -1 in sizes:
    _need(num_devices % known == 0, f'{num_devices} devices cannot fill --config.mesh {sizes}')
    sizes[sizes.index(-1)] = num_devices // known
  _need(
    sizes[0] * sizes[1] * sizes[2] == num_devices,
    f'--config.mesh data*fsdp*tensor = {sizes[0] * sizes[1] * sizes[2]} != {num_devices} devices',
  )
  return sizes[0] * sizes[1]


def uses_evaluator(methods: Sequence[str]) -> bool:
  return any(m in EVALUATOR_METHODS for m in methods)


def model_roles(config) -> tuple[str, ...]:
  """The models this run needs: supervisor and student always, the evaluator for ilr / dpo."""
  return ('supervisor', 'student') + (('evaluator',) if uses_evaluator(config.methods) else ())


def resolve(config) -> None:
  """Fill in the defaults that depend on other fields: an unset tokenizer is its model_dir."""
  for role in ('supervisor', 'student', 'evaluator'):
    m = config[role]
    if not m.tokenizer and m.model_dir:
      m.tokenizer = m.model_dir


def validate(config, num_devices: int | None = None) -> None:
  """Raise ConfigError (one line, naming the flag) for a config that cannot run. No work done.

  Resolves the config first (`resolve`).
  """
  resolve(config)
  methods = tuple(config.methods)
  _need(bool(methods), '--config.methods is empty')
  bad = [m for m in methods if m not in METHODS]
  _need(not bad, f'--config.methods has unknown methods {bad}; known: {METHODS}')
  _need(len(set(methods)) == len(methods), f'--config.methods repeats a method: {methods}')
  _need(config.num_rounds >= 0, f'--config.num_rounds must be >= 0, got {config.num_rounds}')
  _need(config.seed >= 0, f'--config.seed must be >= 0, got {config.seed}')
  from ilr_jax import presets, tasks

  _need(
    config.task.name in tasks._TASKS,
    f'--config.task.name {config.task.name!r} is unknown; known: {sorted(tasks._TASKS)}',
  )
  data_dir = config.task.get('data_dir')
  _need(
    data_dir is None or os.path.isdir(data_dir), f'--config.task.data_dir {data_dir} does not exist'
  )
  for role in model_roles(config):
    m = config[role]
    flag = f'--config.{role}'
    _need(m.init in INITS, f'{flag}.init must be one of {INITS}, got {m.init!r}')
    _need(
      m.preset in presets.HF_CONFIGS,
      f'{flag}.preset {m.preset!r} is unknown; known: {presets.names()}',
    )
    if m.init == 'pretrain':
      _need(
        role == 'evaluator' or m.pretrain_steps > 0,
        f'{flag}.pretrain_steps must be > 0 with init=pretrain',
      )
      _need(config.pretrain.corpus_size > 0, '--config.pretrain.corpus_size must be > 0')
      _need(
        0.0 <= config.pretrain.solved_frac <= 1.0, '--config.pretrain.solved_frac must be in [0, 1]'
      )
      _need(
        0.0 <= config.pretrain.chat_frac <= 1.0, '--config.pretrain.chat_frac must be in [0, 1]'
      )
      if role == 'evaluator':
        _need(
          m.preset == config.supervisor.preset and config.supervisor.init == 'pretrain',
          f"{flag} with init=pretrain shares the supervisor's pretrained base; "
          'set the same preset as --config.supervisor.preset',
        )
    else:
      _need(
        m.model_dir is not None and m.model_dir != '',
        f'{flag}.model_dir is required (an HF model directory) for methods {methods}',
      )
      _need(os.path.isdir(m.model_dir), f'{flag}.model_dir {m.model_dir} does not exist')
    _need(m.tokenizer is not None and m.tokenizer != '', f'{flag}.tokenizer is required')
    _need(os.path.exists(m.tokenizer), f'{flag}.tokenizer {m.tokenizer} does not exist')
  for name in ('supervisor_sft', 'sft', 'evaluator_train', 'dpo'):
    t = config[name]
    _need(t.lr > 0, f'--config.{name}.lr must be > 0, got {t.lr}')
    _need(t.batch_size >= 1, f'--config.{name}.batch_size must be >= 1, got {t.batch_size}')
    if 'optimizer' in t:
      _need(t.optimizer in OPTIMIZERS, f'--config.{name}.optimizer must be one of {OPTIMIZERS}')
  _need(0 <= config.ilr.alpha <= 1, f'--config.ilr.alpha must be in [0, 1], got {config.ilr.alpha}')
  _need(
    config.ilr.alpha_scope in ALPHA_SCOPES,
    f'--config.ilr.alpha_scope must be one of {ALPHA_SCOPES}, got {config.ilr.alpha_scope!r}',
  )
  _need(0 < config.dpo.keep_frac <= 1, '--config.dpo.keep_frac must be in (0, 1]')
  _need(
    config.dpo.num_samples >= 2 and config.dpo.num_samples % 2 == 0,
    f'--config.dpo.num_samples must be even and >= 2, got {config.dpo.num_samples}',
  )
  _need(
    config.evaluator_train.num_checkpoints >= 1,
    '--config.evaluator_train.num_checkpoints must be >= 1',
  )
  if num_devices is None:
    import jax

    num_devices = jax.device_count()
  divisor = _mesh_batch_divisor(config, num_devices)
  for name in ('supervisor_sft', 'sft', 'evaluator_train', 'dpo', 'pretrain'):
    b = config[name].batch_size
    _need(
      b % divisor == 0,
      f"--config.{name}.batch_size={b} is not divisible by the mesh's data*fsdp={divisor}",
    )
  kill = config.debug.kill_at
  _need(isinstance(kill, str), '--config.debug.kill_at must be a string')
