"""The stage graph: one declaration gives the plan, the bodies and the result rows."""

import importlib.util
import pathlib

from ilr_jax import graph

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(arg):
  spec = importlib.util.spec_from_file_location('cfg_arith', ROOT / 'configs' / 'arith.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


class FakeWorkdir:
  """Records of the finished stages: every metric a row could read, value = the stage's name."""

  def __init__(self, finished, missing=()):
    self.finished = set(finished)
    self.missing = set(missing)

  def done(self, stage):
    return stage in self.finished

  def record(self, stage):
    assert stage in self.finished, stage
    keys = (
      'test_accuracy label_accuracy num_labels num_replaced num_agreed num_disagreed threshold '
      'evaluator_accuracy dpo_pairs dpo_pair_accuracy dpo_reward_margin dpo_reward_accuracy '
      'feedback_accuracy feedback_items'
    ).split()
    metrics = {k: stage for k in keys if k not in self.missing}
    return {'name': stage, 'metrics': metrics, 'wall_s': 1.0}


def test_plan_has_every_stage_once_upstream_first():
  config = _config('compare,tiny,all')
  g = graph.build(config)
  names = [s.name for s in graph.plan(config)]
  assert len(names) == len(set(names)) == len(g.nodes)
  for i, s in enumerate(graph.plan(config)):
    assert all(a in names[:i] for a in s.after), s.name
  # ilr, naive and orailr refine the same D0: one pair of half models serves all three.
  assert names.count('halves/weak_labels/m1') == 1
  assert 'halves/cor/labels/m1' in names and 'evaluator' in names


def test_rows_read_the_stages_they_name():
  config = _config('compare,tiny,all')
  stages = [s.name for s in graph.plan(config)]
  rows = {(r['method'], r['round']): r for r in graph.results(config, FakeWorkdir(stages))}
  assert set(rows) == {('supervisor', 0)} | {
    (m, k) for m in ('ilr', 'naive', 'dpo', 'orailr', 'oradpo', 'cororailr', 'cororadpo')
    for k in (0, 1)
  } | {('sft', 0)}  # fmt: skip
  assert rows[('supervisor', 0)]['label_accuracy'] == 'weak_labels'
  assert rows[('cororailr', 0)]['label_accuracy'] == 'cor/labels'
  assert rows[('cororailr', 0)]['test_accuracy'] == 'cor/sft'
  ilr = rows[('ilr', 1)]
  assert ilr['num_replaced'] == 'ilr/r1/labels' and ilr['test_accuracy'] == 'ilr/r1/model'
  assert ilr['evaluator_accuracy'] == 'evaluator'
  assert set(ilr['wall_s']) == {
    'ilr/r1/labels', 'ilr/r1/model', 'halves/weak_labels/m1', 'halves/weak_labels/m2'
  }  # fmt: skip
  assert 'evaluator_accuracy' not in rows[('naive', 1)]
  dpo = rows[('dpo', 1)]
  assert dpo['dpo_pairs'] == 'dpo/r1/pairs' and dpo['dpo_reward_margin'] == 'dpo/r1/policy'
  # Feedback accuracy comes from the comparing stage of the round.
  assert ilr['feedback_accuracy'] == ilr['feedback_items'] == 'ilr/r1/labels'
  assert rows[('naive', 1)]['feedback_accuracy'] == 'naive/r1/labels'
  assert dpo['feedback_accuracy'] == dpo['feedback_items'] == 'dpo/r1/pairs'
  assert 'feedback_accuracy' not in rows[('ilr', 0)]


def test_rows_of_older_records_without_feedback_accuracy():
  config = _config('compare,tiny,all')
  stages = [s.name for s in graph.plan(config)]
  old = FakeWorkdir(stages, missing=('feedback_accuracy', 'feedback_items'))
  rows = {(r['method'], r['round']): r for r in graph.results(config, old)}
  for key in (('ilr', 1), ('dpo', 1), ('oradpo', 1)):
    assert rows[key]['feedback_accuracy'] is None and rows[key]['feedback_items'] is None


def test_partial_results_leave_out_unfinished_rows():
  config = _config('compare,tiny,all')
  stages = [s.name for s in graph.plan(config)]
  finished = stages[: stages.index('ilr/r1/model')]  # everything before ilr's first model
  rows = graph.results(config, FakeWorkdir(finished), partial=True)
  got = {(r['method'], r['round']) for r in rows}
  assert ('ilr', 0) in got and ('ilr', 1) not in got and ('dpo', 1) not in got
