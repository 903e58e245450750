"""The pipeline's config schema: every field `python -m ilr_jax.main` reads, with the paper's
values (`base_config`), the method arg of a config file (`parse_arg`), and `validate`, which turns a
value that cannot run into a one-line ConfigError naming the `--config.` flag before any work.

Each section is built by one function and checked by the one beside it. Config files
(configs/*.py) start from `base_config(method, task)` and fill in the task's models, data and
sizes; pipeline.py runs what they describe. The lists of choices live with the code that makes
them: methods.NAMES, optimizers.OPTIMIZERS, refine.SCOPES, evaluator.TOO_LONG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
from ml_collections import config_dict

from ilr_jax import methods as methods_lib
from ilr_jax import refine

INITS = ('hf', 'checkpoint', 'pretrain')
TRAIN_SECTIONS = ('supervisor_sft', 'sft', 'evaluator_train', 'dpo')
ARGS = tuple(methods_lib.METHODS) + ('compare',)


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
    raise ConfigError(f'config arg is empty; give one of {ARGS}')
  method, switches = parts[0], tuple(parts[1:])
  if method not in ARGS:
    raise ConfigError(f'unknown method {method!r} in config arg; expected one of {ARGS}')
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
  # init='pretrain' only: the fraction of the role's corpus in the evaluator's comparison template
  # (arith.make_corpus); the evaluator shares the supervisor's base, hence its corpus.
  m.pretrain_comparison_frac = 0.0
  return m


def _check_model(config, role: str) -> None:
  m, flag = config[role], f'--config.{role}'
  from ilr_jax import presets

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
    _check_pretrain(config)
    _need(
      0.0 <= m.pretrain_comparison_frac <= 1.0,
      f'{flag}.pretrain_comparison_frac must be in [0, 1], got {m.pretrain_comparison_frac}',
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
      f'{flag}.model_dir is required (an HF model directory) for methods {tuple(config.methods)}',
    )
    _need(os.path.isdir(m.model_dir), f'{flag}.model_dir {m.model_dir} does not exist')
  _need(m.tokenizer is not None and m.tokenizer != '', f'{flag}.tokenizer is required')
  _need(os.path.exists(m.tokenizer), f'{flag}.tokenizer {m.tokenizer} does not exist')


def train_section(
  lr: float,
  epochs: float,
  batch_size: int,
  optimizer: str = 'adamw',
  *,
  lora_rank: int | None = 64,
  lora_alpha: float = 128.0,
  max_len: int = 1024,
) -> ml_collections.ConfigDict:
  """A training section (context.train_config reads every field). lora_rank None: the section
  continues the model's own adapter (DPO), so it has no LoRA fields; 0 is a full fine-tune."""
  t = ml_collections.ConfigDict()
  t.lr = lr
  t.epochs = epochs  # with early stopping (evaluator_train.patience): the most epochs
  t.batch_size = batch_size  # global batch
  t.optimizer = optimizer
  t.warmup_frac = 0.05
  t.weight_decay = 0.0
  if lora_rank is not None:
    t.lora_rank = lora_rank
    t.lora_alpha = lora_alpha
  t.max_len = max_len  # longest training sequence in tokens (longer examples are an error)
  t.pad_multiple = 64  # batches are padded to a multiple of this (length buckets)
  # Rows per gradient-accumulation step (None: the whole batch at once); set where a batch does
  # not fit the accelerator's memory. The update is the same (train.py).
  t.micro_batch = config_dict.placeholder(int)
  return t


def _check_train(config, name: str) -> None:
  from ilr_jax import optimizers

  t, flag = config[name], f'--config.{name}'
  _need(t.lr > 0, f'{flag}.lr must be > 0, got {t.lr}')
  _need(t.epochs > 0, f'{flag}.epochs must be > 0, got {t.epochs}')
  _need(t.batch_size >= 1, f'{flag}.batch_size must be >= 1, got {t.batch_size}')
  mb = t.micro_batch
  _need(
    mb is None or (mb >= 1 and t.batch_size % mb == 0),
    f'{flag}.micro_batch={mb} must be >= 1 and divide batch_size={t.batch_size}',
  )
  _need(
    t.optimizer in optimizers.OPTIMIZERS,
    f'{flag}.optimizer must be one of {optimizers.OPTIMIZERS}, got {t.optimizer!r}',
  )


