"""The evaluator's comparison data: graded samples of half-A checkpoints, turned into pairs.

METHOD.md "Evaluator data and training". `build_comparison_data` samples one answer per question
from each params snapshot of a supervisor-sized model fitted on half A (`sample_checkpoints`), and
turns the graded samples into pairs and classification examples (`comparison_dataset`, the rules
of comparisons.py) saved as an HF dataset with the count of each pair kind. evaluator.py trains
the classifier on them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import numpy as np
from jax.sharding import Mesh

from ilr_jax import comparisons, fit, generate
from ilr_jax import workdir as wd
from ilr_jax.model import Decoder
from ilr_jax.tokens import Tokenizer

log = logging.getLogger(__name__)


def comparison_dataset(
  questions: Sequence[str],
  references: Sequence[str],
  samples: Sequence[Sequence[str]],
  correct: Sequence[Sequence[bool]],
  *,
  seed: int = 0,
  val_frac: float = 0.1,
  ids: Sequence[str] | None = None,
  keep_identical: bool = False,
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
  """Classification examples from graded checkpoint samples (comparisons.py has the rules).

  Pairs are drawn question by question, in order, from one `np.random.default_rng(seed)`; the
  90/10 split is over questions (`comparisons.train_val_split(n, val_frac, seed)`).

  Args:
    questions, references: the half-A questions and their ground-truth answers.
    samples: samples[i][j] is checkpoint i's answer to question j (checkpoint order).
    correct: correct[i][j], whether that answer is correct.
    ids: optional question ids (default: the question's index).
    keep_identical: keep pairs whose two sides are the same text (`pairs_dataset`).

  Returns:
    (DatasetDict with 'train' and 'validation' splits of rows {text, label, kind, weight,
    question_id, question, a, b} (text is the comparison prompt of question, a and b),
    counts {split: {pairs per kind, 'pairs', 'examples', 'questions'}}).
  """
  n = len(questions)
  if len(references) != n:
    raise ValueError(f'{n} questions but {len(references)} references')
  ids = [str(j) for j in range(n)] if ids is None else [str(x) for x in ids]
  if len(ids) != n:
    raise ValueError(f'{n} questions but {len(ids)} ids')
  for i, (s_i, c_i) in enumerate(zip(samples, correct)):
    if len(s_i) != n or len(c_i) != n:
      raise ValueError(
        f'checkpoint {i} has {len(s_i)} samples and {len(c_i)} grades for {n} questions'
      )
  if len(samples) != len(correct):
    raise ValueError(f'{len(samples)} checkpoints of samples but {len(correct)} of grades')
  rng = np.random.default_rng(seed)
  pairs = [
    comparisons.build_pairs(
      references[j], [s[j] for s in samples], [bool(c[j]) for c in correct], rng
    )
    for j in range(n)
  ]
  return pairs_dataset(
    questions, pairs, ids=ids, seed=seed, val_frac=val_frac, keep_identical=keep_identical
  )


def pairs_dataset(
  questions: Sequence[str],
  pairs: Sequence[Sequence[comparisons.Pair]],
  *,
  ids: Sequence[str],
  seed: int = 0,
  val_frac: float = 0.1,
  kinds: Sequence[str] = comparisons.PAIR_KINDS,
  keep_identical: bool = False,
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
  """The classification dataset and counts of `comparison_dataset` from pairs[j] of question j
  (90/10 split over questions; every kind of `kinds` counted).

  Pairs whose two sides are the same text (`comparisons.same_text`) are dropped after they are
  drawn (so the draws, and every other pair, are the same either way) and counted per split as
  `identical_dropped`; `keep_identical` keeps them, as the released code does.
  """
  n = len(questions)
  splits, counts = {}, {}
  for name, idx in zip(('train', 'validation'), comparisons.train_val_split(n, val_frac, seed)):
    rows = []
    keep = {
      j: [p for p in pairs[j] if keep_identical or not comparisons.same_text(p.better, p.worse)]
      for j in idx
    }
    for j in idx:
      for pair in keep[j]:
        exs = comparisons.pairs_to_examples(questions[j], [pair])
        sides = ((pair.better, pair.worse), (pair.worse, pair.better))
        for ex, (a, b) in zip(exs, sides):
          rows.append(
            dict(ex, weight=pair.weight, question_id=ids[j], question=questions[j], a=a, b=b)
          )
    split_pairs = [p for j in idx for p in keep[j]]
    counts[name] = dict(
      comparisons.pair_kind_counts(split_pairs, kinds),
      pairs=len(split_pairs),
      examples=len(rows),
      questions=len(idx),
      identical_dropped=sum(len(pairs[j]) for j in idx) - len(split_pairs),
    )
    features = datasets.Features(
      text=datasets.Value('string'),
      label=datasets.ClassLabel(names=['reject', 'accept']),
      kind=datasets.Value('string'),
      weight=datasets.Value('float64'),
      question_id=datasets.Value('string'),
      question=datasets.Value('string'),
      a=datasets.Value('string'),
      b=datasets.Value('string'),
    )
    # Column-wise, so that an empty split (e.g. val_frac=0) still has its columns.
    columns = {k: [r[k] for r in rows] for k in features}
    splits[name] = datasets.Dataset.from_dict(columns, features=features)
  return datasets.DatasetDict(splits), counts


def save_comparison_data(
  out_dir: str | os.PathLike, data: datasets.DatasetDict, counts: dict[str, Any]
) -> None:
  """Write the HF dataset and `counts.json` into `out_dir` atomically."""
  with wd.atomic_dir(out_dir) as tmp:
    data.save_to_disk(os.fspath(tmp / 'dataset'))
    wd.write_json(tmp / 'counts.json', counts)


def load_comparison_data(out_dir: str | os.PathLike) -> tuple[datasets.DatasetDict, dict]:
  """The (dataset, counts) that `save_comparison_data` wrote."""
  path = pathlib.Path(out_dir)
  if not (path / 'counts.json').exists():
    raise FileNotFoundError(f'{path} holds no comparison data (no counts.json)')
  return datasets.load_from_disk(os.fspath(path / 'dataset')), wd.read_json(path / 'counts.json')


def sample_checkpoints(
  load_base: Callable[[], Decoder],
  checkpoints: Sequence[str | os.PathLike],
  tok: Tokenizer,
  task: Any,
  examples: Sequence[Any],
  *,
  temperature: float | None = None,
  max_new_tokens: int | None = None,
  seed: int = 0,
  batch_size: int = 64,
  mesh: Mesh | None = None,
  out_dir: str | os.PathLike | None = None,
  progress: bool = True,
  grade: bool = True,
) -> tuple[list[list[str]], list[list[bool]]]:
  """One sampled answer per question from each checkpoint, graded against ground truth.

  With `grade=False` nothing is graded (SaferPaca's evaluator data) and every correct[i] is None.

  Checkpoint i samples with seed `seed + i` and the task's 'evaluator_data' decoding (temperature
  0.6) unless `temperature` / `max_new_tokens` are given; correct is tasks.Graded.correct. With
  `out_dir`, each checkpoint's answers are saved as `samples_<i>.json` and reused by a rerun.

  Args:
    load_base: returns a fresh base model (the snapshots hold the trainable params only).
    checkpoints: snapshot paths in training order (`fit.fit_checkpoints`).
    examples: tasks.Examples with the questions and their references.

  Returns:
    (samples[i][j], correct[i][j]) for checkpoint i and question j.
  """
  decoding = task.decoding['evaluator_data']
  if temperature is not None:
    decoding = dataclasses.replace(decoding, temperature=temperature)
  method = decoding.sampler_method()
  questions = [ex.question for ex in examples]
  samples, correct = [], []
  base = None
  for i, path in enumerate(checkpoints):
    saved = pathlib.Path(out_dir) / f'samples_{i}.json' if out_dir is not None else None
    if saved is not None and saved.exists():
      record = wd.read_json(saved)
      if record['checkpoint'] != str(path) or record['num_questions'] != len(questions):
        raise ValueError(f'{saved} was written for another checkpoint or question set')
      samples.append(record['answers'])
      correct.append(record['correct'])
      continue
    base = base if base is not None else load_base()
    model = fit.load_params(base, path)
    result = generate.generate_answers(
      model,
      tok,
      questions,
      method,
      max_new_tokens=max_new_tokens or decoding.max_new_tokens,
      seed=seed + i,
      batch_size=batch_size,
      mesh=mesh,
      desc=f'checkpoint {i}',
      progress=progress,
      scores=False,  # graded by their texts
    )
    texts = [answers[0] for answers in result.texts]  # one sample per question
    samples.append(texts)
    if grade:
      graded = task.grade_batch(texts, list(examples))
      correct.append(graded.correct.tolist())
      log.info('checkpoint %d (%s): %.1f%% of samples correct', i, path, 100 * graded.mean())
    else:
      correct.append(None)
    if saved is not None and wd.is_writer():
      wd.write_json(
        saved,
        dict(
          checkpoint=str(path),
          num_questions=len(questions),
          answers=samples[-1],
          correct=correct[-1],
        ),
      )
    wd.sync(f'evaluator:samples_{i}')  # every process then sees the file on a rerun
  return samples, correct


def build_comparison_data(
  load_base: Callable[[], Decoder],
  checkpoints: Sequence[tuple[int, str | os.PathLike]],
  tok: Tokenizer,
  task: Any,
  examples: Sequence[Any],
  *,
  out_dir: str | os.PathLike,
  seed: int = 0,
  val_frac: float = 0.1,
  batch_size: int = 64,
  mesh: Mesh | None = None,
  progress: bool = True,
  keep_identical: bool = False,
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
  """The evaluator's comparison data from the snapshots of a half-A fit (METHOD.md), resumable.

  Samples one answer per question from each snapshot (`sample_checkpoints`), builds the pairs
  and their examples with a 90/10 split over questions (`comparison_dataset`) and saves them.
  Layout of `out_dir`:
    samples/   samples_<i>.json: checkpoint i's answers and grades
    data/      dataset/ (HF DatasetDict) and counts.json (`load_comparison_data`)
  A rerun finds data/ and loads it.

  Args:
    load_base: returns a fresh base model (the snapshots hold the trainable params only).
    checkpoints: (step, path) of each snapshot in training order (`fit.fit_checkpoints`).
    examples: the half-A tasks.Examples (questions and references).

  Returns:
    (the DatasetDict, counts): counts per split and kind, plus 'checkpoints': the snapshot steps
    and the fraction of correct samples of each.
  """
  out = pathlib.Path(out_dir)
  if (out / 'data' / 'counts.json').exists():
    return load_comparison_data(out / 'data')
  samples, correct = sample_checkpoints(
    load_base,
    [p for _, p in checkpoints],
    tok,
    task,
    examples,
    seed=seed,
    batch_size=batch_size,
    mesh=mesh,
    out_dir=out / 'samples',
    progress=progress,
  )
  data, counts = comparison_dataset(
    [ex.question for ex in examples],
    [ex.answer for ex in examples],
    samples,
    correct,
    seed=seed,
    val_frac=val_frac,
    ids=[ex.id for ex in examples],
    keep_identical=keep_identical,
  )
  counts['checkpoints'] = dict(
    steps=[s for s, _ in checkpoints], accuracy=[float(np.mean(c)) for c in correct]
  )
  if wd.is_writer():
    save_comparison_data(out / 'data', data, counts)
  wd.sync('evaluator:comparisons')
  return data, counts
