"""Safe execution of model-written SQL on sqlite databases, for BIRD's metric and agreement check.

The SQL comes from a model, so it is treated as hostile:
- the database is opened read-only (URI `mode=ro`) with `PRAGMA query_only`, and an authorizer
  allows only reads (SELECT, column reads, functions, recursive CTEs, a few schema pragmas), so
  writes, ATTACH (which creates files, as does VACUUM INTO) and state-changing pragmas are denied;
- each query has a time limit, checked by a progress handler inside sqlite, and caps on the rows
  and bytes fetched and on sqlite's heap;
- queries run in worker processes ('spawn' context: the parent has JAX threads and must never
  fork). A worker that hangs in C past its job's deadline is killed by the parent, and one that
  crashes or is killed scores 0 for its own job only: results travel with their job's id.

Nothing here imports numpy or JAX, so a spawned worker starts fast.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import multiprocessing
import os
import pathlib
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from multiprocessing import connection as mp_connection
from typing import Any

log = logging.getLogger(__name__)

# Schema pragmas a query may read; every other pragma is denied (some change state even when
# called without an argument, e.g. wal_checkpoint).
_READ_PRAGMAS = frozenset(
  {
    'table_info',
    'table_xinfo',
    'table_list',
    'index_list',
    'index_info',
    'index_xinfo',
    'foreign_key_list',
  }
)
_DENIED_FUNCTIONS = frozenset({'load_extension', 'fts3_tokenizer', 'readfile', 'writefile', 'edit'})
# Instructions of sqlite's VM between two calls of the progress handler: about 0.1 ms of work, so
# the time limit is precise and the Python callback costs about 1%.
_PROGRESS_STEPS = 10_000


@dataclasses.dataclass(frozen=True)
class Limits:
  """Bounds on one query.

  Attributes:
    timeout_s: wall-clock limit per query, enforced inside the worker by sqlite's progress handler.
    max_rows: a query that returns more rows fails ('too_many_rows').
    max_bytes: cap on the text and blob bytes fetched by one query ('too_large').
    heap_mb: sqlite's hard heap limit in a worker (memory-hungry queries fail with an error).
    kill_grace_s: the parent kills a worker this long after a job's in-worker limits have passed,
      for a query stuck in one long C call where the progress handler never runs.
  """

  timeout_s: float = 30.0
  max_rows: int = 100_000
  max_bytes: int = 256 * 2**20
  heap_mb: int = 1024
  kill_grace_s: float = 5.0


class QueryError(Exception):
  """A query that did not produce a result; `reason` is a short tag for reports."""

  def __init__(self, reason: str, message: str = ''):
    super().__init__(f'{reason}: {message}' if message else reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Job:
  """Run sql_a and sql_b on the database at db_path and compare their result sets."""

  id: Hashable
  db_path: str
  sql_a: str
  sql_b: str


@dataclasses.dataclass(frozen=True)
class Outcome:
  """Whether a job's two queries returned equal result sets.

  `reason` is None when both ran; otherwise it says which failed and why ('a:timeout',
  'b:error', 'killed', 'crashed'), and `equal` is False.
  """

  id: Hashable
  equal: bool
  reason: str | None = None


def _authorize(action: int, arg1, arg2, db_name, trigger) -> int:
  """sqlite authorizer: a whitelist of read-only actions."""
  del arg1, db_name, trigger
  if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE):
    return sqlite3.SQLITE_OK
  if action == sqlite3.SQLITE_FUNCTION:
    return sqlite3.SQLITE_DENY if arg2.lower() in _DENIED_FUNCTIONS else sqlite3.SQLITE_OK
  return sqlite3.SQLITE_DENY


def _authorize_pragma(action: int, arg1, arg2, db_name, trigger) -> int:
  if action == sqlite3.SQLITE_PRAGMA and arg1.lower() in _READ_PRAGMAS:
    return sqlite3.SQLITE_OK
  return _authorize(action, arg1, arg2, db_name, trigger)


def open_readonly(db_path: str | os.PathLike, limits: Limits = Limits()) -> sqlite3.Connection:
  """Opens an existing sqlite file so that no statement can change it or touch other files."""
  path = pathlib.Path(db_path).resolve()
  if not path.is_file():
    raise FileNotFoundError(f'no sqlite database at {path}')
  conn = sqlite3.connect(f'{path.as_uri()}?mode=ro', uri=True, isolation_level=None)
  # State is set before the authorizer is installed: the authorizer denies these pragmas later.
  conn.execute('PRAGMA query_only = ON')
  conn.execute(f'PRAGMA hard_heap_limit = {int(limits.heap_mb) * 2**20}')
  conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
  conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 2**20)
  conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, 2**17)
  conn.set_authorizer(_authorize_pragma)
  return conn


def run_query(conn: sqlite3.Connection, sql: str, limits: Limits = Limits()) -> list[tuple]:
  """All rows of one read-only statement, within the time, row and byte limits.

  Raises:
    QueryError: reason 'empty', 'timeout', 'too_many_rows', 'too_large', 'not_a_query' or 'error'.
  """
  if not isinstance(sql, str) or not sql.strip():
    raise QueryError('empty')
  deadline = time.monotonic() + limits.timeout_s
  conn.set_progress_handler(lambda: int(time.monotonic() > deadline), _PROGRESS_STEPS)
  try:
    cur = conn.execute(sql)
    if cur.description is None:
      # A comment or a non-query statement yields no rows, which must not match an empty result.
      raise QueryError('not_a_query')
    rows, size = [], 0
    while batch := cur.fetchmany(1000):
      rows.extend(batch)
      size += sum(len(v) for row in batch for v in row if isinstance(v, (str, bytes)))
      if len(rows) > limits.max_rows:
        raise QueryError('too_many_rows', f'more than {limits.max_rows}')
      if size > limits.max_bytes:
        raise QueryError('too_large', f'more than {limits.max_bytes} bytes')
    return rows
  except (sqlite3.Error, MemoryError, OverflowError) as e:
    # MemoryError: sqlite's heap limit (SQLITE_NOMEM); OverflowError: an integer Python refuses.
    if time.monotonic() > deadline:
      raise QueryError('timeout', f'{limits.timeout_s}s') from e
    raise QueryError('error', str(e)[:200]) from e
  finally:
    conn.set_progress_handler(None, _PROGRESS_STEPS)


def compare(job: Job, limits: Limits) -> Outcome:
  """Runs a job in this process: equal result sets (as sets, BIRD's rule) or the failure."""
  try:
    conn = open_readonly(job.db_path, limits)
  except (sqlite3.Error, FileNotFoundError) as e:
    return Outcome(job.id, False, f'open:{type(e).__name__}')
  try:
    results = []
    for side, sql in (('a', job.sql_a), ('b', job.sql_b)):
      try:
        results.append(set(run_query(conn, sql, limits)))
      except QueryError as e:
        return Outcome(job.id, False, f'{side}:{e.reason}')
    return Outcome(job.id, results[0] == results[1])
  finally:
    conn.close()


_READY = '__ready__'
# A spawned worker imports its target's module first; seconds on a loaded machine, never minutes.
_STARTUP_TIMEOUT_S = 120.0


def _worker(conn: mp_connection.Connection, target: Callable[[Any], Any]) -> None:
  """Worker loop: say it is ready, then receive (id, payload), send (id, target(payload)); None
  ends it."""
  conn.send(_READY)
  while (item := conn.recv()) is not None:
    key, payload = item
    conn.send((key, target(payload)))


class _Worker:
  """One worker process. Jobs go only to a ready worker, so a job's deadline never includes the
  worker's start-up (spawning and importing)."""

  def __init__(self, ctx, target: Callable[[Any], Any]):
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=_worker, args=(child, target), daemon=True)
    self.proc.start()
    child.close()
    self.ready = False
    self.key: Hashable | None = None
    self.deadline = time.monotonic() + _STARTUP_TIMEOUT_S

  def check_ready(self) -> None:
    """Marks the worker ready once it said so; raises if it died or hung while starting."""
    if self.conn.poll():
      try:
        message = self.conn.recv()
      except (EOFError, OSError) as e:
        raise RuntimeError(f'a worker process died while starting ({self.proc.exitcode})') from e
      if message != _READY:
        raise RuntimeError(f'a starting worker sent {message!r}')
      self.ready = True
    elif not self.proc.is_alive():
      raise RuntimeError(f'a worker process died while starting (exit code {self.proc.exitcode})')
    elif time.monotonic() > self.deadline:
      raise RuntimeError(f'a worker process did not start in {_STARTUP_TIMEOUT_S:.0f}s')

  def stop(self, kill: bool) -> None:
    if kill:
      self.proc.kill()
    else:
      try:
        self.conn.send(None)
      except (BrokenPipeError, OSError):
        self.proc.kill()
    self.proc.join(timeout=5)
    if self.proc.is_alive():
      self.proc.kill()
      self.proc.join()
    self.conn.close()


