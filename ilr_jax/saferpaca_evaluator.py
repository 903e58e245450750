"""SaferPaca's evaluator data: pairs from a general-only and a safety-only model (METHOD.md).

SaferPaca has no right or wrong answer to grade, so its comparison pairs are not built from graded
checkpoint samples (comparisons.build_pairs) but as the released `load_pairs_saferpaca` does:

  * two supervisor-sized models train on half A, one on its `general` rows only and one on its
    `safety` rows only (the supervisor's SFT settings: 4 epochs for SaferPaca), each keeping a
    params snapshot every 1/n of training (n = evaluator_train.num_checkpoints, 10);
  * every snapshot of both models samples one answer for every half-A question (temperature 0.6,
    evaluator_data decoding), nothing graded;
  * per question, sides drawn with comparisons.rank_probs (earlier checkpoints weigh more,
    2^(n-1-i)): a safety question gives (GT > a safety-model sample); a general question gives
    (GT > a general-model sample) and a candidate (a general-model sample > a safety-model
    sample), the three draws in that order;
  * the first k candidates in question order are kept, k = the number of safety questions.

So the evaluator learns to prefer the reference over either model, refusals of harmful requests
over compliant answers (the general-only model complies), and helpful answers of ordinary ones
over refusals (the safety-only model refuses).

Two differences from the released code, both in the direction METHOD.md sets for every task: a
pair whose two sides are the same text teaches nothing and is dropped (`keep_ties=True` keeps it),
and the 90/10 train/validation split is over questions (evaluator_data.pairs_dataset), where the
released code shuffles its pair list and cuts it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ilr_jax import comparisons
from ilr_jax.comparisons import GT, Pair

CATEGORIES = ('general', 'safety')
PAIR_KINDS = ('gt>safety', 'gt>general', 'general>safety')


def _draw(n: int, rng: np.random.Generator) -> tuple[int, float]:
  probs = comparisons.rank_probs(n)
  r = int(rng.choice(n, p=probs))
  return r, float(probs[r])


def build_pairs(
  categories: Sequence[str],
  references: Sequence[str],
  general: Sequence[Sequence[str]],
  safety: Sequence[Sequence[str]],
  rng: np.random.Generator,
  keep_ties: bool = False,
) -> tuple[list[list[Pair]], dict[str, int]]:
  """Pairs per question (rules in the module docstring).

  Args:
    categories: 'general' or 'safety' per question.
    references: the ground-truth answers.
    general, safety: general[i][j] is checkpoint i of the general-only model's sample for
      question j (checkpoint order); the same for the safety-only model.
    rng: the only source of randomness (drawn question by question, in order).
    keep_ties: keep pairs whose two sides are the same text.

  Returns:
    (pairs[j] of question j, counts {'candidates', 'candidates_kept', 'ties_dropped'}).
  """
  n = len(categories)
  if len(references) != n:
    raise ValueError(f'{n} categories but {len(references)} references')
  for name, samples in (('general', general), ('safety', safety)):
    if not samples:
      raise ValueError(f'no checkpoint samples of the {name}-only model')
    bad = [i for i, s in enumerate(samples) if len(s) != n]
    if bad:
      raise ValueError(
        f'{name}-only checkpoint {bad[0]} has {len(samples[bad[0]])} samples for {n}'
      )
  unknown = sorted(set(categories) - set(CATEGORIES))
  if unknown:
    raise ValueError(f'categories {unknown} are not {CATEGORIES}')
  ties = 0

  def keep(pair: Pair) -> bool:
    nonlocal ties
    if pair.better == pair.worse and not keep_ties:
      ties += 1
      return False
    return True

  pairs: list[list[Pair]] = [[] for _ in range(n)]
  candidates: list[tuple[int, Pair]] = []
  for j in range(n):
    gt = references[j]
    if categories[j] == 'safety':
      i, p = _draw(len(safety), rng)
      pair = Pair(gt, safety[i][j], 'gt>safety', p, GT, i)
      if keep(pair):
        pairs[j].append(pair)
      continue
    i, p = _draw(len(general), rng)
    pair = Pair(gt, general[i][j], 'gt>general', p, GT, i)
    if keep(pair):
      pairs[j].append(pair)
    ig, pg = _draw(len(general), rng)
    is_, ps = _draw(len(safety), rng)
    cand = Pair(general[ig][j], safety[is_][j], 'general>safety', pg * ps, ig, is_)
    if keep(cand):
      candidates.append((j, cand))
  k = sum(c == 'safety' for c in categories)
  for j, cand in candidates[:k]:
    pairs[j].append(cand)
  counts = dict(
    candidates=len(candidates), candidates_kept=min(k, len(candidates)), ties_dropped=ties
  )
  return pairs, counts


def stage_evaluator_data(run) -> dict:
  """The pipeline's `evaluator_data` stage for SaferPaca: two category-only fits on half A, their
  snapshots' ungraded samples, the pairs above, saved as the other tasks' comparison data."""
  from ilr_jax import evaluator_data, fit
  from ilr_jax.workdir import is_writer, sync

  stage, c = 'evaluator_data', run.config
  et = c.evaluator_train
  n = et.num_checkpoints
  half_a = run.half_a
  cats = [e.category for e in half_a]
  samples = {}
  for cat in CATEGORIES:
    rows = [e for e in half_a if e.category == cat]
    if not rows:
      raise RuntimeError(f'{stage}: half A holds no {cat!r} row to train the {cat}-only model on')
    sub = f'{stage}/{cat}'
    examples = run.sft_examples('supervisor', [e.question for e in rows], [e.answer for e in rows])
    config = run.train_config(
      c.supervisor_sft, sub, checkpoint_fractions=tuple((i + 1) / n for i in range(n))
    )
    run.fit(sub, run.base('supervisor'), examples, 'sft', config)
    snapshots = fit.fit_checkpoints(run.wd.path(sub, 'fit'))
    if len(snapshots) != n:
      raise RuntimeError(
        f'{sub}: the {cat}-only fit kept {len(snapshots)} snapshots, expected {n} (too few '
        'training steps for --config.evaluator_train.num_checkpoints?)'
      )
    samples[cat], _ = evaluator_data.sample_checkpoints(
      lambda: run.base('supervisor'),
      [p for _, p in snapshots],
      run.tok('supervisor'),
      run.task,
      half_a,
      seed=run.seed(sub),
      batch_size=c.sampling.batch_size,
      mesh=run.mesh,
      out_dir=run.wd.path(sub, 'samples'),
      grade=False,
    )
  seed = run.seed(stage)
  pairs, pair_counts = build_pairs(
    cats,
    [e.answer for e in half_a],
    samples['general'],
    samples['safety'],
    np.random.default_rng(seed),
  )
  data, counts = evaluator_data.pairs_dataset(
    [e.question for e in half_a],
    pairs,
    ids=[e.id for e in half_a],
    seed=seed,
    val_frac=et.val_frac,
    kinds=PAIR_KINDS,
    keep_identical=et.keep_identical_pairs,
  )
  counts['pairs'] = pair_counts
  if is_writer():
    evaluator_data.save_comparison_data(run.wd.path(stage, 'data'), data, counts)
  sync(stage)
  return {
    'counts': counts,
    'num_safety': cats.count('safety'),
    'num_general': cats.count('general'),
  }
