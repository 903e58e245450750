"""Command line of the pipeline: a config file, a workdir, one call into `pipeline.run`.

  python -m ilr_jax.main --config=configs/arith.py:compare --workdir=/tmp/arith
  python -m ilr_jax.main --config=configs/gsm8k.py:ilr --workdir=DIR \\
    --config.supervisor.model_dir=... --config.student.model_dir=... --config.num_rounds=4

Every config value can be overridden with `--config.section.field=value`; an unknown key or a
value that cannot run is a one-line error (exit status 2) before any work starts. Rerunning a
command resumes its workdir; a changed config value that a finished stage depends on is refused,
naming the key, unless `--recompute_changed` is given.

User errors are one line on stderr and exit status 2, always before any stage starts unless the
problem is only found later (a corrupted file, a full disk): a bad flag or config file, a value
that cannot run, missing data, databases or judges (preflight.py), a workdir in use by another
run (lock.py), a changed config, a missing or corrupted record, label set or checkpoint (the line
names the file and the `--redo=STAGE` that recomputes it). Anything else is a bug and keeps its
traceback.

With human feedback, a run stops with exit status 3 when a stage waits for annotations (the
message says which files to fill in); rerunning the command after they are filled in continues.
A verdicts file that cannot be used is one line per problem, exit status 2.
"""

import contextlib
import errno
import os
import sys

# transformers says at import that PyTorch is missing: ilr_jax runs its models in JAX and uses
# transformers only for tokenizers and configs, so the line asks the user for nothing.
os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'configs/<task>.py:<method>[,switch...]', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'where every stage writes its outputs')
_RECOMPUTE = flags.DEFINE_bool(
  'recompute_changed',
  False,
  'recompute the stages whose config values changed (and everything after them) instead of '
  'refusing to run',
)
_DISTRIBUTED = flags.DEFINE_bool(
  'distributed',
  False,
  'several processes, one run (TPU slices, multi-node GPU, CPU processes): join them with '
  'jax.distributed first; every process runs the same command (see ilr_jax/distributed.py)',
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address',
  None,
  'with --distributed: HOST:PORT of process 0 (default: $JAX_COORDINATOR_ADDRESS, else detected on '
  'TPU VMs / SLURM)',
)
_NUM_PROCESSES = flags.DEFINE_integer(
  'num_processes', None, 'with --distributed: how many processes (default: $JAX_NUM_PROCESSES)'
)
_PROCESS_ID = flags.DEFINE_integer(
  'process_id', None, 'with --distributed: this process (default: $JAX_PROCESS_ID)'
)
_HEARTBEAT = flags.DEFINE_integer(
  'heartbeat_timeout_s',
  100,
  'with --distributed: a process silent this long is dead, and every other process aborts',
)
_INIT_TIMEOUT = flags.DEFINE_integer(
  'initialization_timeout_s', 300, 'with --distributed: how long to wait for every process to join'
)
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
  'shutdown_timeout_s', 300, 'with --distributed: how long the last barrier at exit waits'
)
_REDO = flags.DEFINE_string(
  'redo',
  '',
  'forget this stage and everything downstream of it (records and outputs), then run them again',
)
flags.mark_flags_as_required(['config', 'workdir'])


def _fail(msg: str):
  """A user error: one line on stderr, exit status 2 (absl's status for usage errors)."""
  print(f'ilr_jax.main: {msg}'.replace('\n', ' '), file=sys.stderr, flush=True)
  sys.exit(2)


def _one_line(err: BaseException) -> str:
  # Overrides fail deep inside config_flags (a KeyError of a typo, a TypeError of a bad value);
  # the innermost cause names the key, the outer ones only repeat it.
  err = _innermost(err)
  text = str(err).strip()
  if 'Traceback (most recent call last)' in text:
    # config_flags flattens a config file's exception into a traceback text: its last line is
    # the error itself ('ilr_jax.schema.ConfigError: unknown method ...').
    text = text.splitlines()[-1].strip()
    return text.split(': ', 1)[1] if 'Error: ' in text else text
  from ilr_jax import schema

  if isinstance(err, (flags.Error, schema.ConfigError)):
    return text.replace('\n', ' ')
  return f'{type(err).__name__}: {text}'.replace('\n', ' ')


