"""Several JAX processes, one run: 2 processes x 4 CPU devices against 1 process x 8 devices.

The pipeline runs `configs/arith.py:sft,tiny` (the smallest run with every kind of stage: two
pretrainings, the supervisor's SFT with its snapshots, decoding, a label set, the student's SFT,
the report; shrunk further by overrides) on one 8-device mesh with data=2 and fsdp=4: once in one
process with 8 devices, once in two processes with 4 each joined by `--distributed` on 127.0.0.1
(gloo collectives). Both must end with equal results, label sets and report; process 0 alone
writes files (an audit hook records every file that the other process opens for writing); the
other process reads the same label set (its digest in its log). Then a copy of the 2-process
workdir redoes the student's stage with process 1 SIGKILLed in the middle of its fit: process 0
must exit within the heartbeat timeout with JAX's error, nothing finished may change, and a rerun
of both resumes the fit and ends equal.
"""

import concurrent.futures
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from ilr_jax import distributed, labels

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = 'configs/arith.py:sft,tiny'
# Shrinks the tiny run (fewer student epochs, test problems and new tokens; the supervisor keeps its
# 30 epochs, since with 3 none of its weak labels is valid); the mesh has both batch axes > 1, and
# the fsdp axis is the one inside a process.
SHRINK = (
  '--config.mesh.data=2',
  '--config.mesh.fsdp=4',
  '--config.task.num_test=16',
  '--config.task.max_new_tokens=12',
  '--config.sft.epochs=3',
)
# The killed run redoes the student's stage and saves a resumable checkpoint every 2 of its 6
# steps (bookkeeping, in no stage's fingerprint: a resumed fit ends bitwise equal); process 1
# SIGKILLs itself right after the first one is on disk.
KILLED = ('--redo=sft', '--config.fit.checkpoint_every=2')
KILL_AT = '--config.debug.kill_at=sft:checkpoint_2'
HEARTBEAT_S = 10

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Runs a module like `python -m`, recording every path this process opens for writing, creates,
# renames or removes (Python-level: the pipeline's own files, datasets, JAX's cache).
AUDIT = """
import os, runpy, sys
log = open(os.environ['ILR_AUDIT_LOG'], 'w', buffering=1)
root = os.path.realpath(os.environ['ILR_AUDIT_ROOT'])
WRITES = ('os.rename', 'os.replace', 'os.remove', 'os.rmdir', 'os.mkdir', 'shutil.rmtree')
def hook(event, args):
  path = None
  if event == 'open' and args and isinstance(args[0], (str, bytes, os.PathLike)):
    mode, flags = args[1], args[2]
    if (isinstance(mode, str) and any(c in mode for c in 'wax+')) or (
        isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
      path = args[0]
  elif event in WRITES and args and isinstance(args[0], (str, bytes, os.PathLike)):
    path = args[0]
  if path is not None:
    p = os.path.realpath(os.fsdecode(path))
    if p.startswith(root):
      log.write(event + ' ' + p + chr(10))
sys.addaudithook(hook)
sys.argv = ['ilr_jax.main'] + sys.argv[1:]
runpy.run_module('ilr_jax.main', run_name='__main__')
"""


def _env(devices: int, **extra) -> dict:
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    TOKENIZERS_PARALLELISM='false',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
    PYTHONPATH=str(ROOT),
  )
  env.pop('JAX_COORDINATOR_ADDRESS', None)
  env.update(extra)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _args(wd, cache, extra=()) -> list[str]:
  return [
    f'--config={CONFIG}',
    f'--workdir={wd}',
    f'--config.compile_cache_dir={cache}',
    *SHRINK,
    *extra,
  ]


def _single(wd, cache, logs: pathlib.Path) -> int:
  cmd = [sys.executable, '-m', 'ilr_jax.main', *_args(wd, cache)]
  with open(logs / 'one.log', 'w') as out:
    return subprocess.run(
      cmd, cwd=ROOT, env=_env(8), stdout=out, stderr=subprocess.STDOUT, timeout=1800
    ).returncode


def _start_pair(wd, cache, logs: pathlib.Path, tag: str, extra=(), extra1=()):
  port = _free_port()
  procs = []
  for i in range(2):
    cmd = [
      sys.executable,
      '-c',
      AUDIT,
      *_args(wd, cache, extra),
      *(extra1 if i == 1 else ()),
      '--distributed',
      f'--coordinator_address=127.0.0.1:{port}',
      '--num_processes=2',
      f'--process_id={i}',
      f'--heartbeat_timeout_s={HEARTBEAT_S}',
      '--initialization_timeout_s=120',
      '--shutdown_timeout_s=60',
    ]
    env = _env(4, ILR_AUDIT_LOG=str(logs / f'{tag}.p{i}.audit'), ILR_AUDIT_ROOT=str(wd))
    out = open(logs / f'{tag}.p{i}.log', 'w')
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
  return procs


