"""Tests for ilr_jax.sql: hostile SQL scores 0 within its limit and never changes the database."""

import functools
import hashlib
import os
import pathlib
import sqlite3
import time

import pytest

from ilr_jax import sql

LIMITS = sql.Limits(timeout_s=0.5, max_rows=5_000, max_bytes=2**20, heap_mb=64, kill_grace_s=2.0)
GOLD = 'SELECT name, n FROM items WHERE n > 10'


@pytest.fixture
def db(tmp_path: pathlib.Path) -> pathlib.Path:
  """A 100-row database at {tmp}/shop/shop.sqlite, BIRD's layout."""
  path = tmp_path / 'shop' / 'shop.sqlite'
  path.parent.mkdir()
  conn = sqlite3.connect(path)
  conn.execute('CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)')
  conn.execute('CREATE INDEX items_n ON items (n)')
  conn.executemany(
    'INSERT INTO items VALUES (?, ?, ?)', [(i, f'item{i}', i % 20) for i in range(100)]
  )
  conn.commit()
  conn.close()
  return path


def _digest(path: pathlib.Path) -> tuple[str, float, list[str]]:
  return (
    hashlib.sha256(path.read_bytes()).hexdigest(),
    path.stat().st_mtime,
    sorted(p.name for p in path.parent.iterdir()),
  )


def test_hostile_sql_scores_zero_and_leaves_the_file_alone(db, tmp_path):
  evil = tmp_path / 'evil.db'
  hostile = {
    'drop': 'DROP TABLE items',
    'update': 'UPDATE items SET n = 0',
    'delete': 'DELETE FROM items',
    'insert': "INSERT INTO items VALUES (1000, 'x', 99)",
    'create': 'CREATE TABLE t (x)',
    'create_temp': 'CREATE TEMP TABLE t (x)',
    'attach': f"ATTACH DATABASE '{evil}' AS evil",
    'vacuum_into': f"VACUUM INTO '{evil}'",
    'vacuum': 'VACUUM',
    'journal_mode': 'PRAGMA journal_mode = WAL',
    'writable_schema': 'PRAGMA writable_schema = ON',
    'query_only_off': 'PRAGMA query_only = OFF',
    'checkpoint': 'PRAGMA wal_checkpoint',
    'two_statements': 'SELECT 1; DROP TABLE items',
    'begin': 'BEGIN IMMEDIATE',
    'extension': "SELECT load_extension('/tmp/evil.so')",
    'blob': 'SELECT randomblob(100000000)',
    'recursive_cte': (
      'WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c'
    ),
    'cross_join_count': 'SELECT count(*) FROM items a, items b, items c, items d, items e',
    'cross_join_rows': 'SELECT * FROM items a, items b, items c',
    'comment_only': '-- SELECT name, n FROM items WHERE n > 10',
    'empty': '   ',
  }
  before = _digest(db)
  jobs = [sql.Job(k, str(db), q, GOLD) for k, q in hostile.items()]
  jobs.append(
    sql.Job('same_set', str(db), 'SELECT name, n FROM items WHERE 10 < n ORDER BY 1', GOLD)
  )
  t0 = time.monotonic()
  out = sql.compare_many(jobs, LIMITS, num_workers=2)
  elapsed = time.monotonic() - t0

  assert [o.id for o in out] == [j.id for j in jobs]
  by_id = {o.id: o for o in out}
  assert by_id['same_set'].equal and by_id['same_set'].reason is None
  for key in hostile:
    assert not by_id[key].equal, key
    assert by_id[key].reason.startswith('a:'), (key, by_id[key])
  assert by_id['recursive_cte'].reason == 'a:timeout'
  assert by_id['cross_join_count'].reason == 'a:timeout'
  assert by_id['cross_join_rows'].reason == 'a:too_many_rows'
  assert by_id['comment_only'].reason == 'a:not_a_query'
  assert by_id['empty'].reason == 'a:empty'
  assert _digest(db) == before
  assert not evil.exists()
  # 23 jobs on 2 workers, two of them running into the 0.5 s limit; spawning costs the rest.
  assert elapsed < 15, elapsed


def test_pragmas_that_only_read_the_schema_are_allowed(db):
  conn = sql.open_readonly(db, LIMITS)
  rows = sql.run_query(conn, 'PRAGMA table_info(items)', LIMITS)
  assert [r[1] for r in rows] == ['id', 'name', 'n']
  with pytest.raises(sql.QueryError, match='error'):
    sql.run_query(conn, 'PRAGMA journal_mode', LIMITS)
  conn.close()


def test_in_process_timeout_is_prompt(db):
  conn = sql.open_readonly(db, LIMITS)
  t0 = time.monotonic()
  with pytest.raises(sql.QueryError) as e:
    sql.run_query(
      conn,
      'WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT max(x) FROM c',
      LIMITS,
    )
  assert e.value.reason == 'timeout'
  assert time.monotonic() - t0 < 1.5
  # The connection still works after an interrupted query.
  assert sql.run_query(conn, 'SELECT count(*) FROM items', LIMITS) == [(100,)]
  conn.close()


def test_missing_database_is_one_failed_job(db, tmp_path):
  jobs = [sql.Job(0, str(tmp_path / 'nope.sqlite'), GOLD, GOLD), sql.Job(1, str(db), GOLD, GOLD)]
  out = sql.compare_many(jobs, LIMITS, num_workers=1)
  assert out == [sql.Outcome(0, False, 'open:FileNotFoundError'), sql.Outcome(1, True)]
  assert not (tmp_path / 'nope.sqlite').exists()


def _misbehave(payload: str) -> str:
  """Test target for the pool: hangs in C (sleep), dies, or answers."""
  if payload == 'hang':
    time.sleep(60)
  if payload == 'crash':
    os._exit(3)
  return payload.upper()


def test_killed_and_crashed_workers_only_fail_their_own_job():
  items = [(i, p) for i, p in enumerate(['a', 'hang', 'b', 'crash', 'c', 'hang', 'd', 'e'])]
  t0 = time.monotonic()
  out = sql.run_isolated(_misbehave, items, num_workers=2, hard_timeout_s=1.0)
  assert time.monotonic() - t0 < 12
  assert out == {
    0: 'A',
    1: sql.Failed('killed'),
    2: 'B',
    3: sql.Failed('crashed'),
    4: 'C',
    5: sql.Failed('killed'),
    6: 'D',
    7: 'E',
  }


def test_parent_kills_a_query_past_its_hard_deadline(db):
  # In-worker limit far away, hard limit near: only the parent's kill can end this query.
  slow = sql.Limits(timeout_s=60.0)
  cte = 'WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c'
  out = sql.run_isolated(
    functools.partial(sql.compare, limits=slow),
    [('slow', sql.Job('slow', str(db), cte, GOLD)), ('ok', sql.Job('ok', str(db), GOLD, GOLD))],
    num_workers=2,
    hard_timeout_s=1.0,
  )
  assert out == {'slow': sql.Failed('killed'), 'ok': sql.Outcome('ok', True)}


def test_bird_db_path_errors_name_the_config_key(db):
  assert sql.bird_db_path(db.parent.parent, 'shop') == str(db)
  with pytest.raises(FileNotFoundError, match='db_root'):
    sql.bird_db_path(None, 'shop')
  with pytest.raises(FileNotFoundError, match='other.sqlite'):
    sql.bird_db_path(db.parent.parent, 'other')