def base_config(method: str, task: str) -> ml_collections.ConfigDict:
  """Every field the pipeline reads, with the paper's values; task files fill in the rest.

  Linked values are FieldReferences: a model's tokenizer defaults to its model_dir, and the
  evaluator's base model to the supervisor's (the paper uses one Gemma-2B for both).
  """
  c = ml_collections.ConfigDict()
  c.methods = methods_lib.COMPARE if method == 'compare' else (method,)
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
  c.supervisor_sft = train_section(5e-4, 2, 32)
  c.sft = train_section(1e-4, 2, 32)

  # The evaluator: a full fine-tune of up to 5 epochs with early stopping.
  c.evaluator_train = train_section(1e-6, 5, 16, lora_rank=0, lora_alpha=0.0, max_len=2048)
  c.evaluator_train.patience = 1
  c.evaluator_train.val_frac = 0.1
  c.evaluator_train.num_checkpoints = 10  # checkpoints of the half-A model that sample answers
  c.evaluator_train.too_long = 'truncate'
  c.evaluator_train.swap_second_order = True  # False: the released DPO code's bug (ablation)
  # True keeps pairs whose two sides are the same text (the released code): identical inputs
  # with opposite labels, which teach nothing (METHOD.md); ilr_jax drops them.
  c.evaluator_train.keep_identical_pairs = False

  c.ilr = ml_collections.ConfigDict()
  c.ilr.alpha = 0.15
  c.ilr.alpha_scope = 'disagreeing'  # the released code; 'all' caps replacements of all labels
  c.ilr.floor = 0.5

  c.feedback = feedback_section()

  c.dpo = train_section(1e-6, 2, 32, 'rmsprop', lora_rank=None)  # continues the student's adapter
  c.dpo.beta = 0.1
  c.dpo.num_samples = 6  # answers sampled per half-B prompt, paired (1,2), (3,4), ...
  c.dpo.keep_frac = 0.15

  c.sampling = ml_collections.ConfigDict()
  c.sampling.batch_size = 64  # prompts per generate call
  c.sampling.score_batch_size = 32  # evaluator pairs per call

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.pretrain = ml_collections.ConfigDict()  # arith only (models with init='pretrain')
  c.pretrain.corpus_size = 0  # the steps are per role: <role>.pretrain_steps
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
  c.debug.timing = False  # every label valid, decode to the length limit (timing.py); no accuracy
  return c


def feedback_section() -> ml_collections.ConfigDict:
  """Where comparison feedback comes from (feedback.py). `source` '' keeps each method's own;
  evaluator, oracle, judge or human replaces it for every method that compares (methods.resolve).
  The judge's options are judge.make_judge's (None: its default)."""
  f = ml_collections.ConfigDict()
  f.source = ''
  f.attempts = 3  # judge: tries per batch of prompts (errors, unreadable replies) before failing
  f.retry_wait_s = 2.0  # judge: wait before the 2nd try, doubled for each further one
  f.judge = ml_collections.ConfigDict()
  f.judge.backend = config_dict.placeholder(str)  # 'http' (OpenAI-compatible) or 'local'
  for key in ('base_url', 'model', 'api_key_env', 'model_dir', 'tokenizer_dir', 'dtype'):
    f.judge[key] = config_dict.placeholder(str)
  for key in ('retries', 'top_logprobs', 'num_threads', 'batch_size', 'max_len'):
    f.judge[key] = config_dict.placeholder(int)
  f.judge.timeout_s = config_dict.placeholder(float)
  f.judge.retry_wait_s = config_dict.placeholder(float)
  return f


# The judge's options that change its answers (stage keys of the stages that ask it); timeouts,
# retries and threads do not, so raising a timeout does not invalidate answers already cached.
_JUDGE_RESULT = ('backend', 'base_url', 'model', 'top_logprobs', 'model_dir', 'tokenizer_dir')
JUDGE_RESULT_KEYS = tuple(f'feedback.judge.{k}' for k in _JUDGE_RESULT + ('max_len', 'dtype'))


def _check_feedback(config) -> None:
  f = config.feedback
  sources = ('',) + methods_lib.COMPARING
  _need(f.source in sources, f'--config.feedback.source must be one of {sources}, got {f.source!r}')
  try:
    run = methods_lib.of_config(config)
  except ValueError as e:
    raise ConfigError(f'--config.methods / --config.feedback.source: {e}') from None
  _need(f.attempts >= 1, f'--config.feedback.attempts must be >= 1, got {f.attempts}')
  if any(m.feedback == 'judge' for m in run):
    _need(
      f.judge.backend in ('http', 'local'),
      '--config.feedback.judge.backend must be "http" (with feedback.judge.base_url and '
      f'feedback.judge.model) or "local" (with feedback.judge.model_dir) for judge feedback, got '
      f'{f.judge.backend!r}',
    )
    if f.judge.backend == 'local':
      _need(
        bool(f.judge.model_dir) and os.path.isdir(f.judge.model_dir),
        f'--config.feedback.judge.model_dir {f.judge.model_dir!r} is not an HF model directory',
      )
    else:
      _need(
        bool(f.judge.base_url) and bool(f.judge.model),
        '--config.feedback.judge.base_url and --config.feedback.judge.model are required for '
        'the http judge',
      )


