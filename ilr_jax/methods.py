"""The methods the pipeline compares, as data: one frozen `Method` per name (METHOD.md).

A method is three choices, and the stages read these fields, never the method's name:
  family     'sft' (round 0 only), 'ilr' (refine the labels, SFT again) or 'dpo' (SFT+DPO rounds)
  feedback   who compares a proposal with the current answer: 'evaluator' (the trained pairwise
             classifier, unreliable like a human), 'oracle' (ground-truth grading), 'random'
             (naive: a random alpha of the labels replaced, no comparison); None for SFT
  d0         the round-0 label set: 'weak' (every weak label) or 'correct' (only the correct ones)

A new feedback source (an LLM judge, a person) is a new FEEDBACK entry, a scorer for it in
scorers.py and a row in METHODS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

FAMILIES = (SFT, ILR, DPO) = ('sft', 'ilr', 'dpo')
FEEDBACK = ('evaluator', 'oracle', 'random')
D0 = ('weak', 'correct')


@dataclasses.dataclass(frozen=True)
class Method:
  """One method of the comparison (module docstring)."""

  name: str
  family: str
  feedback: str | None
  d0: str = 'weak'

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f'method {self.name}: family {self.family!r} not in {FAMILIES}')
    if (self.feedback is None) != (self.family == 'sft'):
      raise ValueError(f'method {self.name}: only SFT goes without feedback')
    if self.feedback is not None and self.feedback not in FEEDBACK:
      raise ValueError(f'method {self.name}: feedback {self.feedback!r} not in {FEEDBACK}')
    if self.d0 not in D0:
      raise ValueError(f'method {self.name}: d0 {self.d0!r} not in {D0}')

  @property
  def uses_evaluator(self) -> bool:
    return self.feedback == 'evaluator'

  @property
  def has_rounds(self) -> bool:
    """Whether rounds 1..num_rounds exist (every family but plain SFT)."""
    return self.family != 'sft'


# Display order of reports and plots. The oracle variants are upper bounds; `cor` ones start from
# the correct weak labels only.
METHODS = {
  m.name: m
  for m in (
    Method('sft', 'sft', None),
    Method('ilr', 'ilr', 'evaluator'),
    Method('naive', 'ilr', 'random'),
    Method('dpo', 'dpo', 'evaluator'),
    Method('orailr', 'ilr', 'oracle'),
    Method('oradpo', 'dpo', 'oracle'),
    Method('cororailr', 'ilr', 'oracle', d0='correct'),
    Method('cororadpo', 'dpo', 'oracle', d0='correct'),
  )
}
NAMES = tuple(METHODS)
COMPARE = ('sft', 'ilr', 'naive', 'dpo')  # the paper's main comparison (config arg `compare`)
# Rows of a report: the supervisor's row first, then the methods in table order.
DISPLAY_ORDER = ('supervisor',) + NAMES


def get(name: str) -> Method:
  """The Method called `name`; an unknown name is a one-line error listing the known ones."""
  if name not in METHODS:
    raise ValueError(f'unknown method {name!r}; known: {NAMES}')
  return METHODS[name]


def uses_evaluator(names: Sequence[str]) -> bool:
  """Whether any of the methods asks the trained evaluator (the run then trains one)."""
  return any(get(n).uses_evaluator for n in names)
