"""The methods table: every method's fields, the display order, unknown names."""

import pytest

from ilr_jax import methods


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
