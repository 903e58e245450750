"""`arith`: a synthetic GSM8K-format task and a pretraining corpus, for runs on a CPU.

Problems are short word problems about one person's stock of items, changed by 2 to 4 operations;
the worked solution writes one equation a line, GSM8K style, and ends with `#### n`. Question:

  Mia has 12 apples. She buys 7 more. She gives 5 to Tom. How many apples does Mia have now?

Answer (three lines):

  12+7=19 apples.
  19-5=14 apples.
  #### 14

With data/arith/spm.model a problem, its solution and the SFT prompt take about 90 tokens at the
default knobs (128 at most, BOS and EOS included). Difficulty comes from the knobs of
`ArithConfig` (number of steps, operand size, which operations, an irrelevant sentence), so a
smaller tiny model solves the easy end and a bigger one gets further, as with a real pretrained
LM. `make_corpus` writes equations and worked steps without the word-problem format: base models
learn to compute from it, and supervised fine-tuning has to teach them to read the problems.

Everything is drawn from `random.Random(<string seed>).random()`, the one part of Python's random
module whose sequence is guaranteed across Python versions (string seeds hash with SHA-512), so
the data are byte-for-byte the same on every machine.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

from ilr_jax.tokens import prompt_text

NAMES = (
  ('Mia', 'She', 'her'),
  ('Tom', 'He', 'him'),
  ('Ava', 'She', 'her'),
  ('Leo', 'He', 'him'),
  ('Zoe', 'She', 'her'),
  ('Sam', 'He', 'him'),
  ('Amy', 'She', 'her'),
  ('Ben', 'He', 'him'),
)
ITEMS = (
  'apples',
  'pears',
  'cookies',
  'marbles',
  'stickers',
  'books',
  'coins',
  'shells',
  'cards',
  'eggs',
  'toys',
  'pens',
)
OPS = '+-*/'
STYLES = ('story', 'expression')

# Question sentences per operation; {p} is the pronoun, {f} a friend, {o} the object pronoun and
# {k} the operand. Short on purpose: a whole problem with its solution fits in about 100 tokens.
_QUESTION = {
  '+': ('{p} buys {k} more.', '{p} finds {k} more.', '{f} gives {o} {k} more.'),
  '-': ('{p} gives {k} to {f}.', '{p} loses {k}.', '{p} sells {k}.'),
  '*': ('{p} then has {k} times as many.',),
  '/': ('{p} splits them into {k} equal parts and keeps one part.',),
}
_ASK = (
  'How many {i} does {n} have now?',
  'How many {i} does {n} have in the end?',
)


@dataclasses.dataclass(frozen=True)
class ArithConfig:
  """Difficulty knobs of generated problems.

  Attributes:
    min_steps, max_steps: number of operations per problem (inclusive range).
    max_operand: the start value and the operands of + and - are drawn from [1, max_operand].
    max_factor: multipliers and divisors are drawn from [2, max_factor].
    max_value: no intermediate value exceeds it (keeps answers a few digits long).
    ops: which operations may appear; must hold '+' and '-' so every state has a legal step.
    distractor_prob: chance of one irrelevant sentence about a friend's items.
    style: 'story' (the word problems above) or 'expression' (the bare computation, 'What is
      4+3-5?', answered by the same worked lines without the item: '4+3=7', '7-5=2', '#### 2').
      Expressions leave out the reading: a tiny model that cannot yet pick the numbers out of a
      story still learns to copy them from an expression in a few hundred CPU steps.
  """

  min_steps: int = 2
  max_steps: int = 4
  max_operand: int = 50
  max_factor: int = 5
  max_value: int = 999
  ops: str = OPS
  distractor_prob: float = 0.25
  style: str = 'story'

  def __post_init__(self):
    if self.style not in STYLES:
      raise ValueError(f'style must be one of {STYLES}, got {self.style!r}')
    if not 1 <= self.min_steps <= self.max_steps:
      raise ValueError(f'need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}')
    if self.max_operand < 2 or self.max_factor < 2:
      raise ValueError('max_operand and max_factor must be at least 2')
    if self.max_value < 2 * max(self.max_operand, self.max_factor):
      raise ValueError('max_value must be at least twice max_operand and max_factor')
    if not set(self.ops) <= set(OPS) or not {'+', '-'} <= set(self.ops):
      raise ValueError(f"ops must be a subset of {OPS!r} holding '+' and '-', got {self.ops!r}")
    if not 0.0 <= self.distractor_prob <= 1.0:
      raise ValueError(f'distractor_prob must lie in [0, 1], got {self.distractor_prob}')


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str
  answer: str  # worked solution ending with '#### n'
  value: int  # n


class _Draw:
  """Integer and choice draws built only on `random.random()` (see the module docstring)."""

  def __init__(self, seed: str):
    self._rng = random.Random(seed)

  def integer(self, lo: int, hi: int) -> int:
    return lo + int(self._rng.random() * (hi - lo + 1))

  def pick(self, seq: Sequence):
    return seq[self.integer(0, len(seq) - 1)]

  def chance(self, p: float) -> bool:
    return self._rng.random() < p


def _legal_steps(x: int, cfg: ArithConfig) -> list[tuple[str, int, int]]:
  """(op, lo, hi) for each operation legal from value x ('/': some k in [lo, hi] divides x)."""
  steps = []
  if '+' in cfg.ops and x < cfg.max_value:
    steps.append(('+', 1, min(cfg.max_operand, cfg.max_value - x)))
  if '-' in cfg.ops and x >= 2:
    steps.append(('-', 1, min(cfg.max_operand, x - 1)))
  if '*' in cfg.ops and 2 * x <= cfg.max_value:
    steps.append(('*', 2, min(cfg.max_factor, cfg.max_value // x)))
  if '/' in cfg.ops and any(x % k == 0 for k in range(2, cfg.max_factor + 1)):
    steps.append(('/', 2, cfg.max_factor))
  return steps


def step_line(x: int, op: str, k: int, y: int, item: str) -> str:
  """One line of a worked solution, '12+7=19 apples.' (spaces would cost a token each)."""
  return f'{x}{op}{k}={y} {item}.'


def _apply(op: str, x: int, k: int) -> int:
  return {'+': x + k, '-': x - k, '*': x * k, '/': x // k}[op]


def _chain(draw: _Draw, cfg: ArithConfig, num_steps: int) -> tuple[int, list[tuple[str, int, int]]]:
  """A start value and num_steps (op, operand, result) triples that stay in [1, max_value]."""
  start = x = draw.integer(2, cfg.max_operand)
  steps = []
  for _ in range(num_steps):
    op, lo, hi = draw.pick(_legal_steps(x, cfg))
    if op == '/':
      k = draw.pick([d for d in range(lo, hi + 1) if x % d == 0])
    else:
      k = draw.integer(lo, hi)
    y = _apply(op, x, k)
    steps.append((op, k, y))
    x = y
  return start, steps


Chain = tuple[tuple[int, str, int, int], ...]  # ((x, op, k, y), ...): one computation line each
_LINE = re.compile(r'(\d+)([-+*/])(\d+)=(\d+)')


def _as_chain(start: int, steps: Sequence[tuple[str, int, int]]) -> Chain:
  out, x = [], start
  for op, k, y in steps:
    out.append((x, op, k, y))
    x = y
  return tuple(out)


def computations(text: str) -> list[Chain]:
  """The runs of computation lines in a text, each as a Chain.

  A run is a maximal sequence of lines (or of ', '-separated facts) 'x<op>k=y', with or without
  an item word, in which each line starts from the previous result. A problem's worked solution
  is one run; a pretraining document holds one run or, for one-step facts, several.
  """
  runs: list[Chain] = []
  current: list[tuple[int, str, int, int]] = []
  for part in re.split(r'\n|, ', text):
    m = _LINE.match(part.strip())
    step = (int(m[1]), m[2], int(m[3]), int(m[4])) if m else None
    if step is not None and current and step[0] == current[-1][3]:
      current.append(step)
      continue
    if current:
      runs.append(tuple(current))
    current = [step] if step is not None else []
  if current:
    runs.append(tuple(current))
  return runs


def solution_chain(answer: str) -> Chain:
  """The computation of a worked solution ('4+3=7\n7-5=2\n#### 2' -> ((4,'+',3,7), (7,'-',5,2)))."""
  runs = computations(answer)
  return runs[0] if runs else ()


def contains_chain(run: Chain, chains: frozenset[Chain], min_len: int = 2) -> bool:
  """Whether some contiguous part of `run`, at least min_len steps long, is one of `chains`."""
  n = len(run)
  return any(run[i:j] in chains for i in range(n) for j in range(i + min_len, n + 1))


def exclusions(problems: Sequence[Problem]) -> tuple[frozenset[str], frozenset[Chain]]:
  """What a corpus must not hold of these problems: their questions, and the computations of
  their multi-step solutions (a one-step solution is a single arithmetic fact, which a corpus
  teaches)."""
  questions = frozenset(p.question for p in problems)
  chains = frozenset(c for c in (solution_chain(p.answer) for p in problems) if len(c) >= 2)
  return questions, chains


def leaked(doc: str, questions: frozenset[str], chains: frozenset[Chain]) -> list[str]:
  """What of the excluded problems a corpus document holds: each question whose text it contains
  (with or without its solution), each multi-step solution whose computation it contains."""
  found = [q for q in questions if q in doc]
  for run in computations(doc):
    if len(run) >= 2 and contains_chain(run, chains):
      found.append(repr(run))
  return found


def make_problem(draw: _Draw, cfg: ArithConfig) -> Problem:
  """One word problem (or bare expression, see ArithConfig.style) with its worked solution."""
  if cfg.style == 'expression':
    start, steps = _chain(draw, cfg, draw.integer(cfg.min_steps, cfg.max_steps))
    expr, lines, x = str(start), [], start
    for op, k, y in steps:
      expr += f'{op}{k}'
      lines.append(f'{x}{op}{k}={y}')
      x = y
    lines.append(f'#### {x}')
    return Problem(question=f'What is {expr}?', answer='\n'.join(lines), value=x)
  name, pronoun, obj = draw.pick(NAMES)
  # Friends are of the other gender so every 'she'/'he' can only mean the problem's person.
  friends = [n for n, p, _ in NAMES if p != pronoun]
  item = draw.pick(ITEMS)
  num_steps = draw.integer(cfg.min_steps, cfg.max_steps)
  start, steps = _chain(draw, cfg, num_steps)

  sentences = [f'{name} has {start} {item}.']
  lines = []
  x = start
  for op, k, y in steps:
    template = draw.pick(_QUESTION[op])
    sentences.append(template.format(p=pronoun, f=draw.pick(friends), o=obj, k=k))
    lines.append(step_line(x, op, k, y, item))
    x = y
  if draw.chance(cfg.distractor_prob):
    other = draw.pick([i for i in ITEMS if i != item])
    distractor = f'{draw.pick(friends)} has {draw.integer(2, cfg.max_operand)} {other}.'
    sentences.insert(draw.integer(1, len(sentences)), distractor)
  sentences.append(draw.pick(_ASK).format(i=item, n=name))
  lines.append(f'#### {x}')
  return Problem(question=' '.join(sentences), answer='\n'.join(lines), value=x)


def generate(
  seed: int | str,
  n: int,
  cfg: ArithConfig = ArithConfig(),
  *,
  exclude: frozenset[str] = frozenset(),
) -> list[Problem]:
  """n problems with distinct questions, none in `exclude`, deterministic in (seed, cfg).

  Args:
    seed: any int or string; the stream is keyed by its string form.
    n: number of problems.
    cfg: difficulty knobs.
    exclude: questions that must not appear (a test split excludes the train questions).
  Returns:
    The problems, in generation order.
  """
  draw = _Draw(f'arith/problems/{seed}')
  seen = set(exclude)
  out = []
  misses = 0
  while len(out) < n:
    p = make_problem(draw, cfg)
    if p.question in seen:
      misses += 1
      if misses > 10_000:  # in a row: the knobs allow too few distinct problems
        raise ValueError(f'could not draw {n} distinct problems from {cfg}; widen the knobs')
      continue
    misses = 0
    seen.add(p.question)
    out.append(p)
  return out


def _doc_chain(draw: _Draw, cfg: ArithConfig, chains: frozenset[Chain]):
  """A document's chain of min_steps .. max_steps + 2 steps holding none of `chains` (redrawn)."""
  while True:
    start, steps = _chain(draw, cfg, draw.integer(cfg.min_steps, cfg.max_steps + 2))
    if not chains or not contains_chain(_as_chain(start, steps), chains):
      return start, steps


def _equation_doc(draw: _Draw, cfg: ArithConfig, chains: frozenset[Chain] = frozenset()) -> str:
  """A chain of bare equations, one a line ('12+7=19', then '19-5=14', ...)."""
  start, steps = _doc_chain(draw, cfg, chains)
  lines, x = [], start
  for op, k, y in steps:
    lines.append(f'{x}{op}{k}={y}')
    x = y
  return '\n'.join(lines)


def _worked_doc(draw: _Draw, cfg: ArithConfig, chains: frozenset[Chain] = frozenset()) -> str:
  """A stock and worked steps in the solution's wording, with no question and no final answer."""
  name, _, _ = draw.pick(NAMES)
  item = draw.pick(ITEMS)
  start, steps = _doc_chain(draw, cfg, chains)
  lines, x = [f'{name} has {start} {item}.'], start
  for op, k, y in steps:
    lines.append(step_line(x, op, k, y, item))
    x = y
  return '\n'.join(lines)


def _facts_doc(draw: _Draw, cfg: ArithConfig, chains: frozenset[Chain] = frozenset()) -> str:
  """Unrelated one-step facts on one line: '3*4=12, 40/5=8.' (redrawn in the rare case that
  consecutive facts happen to chain into one of `chains`)."""
  while True:
    facts = []
    for _ in range(draw.integer(2, 5)):
      x, [(op, k, y)] = _chain(draw, cfg, 1)
      facts.append(f'{x}{op}{k}={y}')
    text = ', '.join(facts) + '.'
    if not chains or not any(contains_chain(r, chains) for r in computations(text)):
      return text


def _allowed_problem(
  draw: _Draw, cfg: ArithConfig, exclude: frozenset[str], chains: frozenset[Chain]
) -> Problem:
  """A problem whose question is not in `exclude` and whose solution is not in `chains`, redrawn
  until it is (the knobs allow more problems than any exclusion holds)."""
  p = make_problem(draw, cfg)
  while p.question in exclude or (chains and contains_chain(solution_chain(p.answer), chains)):
    p = make_problem(draw, cfg)
  return p


def _solved_doc(
  draw: _Draw,
  cfg: ArithConfig,
  chat_frac: float = 0.0,
  exclude: frozenset[str] = frozenset(),
  chains: frozenset[Chain] = frozenset(),
) -> str:
  """A solved word problem as plain text, the question then its worked solution on new lines:

  'Mia has 12 apples. She buys 7 more. How many apples does Mia have now?
  12+7=19 apples.
  #### 19'

  Like the worked math of a real pretraining corpus: a base model that reads these learns to read
  and solve the problems, and supervised fine-tuning then teaches the prompt format and when to
  stop. How often a model gets them right depends on how long it pretrained and on its size.
  With probability `chat_frac` the problem is written in the pipeline's prompt format instead
  (tokens.PROMPT_TEMPLATE, then the solution), like the instruction data of a real pretraining
  mix: a tiny base that never saw the template loses its computation when SFT moves it into the
  template, since 200 examples cannot re-teach it to copy the numbers in a new context.
  """
  p = _allowed_problem(draw, cfg, exclude, chains)
  if chat_frac and draw.chance(chat_frac):
    return prompt_text(p.question) + p.answer
  return f'{p.question}\n{p.answer}'


def _slip(draw: _Draw, p: Problem) -> str:
  """A wrong worked solution of `p`: one step's result off by 1 to 3, carried through the later
  steps and the final answer, as a careless solver writes it ('5+4=10', '10+8=18', '#### 18').
  Redrawn until no value is negative."""
  chain = solution_chain(p.answer)
  while True:
    bad = draw.integer(0, len(chain) - 1)
    delta = draw.pick((-3, -2, -1, 1, 2, 3))
    lines, x = [], chain[0][0]
    for i, (_, op, k, _) in enumerate(chain):
      y = _apply(op, x, k) + (delta if i == bad else 0)
      lines.append(f'{x}{op}{k}={y}')
      x = y
    if '=-' not in '\n'.join(lines):
      return '\n'.join(lines + [f'#### {x}'])


def _comparison_doc(
  draw: _Draw,
  cfg: ArithConfig,
  exclude: frozenset[str] = frozenset(),
  chains: frozenset[Chain] = frozenset(),
) -> str:
  """A solved problem's correct solution and a slipped one (`_slip`) in the evaluator's comparison
  template, in a random order, then the verdict: 'Yes' (change to answer (B)) when B is the
  correct one, else 'No'. The judgement data of a real pretraining mix: a base that has read these
  reads the template, at its length, as a question about which answer is right.
  Expression-style problems only (their solutions hold nothing but the computation)."""
  from ilr_jax.comparisons import comparison_prompt

  p = _allowed_problem(draw, cfg, exclude, chains)
  wrong = _slip(draw, p)
  if draw.chance(0.5):
    return comparison_prompt(p.question, wrong, p.answer) + '\nYes'
  return comparison_prompt(p.question, p.answer, wrong) + '\nNo'


def split_judgement(doc: str) -> tuple[str, str] | None:
  """(comparison prompt, verdict) of a comparison document (`_comparison_doc`), None for any
  other document. Pretraining learns only the verdict of these (supervisor_stages.pretrain), so
  the slipped solutions they show never teach wrong arithmetic."""
  if not doc.startswith('QUESTION:\n'):
    return None
  prompt, _, verdict = doc.rpartition('\n')
  return (prompt, verdict) if verdict in ('Yes', 'No') else None


def make_corpus(
  seed: int | str,
  size: int,
  cfg: ArithConfig = ArithConfig(),
  solved_frac: float = 0.0,
  chat_frac: float = 0.0,
  *,
  exclude: frozenset[str] = frozenset(),
  exclude_chains: frozenset[Chain] = frozenset(),
  comparison_frac: float = 0.0,
) -> list[str]:
  """Pretraining documents: equation chains, worked steps and one-step facts, deterministic.

  Args:
    seed: any int or string (a separate stream from `generate`'s).
    size: number of documents.
    cfg: operand and step knobs; chains run up to cfg.max_steps + 2 steps so a model sees longer
      computations in pretraining than any problem asks for.
    solved_frac: the expected fraction of solved word problems (`_solved_doc`); 0 (the default)
      draws no word problem at all, only chains, steps and facts, and no random number for that
      choice, so those documents do not change.
    chat_frac: the fraction of those solved problems written in the prompt format (see
      `_solved_doc`); 0 (the default) writes all of them in the plain format and draws no random
      number for that choice, so the other documents do not change.
    exclude: questions no solved problem may ask (the pipeline passes every train and test
      question: `exclusions`).
    exclude_chains: computations (Chains of 2 or more steps) that no document may contain, as a
      whole or as a contiguous part of a longer chain: the multi-step solutions of the train and
      test problems (`exclusions`). Without exclusions nothing is redrawn, so the documents do
      not change.
    comparison_frac: the expected fraction of comparison documents (`_comparison_doc`, on
      problems under the same exclusions); 0 (the default) draws no random number for that
      choice, so the other documents do not change.
  Returns:
    `size` strings, several lines each.
  """
  if not 0.0 <= solved_frac <= 1.0:
    raise ValueError(f'solved_frac must lie in [0, 1], got {solved_frac}')
  if not 0.0 <= chat_frac <= 1.0:
    raise ValueError(f'chat_frac must lie in [0, 1], got {chat_frac}')
  if not 0.0 <= comparison_frac <= 1.0:
    raise ValueError(f'comparison_frac must lie in [0, 1], got {comparison_frac}')
  if comparison_frac and cfg.style != 'expression':
    raise ValueError("comparison documents need style='expression' problems")
  draw = _Draw(f'arith/corpus/{seed}')
  makers = (_equation_doc, _worked_doc, _facts_doc)
  docs = []
  for _ in range(size):
    if comparison_frac and draw.chance(comparison_frac):
      docs.append(_comparison_doc(draw, cfg, exclude, exclude_chains))
    elif solved_frac and draw.chance(solved_frac):
      docs.append(_solved_doc(draw, cfg, chat_frac, exclude, exclude_chains))
    else:
      docs.append(draw.pick(makers)(draw, cfg, exclude_chains))
  return docs
