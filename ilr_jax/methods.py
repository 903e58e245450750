"""The methods the pipeline compares, as data: one frozen `Method` per name (METHOD.md).

A method is three choices, and the stages read these fields, never the method's name:
  family     'sft' (round 0 only), 'ilr' (refine the labels, SFT again) or 'dpo' (SFT+DPO rounds)
  feedback   who compares a proposal with the current answer: 'evaluator' (the trained pairwise
             classifier, unreliable like a human), 'oracle' (ground-truth grading), 'judge' (an
             LLM judge), 'human' (people, through annotation files), 'random' (naive: a random
             alpha of the labels replaced, no comparison); None for SFT. feedback.py holds them.
  d0         the round-0 label set: 'weak' (every weak label) or 'correct' (only the correct ones)

The config's `feedback.source` swaps the comparing source of every method that has one (`resolve`):
`ilr` with source 'oracle' is `orailr`, the same stages and the same numbers. A method's name is its
three choices spelled out (`name_of`): [cor][ora|judge|human]<family>.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

FAMILIES = (SFT, ILR, DPO) = ('sft', 'ilr', 'dpo')
FEEDBACK = ('evaluator', 'oracle', 'judge', 'human', 'random')
COMPARING = ('evaluator', 'oracle', 'judge', 'human')  # the sources that compare two answers
_PREFIX = {'evaluator': '', 'oracle': 'ora', 'judge': 'judge', 'human': 'human'}
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


def name_of(family: str, feedback: str, d0: str = 'weak') -> str:
  """The name of a comparing method from its choices: [cor][ora|judge|human]<family>."""
  return ('cor' if d0 == 'correct' else '') + _PREFIX[feedback] + family


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
NAMES = tuple(METHODS)  # the paper's methods (config switch `all`)
# Every other combination of a comparing source and D0 (feedback.source makes them from the paper's
# methods): the judge and human ones need an endpoint or annotators (feedback.py).
METHODS.update(
  (m.name, m)
  for m in (
    Method(name_of(family, source, d0), family, source, d0)
    for d0 in D0
    for source in COMPARING
    for family in ('ilr', 'dpo')
  )
  if m.name not in METHODS
)
EXTERNAL = tuple(n for n in METHODS if n not in NAMES)
COMPARE = ('sft', 'ilr', 'naive', 'dpo')  # the paper's main comparison (config arg `compare`)
# Rows of a report: the supervisor's row first, then the methods in table order.
DISPLAY_ORDER = ('supervisor',) + NAMES + EXTERNAL


def get(name: str) -> Method:
  """The Method called `name`; an unknown name is a one-line error listing the known ones."""
  if name not in METHODS:
    raise ValueError(f'unknown method {name!r}; known: {NAMES}')
  return METHODS[name]


def with_feedback(method: Method, source: str) -> Method:
  """`method` with its comparing feedback replaced by `source` ('' keeps it); SFT and naive,
  which compare nothing, are returned as they are."""
  if not source or method.feedback not in COMPARING:
    return method
  if source not in COMPARING:
    raise ValueError(f'feedback source {source!r} not in {COMPARING}')
  return METHODS[name_of(method.family, source, method.d0)]


def resolve(names: Sequence[str], source: str = '') -> tuple[Method, ...]:
  """The Methods a run executes: the named ones with the feedback source swapped (`with_feedback`).

  Two names that become one method (ilr and orailr with source 'judge') are an error.
  """
  out = tuple(with_feedback(get(n), source) for n in names)
  seen = [m.name for m in out]
  twice = sorted({n for n in seen if seen.count(n) > 1})
  if twice:
    raise ValueError(f'methods {tuple(names)} with feedback source {source!r} run {twice} twice')
  return out


def uses_evaluator(names: Sequence[str], source: str = '') -> bool:
  """Whether any of the methods asks the trained evaluator (the run then trains one)."""
  return any(m.uses_evaluator for m in resolve(names, source))


def of_config(config) -> tuple[Method, ...]:
  """The Methods of a config: `methods` with `feedback.source` applied."""
  return resolve(tuple(config.methods), config.feedback.source)
