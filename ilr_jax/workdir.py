"""The pipeline's working directory: fixed layout, atomic writes, stage records and label sets.

Layout of one `--workdir` (nothing encodes a config value into a folder name):

  config.json                  the resolved config of the latest run
  stages/<stage>.json          a finished stage's record (the completion marker, written last)
  stages/<stage>.started.json  the config an unfinished stage was started with
  <stage>/...                  the stage's outputs (models, label sets, samples, checkpoints)
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
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

LABEL_COLUMNS = (
  'id',
  'question',
  'label',
  'source',
  'round',
  'score',
  'replaced',
  'agreed',
  'correct',
)
LABEL_SOURCES = ('weak', 'proposal', 'gt')


class ConfigChangedError(ValueError):
  """A finished (or started) stage was computed with a different value of a config key."""


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


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None if math.isnan(x) else x
  return x


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Write `obj` as JSON through a temporary file and a rename (atomic on POSIX)."""
  write_text(path, json.dumps(_jsonable(obj), indent=1, sort_keys=True) + '\n')


def write_text(path: str | os.PathLike, text: str) -> None:
  """Write a text file through a temporary file and a rename (atomic on POSIX); on any failure,
  an interrupt included, the temporary file is removed and `path` keeps its old contents."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + '.tmp-', dir=path.parent)
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(pathlib.Path(path).read_text())


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


# -- label sets ----------------------------------------------------------------------------------


def check_label_rows(rows: Mapping[str, Sequence]) -> int:
  """Validate label-set columns; returns the number of rows. Raises naming the bad column."""
  missing = [c for c in LABEL_COLUMNS if c not in rows]
  if missing:
    raise ValueError(f'label set lacks columns {missing}')
  n = len(rows['id'])
  for c in rows:
    if len(rows[c]) != n:
      raise ValueError(f'label set column {c!r} has {len(rows[c])} rows, id has {n}')
  bad = sorted({s for s in rows['source'] if s not in LABEL_SOURCES})
  if bad:
    raise ValueError(f'label set sources {bad} not in {LABEL_SOURCES}')
  if len(set(rows['id'])) != n:
    raise ValueError('label set ids are not unique')
  return n


def save_label_set(path: str | os.PathLike, rows: Mapping[str, Sequence]) -> None:
  """Save a label set (columns LABEL_COLUMNS, plus any extra) as an HF dataset, atomically.

  Columns: id, question, label; source ('weak' | 'proposal' | 'gt': where the label came from);
  round (the round that last set it); score (the evaluator's score of the replacing proposal,
  NaN if none); replaced (set by a proposal in the round that wrote this set); agreed (this round's
  proposal agreed with the previous label); correct (the label's correctness where the ground
  truth is known, else None).
  """
  import datasets

  check_label_rows(rows)
  cols = {c: list(rows[c]) for c in rows}
  cols['score'] = [float('nan') if s is None else float(s) for s in cols['score']]
  features = datasets.Features(
    {
      **{c: datasets.Value('string') for c in ('id', 'question', 'label', 'source')},
      'round': datasets.Value('int32'),
      'score': datasets.Value('float64'),
      'replaced': datasets.Value('bool'),
      'agreed': datasets.Value('bool'),
      'correct': datasets.Value('bool'),
    }
  )
  extra = {c: v for c, v in cols.items() if c not in LABEL_COLUMNS}
  ds = datasets.Dataset.from_dict(
    {c: cols[c] for c in LABEL_COLUMNS},
    features=features,
  )
  for c, v in extra.items():
    ds = ds.add_column(c, v)
  if not is_writer():
    return
  with atomic_dir(path) as tmp:
    ds.save_to_disk(os.fspath(tmp))


def load_label_set(path: str | os.PathLike) -> dict[str, list]:
  """A saved label set as a dict of column lists (NaN scores as float('nan'))."""
  import datasets

  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'label set {path} does not exist')
  ds = datasets.load_from_disk(os.fspath(path))
  rows = {c: ds[c] for c in ds.column_names}
  import jax

  if jax.process_count() > 1:
    # Every process reads what process 0 wrote; the log line lets a run show they read the same.
    print(
      f'[ilr_jax] process {jax.process_index()} read label set {path} digest {label_digest(rows)}',
      flush=True,
    )
  return rows


def label_digest(rows: Mapping[str, Sequence]) -> str:
  """A short content hash of a label set's columns (NaN scores hash as null)."""
  blob = json.dumps(_jsonable({c: list(rows[c]) for c in sorted(rows)}), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
  return {prefix[:-1]: _jsonable(tree)}


def _select(flat: Mapping[str, Any], key: str) -> dict[str, Any]:
  picked = {k: v for k, v in flat.items() if k == key or k.startswith(key + '.')}
  if not picked:
    raise KeyError(f'stage depends on config key {key!r}, which the config does not have')
  return picked


def fingerprint(values: Mapping[str, Any]) -> str:
  blob = json.dumps(_jsonable(dict(values)), sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _first_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
  for k in sorted(set(old) | set(new)):
    if old.get(k, '<absent>') != new.get(k, '<absent>'):
      return k, old.get(k, '<absent>'), new.get(k, '<absent>')
  return None


class Workdir:
  """Stage records and output paths under one root folder.

  Args:
    root: the workdir.
    config: the resolved config as nested mappings (a ConfigDict's `to_dict()`).
    stages: every stage this run may execute, upstream before downstream.
    recompute_changed: forget and recompute stages whose config values changed, instead of
      refusing.
    kill_at: a test hook (config `debug.kill_at`): 'STAGE' SIGKILLs this process right after that
      stage's record is written, 'STAGE:outputs' after its outputs but before its record.
  """

  def __init__(
    self,
    root: str | os.PathLike,
    config: Mapping[str, Any],
    stages: Sequence[Stage],
    recompute_changed: bool = False,
    kill_at: str = '',
  ):
    self.root = pathlib.Path(root)
    self.kill_at = kill_at
    self.flat = flatten(config)
    self.recompute_changed = recompute_changed
    self.stages: dict[str, Stage] = {}
    self._values: dict[str, dict[str, Any]] = {}
    for st in stages:
      self.add(st)
    if kill_at and kill_at.split(':')[0] not in self.stages:
      raise ValueError(f'debug.kill_at names no stage of this run: {kill_at!r}')

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

  def _stored_values(self, stage: str) -> dict[str, Any] | None:
    for started in (False, True):
      p = self._record_path(stage, started)
      if p.exists():
        return read_json(p)['config']
    return None

  def check(self) -> list[str]:
    """Compare every registered stage's recorded config with the current one, before any work.

    Returns the stages forgotten (with `recompute_changed`). Raises ConfigChangedError naming the
    first changed key otherwise.
    """
    forgotten = []
    for name in self.stages:
      old = self._stored_values(name)
      if old is None:
        continue
      change = _first_change(old, _jsonable(self._values[name]))
      if change is None:
        continue
      if not self.recompute_changed:
        key, was, now = change
        raise ConfigChangedError(
          f'config key {key} changed from {was!r} to {now!r}, but stage {name!r} in '
          f'{self.root} was computed with the old value; rerun with --recompute_changed to '
          'recompute the affected stages, or use a new --workdir'
        )
      self.forget(name)
      forgotten.append(name)
    return forgotten

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
    return self._record_path(stage).exists()

  def record(self, stage: str) -> dict[str, Any]:
    """A finished stage's record: name, config, fingerprint, wall_s, metrics."""
    p = self._record_path(stage)
    if not p.exists():
      raise FileNotFoundError(f'stage {stage!r} has not finished in {self.root}')
    return read_json(p)

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
