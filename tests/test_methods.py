"""The methods table: every method's fields, the display order, unknown names."""

import pytest

from ilr_jax import graph, methods


def test_table():
  assert methods.NAMES == (
    'sft', 'ilr', 'naive', 'dpo', 'orailr', 'oradpo', 'cororailr', 'cororadpo'
  )  # fmt: skip
  assert set(methods.COMPARE) <= set(methods.NAMES)
  assert methods.DISPLAY_ORDER[0] == 'supervisor'
  m = methods.METHODS
  assert [n for n in methods.NAMES if m[n].uses_evaluator] == ['ilr', 'dpo']
  assert [n for n in methods.NAMES if m[n].family == 'ilr'] == [
    'ilr',
    'naive',
    'orailr',
    'cororailr',
  ]
  assert m['naive'].feedback == 'random' and m['cororadpo'].d0 == 'correct'
  assert not m['sft'].has_rounds and m['dpo'].has_rounds
  assert methods.uses_evaluator(['sft', 'naive']) is False
  assert methods.uses_evaluator(['naive', 'dpo']) is True


def test_bad_methods_are_one_line_errors():
  with pytest.raises(ValueError, match="unknown method 'rlhf'"):
    methods.get('rlhf')
  with pytest.raises(ValueError, match='family'):
    methods.Method('x', 'rlhf', 'oracle')
  with pytest.raises(ValueError, match='only SFT goes without feedback'):
    methods.Method('x', 'ilr', None)
  with pytest.raises(ValueError, match='feedback'):
    methods.Method('x', 'ilr', 'crowd')


def test_feedback_source_expresses_the_oracle_variants_with_their_stages():
  from ilr_jax import schema

  for family in ('ilr', 'dpo'):
    named = schema.base_config(f'ora{family}', 'arith')
    by_source = schema.base_config(family, 'arith')
    by_source.feedback.source = 'oracle'
    a, b = graph.build(named).nodes, graph.build(by_source).nodes
    assert list(a) == list(b)
    assert all((a[n].stage, a[n].body, a[n].args) == (b[n].stage, b[n].body, b[n].args) for n in a)
  c = schema.base_config('compare', 'arith')
  c.feedback.source = 'judge'
  assert [m.name for m in methods.of_config(c)] == ['sft', 'judgeilr', 'naive', 'judgedpo']
  assert all(
    methods.name_of(m.family, m.feedback, m.d0) == n
    for n, m in methods.METHODS.items()
    if m.feedback not in (None, 'random')
  )
  c.methods = ('ilr', 'orailr')
  with pytest.raises(ValueError, match="run \\['judgeilr'\\] twice"):
    methods.of_config(c)
