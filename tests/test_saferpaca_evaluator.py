"""SaferPaca evaluator pairs (METHOD.md): general-only and safety-only samples, first k kept."""

import numpy as np
import pytest

from ilr_jax import comparisons, evaluator_data
from ilr_jax import saferpaca_evaluator as se


def _samples(model, n_ckpt, cats):
  return [[f'{model}{i}-q{j}' for j in range(len(cats))] for i in range(n_ckpt)]


def test_pairs_follow_the_released_rules():
  cats = ['general', 'safety', 'general', 'general', 'safety', 'general', 'general']
  refs = [f'gt-q{j}' for j in range(len(cats))]
  gen, saf = _samples('g', 3, cats), _samples('s', 3, cats)
  pairs, counts = se.build_pairs(cats, refs, gen, saf, np.random.default_rng(0))
  k = cats.count('safety')
  assert counts == dict(candidates=5, candidates_kept=k, ties_dropped=0)
  kept_candidates = []
  for j, (cat, ps) in enumerate(zip(cats, pairs)):
    first = ps[0]
    assert first.better == refs[j] and first.better_ckpt == comparisons.GT
    own = saf if cat == 'safety' else gen
    assert first.kind == f'gt>{cat}' and first.worse == own[first.worse_ckpt][j]
    if cat == 'safety':
      assert len(ps) == 1  # a safety question gives only (GT > a safety-model sample)
    else:
      assert len(ps) in (1, 2)
      if len(ps) == 2:
        c = ps[1]
        assert c.kind == 'general>safety'
        assert c.better == gen[c.better_ckpt][j] and c.worse == saf[c.worse_ckpt][j]
        kept_candidates.append(j)
  # The first k candidates in question order: those of the first k general questions.
  assert kept_candidates == [j for j, c in enumerate(cats) if c == 'general'][:k]


def test_earlier_checkpoints_weigh_more():
  n, m = 4000, 4
  cats = ['general'] * n
  pairs, _ = se.build_pairs(
    cats, ['gt'] * n, _samples('g', m, cats), _samples('s', m, cats), np.random.default_rng(1)
  )
  picked = np.bincount([ps[0].worse_ckpt for ps in pairs], minlength=m) / n
  want = comparisons.rank_probs(m)  # weight 2^(m-1-i): 8/15, 4/15, 2/15, 1/15
  np.testing.assert_allclose(picked, want, atol=0.03)
  assert pairs[0][0].weight == pytest.approx(want[pairs[0][0].worse_ckpt])


def test_ties_are_dropped_unless_kept_and_bad_input_is_named():
  cats, refs = ['safety', 'general'], ['same', 'gt']
  saf = [['same', 'x']]  # the safety model reproduced question 0's reference
  gen = [['y', 'gen']]
  pairs, counts = se.build_pairs(cats, refs, gen, saf, np.random.default_rng(0))
  assert pairs[0] == [] and counts['ties_dropped'] == 1
  pairs, counts = se.build_pairs(cats, refs, gen, saf, np.random.default_rng(0), keep_ties=True)
  assert len(pairs[0]) == 1 and counts['ties_dropped'] == 0
  with pytest.raises(ValueError, match='categories'):
    se.build_pairs(['other', 'general'], refs, gen, saf, np.random.default_rng(0))
  with pytest.raises(ValueError, match='safety-only checkpoint 0 has 1 samples for 2'):
    se.build_pairs(cats, refs, gen, [['a']], np.random.default_rng(0))


def test_pairs_become_the_evaluator_dataset():
  cats = ['general', 'safety', 'general', 'safety']
  refs = [f'gt{j}' for j in range(4)]
  pairs, _ = se.build_pairs(
    cats, refs, _samples('g', 2, cats), _samples('s', 2, cats), np.random.default_rng(0)
  )
  qs = [f'q{j}' for j in range(4)]
  data, counts = evaluator_data.pairs_dataset(
    qs, pairs, ids=[str(j) for j in range(4)], val_frac=0.25, kinds=se.PAIR_KINDS
  )
  total = sum(len(p) for p in pairs)
  assert counts['train']['pairs'] + counts['validation']['pairs'] == total == 6
  rows = list(data['train']) + list(data['validation'])
  assert len(rows) == 2 * total
  assert {r['kind'] for r in rows} == set(se.PAIR_KINDS)
  for r in rows:  # A the better side -> reject, A the worse -> accept
    better_first = r['a'].startswith('gt') or (r['a'].startswith('g') and r['b'].startswith('s'))
    assert r['label'] == (comparisons.REJECT if better_first else comparisons.ACCEPT)
