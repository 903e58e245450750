"""launch/ scripts in dry-run mode: they print exactly what they would run, and run nothing."""

import os
import pathlib
import shlex
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _dry(script, *args, **env):
  # PATH without gcloud or a venv: a command that really ran would fail the script (set -e).
  full = dict(PATH='/usr/bin:/bin', DRY_RUN='1', HOME=os.environ.get('HOME', '/tmp'), **env)
  return subprocess.run(
    ['bash', str(ROOT / 'launch' / script), *args],
    env=full,
    capture_output=True,
    text=True,
    timeout=60,
    check=True,
  ).stdout


def _argv(line: str) -> list[str]:
  """The argument vector bash makes of a printed command line (it prints $'...' quoting)."""
  out = subprocess.run(
    ['bash', '-c', f'printf "%s\\0" {line}'], capture_output=True, text=True, check=True
  ).stdout
  return out.split('\0')[:-1]


def test_tpu_vm_dry_run_prints_every_workers_command():
  out = _dry(
    'tpu_vm.sh', '--config=configs/gsm8k.py:ilr', '--workdir=/mnt/runs/a b', TPU_NAME='v4', ZONE='z'
  )
  lines = out.splitlines()
  scp = _argv(lines[0])
  assert scp[:4] == ['gcloud', 'compute', 'tpus', 'tpu-vm'] and scp[4] == 'scp'
  assert '--worker=all' in scp and scp[-1] == 'v4:~/ilr_jax_repo'
  assert '# every worker of v4 runs:' in lines
  ssh = _argv(lines[-1])
  assert ssh[4] == 'ssh' and '--worker=all' in ssh
  script = next(a for a in ssh if a.startswith('--command='))
  main = [ln.strip() for ln in script.splitlines() if 'ilr_jax.main' in ln]
  assert len(main) == 1
  assert shlex.split(main[0]) == [
    'python',
    '-m',
    'ilr_jax.main',
    '--distributed',
    '--config=configs/gsm8k.py:ilr',
    '--workdir=/mnt/runs/a b',
  ]
  assert "pip install -q -e '.[tpu]'" in script


def test_gpu_host_dry_run_prints_the_setup_and_the_command():
  venv = (ROOT / '.venv').exists()
  out = _dry('gpu_host.sh', '--config=configs/bird.py:ilr', '--workdir=/data/x', '--distributed')
  lines = out.splitlines()
  assert _argv(lines[-1]) == [
    '.venv/bin/python',
    '-m',
    'ilr_jax.main',
    '--config=configs/bird.py:ilr',
    '--workdir=/data/x',
    '--distributed',
  ]
  assert 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.92' in lines
  assert _argv(lines[2]) == ['.venv/bin/pip', 'install', '-q', '-e', '.[cuda]']
  assert (ROOT / '.venv').exists() == venv  # the dry run created nothing
