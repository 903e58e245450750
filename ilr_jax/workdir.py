"""The pipeline's working directory: fixed layout, atomic writes and stage records.

Layout of one `--workdir` (nothing encodes a config value into a folder name):

  config.json                  the resolved config of the latest run
  stages/<stage>.json          a finished stage's record (the completion marker, written last)
  stages/<stage>.started.json  the config an unfinished stage was started with
  <stage>/...                  the stage's outputs (models, label sets (labels.py), samples, ...)
  results.jsonl, report.md, accuracy.png, tb/   the report (report.py)

A stage name may hold '/' (`ilr/r1/labels`); its outputs then sit in nested folders.

Integrity. A stage declares the config keys it depends on and the stages it reads from; its
fingerprint covers the values of its own keys and, transitively, those of every upstream stage,
so no artifact can silently mix two configs. Before any work, `Workdir.check` compares the current
values with every stage already recorded (finished or only started) and refuses with a one-line
message naming the first changed key, unless `recompute_changed` is set: then every stage whose
values changed is forgotten (record and outputs deleted) and computed again.

Atomicity. JSON files are written to a temporary file in the same folder and renamed over the
target; directories (label sets, models) are written into a temporary sibling and renamed into
place. The record of a stage is written only after all its outputs are in place, so a process
killed at any moment leaves either a finished stage or one that a rerun recomputes (resuming from
the checkpoints its training loop left), never a half-written artifact that a later run trusts.

Faults (the workdir lock is lock.py). Every record, label set and checkpoint is read through
`load`, which turns a missing or corrupted file into one ArtifactError naming the path; `redo`
forgets a stage and everything downstream of it (`--redo=STAGE`). Config keys in `ignore`
(resource locations, worker counts, timeouts) are never part of a fingerprint: changing them
never invalidates a stage.

Multi-host: every process builds the same stages; only process 0 writes non-array artifacts
(`is_writer`); `sync` is a barrier so the others read what process 0 wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np


class WorkdirError(ValueError):
  """A workdir problem the user fixes (the message says how); main prints it as one line."""


class ConfigChangedError(WorkdirError):
  """A finished (or started) stage was computed with a different value of a config key."""


class ArtifactError(WorkdirError):
  """A file a run reads is missing or unreadable; `path` names it (main adds the --redo fix)."""

  def __init__(self, path: str | os.PathLike, problem: str):
    self.path = pathlib.Path(path).absolute()
    self.problem = problem
    super().__init__(f'{self.path}: {problem}')


# What a truncated, emptied or overwritten file raises while being parsed: JSONDecodeError and
# pyarrow's ArrowInvalid are ValueErrors, tensorstore reports corrupt chunks as ValueError, and a
# JSON file of the wrong shape fails with KeyError / TypeError. Only reads are wrapped, so a bug
# elsewhere still ends in its own traceback.
READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError)


def load(path: str | os.PathLike, read: Callable[[pathlib.Path], Any], what: str) -> Any:
  """`read(path)`, with a missing or corrupted file turned into one ArtifactError naming it."""
  path = pathlib.Path(path)
  if not path.exists():
    raise ArtifactError(path, f'{what} is missing')
  try:
    return read(path)
  except READ_ERRORS as e:
    detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
    raise ArtifactError(
      path, f'{what} is unreadable ({type(e).__name__}{": " + detail if detail else ""})'
    ) from e


def is_writer() -> bool:
  """True on the one process that writes non-array artifacts (process 0)."""
  import jax

  return jax.process_index() == 0


def sync(name: str) -> None:
  """Barrier across processes (a no-op with one process)."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


# -- atomic writes -------------------------------------------------------------------------------


def jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None if math.isnan(x) else x
  return x


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Write `obj` as JSON through a temporary file and a rename (atomic on POSIX)."""
  write_text(path, json.dumps(jsonable(obj), indent=1, sort_keys=True) + '\n')


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yield a temporary file beside `path` to write; on success it is renamed over `path` (atomic
  on POSIX). On any failure, an interrupt included, the temporary file is removed and `path` keeps
  its old contents."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + '.tmp-', dir=path.parent)
  os.close(fd)
  try:
    yield pathlib.Path(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_text(path: str | os.PathLike, text: str) -> None:
  """Write a text file atomically (`atomic_file`), synced to disk before the rename."""
  with atomic_file(path) as tmp, open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def read_json(path: str | os.PathLike, what: str = 'JSON file') -> Any:
  """A JSON file's contents; a missing or corrupted file is an ArtifactError naming it."""
  return load(path, lambda p: json.loads(p.read_text()), what)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yield a temporary sibling directory; on success it replaces `path` (removed first if there).

  The window between removing an old `path` and the rename is harmless: only an unfinished stage
  rewrites its outputs, and nothing trusts them before the stage's record exists.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=path.name + '.tmp-', dir=path.parent))
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if path.exists():
    shutil.rmtree(path)
  os.replace(tmp, path)


# -- stages --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
  """One unit of resumable work.

  Attributes:
    name: unique, may hold '/'; also the folder of its outputs.
    keys: dotted config keys its result depends on; a key names its whole subtree.
    after: names of the stages whose outputs it reads (their keys count as its own).
  """

  name: str
  keys: tuple[str, ...] = ()
  after: tuple[str, ...] = ()


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """Nested mappings -> {'a.b.c': leaf}; sequences are leaves (as JSON lists)."""
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, f'{prefix}{k}.'))
    if not tree and prefix:
      out[prefix[:-1]] = {}
    return out
  return {prefix[:-1]: jsonable(tree)}


def _under(k: str, key: str) -> bool:
  return k == key or k.startswith(key + '.')


def _select(flat: Mapping[str, Any], key: str) -> dict[str, Any]:
  picked = {k: v for k, v in flat.items() if _under(k, key)}
  if not picked:
    raise KeyError(f'stage depends on config key {key!r}, which the config does not have')
  return picked


# debug.kill_at: 'STAGE' (after its record), 'STAGE:outputs' (after its outputs, before its
# record), 'STAGE:checkpoint_N' / 'STAGE:snapshot_N' (inside the stage's fit, right after the
# resumable checkpoint / the params snapshot of step N is on disk).
_KILL_SUFFIX = re.compile(r'(|outputs|(checkpoint|snapshot)_[0-9]+)')


