"""How often comparison feedback prefers the better side of a pair (pure numpy, no jax).

A score s = P(second better than first) prefers the second side when s > 0.5 and the first when
s < 0.5; s == 0.5 exactly prefers neither and counts as half a hit, never as an error (METHOD.md:
"its metrics never count a tie as an error"). The evaluator's validation accuracy
(`evaluator.validation_metrics`), ILR's and SFT+DPO's feedback accuracy all use this rule.
"""

from __future__ import annotations

import numpy as np


def preference_hits(scores, second_better) -> np.ndarray:
  """float64[N]: 1 where s = P(second better than first) prefers the better side, 0.5 where
  s == 0.5 exactly, 0 otherwise (NaN scores included)."""
  s = np.asarray(scores, np.float64)
  second = np.asarray(second_better, bool)
  if s.shape != second.shape or s.ndim != 1:
    raise ValueError(f'scores {s.shape} and second_better {second.shape} must be equal [N]')
  right = np.where(second, s > 0.5, s < 0.5)
  return np.where(s == 0.5, 0.5, right.astype(np.float64))


def feedback_accuracy(scores, first_correct, second_correct) -> tuple[float | None, int]:
  """(accuracy or None, count) of feedback over the items with exactly one correct side.

  `scores` are s = P(second better than first); a hit is 1 where s prefers the correct side, 0.5
  where s == 0.5 exactly, else 0 (`preference_hits`). Items with a NaN score (not compared) are
  left out; None when no item counts.
  """
  s = np.asarray(scores, np.float64)
  first, second = np.asarray(first_correct, bool), np.asarray(second_correct, bool)
  if not s.shape == first.shape == second.shape or s.ndim != 1:
    raise ValueError(
      f'scores {s.shape}, first_correct {first.shape} and second_correct {second.shape} must be '
      'equal [N]'
    )
  counted = (first != second) & ~np.isnan(s)
  if not counted.any():
    return None, 0
  hits = preference_hits(s[counted], second[counted])
  return float(hits.mean()), int(counted.sum())