# -- validation (before any work) ------------------------------------------------------------------


def _need(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def _check_methods(config) -> None:
  names = tuple(config.methods)
  _need(bool(names), '--config.methods is empty')
  bad = [m for m in names if m not in methods_lib.METHODS]
  _need(not bad, f'--config.methods has unknown methods {bad}; known: {methods_lib.NAMES}')
  _need(len(set(names)) == len(names), f'--config.methods repeats a method: {names}')
  _need(config.num_rounds >= 0, f'--config.num_rounds must be >= 0, got {config.num_rounds}')
  _need(config.seed >= 0, f'--config.seed must be >= 0, got {config.seed}')


def _check_task(config) -> None:
  from ilr_jax import tasks

  _need(
    config.task.name in tasks._TASKS,
    f'--config.task.name {config.task.name!r} is unknown; known: {sorted(tasks._TASKS)}',
  )
  data_dir = config.task.get('data_dir')
  _need(
    data_dir is None or os.path.isdir(data_dir), f'--config.task.data_dir {data_dir} does not exist'
  )


def _check_pretrain(config) -> None:
  p = config.pretrain
  _need(p.corpus_size > 0, '--config.pretrain.corpus_size must be > 0')
  _need(0.0 <= p.solved_frac <= 1.0, '--config.pretrain.solved_frac must be in [0, 1]')
  _need(0.0 <= p.chat_frac <= 1.0, '--config.pretrain.chat_frac must be in [0, 1]')


def _check_evaluator_train(config) -> None:
  et = config.evaluator_train
  _need(et.num_checkpoints >= 1, '--config.evaluator_train.num_checkpoints must be >= 1')
  _need(0.0 <= et.val_frac < 1.0, '--config.evaluator_train.val_frac must be in [0, 1)')
  too_long = ('error', 'truncate')  # evaluator.TOO_LONG (not imported: it pulls in jax)
  _need(et.too_long in too_long, f'--config.evaluator_train.too_long must be one of {too_long}')
  _need(
    isinstance(et.keep_identical_pairs, bool),
    '--config.evaluator_train.keep_identical_pairs must be True or False',
  )


def _check_ilr(config) -> None:
  ilr = config.ilr
  _need(0 <= ilr.alpha <= 1, f'--config.ilr.alpha must be in [0, 1], got {ilr.alpha}')
  _need(
    ilr.alpha_scope in refine.SCOPES,
    f'--config.ilr.alpha_scope must be one of {refine.SCOPES}, got {ilr.alpha_scope!r}',
  )
  _need(0 <= ilr.floor <= 1, f'--config.ilr.floor must be in [0, 1], got {ilr.floor}')


def _check_dpo(config) -> None:
  dpo = config.dpo
  _need(0 < dpo.keep_frac <= 1, '--config.dpo.keep_frac must be in (0, 1]')
  _need(
    dpo.num_samples >= 2 and dpo.num_samples % 2 == 0,
    f'--config.dpo.num_samples must be even and >= 2, got {dpo.num_samples}',
  )


def _check_mesh(config, num_devices: int) -> None:
  """The mesh must fit the devices and split every training batch over data x fsdp."""
  from ilr_jax import sharding

  m = config.mesh
  try:
    data, fsdp, _ = sharding.mesh_shape(m.data, m.fsdp, m.tensor, num_devices)
  except ValueError as e:
    raise ConfigError(f'--config.mesh: {e}') from None
  for name in TRAIN_SECTIONS + ('pretrain',):
    b = config[name].batch_size
    _need(
      b % (data * fsdp) == 0,
      f"--config.{name}.batch_size={b} is not divisible by the mesh's data*fsdp={data * fsdp}",
    )


def model_roles(config) -> tuple[str, ...]:
  """The models this run needs: supervisor and student always, the evaluator when a method asks
  the trained evaluator for feedback."""
  uses = any(m.uses_evaluator for m in methods_lib.of_config(config))
  return ('supervisor', 'student') + (('evaluator',) if uses else ())


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
  _check_methods(config)
  _check_feedback(config)
  _check_task(config)
  for role in model_roles(config):
    _check_model(config, role)
  for name in TRAIN_SECTIONS:
    _check_train(config, name)
  _check_evaluator_train(config)
  _check_ilr(config)
  _check_dpo(config)
  if num_devices is None:
    import jax

    num_devices = jax.device_count()
  _check_mesh(config, num_devices)
  _need(isinstance(config.debug.kill_at, str), '--config.debug.kill_at must be a string')
  _need(isinstance(config.debug.timing, bool), '--config.debug.timing must be True or False')