@dataclasses.dataclass(frozen=True)
class Failed:
  """A job whose worker died ('crashed') or was killed past its deadline ('killed')."""

  reason: str


def run_isolated(
  target: Callable[[Any], Any],
  items: Sequence[tuple[Hashable, Any]],
  *,
  num_workers: int,
  hard_timeout_s: float,
) -> dict[Hashable, Any]:
  """target(payload) for each (id, payload) in spawned worker processes, results by id.

  A job running longer than hard_timeout_s has its worker killed and gets Failed('killed'); a
  job whose worker dies gets Failed('crashed'). Either way a fresh worker takes the next job, so
  no other job is affected. target must be picklable (a module-level function or a partial).
  A worker that cannot start at all is an error of the environment, raised as RuntimeError.

  Returns:
    {id: target's result or a Failed}; ids must be unique.
  """
  keys = [k for k, _ in items]
  if len(set(keys)) != len(keys):
    raise ValueError('job ids must be unique')
  ctx = multiprocessing.get_context('spawn')
  pending = deque(items)
  results: dict[Hashable, Any] = {}
  workers = [_Worker(ctx, target) for _ in range(max(1, min(num_workers, len(items))))]
  try:
    while pending or any(w.key is not None for w in workers):
      for i, w in enumerate(workers):
        if w.ready and w.key is None and pending:
          key, payload = pending.popleft()
          try:
            w.conn.send((key, payload))
          except (BrokenPipeError, OSError):
            # The worker died while idle; the job never started, so it goes back in the queue.
            pending.appendleft((key, payload))
            w.stop(kill=True)
            workers[i] = _Worker(ctx, target)
            continue
          w.key, w.deadline = key, time.monotonic() + hard_timeout_s
      waiting = [w for w in workers if w.key is not None or not w.ready]
      wait_s = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
      mp_connection.wait([w.conn for w in waiting] + [w.proc.sentinel for w in waiting], wait_s)
      for i, w in enumerate(workers):
        if not w.ready:
          w.check_ready()
          continue
        if w.key is None:
          continue
        failure = None
        if w.conn.poll():
          try:
            key, result = w.conn.recv()
          except (EOFError, OSError):
            failure = 'crashed'
          else:
            if key != w.key:
              raise RuntimeError(f'worker answered job {key!r} while running {w.key!r}')
            results[key], w.key = result, None
            continue
        elif not w.proc.is_alive():
          failure = 'crashed'
        elif time.monotonic() >= w.deadline:
          failure = 'killed'
        if failure is not None:
          log.warning('job %r: worker %s (exit code %s)', w.key, failure, w.proc.exitcode)
          results[w.key] = Failed(failure)
          w.stop(kill=True)
          workers[i] = _Worker(ctx, target)
  finally:
    for w in workers:
      w.stop(kill=False)
  return results


