"""Command line of the pipeline: a config file, a workdir, one call into `pipeline.run`.

  python -m ilr_jax.main --config=configs/arith.py:compare --workdir=/tmp/arith
  python -m ilr_jax.main --config=configs/gsm8k.py:ilr --workdir=DIR \\
    --config.supervisor.model_dir=... --config.student.model_dir=... --config.num_rounds=4

Every config value can be overridden with `--config.section.field=value`; an unknown key or a
value that cannot run is a one-line error (exit status 2) before any work starts. Rerunning a
command resumes its workdir; a changed config value that a finished stage depends on is refused,
naming the key, unless `--recompute_changed` is given.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

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
flags.mark_flags_as_required(['config', 'workdir'])


def _one_line(err: BaseException) -> str:
  # Overrides fail deep inside config_flags (a KeyError of a typo, a TypeError of a bad value);
  # the innermost cause names the key, the outer ones only repeat it.
  if isinstance(err, flags.Error):
    return str(err).replace('\n', ' ')
  err = _innermost(err)
  return f'{type(err).__name__}: {err}'.replace('\n', ' ')


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
    sys.exit(f'ilr_jax.main: unknown config key {what} (the config is locked; see the config file)')
  except (flags.Error, schema.ConfigError, TypeError, ValueError) as e:
    sys.exit(f'ilr_jax.main: bad flags or config: {_one_line(e)}')


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
  from ilr_jax import pipeline, schema, workdir

  try:
    schema.validate(_CONFIG.value)
    pipeline.check_workdir(_CONFIG.value, _WORKDIR.value, recompute_changed=_RECOMPUTE.value)
  except (schema.ConfigError, workdir.ConfigChangedError) as e:
    sys.exit(f'ilr_jax.main: {e}')
  table = pipeline.run(_CONFIG.value, _WORKDIR.value, recompute_changed=_RECOMPUTE.value)
  print(table, flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse)