def _innermost(err: BaseException) -> BaseException:
  while err.__context__ is not None and str(err.__context__):
    err = err.__context__
  return err


def _parse(argv):
  from ilr_jax import schema

  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:
    missing = str(_innermost(e)).strip('\'"')
    named = [
      a.split('=')[0] for a in argv if a.startswith('--config.') and missing in a.split('=')[0]
    ]
    what = named[0] if named else repr(missing)
    _fail(f'unknown config key {what} (the config is locked; see the config file)')
  except (flags.Error, schema.ConfigError, TypeError, ValueError) as e:
    _fail(f'bad flags or config: {_one_line(e)}')


def _config():
  """The parsed config; a config file that cannot be loaded is a user error."""
  from ilr_jax import schema

  try:
    config = _CONFIG.value
    schema.resolve(config)  # touches the lazily loaded config file
  except OSError as e:  # config_flags: the file does not exist or cannot be read
    _fail(f'cannot load the --config file: {str(e).strip().splitlines()[-1].strip()}')
  except (flags.Error, schema.ConfigError) as e:
    _fail(f'bad flags or config: {_one_line(e)}')
  return config


def _artifact_line(err, config) -> str:
  """An unreadable file as one line with its fix: the --redo of the stage that wrote it."""
  from ilr_jax import pipeline, workdir

  wd = workdir.Workdir(_WORKDIR.value, config.to_dict(), pipeline.plan(config))
  stage = wd.stage_of(err.path)
  if stage is None:
    return f'{err}; replace or delete it'
  return f'{err}; rerun with --redo={stage} to recompute that stage and everything after it'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Orbax and datasets log every checkpoint at INFO; stage lines are printed by the pipeline.
    logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value:
    from ilr_jax import distributed

    coord = distributed.Coordinator(
      address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      initialization_timeout_s=_INIT_TIMEOUT.value,
      heartbeat_timeout_s=_HEARTBEAT.value,
      shutdown_timeout_s=_SHUTDOWN_TIMEOUT.value,
    )
    try:
      coord = distributed.resolve(coord)
    except ValueError as e:
      sys.exit(f'ilr_jax.main: bad --distributed settings: {e}')
    distributed.initialize(coord)
    print(f'[ilr_jax] {distributed.describe()}', flush=True)
  config = _config()
  from ilr_jax import feedback, lock, pipeline, preflight, schema, workdir

  try:
    schema.validate(config)
  except schema.ConfigError as e:
    _fail(str(e))
  try:
    # The lock first, so a second run is refused at once; then the resources, before any stage.
    with lock.locked(_WORKDIR.value) if workdir.is_writer() else contextlib.nullcontext():
      preflight.check(config)
      pipeline.check_workdir(
        config, _WORKDIR.value, recompute_changed=_RECOMPUTE.value, redo=_REDO.value
      )
      table = pipeline.run(config, _WORKDIR.value, recompute_changed=_RECOMPUTE.value)
  except schema.ConfigError as e:
    _fail(str(e))
  except workdir.ArtifactError as e:
    _fail(_artifact_line(e, config))
  except workdir.WorkdirError as e:
    _fail(str(e))
  except feedback.AwaitingAnnotations as e:
    print(f'{e}\nilr_jax.main: waiting for annotations (exit status 3)', flush=True)
    sys.exit(3)
  except feedback.AnnotationError as e:  # one line per problem: several lines on purpose
    print(f'ilr_jax.main: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  except feedback.FeedbackError as e:
    _fail(str(e))
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    _fail(
      f'out of disk space writing {e.filename or "into " + _WORKDIR.value} ({e.strerror}); '
      'free some space and rerun the same command: it resumes where it stopped'
    )
  print(table, flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse)
