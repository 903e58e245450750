"""Feedback accuracy: the pure rule, and the ILR and SFT+DPO stages that report it."""

import math
import types

import numpy as np
import pytest

from ilr_jax import dpo_stages, label_stages, methods
from ilr_jax.feedback_metrics import feedback_accuracy, preference_hits


def test_preference_hits_rule():
  s = [0.9, 0.1, 0.5, 0.9, 0.1, 0.5, math.nan]
  second = [True, False, True, False, True, False, True]
  np.testing.assert_array_equal(preference_hits(s, second), [1, 1, 0.5, 0, 0, 0.5, 0])


def test_feedback_accuracy_counts_items_with_one_correct_side():
  scores = [0.8, 0.2, 0.5, 0.7, 0.9, 0.1, math.nan]
  first = [False, True, False, True, True, False, False]
  second = [True, False, True, False, True, False, True]
  # Items 0-3 count (hits 1, 1, 0.5, 0); 4 and 5 are equally correct; 6 has no score.
  acc, n = feedback_accuracy(scores, first, second)
  assert n == 4 and acc == pytest.approx(2.5 / 4)


def test_feedback_accuracy_none_when_nothing_counts():
  assert feedback_accuracy([math.nan, 0.3], [True, True], [False, True]) == (None, 0)
  assert feedback_accuracy([], [], []) == (None, 0)
  with pytest.raises(ValueError, match='must be equal'):
    feedback_accuracy([0.5], [True, False], [False])


def _ilr_run(scorer):
  """A Run for refine_labels: 6 items, proposals agree on items 0 and 1."""
  examples = [types.SimpleNamespace(id=f'x{i}', question=f'q{i}') for i in range(6)]
  return types.SimpleNamespace(
    wd=types.SimpleNamespace(path=lambda *parts: '/'.join(parts)),
    half_b=examples,
    task=types.SimpleNamespace(
      agree_batch=lambda props, labels, ex: [p == x for p, x in zip(props, labels)],
      is_valid_label=lambda x: True,
    ),
    scorer=lambda source, stage: scorer,
    config=types.SimpleNamespace(
      ilr=types.SimpleNamespace(alpha=0.15, alpha_scope='disagreeing', floor=0.5)
    ),
    seed=lambda name: 0,
    correct=lambda answers, ex: [a.startswith('right') for a in answers],
  )


@pytest.mark.parametrize('name', ['ilr', 'naive', 'orailr'])
def test_refine_labels_reports_feedback_accuracy(monkeypatch, name):
  labels = ['right0', 'wrong1', 'wrong2', 'right3', 'wrong4', 'right5']
  proposals = ['right0', 'wrong1', 'right2', 'wrong3', 'wrong4b', 'right5b']
  d = dict(
    id=[f'x{i}' for i in range(6)],
    question=[f'q{i}' for i in range(6)],
    label=labels,
    source=['weak'] * 6,
    round=[0] * 6,
    correct=[x.startswith('right') for x in labels],
  )
  # P(proposal better): items 2 (right proposal) and 3 (wrong proposal) have one correct side.
  table = {'q2': 0.9, 'q3': 0.5, 'q4': 0.99, 'q5': 0.01}

  def scorer(questions, currents, proposals):
    assert set(questions) == {'q2', 'q3', 'q4', 'q5'}  # the disagreeing items only
    if name == 'orailr':
      return np.asarray([float(p.startswith('right')) for p in proposals])
    return np.asarray([table[q] for q in questions])

  monkeypatch.setattr(label_stages, 'load_label_set', lambda path: d)
  monkeypatch.setattr(label_stages, 'save_label_set', lambda path, rows: None)
  monkeypatch.setattr(label_stages, '_proposals', lambda run, stage, prev, ids: proposals)
  out = label_stages.refine_labels(_ilr_run(scorer), methods.get(name), 1, 'weak_labels')
  expected = {'ilr': (0.75, 2), 'naive': (None, 0), 'orailr': (1.0, 2)}[name]
  assert (out['feedback_accuracy'], out['feedback_items']) == expected


def _dpo_run(scorer, num_samples=4):
  return types.SimpleNamespace(
    config=types.SimpleNamespace(
      dpo=types.SimpleNamespace(num_samples=num_samples, keep_frac=0.25)
    ),
    load=lambda stage: None,
    half_b=[types.SimpleNamespace(question=f'q{i}') for i in range(2)],
    generate=lambda model, role, qs, kind, stage, num_samples: [
      ['right', 'wrong', 'right', 'right'],
      ['wrong', 'right', 'wrong', 'wrong'],
    ],
    correct=lambda answers, ex: [a == 'right' for a in answers],
    scorer=lambda source, stage: scorer,
    task=types.SimpleNamespace(is_valid_label=lambda x: True),
    seed=lambda name: 0,
    wd=types.SimpleNamespace(path=lambda *parts: '/'.join(parts)),
  )


@pytest.mark.parametrize('name', ['dpo', 'oradpo'])
def test_dpo_pairs_report_feedback_accuracy_over_all_scored_pairs(monkeypatch, name):
  # Pairs (right, wrong), (right, right), (wrong, right), (wrong, wrong): two with one correct.
  scores = np.asarray([0.6, 0.99, 0.5, 0.01])

  def scorer(questions, a, b):
    assert len(a) == 4
    return scores

  monkeypatch.setattr(dpo_stages, 'write_json', lambda path, obj: None)
  out = dpo_stages.pairs(_dpo_run(scorer), methods.get(name), 1, 'sft')
  assert out['dpo_candidates'] == 4 and out['dpo_top'] == 1  # the cut keeps one pair ...
  # ... but feedback accuracy reads every scored pair: 0 for (right, wrong) at 0.6, a tie 0.5.
  expected = {'dpo': (0.25, 2), 'oradpo': (None, 0)}[name]
  assert (out['feedback_accuracy'], out['feedback_items']) == expected