def _wait(procs, timeout=1800) -> list[int]:
  return [p.wait(timeout=timeout) for p in procs]


def _pair(wd, cache, logs, tag, extra=()):
  procs = _start_pair(wd, cache, logs, tag, extra)
  codes = _wait(procs)
  assert codes == [0, 0], (codes, _tail(logs / f'{tag}.p0.log'), _tail(logs / f'{tag}.p1.log'))


def _tail(path, n=4000) -> str:
  return pathlib.Path(path).read_text()[-n:]


def _killed_then_rerun(two, killed, cache, logs):
  """On a copy of the finished 2-process workdir, redo the student's stage with process 1 killed
  after the first checkpoint of its fit; time how long process 0 takes to exit; rerun both."""
  shutil.copytree(two, killed)
  # The rerun must write these again (the copy's would make the comparison trivial).
  (killed / 'results.jsonl').unlink()
  (killed / 'report.md').unlink()
  finished = {
    p.name: p.read_text() for p in (killed / 'stages').glob('*.json') if p.name != 'sft.json'
  }
  procs = _start_pair(killed, cache, logs, 'killed', KILLED, (KILL_AT,))
  rc1 = procs[1].wait(timeout=1800)
  t_kill = time.monotonic()
  try:
    rc0 = procs[0].wait(timeout=HEARTBEAT_S + 90)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    raise AssertionError('process 0 still ran 100 s after process 1 was killed') from None
  survived_s = time.monotonic() - t_kill
  after = {p.name: p.read_text() for p in (killed / 'stages').glob('*.json')}
  checkpoints = sorted(p.name for p in (killed / 'sft' / 'fit' / 'checkpoints').iterdir())
  _pair(killed, cache, logs, 'rerun', KILLED[1:])
  return dict(
    rc0=rc0, rc1=rc1, survived_s=survived_s, finished=finished, after=after, checkpoints=checkpoints
  )


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp('distributed')
  logs = base / 'logs'
  logs.mkdir()
  one, two, killed = base / 'one', base / 'two', base / 'killed'
  t0 = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    f_one = pool.submit(_single, one, base / 'cache1', logs)
    f_two = pool.submit(
      lambda: (
        _pair(two, base / 'cache2', logs, 'two'),
        _killed_then_rerun(two, killed, base / 'cache2', logs),
      )
    )
    rc_one = f_one.result()
    _, kill = f_two.result()
  assert rc_one == 0, _tail(logs / 'one.log')
  print(
    f'distributed runs: {time.monotonic() - t0:.0f} s; survivor exited {kill["survived_s"]:.1f} s'
  )
  return dict(one=one, two=two, killed=killed, logs=logs, kill=kill)


def _rows(wd):
  rows = [json.loads(line) for line in (wd / 'results.jsonl').read_text().splitlines()]
  for r in rows:
    r.pop('wall_s', None)
  return rows


def _label_dirs(wd):
  return sorted(p.parent.relative_to(wd) for p in wd.rglob('labels/dataset_info.json'))


def _same_label_sets(a_wd, b_wd):
  dirs = _label_dirs(a_wd)
  assert dirs and dirs == _label_dirs(b_wd)
  for rel in dirs:
    a, b = labels.load_label_set(a_wd / rel), labels.load_label_set(b_wd / rel)
    assert labels.label_digest(a) == labels.label_digest(b), rel


def _report(wd) -> str:
  # The report's figures, without its wall-clock column if it has one.
  return (wd / 'report.md').read_text()


def _files(wd) -> set[str]:
  """Every file's path, with the names that differ between any two runs made equal: orbax's
  data files (32 hex digits, random) and TensorBoard's event files (a timestamp). Orbax writes
  each process's shards of an array checkpoint (ocdbt.process_N, array_metadatas/process_N):
  per-process array files by design, not duplicates, so those are left out."""
  out = set()
  for p in wd.rglob('*'):
    rel = p.relative_to(wd)
    if not p.is_file() or rel.parts[0] == 'jax_cache' or 'process_' in str(rel):
      continue
    parts = [
      '<data>'
      if re.fullmatch('[0-9a-f]{32}', x)
      else ('<events>' if x.startswith('events.out.tfevents.') else x)
      for x in rel.parts
    ]
    out.add('/'.join(parts))
  return out


def _non_array_writes(audit: str) -> list[str]:
  """Writes other than orbax's per-process array files and mkdir of folders."""
  out = []
  for line in audit.splitlines():
    event, path = line.split(' ', 1)
    if 'orbax-checkpoint-tmp' in path or 'process_' in path or event == 'os.mkdir':
      continue
    out.append(line)
  return out


def _predictions(wd) -> str:
  # The student's test answers: texts that change with any difference in its parameters.
  return (wd / 'sft' / 'test_predictions.json').read_text()


