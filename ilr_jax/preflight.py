"""Resource checks of a run, done once before any stage: data, databases, judges, decoding.

`schema.validate` checks the config's values on their own; `check` here checks what they point
at, so that a missing database folder, an empty split or a decoding setting that cannot run is a
one-line error (schema.ConfigError, naming the `--config.` flag) in seconds, not a failure after
hours of training. `python -m ilr_jax.main` calls it after validation and before it touches the
workdir.
"""

from __future__ import annotations

from ilr_jax import judge, methods, tasks
from ilr_jax.schema import ConfigError

# What loading a task's data raises for bad data (tasks.py turns most into a ValueError naming
# the folder; a missing task option is a TypeError of the task's constructor).
_DATA_ERRORS = (OSError, ValueError, KeyError, TypeError)


def _need(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def _limits(config) -> None:
  for split in ('train', 'test'):
    limit = config.task.get(f'{split}_limit')
    _need(
      limit is None or limit >= 1,
      f'--config.task.{split}_limit must be >= 1 (or unset for all rows), got {limit}',
    )
  tokens = config.task.get('max_new_tokens')
  _need(  # tasks.py reads a falsy value as "the task's default"; 0 is a typo, not a default
    tokens is None or tokens >= 1, f'--config.task.max_new_tokens must be >= 1, got {tokens}'
  )
  for key in ('batch_size', 'score_batch_size'):
    b = config.sampling[key]
    _need(b >= 1, f'--config.sampling.{key} must be >= 1, got {b}')


def _task(config) -> tasks.Task:
  from ilr_jax import context

  try:
    return context.make_task(config.task.to_dict())
  except (TypeError, ValueError) as e:  # TypeError: an option this task does not take
    raise ConfigError(f'--config.task: {e}') from None


def _split(task: tasks.Task, config, split: str) -> list[tasks.Example]:
  try:
    rows = task.load(split, config.task.get(f'{split}_limit'))
  except _DATA_ERRORS as e:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    raise ConfigError(f'--config.task data, split {split!r}: {msg}'.replace('\n', ' ')) from None
  _need(bool(rows), f'--config.task data: split {split!r} of task {task.name} has no rows')
  return rows


def _decoding(config, task: tasks.Task) -> None:
  for use, d in task.decoding.items():
    where = f'task {task.name} decoding for {use!r}'
    _need(d.method in ('beam', 'sample'), f'{where}: method {d.method!r} is not beam or sample')
    _need(
      d.max_new_tokens >= 1,
      f'{where}: max_new_tokens must be >= 1 (--config.task.max_new_tokens), '
      f'got {d.max_new_tokens}',
    )
    _need(d.num_beams >= 1, f'{where}: num_beams must be >= 1, got {d.num_beams}')
    _need(d.temperature > 0, f'{where}: temperature must be > 0, got {d.temperature}')
    _need(d.num_samples >= 1, f'{where}: num_samples must be >= 1, got {d.num_samples}')


def _compares(name: str) -> bool:
  """Whether an ILR method compares proposals with labels (every one but random feedback)."""
  m = methods.get(name)
  return m.family == 'ilr' and m.feedback != 'random'


def _graders(config, task: tasks.Task, examples) -> None:
  """Databases (BIRD), judge and embedder (SaferPaca): configured and present."""
  if isinstance(task, tasks.SaferPaca):
    options = config.task.to_dict()
    try:
      judge.check_options(options.get('judge'), 'task.judge')
      if any(_compares(m) for m in config.methods):  # agreement is by embedding
        judge.check_options(options.get('embedder'), 'task.embedder', embedder=True)
    except judge.JudgeConfigError as e:
      raise ConfigError(str(e)) from None
    return
  try:
    task.check_ready(examples)
  except (FileNotFoundError, judge.JudgeConfigError) as e:
    raise ConfigError(str(e)) from None


def check(config) -> None:
  """Raise ConfigError (one line) for a resource the configured run lacks; loads only data."""
  _limits(config)
  task = _task(config)
  train = _split(task, config, 'train')
  test = _split(task, config, 'test')
  _need(
    len(train) >= 2,
    f'--config.task data: split train has {len(train)} usable rows; the method splits it in two '
    'halves, so it needs at least 2 (--config.task.train_limit?)',
  )
  _decoding(config, task)
  _graders(config, task, train + test)
