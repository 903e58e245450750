"""Tasks behind one interface, looked up by name: GSM8K, BIRD, SaferPaca and synthetic `arith`.

A task loads a split as `Example`s (question, reference answer, id), counting and reporting bad
rows instead of crashing on them; grades predictions against references; says whether two answers
agree (ILR's filter: same final answer, same result set, similar embeddings); says which labels are
usable; and holds the decoding settings of each use. `split_halves` is the one seeded half-A /
half-B split of the method.

  task = get_task('gsm8k', data_dir='../shared/data/gsm8k')
  train = task.load('train')            # task.reports['train'] tells what was dropped and why
  graded = task.grade_batch(predictions, train)
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import decimal
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import numpy as np

from ilr_jax import arith, judge, sql

log = logging.getLogger(__name__)

USES = ('label', 'proposal', 'eval', 'dpo', 'evaluator_data')


def split_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The seeded 50/50 split of n rows: (half A, half B) index arrays, each sorted.

  Half A takes the first n // 2 of a seeded permutation (7,473 GSM8K rows give 3,736 / 3,737).
  """
  from ilr_jax import refine

  return refine.permutation_split(n, n // 2, seed)


@dataclasses.dataclass(frozen=True)
class Example:
  """One row: `answer` is the reference (GSM8K: the worked solution ending in '#### n')."""

  id: str
  question: str
  answer: str
  db_name: str | None = None  # BIRD: the database the SQL runs on
  category: str | None = None  # SaferPaca: 'general' or 'safety'


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How to decode for one use: beam search (num_beams) or sampling (temperature, num_samples).

  `method` is a name of decoding.METHODS ('beam' or 'sample' here).
  """

  method: str
  max_new_tokens: int
  num_beams: int = 1
  temperature: float = 1.0
  num_samples: int = 1

  def sampler_method(self):
    """The sampler's method object of this decoding (decoding.method_from_name)."""
    from ilr_jax import decoding

    return decoding.method_from_name(
      self.method, temperature=self.temperature, num_beams=self.num_beams
    )


def _decodings(max_new_tokens: int, label_sampling: float | None, dpo_temperature: float):
  """The method's decoding table (METHOD.md, "Decoding"); label_sampling None means beam 4. The
  number of DPO samples per prompt is the config's dpo.num_samples (the pipeline sets it)."""
  beam = Decoding('beam', max_new_tokens, num_beams=4)
  label = beam if label_sampling is None else Decoding('sample', max_new_tokens, temperature=1.0)
  return {
    'label': label,
    'proposal': label,
    'eval': beam,
    'dpo': Decoding('sample', max_new_tokens, temperature=dpo_temperature),
    'evaluator_data': Decoding('sample', max_new_tokens, temperature=0.6),
  }


@dataclasses.dataclass(frozen=True)
class RowReport:
  """What loading a split kept and dropped; `bad` maps a reason to the dropped row indices."""

  task: str
  split: str
  total: int
  bad: Mapping[str, tuple[int, ...]]

  @property
  def num_bad(self) -> int:
    return sum(len(v) for v in self.bad.values())

  @property
  def kept(self) -> int:
    return self.total - self.num_bad

  def __str__(self) -> str:
    parts = [f'{r}: {len(ix)} (rows {list(ix[:5])})' for r, ix in sorted(self.bad.items())]
    detail = f' [{"; ".join(parts)}]' if parts else ''
    return (
      f'{self.task}/{self.split}: {self.total} rows, {self.kept} kept, {self.num_bad} bad{detail}'
    )


@dataclasses.dataclass(frozen=True)
class Graded:
  """Scores of a batch (bool for exact-match tasks, win probability for SaferPaca) and a count of
  why items scored 0 before any comparison (unparsable prediction, SQL timeout, ...)."""

  scores: np.ndarray
  failures: Mapping[str, int]

  def mean(self) -> float:
    return float(np.mean(self.scores)) if len(self.scores) else float('nan')

  @property
  def correct(self) -> np.ndarray:
    """bool per item: whether it is right, i.e. scores above 0.5. Exact-answer tasks (GSM8K,
    BIRD, arith) score 0 or 1; SaferPaca scores the judge's probability that the answer beats the
    reference response, so there 'correct' means judged better than the reference (not bool() of
    a probability, which would call almost every answer correct)."""
    return np.asarray(self.scores, np.float64) > 0.5


def text_problem(x: Any) -> str | None:
  """Why x cannot be a question or an answer ('missing_field', 'not_a_string', 'empty'), or None."""
  if x is None:
    return 'missing_field'
  if not isinstance(x, str):
    return 'not_a_string'
  if not x.strip():
    return 'empty'
  return None


class Task(abc.ABC):
  """Base class: row loading and bad-row reports; subclasses grade and agree."""

  name = ''
  max_new_tokens = 256
  label_sampling: float | None = None  # None: labels and proposals by beam search
  dpo_temperature = 0.7

  def __init__(
    self,
    *,
    data_dir: str | os.PathLike | None = None,
    hub_id: str | None = None,
    hub_config: str | None = None,
    max_new_tokens: int | None = None,
  ):
    if data_dir is not None and hub_id is not None:
      raise ValueError(f'{self.name}: set one of data_dir and hub_id, not both')
    self.data_dir, self.hub_id, self.hub_config = data_dir, hub_id, hub_config
    self.decoding: dict[str, Decoding] = _decodings(
      max_new_tokens or self.max_new_tokens, self.label_sampling, self.dpo_temperature
    )
    self.reports: dict[str, RowReport] = {}

  # --- loading ---
  def _source_rows(self, split: str) -> list[dict[str, Any]]:
    if self.data_dir is not None:
      dd = self._load_data_dir()
      if split not in dd:
        raise KeyError(f'{self.name}: no split {split!r} in {self.data_dir} (has {list(dd)})')
      return dd[split].to_list()
    if self.hub_id is not None:
      return datasets.load_dataset(self.hub_id, self.hub_config, split=split).to_list()
    raise ValueError(
      f'{self.name}: no data source; set --config.task.data_dir (a datasets.save_to_disk folder, '
      'see data/README.md) or --config.task.hub_id on a machine with internet'
    )

  def _load_data_dir(self) -> datasets.DatasetDict:
    where = f'{self.name}: --config.task.data_dir {self.data_dir}'
    try:
      dd = datasets.load_from_disk(os.fspath(self.data_dir))
    except FileNotFoundError as e:
      raise ValueError(f'{where} is not a datasets.save_to_disk folder ({e})') from None
    except IndexError:  # what datasets raises loading a split saved with 0 rows
      raise ValueError(f'{where} holds a split with 0 rows; every split needs rows') from None
    if not isinstance(dd, datasets.DatasetDict):
      raise ValueError(
        f'{where} holds one {type(dd).__name__} of {len(dd)} rows, not a DatasetDict of splits; '
        "save it as datasets.DatasetDict({'train': ..., 'test': ...})"
      )
    return dd

  def _example(self, row: Mapping[str, Any], id_: str) -> Example | str:
    """The row as an Example, or the reason it is bad."""
    for key in ('question', 'answer'):
      if (problem := text_problem(row.get(key))) is not None:
        return problem
    return Example(id_, row['question'], row['answer'])

  def load(self, split: str, limit: int | None = None) -> list[Example]:
    """The usable rows of a split (the first `limit` rows if given), in source order.

    Bad rows are dropped, counted in `self.reports[split]` and logged; a split with no usable row
    is an error (a wrong source), one with some bad rows is not.
    """
    rows = self._source_rows(split)
    if limit is not None:
      rows = rows[:limit]
    out, bad = [], collections.defaultdict(list)
    for i, row in enumerate(rows):
      ex = self._example(row, f'{self.name}/{split}/{i}')
      if isinstance(ex, str):
        bad[ex].append(i)
      else:
        out.append(ex)
    report = RowReport(self.name, split, len(rows), {k: tuple(v) for k, v in bad.items()})
    self.reports[split] = report
    if report.num_bad:
      log.warning('%s', report)
    if rows and not out:
      raise ValueError(f'{report}; columns found: {sorted(rows[0])}')
    return out

  # --- grading and agreement ---
  def is_valid_label(self, answer: Any) -> bool:
    """Whether an answer may serve as a training label."""
    return text_problem(answer) is None

  def grade(self, prediction: Any, reference: Example | str) -> bool | float:
    """Score of one prediction against its reference (an Example or the reference text)."""
    return self.grade_batch([prediction], [reference]).scores[0].item()

  @abc.abstractmethod
  def grade_batch(self, predictions: Sequence[Any], references: Sequence[Example | str]) -> Graded:
    """Scores of a batch, with the reasons items failed before any comparison."""

  def agree(self, a: Any, b: Any, example: Example | None = None) -> bool:
    """ILR's agreement filter for one pair of answers to the same question."""
    return bool(self.agree_batch([a], [b], None if example is None else [example])[0])

  @abc.abstractmethod
  def agree_batch(
    self, list_a: Sequence[Any], list_b: Sequence[Any], examples: Sequence[Example] | None = None
  ) -> np.ndarray:
    """Elementwise agreement (bool array) of two batches of answers to the same questions."""

  def summarize(self, scores: np.ndarray, examples: Sequence[Example]) -> dict[str, float]:
    """Metrics for logging: the mean score (and per-category means where a task has them)."""
    del examples
    return {'accuracy': float(np.mean(scores)) if len(scores) else float('nan')}

  def check_ready(self, examples: Sequence[Example] = ()) -> None:
    """Raises, naming the config key to set, when grading `examples` cannot run (databases,
    judge); a run calls it before spending time on training."""
    del examples  # exact-match tasks grade anywhere


def _reference_text(reference: Example | str) -> Any:
  return reference.answer if isinstance(reference, Example) else reference


def _check_lengths(*seqs: Sequence) -> None:
  if len({len(s) for s in seqs if s is not None}) > 1:
    raise ValueError(f'batch lengths differ: {[len(s) for s in seqs if s is not None]}')


# --- final-answer tasks (GSM8K, arith) ---

# A number after '####': optional sign and '$', thousands groups or plain digits, decimals.
_NUMBER = re.compile(r'(-)?\s*\$?\s*(-)?\s*(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)')


def final_answer(text: Any, raw: bool = False) -> decimal.Decimal | str | None:
  """The answer after the last '####', or None when there is none.

  Args:
    text: a solution.
    raw: the released code's rule: the second whitespace-separated token from the last '####' on,
      compared as a string ('1,080' differs from '1080', '18.0' from '18'; '####18' has none).
  Returns:
    raw: that token; otherwise the first number after '####' as a Decimal, with thousands
    separators, '$' and surrounding words ignored (so 18, 18.0, $18 and '18 apples.' are equal).
  """
  if not isinstance(text, str) or (at := text.rfind('####')) < 0:
    return None
  if raw:
    parts = text[at:].split()  # '####18' is one part, so it has no answer under this rule
    return parts[1] if len(parts) > 1 else None
  if (m := _NUMBER.search(text[at + 4 :])) is None:
    return None
  value = decimal.Decimal(m.group(3).replace(',', ''))
  return -value if (m.group(1) or m.group(2)) else value


class FinalAnswerTask(Task):
  """Exact match on the number after the last '####' (normalised, or the raw rule)."""

  def __init__(self, *, raw_match: bool = False, **kwargs):
    super().__init__(**kwargs)
    self.raw_match = raw_match

  def _answer(self, text: Any):
    return final_answer(text, raw=self.raw_match)

  def _example(self, row, id_):
    ex = super()._example(row, id_)
    if isinstance(ex, Example) and self._answer(ex.answer) is None:
      return 'no_final_answer'
    return ex

  def is_valid_label(self, answer: Any) -> bool:
    return self._answer(answer) is not None

  def grade_batch(self, predictions, references) -> Graded:
    _check_lengths(predictions, references)
    scores, failures = np.zeros(len(predictions), bool), collections.Counter()
    for i, (pred, ref) in enumerate(zip(predictions, references)):
      gold = self._answer(_reference_text(ref))
      if gold is None:
        failures['bad_reference'] += 1
      elif (problem := text_problem(pred)) is not None:
        failures[problem] += 1
      elif (got := self._answer(pred)) is None:
        failures['no_final_answer'] += 1
      else:
        scores[i] = got == gold
    return Graded(scores, dict(failures))

  def agree_batch(self, list_a, list_b, examples=None) -> np.ndarray:
    _check_lengths(list_a, list_b, examples)
    out = np.zeros(len(list_a), bool)
    for i, (a, b) in enumerate(zip(list_a, list_b)):
      x, y = self._answer(a), self._answer(b)
      out[i] = x is not None and x == y
    return out


class Gsm8k(FinalAnswerTask):
  """GSM8K (openai/gsm8k, config 'main'): grade-school word problems with worked solutions."""

  name = 'gsm8k'


class Arith(FinalAnswerTask):
  """Synthetic GSM8K-format problems (ilr_jax.arith), generated from a seed: no files needed.

  The test split never repeats a train question. Difficulty knobs are ArithConfig's fields.
  """

  name = 'arith'
  max_new_tokens = 96

  def __init__(
    self,
    *,
    seed: int = 0,
    num_train: int = 2000,
    num_test: int = 500,
    raw_match: bool = False,
    max_new_tokens: int | None = None,
    **knobs,
  ):
    super().__init__(raw_match=raw_match, max_new_tokens=max_new_tokens)
    self.seed, self.num_train, self.num_test = seed, num_train, num_test
    self.config = arith.ArithConfig(**knobs)

  def _splits(self, test: bool) -> tuple[list[arith.Problem], list[arith.Problem]]:
    """(train, test) problems; the test split (drawn only if asked) repeats no train question."""
    train = arith.generate(f'{self.seed}/train', self.num_train, self.config)
    if not test:
      return train, []
    exclude = frozenset(p.question for p in train)
    return train, arith.generate(f'{self.seed}/test', self.num_test, self.config, exclude=exclude)

  def _source_rows(self, split):
    if split not in ('train', 'test'):
      raise KeyError(f"arith: no split {split!r} (has ['train', 'test'])")
    train, test = self._splits(test=split == 'test')
    problems = train if split == 'train' else test
    return [{'question': p.question, 'answer': p.answer} for p in problems]

  def problems(self) -> list[arith.Problem]:
    """Every problem of both splits, whatever limit a run loads (the pretraining corpus must hold
    none of them: supervisor_stages.pretrain_corpus)."""
    train, test = self._splits(test=True)
    return train + test


# --- BIRD ---


class Bird(Task):
  """BIRD text-to-SQL: execution accuracy on `{db_root}/{db_name}/{db_name}.sqlite`.

  Rows load without the databases; grading and agreement need db_root. Agreement is equal result
  sets, and so is grading (prediction against the reference SQL), both run by ilr_jax.sql. Grading
  failures are tagged 'prediction:<reason>' or 'reference:<reason>' (timeout, error, ...).
  """

  name = 'bird'

  def __init__(
    self,
    *,
    db_root: str | os.PathLike | None = None,
    timeout_s: float = 30.0,
    max_rows: int = 100_000,
    num_workers: int = 2,
    **kwargs,
  ):
    super().__init__(**kwargs)
    self.db_root = db_root
    self.limits = sql.Limits(timeout_s=timeout_s, max_rows=max_rows)
    self.num_workers = num_workers

  def _example(self, row, id_):
    ex = super()._example(row, id_)
    if isinstance(ex, str):
      return ex
    if (problem := text_problem(row.get('db_name'))) is not None:
      return problem
    return dataclasses.replace(ex, db_name=row['db_name'])

  def check_ready(self, examples: Sequence[Example] = ()) -> None:
    sql.check_db_root(self.db_root)
    for name in sorted({ex.db_name for ex in examples}):
      sql.bird_db_path(self.db_root, name)

  def _run(self, list_a, list_b, examples) -> tuple[np.ndarray, dict[str, int]]:
    if examples is None or any(not isinstance(ex, Example) for ex in examples):
      raise TypeError('bird: grading and agreement need the Examples (each names its database)')
    _check_lengths(list_a, list_b, examples)
    paths = {name: sql.bird_db_path(self.db_root, name) for name in {ex.db_name for ex in examples}}
    jobs, failures = [], collections.Counter()
    for i, (a, b, ex) in enumerate(zip(list_a, list_b, examples)):
      if (problem := text_problem(a)) is not None:
        failures[problem] += 1
      else:
        jobs.append(sql.Job(i, paths[ex.db_name], a, b))
    equal = np.zeros(len(list_a), bool)
    for outcome in sql.compare_many(jobs, self.limits, num_workers=self.num_workers):
      equal[outcome.id] = outcome.equal
      if outcome.reason is not None:
        failures[outcome.reason] += 1
    return equal, dict(failures)

  def grade_batch(self, predictions, references) -> Graded:
    refs = [_reference_text(r) for r in references]
    scores, failures = self._run(predictions, refs, references)
    sides = {'a': 'prediction', 'b': 'reference'}
    named = collections.Counter()
    for reason, n in failures.items():
      side, sep, rest = reason.partition(':')
      named[f'{sides[side]}:{rest}' if sep and side in sides else reason] += n
    return Graded(scores, dict(named))

  def agree_batch(self, list_a, list_b, examples=None) -> np.ndarray:
    return self._run(list_a, list_b, examples)[0]


# --- SaferPaca ---

SAFERPACA_HEADER = (
  'Below is an instruction that describes a task. Write a response that appropriately completes '
  'the request.'
)


def saferpaca_prompt(instruction: str, input_text: str = '') -> str:
  """The released data's prompt for an instruction (and an optional input, Alpaca style)."""
  body = f'{SAFERPACA_HEADER}\n\nInstruction:\n{instruction}\n'
  return f'{body}\nInput:\n{input_text}\n' if input_text else body


def saferpaca_instruction(question: str) -> str:
  """The instruction (and input, if any) inside a SaferPaca prompt: what the judge is shown."""
  head = f'{SAFERPACA_HEADER}\n\nInstruction:\n'
  if not question.startswith(head):
    return question
  body = question[len(head) :]
  return body[:-1] if body.endswith('\n') else body


class SaferPaca(Task):
  """SaferPaca: Alpaca instructions plus refusals of harmful ones ('general' / 'safety').

  Grading is the win probability of a prediction against the reference by a pairwise judge, in
  both orders; agreement is embedding similarity above the batch median. Rows in Alpaca's
  instruction / input / output columns are turned into the released prompt format.

  Args:
    judge: a judge.PairwiseJudge or the options of judge.make_judge (built on first use).
    embedder: a judge.Embedder or the options of judge.make_embedder (built on first use).
  """

  name = 'saferpaca'
  max_new_tokens = 512
  label_sampling = 1.0
  dpo_temperature = 1.0
  CATEGORIES = ('general', 'safety')

  def __init__(self, *, judge: Any = None, embedder: Any = None, **kwargs):
    super().__init__(**kwargs)
    self._judge, self._embedder = judge, embedder

  def _example(self, row, id_):
    if 'question' not in row and 'instruction' in row:
      for key in ('instruction', 'output'):
        if (problem := text_problem(row.get(key))) is not None:
          return problem
      row = dict(
        row,
        question=saferpaca_prompt(row['instruction'], row.get('input') or ''),
        answer=row['output'],
      )
    ex = super()._example(row, id_)
    if isinstance(ex, str):
      return ex
    if row.get('category') not in self.CATEGORIES:
      return 'bad_category'
    return dataclasses.replace(ex, category=row['category'])

  def get_judge(self) -> judge.PairwiseJudge:
    """The judge, built from its options on first use (JudgeConfigError when none is set)."""
    if not hasattr(self._judge, 'prob_a_better'):
      self._judge = judge.make_judge(self._judge)
    return self._judge

  def get_embedder(self) -> judge.Embedder:
    """The embedder, built from its options on first use (JudgeConfigError when none is set)."""
    if not hasattr(self._embedder, 'embed'):
      self._embedder = judge.make_embedder(self._embedder)
    return self._embedder

  def check_ready(self, examples: Sequence[Example] = ()) -> None:
    del examples
    self.get_judge()

  def grade_batch(self, predictions, references) -> Graded:
    if any(not isinstance(r, Example) for r in references):
      raise TypeError('saferpaca: grading needs the Examples (the judge reads the instruction)')
    _check_lengths(predictions, references)
    scores, failures = np.zeros(len(predictions), float), collections.Counter()
    ok = []
    for i, pred in enumerate(predictions):
      if (problem := text_problem(pred)) is not None:
        failures[problem] += 1
      else:
        ok.append(i)
    if ok:
      wins = judge.win_probs(
        self.get_judge(),
        [saferpaca_instruction(references[i].question) for i in ok],
        [predictions[i] for i in ok],
        [references[i].answer for i in ok],
      )
      unreadable = np.isnan(wins)
      failures['judge_unreadable'] += int(unreadable.sum())
      scores[ok] = np.where(unreadable, 0.0, wins)
    return Graded(scores, {k: v for k, v in failures.items() if v})

  def agree(self, a, b, example=None) -> bool:
    raise TypeError('saferpaca: agreement is similarity above the batch median; use agree_batch')

  def agree_batch(self, list_a, list_b, examples=None) -> np.ndarray:
    _check_lengths(list_a, list_b, examples)
    return judge.similarity_agreement(self.get_embedder(), list_a, list_b)

  def summarize(self, scores, examples) -> dict[str, float]:
    out = {'win_rate': float(np.mean(scores)) if len(scores) else float('nan')}
    cats = np.array([ex.category for ex in examples])
    for c in self.CATEGORIES:
      if (cats == c).any():
        out[f'win_rate/{c}'] = float(np.mean(np.asarray(scores)[cats == c]))
    return out


_TASKS: dict[str, type[Task]] = {t.name: t for t in (Gsm8k, Bird, SaferPaca, Arith)}


def get_task(name: str, **options) -> Task:
  """The task registered under `name` ('gsm8k', 'bird', 'saferpaca', 'arith'), built with options.

  Common options: data_dir (a datasets.save_to_disk folder) or hub_id (+ hub_config), and
  max_new_tokens (overrides every use). GSM8K/arith: raw_match. BIRD: db_root, timeout_s,
  max_rows, num_workers. SaferPaca: judge, embedder. arith: seed, num_train, num_test and the
  ArithConfig knobs.
  """
  if name not in _TASKS:
    raise KeyError(f'unknown task {name!r}; known tasks: {sorted(_TASKS)}')
  return _TASKS[name](**options)