def test_two_processes_equal_one(runs):
  one, two = runs['one'], runs['two']
  assert _rows(one) == _rows(two)
  assert _predictions(one) == _predictions(two)
  _same_label_sets(one, two)
  assert _report(one) == _report(two)


def test_process_0_alone_writes(runs):
  one, two, logs = runs['one'], runs['two'], runs['logs']
  # No duplicates (a second writer's temporary or per-process files) and no partial files.
  assert _files(one) == _files(two)
  assert (
    not list(two.rglob('*.tmp-*'))
    and not list(two.rglob('*.tmp'))
    and not list(two.rglob('*orbax-checkpoint-tmp*'))
  )
  writes0 = _non_array_writes((logs / 'two.p0.audit').read_text())
  writes1 = _non_array_writes((logs / 'two.p1.audit').read_text())
  assert len(writes0) > 20  # the hook sees process 0's writes, so its silence on 1 means something
  assert writes1 == [], writes1[:20]


def test_other_process_read_the_same_label_sets(runs):
  two, logs = runs['two'], runs['logs']
  log1 = (logs / 'two.p1.log').read_text()
  assert 'process 1 of 2: 4 local of 8 cpu devices' in log1
  read = {}
  for line in log1.splitlines():
    if line.startswith('[ilr_jax] process 1 read label set '):
      path, digest = line.removeprefix('[ilr_jax] process 1 read label set ').split(' digest ')
      read[path] = digest
  assert read
  for path, digest in read.items():
    assert labels.label_digest(labels.load_label_set(path)) == digest, path
    assert pathlib.Path(path).is_relative_to(two)


def test_a_killed_process_stops_the_other_and_the_rerun_resumes(runs):
  kill, one, killed, logs = runs['kill'], runs['one'], runs['killed'], runs['logs']
  assert kill['rc1'] == -signal.SIGKILL
  # The survivor exits (JAX's coordination service aborts it) within the heartbeat timeout plus
  # its polling, instead of waiting at a barrier.
  assert kill['rc0'] != 0
  assert kill['survived_s'] < HEARTBEAT_S + 60, kill['survived_s']
  assert 'another task died' in (logs / 'killed.p0.log').read_text()
  # Killed in the middle of the fit: one checkpoint of its three on disk.
  assert kill['checkpoints'] == ['2'], kill['checkpoints']
  # Nothing finished before the kill was lost or rewritten, and the rerun did not redo it.
  assert kill['finished'] and all(kill['after'][k] == v for k, v in kill['finished'].items())
  rerun0 = (logs / 'rerun.p0.log').read_text()
  for name in kill['finished']:
    assert f'stage {name.removesuffix(".json")} done' not in rerun0
  assert f'{killed / "sft" / "fit"}: resumed at step 2 of 6' in rerun0
  assert 'stage sft done' in rerun0
  assert _rows(one) == _rows(killed)
  assert _predictions(one) == _predictions(killed)
  _same_label_sets(one, killed)
  assert _report(one) == _report(killed)
  assert not list(killed.rglob('*.tmp-*'))
  assert not list((killed / 'stages').rglob('*.started.json'))
  assert _non_array_writes((logs / 'rerun.p1.audit').read_text()) == []


def test_coordinator_settings_are_checked():
  with pytest.raises(ValueError, match='not HOST:PORT'):
    distributed.resolve(distributed.Coordinator(address='localhost'))
  with pytest.raises(ValueError, match='process_id 2 is not below num_processes 2'):
    distributed.resolve(distributed.Coordinator(address='h:1', num_processes=2, process_id=2))


def test_coordinator_from_the_environment(monkeypatch):
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  c = distributed.resolve(distributed.Coordinator())
  assert (c.address, c.num_processes, c.process_id) == ('10.0.0.1:1234', 4, 3)
  # Flags win over the environment.
  c = distributed.resolve(distributed.Coordinator(address='h:9', process_id=0))
  assert (c.address, c.num_processes, c.process_id) == ('h:9', 4, 0)
  monkeypatch.setenv('JAX_NUM_PROCESSES', 'four')
  with pytest.raises(ValueError, match='JAX_NUM_PROCESSES'):
    distributed.resolve(distributed.Coordinator())


def test_no_persistent_compilation_cache_for_sharded_cpu_meshes(monkeypatch):
  import jax

  from ilr_jax import compile_cache

  # The test's own single process: data parallelism alone may use the cache, sharded params not.
  assert compile_cache.usable({'data': 8, 'fsdp': 1, 'tensor': 1})
  assert not compile_cache.usable({'data': 2, 'fsdp': 4, 'tensor': 1})
  assert not compile_cache.usable({'data': 4, 'fsdp': 1, 'tensor': 2})
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  assert not compile_cache.usable({'data': 8, 'fsdp': 1, 'tensor': 1})
