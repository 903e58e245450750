"""Label sets: the schema of D_k (one row per half-B question, with provenance) and its I/O.

A label set is saved as an HF dataset, atomically (workdir.atomic_dir). Columns LABEL_COLUMNS come
first; a stage may add more (proposal, proposal_correct, previous_label, valid).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

from ilr_jax.workdir import atomic_dir, is_writer, jsonable, load

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


def label_rows(ids, questions, labels, source, round_, score, replaced, agreed, correct, **extra):
  """The columns of a label set from per-row sequences (LABEL_COLUMNS in order, then `extra`)."""
  return dict(
    id=list(ids),
    question=list(questions),
    label=list(labels),
    source=list(source),
    round=list(round_),
    score=list(score),
    replaced=list(replaced),
    agreed=list(agreed),
    correct=list(correct),
    **extra,
  )


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

  def read(p: pathlib.Path) -> dict[str, list]:
    ds = datasets.load_from_disk(os.fspath(p))
    return {c: ds[c] for c in ds.column_names}

  rows = load(path, read, 'label set')
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
  blob = json.dumps(jsonable({c: list(rows[c]) for c in sorted(rows)}), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]
