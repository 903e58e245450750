"""Comparison feedback sources: who tells ILR and SFT+DPO whether a proposal beats the current
answer. Every source is an evaluator.Scorer,

  scores = scorer(questions, currents, proposals)   # float64[N] in [0, 1]: P(proposal better)

built for one stage by `make(run, source, stage)`:

  evaluator  the trained pairwise classifier (evaluator.EvaluatorScorer)
  oracle     ground-truth grading (evaluator.OracleScorer)
  judge      an LLM judge (judge.py's HTTP OpenAI-compatible or local backend), asked in both
             orders and combined as the evaluator combines its two: mean(P(B better | A, B),
             P(A better | B, A)) with A the current answer and B the proposal. Every reply is
             appended to <stage>/judge_answers.jsonl as it arrives, so a rerun asks only what is
             missing. Errors and unreadable replies are retried (feedback.attempts) and then fail
             with one FeedbackError naming the stage.
  human      people, through files: the stage writes <stage>/to_annotate.csv and .jsonl (id,
             question, A, B; which side is the proposal is drawn at random per comparison and
             recorded in <stage>/annotation_key.json) and stops (AwaitingAnnotations, exit status
             3); the verdicts come back as <stage>/annotations.csv or .jsonl (id, verdict A, B or
             tie) and a rerun validates them (AnnotationError: one line per problem, nothing
             consumed) or waits again while some are missing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import pathlib
import time
from collections.abc import Sequence

import numpy as np

from ilr_jax.workdir import atomic_file, is_writer, read_json, sync, write_json, write_text

log = logging.getLogger(__name__)

JUDGE_ANSWERS = 'judge_answers.jsonl'
TO_ANNOTATE = 'to_annotate'  # .csv and .jsonl
ANNOTATIONS = 'annotations'  # .csv or .jsonl, written by the annotators
ANNOTATION_KEY = 'annotation_key.json'
VERDICTS = ('A', 'B', 'tie')


class FeedbackError(RuntimeError):
  """A feedback source failed for good; the message names the stage."""


class AnnotationError(ValueError):
  """A verdicts file that cannot be used; one line per problem."""


class AwaitingAnnotations(Exception):
  """A stage waits for human verdicts; the message says which files to fill in."""


def _check_triples(questions, currents, proposals) -> None:
  if not len(questions) == len(currents) == len(proposals):
    raise ValueError(
      f'got {len(questions)} questions, {len(currents)} currents and {len(proposals)} proposals'
    )


def _key(question: str, a: str, b: str) -> str:
  """A stable id of one ordered comparison (the same on every process and every rerun)."""
  blob = json.dumps([question, a, b], ensure_ascii=False)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make(run, source: str, stage: str):
  """The Scorer of a feedback source (methods.COMPARING) for one stage of a run (context.Run)."""
  from ilr_jax import evaluator

  if source == 'evaluator':
    et = run.config.evaluator_train
    return evaluator.EvaluatorScorer(
      run.load('evaluator', 'evaluator'),
      run.tok('evaluator'),
      batch_size=run.config.sampling.score_batch_size,
      max_len=et.max_len,
      too_long=et.too_long,
      swap_second_order=et.swap_second_order,
      mesh=run.mesh,
      progress=False,
    )
  if source == 'oracle':
    return evaluator.OracleScorer(run.task, run.half_b)
  f = run.config.feedback
  if source == 'judge':
    from ilr_jax import judge

    try:
      backend = judge.make_judge(f.judge.to_dict(), prefix='feedback.judge')
    except judge.JudgeConfigError as e:
      raise FeedbackError(f'{stage}: {e}') from None
    return JudgeFeedback(
      backend,
      run.wd.path(stage),
      stage,
      attempts=f.attempts,
      retry_wait_s=f.retry_wait_s,
    )
  if source == 'human':
    return HumanFeedback(run.wd.path(stage), stage, seed=run.seed(stage + '/human'))
  raise ValueError(f'feedback {source!r} compares no answers, so it has no scorer')


# -- judge -----------------------------------------------------------------------------------------


class JudgeFeedback:
  """P(proposal better) from a judge.PairwiseJudge, both orders, answers cached (module docstring).

  Args:
    judge: a PairwiseJudge (prob_a_better: P(output A better), NaN when unreadable).
    folder: the stage's folder; the cache is folder/judge_answers.jsonl.
    stage: named in errors.
    attempts: tries of each batch of prompts; a reply that fails or holds no verdict is asked again.
    retry_wait_s: wait before the second try, doubled for each further one.
    batch: prompts per call of the judge (the cache is appended after each call).
  """

  def __init__(self, judge, folder, stage: str, *, attempts=3, retry_wait_s=2.0, batch=64):
    self.judge, self.stage = judge, stage
    self.path = pathlib.Path(folder) / JUDGE_ANSWERS
    self.attempts, self.retry_wait_s, self.batch = attempts, retry_wait_s, batch
    self._answers: dict[str, float] = {}  # this process's answers (only process 0 keeps a file)

  def _load(self) -> dict[str, float]:
    if not self.path.exists():
      return {}
    lines = self.path.read_text().splitlines()
    out = {}
    for i, line in enumerate(lines):
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        if i == len(lines) - 1:  # a write cut short by a kill; that answer is asked again
          continue
        raise FeedbackError(f'{self.stage}: {self.path} line {i + 1} is not JSON') from None
      out[row['key']] = float(row['p_a'])
    return out

  def _append(self, triples, p_a) -> None:
    self._answers.update((_key(*t), p) for t, p in zip(triples, p_a))
    if not is_writer():
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, 'a') as f:
      for (q, a, b), p in zip(triples, p_a):
        f.write(json.dumps({'key': _key(q, a, b), 'question': q, 'a': a, 'b': b, 'p_a': p}) + '\n')
      f.flush()
      os.fsync(f.fileno())

  def _ask(self, triples: list[tuple[str, str, str]]) -> None:
    """Ask P(A better) of each (question, A, B), retried (class docstring), and save each answer;
    raises FeedbackError naming the stage when some stay unanswered."""
    from ilr_jax.judge import JudgeError

    remaining, last = list(triples), ''
    for attempt in range(self.attempts):
      if attempt:
        time.sleep(self.retry_wait_s * 2 ** (attempt - 1))
      try:
        p = np.asarray(self.judge.prob_a_better(*map(list, zip(*remaining))), np.float64)
      except (JudgeError, json.JSONDecodeError) as e:
        last = f'{type(e).__name__}: {e}'
        log.warning(
          '%s: judge attempt %d of %d failed: %s', self.stage, attempt + 1, self.attempts, last
        )
        continue
      ok = np.isfinite(p) & (p >= 0) & (p <= 1)
      self._append([t for t, g in zip(remaining, ok) if g], p[ok].tolist())
      remaining = [t for t, g in zip(remaining, ok) if not g]
      if not remaining:
        return
      last = f'{len(remaining)} replies held no A/B verdict'
    raise FeedbackError(
      f'{self.stage}: the judge gave no usable answer for {len(remaining)} comparison prompts '
      f'after {self.attempts} attempts ({last}); the answers received are saved in {self.path} '
      'and are not asked again on a rerun'
    )

  def __call__(self, questions, currents, proposals) -> np.ndarray:
    """float64[N]: mean(1 - P(A better | current, proposal), P(A better | proposal, current))."""
    _check_triples(questions, currents, proposals)
    first = list(zip(questions, currents, proposals))
    second = list(zip(questions, proposals, currents))
    cache = self._load()
    todo = list({_key(*t): t for t in first + second if _key(*t) not in cache}.values())
    for start in range(0, len(todo), self.batch):
      self._ask(todo[start : start + self.batch])
    cache.update(self._answers)
    p1 = np.asarray([cache[_key(*t)] for t in first], np.float64)
    p2 = np.asarray([cache[_key(*t)] for t in second], np.float64)
    return 0.5 * ((1.0 - p1) + p2)


# -- human -----------------------------------------------------------------------------------------


class HumanFeedback:
  """P(proposal better) from people's verdicts in files (module docstring).

  A verdict for the proposal's side scores 1, for the current answer's side 0, a tie 0.5.

  Args:
    folder: the stage's folder (requests, key and verdicts live there).
    stage: named in messages.
    seed: draws which side shows the proposal.
  """

  def __init__(self, folder, stage: str, seed: int):
    self.folder, self.stage, self.seed = pathlib.Path(folder), stage, seed

  def _requests(self, questions, currents, proposals):
    """(ids per item, {id: (question, A, B)}, {id: side of the proposal}), in first-seen order."""
    ids = [_key(q, c, p) for q, c, p in zip(questions, currents, proposals)]
    unique = list(dict.fromkeys(ids))
    first = {x: i for i, x in reversed(list(enumerate(ids)))}
    flip = np.random.default_rng(self.seed).random(len(unique)) < 0.5
    side, shown = {}, {}
    for x, f in zip(unique, flip):
      i = first[x]
      side[x] = 'A' if f else 'B'
      a, b = (proposals[i], currents[i]) if f else (currents[i], proposals[i])
      shown[x] = (questions[i], a, b)
    return ids, shown, side

  def _write_requests(self, shown, side) -> None:
    """The files for the annotators and the key, once: a rerun never overwrites them."""
    if not is_writer() or (self.folder / ANNOTATION_KEY).exists():
      return
    rows = [{'id': x, 'question': q, 'A': a, 'B': b} for x, (q, a, b) in shown.items()]
    write_text(
      self.folder / f'{TO_ANNOTATE}.jsonl',
      ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows),
    )
    with atomic_file(self.folder / f'{TO_ANNOTATE}.csv') as tmp, open(tmp, 'w', newline='') as f:
      w = csv.DictWriter(f, fieldnames=['id', 'question', 'A', 'B', 'verdict'])
      w.writeheader()
      w.writerows({**r, 'verdict': ''} for r in rows)
    write_json(self.folder / ANNOTATION_KEY, {'proposal_side': side})

  def instructions(self, n: int) -> str:
    d = self.folder
    return (
      f'{self.stage}: waiting for annotations of {n} comparisons, written to\n'
      f'  {d / TO_ANNOTATE}.csv   (columns id, question, A, B, verdict)\n'
      f'  {d / TO_ANNOTATE}.jsonl (one {{"id", "question", "A", "B"}} per line)\n'
      'For each, decide which answer better responds to the question: A, B or tie. Save the\n'
      f'verdicts as {d / ANNOTATIONS}.csv (the CSV with its verdict column filled in) or as\n'
      f'{d / ANNOTATIONS}.jsonl (one {{"id": ..., "verdict": "A" | "B" | "tie"}} per line), then\n'
      f'rerun the same command. ({ANNOTATION_KEY} says which side is the current label: keep it\n'
      'from the annotators.)'
    )

  def read_verdicts(self, known: Sequence[str]) -> tuple[dict[str, str], list[str]] | None:
    """({id: 'A' | 'B' | 'tie'}, problems) from the annotations file; None when there is none.

    A blank verdict (an unfilled CSV cell, a JSON null or "") is missing, not a problem.
    """
    found = [
      d for d in (self.folder / f'{ANNOTATIONS}.{e}' for e in ('csv', 'jsonl')) if d.exists()
    ]
    if not found:
      return None
    if len(found) > 1:
      return {}, [f'both {found[0]} and {found[1]} exist; keep one']
    path, known = found[0], set(known)
    entries, problems = [], []  # (line, id, verdict)
    if path.suffix == '.csv':
      with open(path, newline='') as f:
        reader = csv.DictReader(f)
        if not {'id', 'verdict'} <= set(reader.fieldnames or ()):
          return {}, [f'{path}: the header must name the columns id and verdict']
        entries = [(i + 2, r['id'], r['verdict']) for i, r in enumerate(reader)]
    else:
      for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
          continue
        try:
          r = json.loads(line)
        except json.JSONDecodeError:
          r = None
        if not isinstance(r, dict) or 'id' not in r:
          problems.append((i, f'{path.name} line {i}: not a JSON object with an "id"'))
          continue
        entries.append((i, r['id'], r.get('verdict')))
    verdicts = {}
    canon = {v.lower(): v for v in VERDICTS}
    for line, x, v in entries:
      where = f'{path.name} line {line}'
      x = str(x).strip() if x is not None else ''
      v = '' if v is None else str(v).strip()
      if x not in known:
        problems.append((line, f'{where}: unknown id {x!r} (not a comparison of this stage)'))
      elif v and v.lower() not in canon:
        problems.append((line, f'{where}: bad verdict {v!r} for id {x}; expected A, B or tie'))
      elif v and verdicts.get(x, canon[v.lower()]) != canon[v.lower()]:
        problems.append((line, f'{where}: id {x} again, with another verdict ({v!r})'))
      elif v:
        verdicts[x] = canon[v.lower()]
    return verdicts, [msg for _, msg in sorted(problems)]

  def __call__(self, questions, currents, proposals) -> np.ndarray:
    """float64[N]; raises AwaitingAnnotations until every verdict is in, AnnotationError on a bad
    file."""
    _check_triples(questions, currents, proposals)
    ids, shown, side = self._requests(questions, currents, proposals)
    if not ids:
      return np.zeros(0, np.float64)
    self._write_requests(shown, side)
    sync(f'annotate:{self.stage}')
    side = read_json(self.folder / ANNOTATION_KEY)['proposal_side']
    if set(side) != set(shown):
      raise FeedbackError(
        f'{self.stage}: {self.folder / ANNOTATION_KEY} holds other comparisons than this stage '
        f'asks for; move {TO_ANNOTATE}.*, {ANNOTATION_KEY} and {ANNOTATIONS}.* away and rerun'
      )
    got = self.read_verdicts(list(shown))
    if got is None:
      raise AwaitingAnnotations(self.instructions(len(shown)))
    verdicts, problems = got
    if problems:
      raise AnnotationError(
        f'{self.stage}: the annotations cannot be used (nothing was consumed; fix the file and '
        'rerun):\n  ' + '\n  '.join(problems)
      )
    missing = [x for x in shown if x not in verdicts]
    if missing:
      raise AwaitingAnnotations(
        f'{self.stage}: {len(missing)} of {len(shown)} comparisons have no verdict yet (e.g. id '
        f'{missing[0]}); fill them in and rerun.\n' + self.instructions(len(shown))
      )
    score = {'tie': 0.5}
    return np.asarray(
      [score.get(verdicts[x], 1.0 if verdicts[x] == side[x] else 0.0) for x in ids], np.float64
    )
