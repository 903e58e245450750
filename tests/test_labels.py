"""Label sets: the schema and its atomic save and load."""

import math

import pytest

from ilr_jax import labels


def _labels(n=3):
  return dict(
    id=[f'q{i}' for i in range(n)],
    question=[f'question {i}' for i in range(n)],
    label=[f'answer {i}' for i in range(n)],
    source=['weak', 'proposal', 'gt'][:n],
    round=[0, 1, 0][:n],
    score=[None, 0.9, float('nan')][:n],
    replaced=[False, True, False][:n],
    agreed=[True, False, False][:n],
    correct=[True, None, False][:n],
  )


def test_label_set_roundtrip_and_validation(tmp_path):
  path = tmp_path / 'labels'
  labels.save_label_set(path, _labels())
  got = labels.load_label_set(path)
  assert got['id'] == ['q0', 'q1', 'q2'] and got['source'] == ['weak', 'proposal', 'gt']
  assert math.isnan(got['score'][0]) and got['score'][1] == 0.9
  assert got['correct'] == [True, None, False]
  assert not list(tmp_path.glob('*.tmp-*'))  # the temporary directory was renamed away
  bad = _labels()
  bad['source'][0] = 'oracle'
  with pytest.raises(ValueError, match='sources'):
    labels.save_label_set(tmp_path / 'bad', bad)
  short = _labels()
  short['label'] = short['label'][:2]
  with pytest.raises(ValueError, match="column 'label'"):
    labels.save_label_set(tmp_path / 'bad', short)
  assert not (tmp_path / 'bad').exists()