def compare_many(
  jobs: Sequence[Job], limits: Limits = Limits(), *, num_workers: int = 2
) -> list[Outcome]:
  """Runs the jobs in isolated workers; outcomes in the order of `jobs`, matched by id."""
  if not jobs:
    return []
  # Two queries and opening the database fit in the in-worker limits; the parent adds a grace.
  hard_timeout_s = 2 * limits.timeout_s + limits.kill_grace_s
  out = run_isolated(
    functools.partial(compare, limits=limits),
    [(job.id, job) for job in jobs],
    num_workers=num_workers,
    hard_timeout_s=hard_timeout_s,
  )
  return [
    Outcome(job.id, False, out[job.id].reason) if isinstance(out[job.id], Failed) else out[job.id]
    for job in jobs
  ]


def check_db_root(db_root: str | os.PathLike | None) -> pathlib.Path:
  """The BIRD database folder, checked to exist; one-line errors name the config key."""
  if db_root is None:
    raise FileNotFoundError(
      'BIRD grading needs its sqlite databases: set the task option db_root '
      '(--config.task.db_root) to the folder holding {db_name}/{db_name}.sqlite'
    )
  root = pathlib.Path(db_root)
  if not root.is_dir():
    raise FileNotFoundError(f'BIRD db_root {root} is not a folder (--config.task.db_root)')
  return root


def bird_db_path(db_root: str | os.PathLike | None, db_name: str) -> str:
  """`{db_root}/{db_name}/{db_name}.sqlite`, checked to exist.

  Raises:
    FileNotFoundError: one line naming the missing file and the config key to set.
  """
  path = check_db_root(db_root) / db_name / f'{db_name}.sqlite'
  if not path.is_file():
    raise FileNotFoundError(
      f'BIRD database {db_name!r} not found at {path} (check --config.task.db_root={db_root})'
    )
  return str(path)
