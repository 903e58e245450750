"""Faults of a whole pipeline run on one workdir (`configs/arith.py:sft,tiny`, in subprocesses):

  1. SIGKILLed right after the supervisor fit commits its step-45 checkpoint (the issue's window);
  2. the rerun hits a full disk writing the step-90 snapshot: one line, exit status 2;
  3. the rerun after "freeing space" finishes, with both supervisor snapshots present;
  4. a truncated stage record: one line naming it and the --redo that fixes it, nothing lost;
  5. `--redo=supervisor` recomputes that stage and everything after it without a fault: the
     results are identical to those of the faulted run.

One chain, so the pipeline's work is paid about twice (about 2 minutes on 2 idle cores).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

import ilr_jax
from ilr_jax import fit, labels

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_ROOT = pathlib.Path(ilr_jax.__file__).resolve().parents[1]  # the ilr_jax under test
CONFIG = 'configs/arith.py:sft,tiny'

pytestmark = pytest.mark.e2e

# main with the snapshot writer failing once as a full disk does (ENOSPC) at the step-90 snapshot.
_FULL_DISK = """
import errno, os, sys
from absl import app
from ilr_jax import fit, main
real = fit.save_params
def save_params(model, path, **kw):
  if str(path).endswith('supervisor/fit/snapshots/step_90'):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
  return real(model, path, **kw)
fit.save_params = save_params
sys.argv[0] = 'ilr_jax.main'
app.run(main.main, flags_parser=main._parse)
"""


def _main(wd, cache, *extra, full_disk=False):
  env = dict(
    os.environ,
    PYTHONPATH=str(PACKAGE_ROOT),
    JAX_PLATFORMS='cpu',
    TOKENIZERS_PARALLELISM='false',
    XLA_FLAGS='--xla_force_host_platform_device_count=2',
  )
  head = ['-c', _FULL_DISK] if full_disk else ['-m', 'ilr_jax.main']
  cmd = [sys.executable, *head, f'--config={CONFIG}', f'--workdir={wd}', *extra]
  cmd.append(f'--config.compile_cache_dir={cache}')  # the session's (conftest.py)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _rows(wd):
  rows = [json.loads(line) for line in (wd / 'results.jsonl').read_text().splitlines()]
  return [{k: v for k, v in r.items() if k != 'wall_s'} for r in rows]


def _labels(wd):  # as text, so that NaN scores compare equal
  d = labels.load_label_set(wd / 'weak_labels' / 'labels')
  return {k: [str(x) for x in v] for k, v in d.items()}


def _last_line(r):
  lines = r.stderr.strip().splitlines()
  return lines[-1] if lines else ''


@pytest.mark.slow
def test_kill_full_disk_corruption_and_redo_end_with_the_same_results(tmp_path, compile_cache_dir):
  cache = compile_cache_dir  # the session's (conftest.py)
  wd = tmp_path / 'wd'
  sup = wd / 'supervisor' / 'fit'
  r = _main(wd, cache, '--config.debug.kill_at=supervisor:checkpoint_45')
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  assert (sup / 'checkpoints' / '45').is_dir() and not (wd / 'stages' / 'supervisor.json').exists()

  r = _main(wd, cache, full_disk=True)
  assert r.returncode == 2, r.stderr[-3000:]
  line = _last_line(r)
  assert 'out of disk space' in line and 'step_90' in line and 'rerun the same command' in line

  r = _main(wd, cache)
  assert r.returncode == 0, r.stderr[-3000:]
  assert [s for s, _ in fit.fit_checkpoints(sup)] == [45, 90]
  faulted = _rows(wd)
  labels = _labels(wd)

  record = wd / 'stages' / 'sft.json'
  kept = {p: p.read_bytes() for p in (wd / 'stages').rglob('*.json') if p != record}
  record.write_text(record.read_text()[:40])
  r = _main(wd, cache)
  assert r.returncode == 2, r.stderr[-3000:]
  line = _last_line(r)
  assert str(record) in line and '--redo=sft' in line and len(r.stderr.strip().splitlines()) == 1
  assert {p: p.read_bytes() for p in kept} == kept

  r = _main(wd, cache, '--redo=supervisor')
  assert r.returncode == 0, r.stderr[-3000:]
  assert '[ilr_jax] stage supervisor done' in r.stdout  # recomputed, with what follows
  assert '[ilr_jax] stage pretrain/supervisor done' not in r.stdout  # upstream: kept
  assert _rows(wd) == faulted
  assert _labels(wd) == labels
  assert [s for s, _ in fit.fit_checkpoints(sup)] == [45, 90]
