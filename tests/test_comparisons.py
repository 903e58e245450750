"""Hand-checked cases for the evaluator's comparison pairs, examples and split."""

import collections

import numpy as np
import pytest

from ilr_jax import comparisons as cmp


def test_template_is_the_released_prompt():
  assert cmp.COMPARISON_TEMPLATE == (
    'QUESTION:\n{q}\n\nANSWER (A):\n{a}\n\nANSWER (B):\n{b}\n\nYou gave the answer (A) to the '
    'question. Do you accept to change it to answer (B) proposed by another model?'
  )
  assert cmp.comparison_prompt('Q?', 'x', 'y') == (
    'QUESTION:\nQ?\n\nANSWER (A):\nx\n\nANSWER (B):\ny\n\nYou gave the answer (A) to the '
    'question. Do you accept to change it to answer (B) proposed by another model?'
  )
  assert (cmp.REJECT, cmp.ACCEPT) == (0, 1)


def test_rank_probs():
  np.testing.assert_allclose(cmp.rank_probs(1), [1.0])
  np.testing.assert_allclose(cmp.rank_probs(3), [4 / 7, 2 / 7, 1 / 7])
  assert np.isfinite(cmp.rank_probs(2000)).all()
  with pytest.raises(ValueError):
    cmp.rank_probs(0)


def test_all_correct_gives_one_gt_over_correct_pair():
  samples = ['c0', 'c1', 'c2']
  pairs = cmp.build_pairs('GT', samples, [True, True, True], np.random.default_rng(0))
  assert len(pairs) == 1
  (p,) = pairs
  assert (p.better, p.kind, p.better_ckpt) == ('GT', 'gt>correct', cmp.GT)
  assert p.worse == samples[p.worse_ckpt]
  assert p.weight == pytest.approx([4 / 7, 2 / 7, 1 / 7][p.worse_ckpt])


def test_all_wrong_gives_one_gt_over_wrong_pair():
  samples = ['w0', 'w1']
  pairs = cmp.build_pairs('GT', samples, [False, False], np.random.default_rng(0))
  assert len(pairs) == 1
  (p,) = pairs
  assert (p.better, p.kind) == ('GT', 'gt>wrong')
  assert p.worse == samples[p.worse_ckpt]
  assert p.weight == pytest.approx([2 / 3, 1 / 3][p.worse_ckpt])


def test_no_samples_gives_no_pairs():
  assert cmp.build_pairs('GT', [], [], np.random.default_rng(0)) == []


def test_mismatched_lengths_raise():
  with pytest.raises(ValueError):
    cmp.build_pairs('GT', ['a', 'b'], [True], np.random.default_rng(0))


MIXED = ['c0', 'w1', 'c2', 'w3']
MIXED_OK = [True, False, True, False]


def test_mixed_gives_two_pairs_with_exact_weights():
  rng = np.random.default_rng(0)
  for _ in range(50):
    first, second = cmp.build_pairs('GT', MIXED, MIXED_OK, rng)
    assert (first.better, first.kind) == ('GT', 'gt>correct')
    assert first.worse_ckpt in (0, 2)
    # Rank weights within the correct list [c0, c2]: 2/3 and 1/3 (not 4:1 from checkpoints 0, 2).
    assert first.weight == pytest.approx({0: 2 / 3, 2: 1 / 3}[first.worse_ckpt])
    assert second.worse_ckpt in (1, 3)
    assert second.worse == MIXED[second.worse_ckpt]
    # Better side from [c0, c2, GT] with probabilities 4/7, 2/7, 1/7; worse from [w1, w3]: 2/3, 1/3.
    p_better = {0: 4 / 7, 2: 2 / 7, cmp.GT: 1 / 7}[second.better_ckpt]
    p_worse = {1: 2 / 3, 3: 1 / 3}[second.worse_ckpt]
    assert second.weight == pytest.approx(p_better * p_worse)
    if second.better_ckpt == cmp.GT:
      assert (second.better, second.kind) == ('GT', 'gt>wrong')
    else:
      assert (second.better, second.kind) == (MIXED[second.better_ckpt], 'correct>wrong')