def fingerprint(values: Mapping[str, Any]) -> str:
  blob = json.dumps(jsonable(dict(values)), sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _first_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
  for k in sorted(set(old) | set(new)):
    if old.get(k, '<absent>') != new.get(k, '<absent>'):
      return k, old.get(k, '<absent>'), new.get(k, '<absent>')
  return None


_UNLISTED = ('checkpoints', 'tb')  # pruned (orbax keeps the last few) or appended to by design


def _outputs(folder: pathlib.Path, depth: int = 3) -> list[str]:
  """The files and folders of a stage's outputs, `depth` levels deep (the record lists them)."""
  found: list[str] = []

  def walk(d: pathlib.Path, rel: str, level: int) -> None:
    for p in sorted(d.iterdir()):
      if '.tmp-' in p.name:
        continue
      found.append(rel + p.name)
      if p.is_dir() and level < depth and p.name not in _UNLISTED:
        walk(p, rel + p.name + '/', level + 1)

  if folder.is_dir():
    walk(folder, '', 1)
  return found


class Workdir:
  """Stage records and output paths under one root folder.

  Args:
    root: the workdir.
    config: the resolved config as nested mappings (a ConfigDict's `to_dict()`).
    stages: every stage this run may execute, upstream before downstream.
    recompute_changed: forget and recompute stages whose config values changed, instead of
      refusing.
    kill_at: a test hook (config `debug.kill_at`): 'STAGE' SIGKILLs this process right after that
      stage's record is written, 'STAGE:outputs' after its outputs but before its record,
      'STAGE:checkpoint_N' / 'STAGE:snapshot_N' inside its fit (`fit_hook`).
    ignore: config keys (with their subtrees) that never change a result, left out of every
      fingerprint (e.g. a database folder, a worker count).
  """

  def __init__(
    self,
    root: str | os.PathLike,
    config: Mapping[str, Any],
    stages: Sequence[Stage],
    recompute_changed: bool = False,
    kill_at: str = '',
    ignore: Sequence[str] = (),
  ):
    self.root = pathlib.Path(root)
    self.kill_at = kill_at
    self.ignore = tuple(ignore)
    self.flat = {k: v for k, v in flatten(config).items() if not self._ignored(k)}
    self.recompute_changed = recompute_changed
    self.stages: dict[str, Stage] = {}
    self._values: dict[str, dict[str, Any]] = {}
    for st in stages:
      self.add(st)
    name, _, suffix = kill_at.partition(':')
    if kill_at and (name not in self.stages or not _KILL_SUFFIX.fullmatch(suffix)):
      raise WorkdirError(
        f'--config.debug.kill_at={kill_at!r} is not STAGE[:outputs|:checkpoint_N|:snapshot_N] '
        f'with a STAGE of this run ({", ".join(self.stages)})'
      )

  def _ignored(self, key: str) -> bool:
    return any(_under(key, k) for k in self.ignore)

  def add(self, stage: Stage) -> None:
    """Register a stage; its upstream stages must be registered first."""
    if stage.name in self.stages:
      raise ValueError(f'stage {stage.name!r} registered twice')
    values: dict[str, Any] = {}
    for up in stage.after:
      if up not in self._values:
        raise ValueError(f'stage {stage.name!r} reads {up!r}, which is not registered before it')
      values.update(self._values[up])
    for key in stage.keys:
      values.update(_select(self.flat, key))
    self.stages[stage.name] = stage
    self._values[stage.name] = values

  # -- paths -------------------------------------------------------------------------------------

  def path(self, stage: str, *parts: str) -> pathlib.Path:
    """The folder of a stage's outputs (or a path inside it)."""
    return self.root.joinpath(stage, *parts)

  def _record_path(self, stage: str, started: bool = False) -> pathlib.Path:
    return self.root / 'stages' / (stage + ('.started.json' if started else '.json'))

  def values(self, stage: str) -> dict[str, Any]:
    """The config values a stage depends on (its own and its upstream stages')."""
    return dict(self._values[stage])

  # -- integrity ---------------------------------------------------------------------------------

  def _read_record(self, stage: str, started: bool = False) -> dict[str, Any]:
    def read(p: pathlib.Path) -> dict[str, Any]:
      rec = json.loads(p.read_text())
      need = ('name', 'config') if started else ('name', 'config', 'wall_s', 'metrics')
      missing = [k for k in need if k not in rec]
      if missing or rec['name'] != stage:
        raise KeyError(f'not a record of stage {stage!r} (lacks {missing or ["its name"]})')
      return rec

    return load(self._record_path(stage, started), read, f'the record of stage {stage!r}')

  def _stored_values(self, stage: str) -> tuple[dict[str, Any], bool] | None:
    """(recorded config values, finished?) of a stage, None if it never started."""
    for started in (False, True):
      if self._record_path(stage, started).exists():
        values = self._read_record(stage, started)['config']
        return {k: v for k, v in values.items() if not self._ignored(k)}, not started
    return None

  def check(self) -> list[str]:
    """Compare every registered stage's recorded config with the current one, before any work.

    Returns the stages forgotten (with `recompute_changed`). Raises ConfigChangedError naming the
    first changed key otherwise.
    """
    forgotten = []
    for name in self.stages:
      stored = self._stored_values(name)
      if stored is None:
        continue
      old, finished = stored
      change = _first_change(old, jsonable(self._values[name]))
      if change is None:
        continue
      if not self.recompute_changed:
        key, was, now = change
        how = 'was computed' if finished else 'was started (not finished)'
        raise ConfigChangedError(
          f'config key {key} changed from {was!r} to {now!r}, but stage {name!r} in '
          f'{self.root} {how} with the old value; rerun with --recompute_changed to '
          'recompute the affected stages, or use a new --workdir'
        )
      self.forget(name)
      forgotten.append(name)
    return forgotten

  def downstream(self, stage: str) -> list[str]:
    """`stage` and every registered stage that reads from it, directly or not, in plan order."""
    if stage not in self.stages:
      raise WorkdirError(
        f'--redo={stage!r} names no stage of this run; stages: {", ".join(self.stages)}'
      )
    hit = {stage}
    for name, st in self.stages.items():
      if any(up in hit for up in st.after):
        hit.add(name)
    return [n for n in self.stages if n in hit]

  def redo(self, stage: str) -> list[str]:
    """Forget `stage` and everything downstream of it (records and outputs); returns them."""
    names = self.downstream(stage)
    for name in names:
      self.forget(name)
    sync(f'redo:{stage}')
    return names

  def stage_of(self, path: str | os.PathLike) -> str | None:
    """The registered stage a path under this workdir belongs to (its record or an output)."""
    try:
      rel = pathlib.Path(path).absolute().relative_to(self.root.absolute()).as_posix()
    except ValueError:
      return None
    if rel.startswith('stages/'):
      name = rel[len('stages/') :].removesuffix('.json').removesuffix('.started')
      return name if name in self.stages else None
    owners = [n for n in self.stages if rel == n or rel.startswith(n + '/')]
    return max(owners, key=len, default=None)

  def fit_hook(self, stage: str) -> Callable[[str, int], None] | None:
    """fit.fit's `after_save` for a stage: the 'checkpoint_N' / 'snapshot_N' kills of kill_at."""
    name, _, suffix = self.kill_at.partition(':')
    if name != stage or not suffix.startswith(('checkpoint_', 'snapshot_')):
      return None

    def hook(kind: str, step: int) -> None:
      if f'{kind}_{step}' == suffix:
        os.kill(os.getpid(), signal.SIGKILL)

    return hook

  def forget(self, stage: str) -> None:
    """Delete a stage's record and outputs."""
    if not is_writer():
      return
    for started in (False, True):
      with contextlib.suppress(FileNotFoundError):
        self._record_path(stage, started).unlink()
    shutil.rmtree(self.path(stage), ignore_errors=True)

  # -- records -----------------------------------------------------------------------------------

  def done(self, stage: str) -> bool:
    """Whether a stage finished: its record exists and every output it lists is still there
    (a missing one is an ArtifactError naming it, never a stage trusted without it)."""
    if not self._record_path(stage).exists():
      return False
    for rel in self._read_record(stage).get('outputs', ()):
      if not self.path(stage, rel).exists():
        raise ArtifactError(self.path(stage, rel), f'an output of finished stage {stage!r} is gone')
    return True

  def record(self, stage: str) -> dict[str, Any]:
    """A finished stage's record: name, config, fingerprint, wall_s, metrics."""
    return self._read_record(stage)

  def metrics(self, stage: str) -> dict[str, Any]:
    return self.record(stage)['metrics']

  def start(self, stage: str) -> None:
    """Note that a stage began with the current config (so its checkpoints are tied to it)."""
    if is_writer():
      values = self._values[stage]
      write_json(
        self._record_path(stage, started=True),
        {'name': stage, 'config': values, 'fingerprint': fingerprint(values)},
      )
    sync(f'start:{stage}')

  def finish(self, stage: str, metrics: Mapping[str, Any], wall_s: float) -> None:
    """Write the completion record (after every output of the stage is in place)."""
    if is_writer():
      values = self._values[stage]
      write_json(
        self._record_path(stage),
        {
          'name': stage,
          'config': values,
          'fingerprint': fingerprint(values),
          'wall_s': float(wall_s),
          'finished_at': time.strftime('%Y-%m-%dT%H:%M:%S'),
          'metrics': dict(metrics),
          'outputs': _outputs(self.path(stage)),
        },
      )
      with contextlib.suppress(FileNotFoundError):
        self._record_path(stage, started=True).unlink()
    sync(f'finish:{stage}')

  def run(self, stage: str, fn: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
    """Run a registered stage unless it has finished; returns its metrics either way.

    `fn` writes the stage's outputs under `self.path(stage)` (atomically, or resumably from its
    own checkpoints) and returns JSON-able metrics.
    """
    if stage not in self.stages:
      raise KeyError(f'stage {stage!r} is not registered')
    if self.done(stage):
      return self.metrics(stage)
    self.start(stage)
    t0 = time.perf_counter()
    metrics = dict(fn())
    wall_s = time.perf_counter() - t0
    if self.kill_at == f'{stage}:outputs':
      os.kill(os.getpid(), signal.SIGKILL)
    self.finish(stage, metrics, wall_s)
    if self.kill_at == stage:
      os.kill(os.getpid(), signal.SIGKILL)
    return self.metrics(stage)