def test_mixed_sampling_frequencies():
  rng = np.random.default_rng(123)
  n = 14000
  better = collections.Counter()
  worse = collections.Counter()
  for _ in range(n):
    _, second = cmp.build_pairs('GT', MIXED, MIXED_OK, rng)
    better[second.better_ckpt] += 1
    worse[second.worse_ckpt] += 1
  # Standard errors are below 0.005 at this n; 0.02 is a 4-sigma band.
  assert better[0] / n == pytest.approx(4 / 7, abs=0.02)
  assert better[2] / n == pytest.approx(2 / 7, abs=0.02)
  assert better[cmp.GT] / n == pytest.approx(1 / 7, abs=0.02)
  assert worse[1] / n == pytest.approx(2 / 3, abs=0.02)


def test_build_pairs_is_seeded():
  a = cmp.build_pairs('GT', MIXED, MIXED_OK, np.random.default_rng(7))
  b = cmp.build_pairs('GT', MIXED, MIXED_OK, np.random.default_rng(7))
  assert a == b


def test_two_examples_per_pair_with_swapped_labels():
  pairs = [
    cmp.Pair('GT', 'c0', 'gt>correct', 1.0, cmp.GT, 0),
    cmp.Pair('c0', 'w1', 'correct>wrong', 0.5, 0, 1),
  ]
  ex = cmp.pairs_to_examples('Q', pairs)
  assert len(ex) == 4
  assert ex[0] == dict(
    text=cmp.comparison_prompt('Q', 'GT', 'c0'), label=cmp.REJECT, kind='gt>correct'
  )
  assert ex[1] == dict(
    text=cmp.comparison_prompt('Q', 'c0', 'GT'), label=cmp.ACCEPT, kind='gt>correct'
  )
  assert ex[2]['text'] == cmp.comparison_prompt('Q', 'c0', 'w1') and ex[2]['label'] == cmp.REJECT
  assert ex[3]['text'] == cmp.comparison_prompt('Q', 'w1', 'c0') and ex[3]['label'] == cmp.ACCEPT
  assert ex[3]['kind'] == 'correct>wrong'


@pytest.mark.parametrize(
  'n,val_frac,sizes',
  [
    (100, 0.1, (90, 10)),
    (15, 0.1, (13, 2)),
    (10, 0.1, (9, 1)),
    (90, 0.3, (63, 27)),
    (0, 0.1, (0, 0)),
  ],
)
def test_split_sizes_disjoint_and_covering(n, val_frac, sizes):
  train, val = cmp.train_val_split(n, val_frac, seed=0)
  assert (len(train), len(val)) == sizes
  assert not set(train.tolist()) & set(val.tolist())
  np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))


def test_split_is_seeded():
  a = cmp.train_val_split(200, 0.1, seed=1)
  b = cmp.train_val_split(200, 0.1, seed=1)
  c = cmp.train_val_split(200, 0.1, seed=2)
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])


def test_pair_kind_counts():
  rng = np.random.default_rng(0)
  pairs = (
    cmp.build_pairs('GT', ['c0', 'c1'], [True, True], rng)
    + cmp.build_pairs('GT', ['w0'], [False], rng)
    + cmp.build_pairs('GT', ['w0', 'w1'], [False, False], rng)
  )
  assert cmp.pair_kind_counts(pairs) == {'gt>correct': 1, 'correct>wrong': 0, 'gt>wrong': 2}
  examples = cmp.pairs_to_examples('Q', pairs)
  assert cmp.pair_kind_counts(examples) == {'gt>correct': 2, 'correct>wrong': 0, 'gt>wrong': 4}
  assert list(cmp.pair_kind_counts([])) == list(cmp.PAIR_KINDS)
  with pytest.raises(ValueError):
    cmp.pair_kind_counts([dict(kind='bogus')])
