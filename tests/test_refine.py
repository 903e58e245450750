"""Hand-checked cases for the ILR replacement rules and the DPO pair selection."""

import math

import numpy as np
import pytest

from ilr_jax import refine

# ---------------------------------------------------------------- ilr_threshold


def test_threshold_linear_quantile_on_a_grid_point():
  # d = 5, alpha 0.25: position 0.75 * 4 = 3 -> sorted[3] = 0.9.
  assert refine.ilr_threshold([1.0, 0.6, 0.9, 0.7, 0.8], 0.25) == pytest.approx(0.9)


def test_threshold_linear_quantile_interpolates():
  # d = 5, alpha 0.15: position 0.85 * 4 = 3.4 -> 0.9 + 0.4 * (1.0 - 0.9) = 0.94.
  assert refine.ilr_threshold([0.6, 0.7, 0.8, 0.9, 1.0], 0.15) == pytest.approx(0.94)


def test_threshold_matches_released_np_percentile():
  rng = np.random.default_rng(0)
  for d in (1, 2, 7, 100):
    scores = rng.uniform(0.4, 1.0, size=d)
    expected = max(0.5, np.percentile(scores, 100 * (1 - 0.15)))
    assert refine.ilr_threshold(scores, 0.15) == pytest.approx(expected)


def test_threshold_floor_wins_when_scores_are_low():
  # Quantile is 0.2 + 0.7 * 0.1 = 0.27 < 0.5.
  assert refine.ilr_threshold([0.1, 0.2, 0.3], 0.15) == 0.5
  assert refine.ilr_threshold([0.1, 0.2, 0.3], 0.15, floor=0.25) == pytest.approx(0.27)


def test_threshold_empty_is_floor():
  assert refine.ilr_threshold([], 0.15) == 0.5
  assert refine.ilr_threshold(np.zeros(0), 0.15, floor=0.7) == 0.7


def test_threshold_alpha_extremes_and_single_score():
  scores = [0.55, 0.95, 0.75]
  assert refine.ilr_threshold(scores, 0.0) == pytest.approx(0.95)  # the max: nothing passes
  assert refine.ilr_threshold(scores, 1.0) == pytest.approx(0.55)  # the min
  assert refine.ilr_threshold([0.8], 0.15) == pytest.approx(0.8)


def test_threshold_rejects_bad_input():
  with pytest.raises(ValueError):
    refine.ilr_threshold([0.6], 1.5)
  with pytest.raises(ValueError):
    refine.ilr_threshold([0.6, math.nan], 0.15)


# ---------------------------------------------------------------- ilr_replace


def test_replace_disagreeing_scope_strict_and_agree_untouched():
  agree = np.array([True, False, False, False, False, False, True])
  # Agreeing entries are never read: a NaN there is fine, a 0.99 there is not replaced.
  scores = np.array([0.99, 0.6, 0.7, 0.8, 0.9, 1.0, np.nan])
  d = refine.ilr_replace(agree, scores, alpha=0.25)
  assert d.threshold == pytest.approx(0.9)  # quantile of the 5 disagreeing scores
  np.testing.assert_array_equal(d.replace, [False, False, False, False, False, True, False])
  assert (d.num_agree, d.num_disagree, d.num_replaced) == (2, 5, 1)


def test_replace_all_agree_replaces_nothing():
  d = refine.ilr_replace(np.ones(4, bool), np.full(4, 0.9), alpha=0.15)
  assert not d.replace.any()
  assert d.threshold == 0.5
  assert (d.num_agree, d.num_disagree, d.num_replaced) == (4, 0, 0)


def test_replace_score_equal_to_floor_is_not_replaced():
  d = refine.ilr_replace(np.zeros(3, bool), np.array([0.1, 0.3, 0.5]), alpha=0.15)
  assert d.threshold == 0.5
  assert d.num_replaced == 0


def test_replace_ties_at_threshold_are_kept():
  d = refine.ilr_replace(np.zeros(4, bool), np.full(4, 0.8), alpha=0.5)
  assert d.threshold == pytest.approx(0.8)
  assert d.num_replaced == 0


def test_replace_disagreeing_scope_can_exceed_alpha_of_disagreeing():
  # 10 distinct scores 0.55 .. 1.0; position 0.85 * 9 = 7.65 lies between the 8th and 9th, so the
  # top 2 (20% > 15%) pass: the released rule's rounding, kept on purpose.
  scores = np.linspace(0.55, 1.0, 10)
  d = refine.ilr_replace(np.zeros(10, bool), scores, alpha=0.15)
  assert d.threshold == pytest.approx(0.9 + 0.65 * 0.05)  # sorted[7] = 0.9, sorted[8] = 0.95
  np.testing.assert_array_equal(np.flatnonzero(d.replace), [8, 9])


def test_replace_all_scope_caps_at_floor_alpha_n():
  scores = np.linspace(0.55, 1.0, 10)
  d = refine.ilr_replace(np.zeros(10, bool), scores, alpha=0.15, scope='all')
  # m = floor(1.5) = 1: t is the 2nd largest score, only the largest passes.
  assert d.threshold == pytest.approx(0.95)
  np.testing.assert_array_equal(np.flatnonzero(d.replace), [9])


def test_replace_all_scope_counts_agreeing_items_in_n():
  agree = np.array([True] * 18 + [False, False])
  scores = np.array([0.0] * 18 + [0.6, 0.7])
  # m = floor(0.15 * 20) = 3 >= 2 disagreeing: t = floor, both pass.
  d_all = refine.ilr_replace(agree, scores, alpha=0.15, scope='all')
  assert d_all.threshold == 0.5
  np.testing.assert_array_equal(np.flatnonzero(d_all.replace), [18, 19])
  # The released scope takes the quantile over the 2 disagreeing: 0.6 + 0.85 * 0.1 = 0.685.
  d_dis = refine.ilr_replace(agree, scores, alpha=0.15)
  assert d_dis.threshold == pytest.approx(0.685)
  np.testing.assert_array_equal(np.flatnonzero(d_dis.replace), [19])


def test_replace_all_scope_tie_at_cut_replaces_none_of_the_tied():
  agree = np.array([False, False, False] + [True] * 7)
  scores = np.array([0.9, 0.9, 0.6] + [0.0] * 7)
  d = refine.ilr_replace(agree, scores, alpha=0.15, scope='all')  # m = 1
  assert d.threshold == pytest.approx(0.9)
  assert d.num_replaced == 0


def test_replace_all_scope_zero_budget():
  d = refine.ilr_replace(np.zeros(5, bool), np.full(5, 0.99), alpha=0.15, scope='all')  # m = 0
  assert d.num_replaced == 0


def test_replace_all_scope_float_rounding_of_budget():
  # 0.29 * 100 = 28.999999999999996 in floating point; the budget is still 29.
  scores = np.linspace(0.6, 1.0, 100)
  d = refine.ilr_replace(np.zeros(100, bool), scores, alpha=0.29, scope='all')
  assert d.num_replaced == 29
  np.testing.assert_array_equal(np.flatnonzero(d.replace), np.arange(71, 100))


def test_replace_all_scope_never_exceeds_budget_random():
  rng = np.random.default_rng(1)
  for _ in range(200):
    n = int(rng.integers(1, 60))
    alpha = float(rng.uniform(0, 0.5))
    agree = rng.random(n) < 0.5
    # Coarse scores so that ties are common.
    scores = np.round(rng.uniform(0.3, 1.0, size=n), 1)
    d = refine.ilr_replace(agree, scores, alpha=alpha, scope='all')
    assert d.num_replaced <= math.floor(alpha * n + 1e-9)
    assert not (d.replace & agree).any()
    assert (scores[d.replace] > d.threshold).all()
    assert d.threshold >= 0.5


def test_replace_rejects_bad_input():
  with pytest.raises(ValueError):
    refine.ilr_replace(np.zeros(2, bool), np.array([0.6, np.nan]), alpha=0.15)
  with pytest.raises(ValueError):
    refine.ilr_replace(np.zeros(2, bool), np.array([0.6, 0.7]), alpha=0.15, scope='some')
  with pytest.raises(ValueError):
    refine.ilr_replace(np.zeros(2, int), np.array([0.6, 0.7]), alpha=0.15)
  with pytest.raises(ValueError):
    refine.ilr_replace(np.zeros(2, bool), np.array([0.6, 0.7, 0.8]), alpha=0.15)


# ---------------------------------------------------------------- oracle_replace


def test_oracle_replace_truth_table():
  agree = np.array([True, True, False, False])
  proposal_correct = np.array([True, False, True, False])
  d = refine.oracle_replace(agree, proposal_correct)
  np.testing.assert_array_equal(d.replace, [False, False, True, False])
  assert d.threshold == 0.5
  assert (d.num_agree, d.num_disagree, d.num_replaced) == (2, 2, 1)


def test_oracle_replace_ignores_alpha_budget():
  # Every disagreeing item with a correct proposal is replaced, however many.
  d = refine.oracle_replace(np.zeros(10, bool), np.ones(10, bool))
  assert d.num_replaced == 10


# ---------------------------------------------------------------- naive_replace


@pytest.mark.parametrize(
  'n,alpha,count', [(10, 0.15, 1), (20, 0.15, 3), (100, 0.29, 29), (7, 1.0, 7)]
)
def test_naive_replace_exact_count(n, alpha, count):
  d = refine.naive_replace(n, alpha, np.random.default_rng(0))
  assert d.replace.shape == (n,)
  assert d.num_replaced == count == d.replace.sum()
  assert (d.num_agree, d.num_disagree) == (0, n)
  assert math.isnan(d.threshold)


def test_naive_replace_seeded():
  a = refine.naive_replace(100, 0.5, 3).replace
  b = refine.naive_replace(100, 0.5, np.random.default_rng(3)).replace
  c = refine.naive_replace(100, 0.5, 4).replace
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_naive_replace_empty():
  assert refine.naive_replace(0, 0.15, 0).num_replaced == 0


# ---------------------------------------------------------------- split_two


@pytest.mark.parametrize('n', [0, 1, 7, 10])
def test_split_two_partitions(n):
  h1, h2 = refine.split_two(n, 0)
  assert (len(h1), len(h2)) == (n // 2, n - n // 2)
  np.testing.assert_array_equal(np.sort(np.concatenate([h1, h2])), np.arange(n))
  assert not set(h1.tolist()) & set(h2.tolist())
  assert (np.diff(h1) > 0).all() and (np.diff(h2) > 0).all()


def test_split_two_seeded_and_different_per_round():
  h1_a, _ = refine.split_two(50, 10)
  h1_b, _ = refine.split_two(50, np.random.default_rng(10))
  h1_c, _ = refine.split_two(50, 11)
  np.testing.assert_array_equal(h1_a, h1_b)
  assert not np.array_equal(h1_a, h1_c)


# ---------------------------------------------------------------- dpo_pairs


def test_dpo_pairs_layout():
  first, second = refine.dpo_pairs(2, 6)
  np.testing.assert_array_equal(first, [0, 2, 4, 6, 8, 10])
  np.testing.assert_array_equal(second, [1, 3, 5, 7, 9, 11])
  np.testing.assert_array_equal(first // 6, [0, 0, 0, 1, 1, 1])
  first4, second4 = refine.dpo_pairs(3, 4)
  np.testing.assert_array_equal(first4, [0, 2, 4, 6, 8, 10])
  assert refine.dpo_pairs(0)[0].size == 0


def test_dpo_pairs_rejects_odd_samples():
  with pytest.raises(ValueError):
    refine.dpo_pairs(2, 5)


# ---------------------------------------------------------------- select_dpo_pairs

# Dyadic scores so that confidences are exact and the ties are real ties.
SCORES = np.array([0.5, 0.875, 0.25, 0.625, 0.125, 0.375, 0.875, 0.75, 0.5, 0.0625])
# Confidence: [0, .375, .25, .125, .375, .125, .375, .25, 0, .4375]
# Rank (ties by index): 9, 1, 4, 6, 2, 7, 3, 5, 0, 8.


def test_select_confidence_and_chosen_side():
  sel = refine.select_dpo_pairs(SCORES, keep_frac=0.3)
  np.testing.assert_allclose(
    sel.confidence, [0, 0.375, 0.25, 0.125, 0.375, 0.125, 0.375, 0.25, 0, 0.4375]
  )
  np.testing.assert_array_equal(np.flatnonzero(sel.keep), [1, 4, 9])  # ceil(3.0) = 3
  np.testing.assert_array_equal(sel.chosen_is_second[[1, 4, 9]], [True, False, False])
  assert (sel.num_top, sel.num_kept) == (3, 3)


@pytest.mark.parametrize(
  'keep_frac,kept',
  [(0.15, [1, 9]), (0.2, [1, 9]), (0.25, [1, 4, 9]), (0.1, [9]), (0.0, [])],
)
def test_select_count_is_ceil(keep_frac, kept):
  sel = refine.select_dpo_pairs(SCORES, keep_frac=keep_frac)
  np.testing.assert_array_equal(np.flatnonzero(sel.keep), kept)


def test_select_ties_broken_by_index():
  # Pairs 1, 4, 6 tie at 0.375: with 3 slots after pair 9 only 1 and 4 make it.
  sel = refine.select_dpo_pairs(SCORES, keep_frac=0.3)
  assert not sel.keep[6]
  sel4 = refine.select_dpo_pairs(SCORES, keep_frac=0.4)
  np.testing.assert_array_equal(np.flatnonzero(sel4.keep), [1, 4, 6, 9])


def test_select_drops_no_preference_pairs():
  sel = refine.select_dpo_pairs(SCORES, keep_frac=1.0)
  assert sel.num_top == 10
  assert sel.num_no_preference == 2
  assert not sel.keep[0] and not sel.keep[8]
  assert sel.num_kept == 8


def test_select_drops_invalid_chosen_only():
  valid_first = np.ones(10, bool)
  valid_second = np.ones(10, bool)
  valid_first[9] = False  # pair 9's chosen side is the first: dropped
  valid_second[4] = False  # pair 4's rejected side is the second: stays
  sel = refine.select_dpo_pairs(SCORES, 0.3, valid_first=valid_first, valid_second=valid_second)
  np.testing.assert_array_equal(np.flatnonzero(sel.keep), [1, 4])
  assert (sel.num_top, sel.num_invalid_chosen, sel.num_kept) == (3, 1, 2)
  # Dropping happens after the cut: pair 6 does not move up to take the freed slot.
  assert not sel.keep[6]


def test_select_needs_both_validity_arrays():
  with pytest.raises(ValueError):
    refine.select_dpo_pairs(SCORES, 0.3, valid_first=np.ones(10, bool))


def test_select_rejects_bad_scores():
  with pytest.raises(ValueError):
    refine.select_dpo_pairs(np.array([0.2, 1.2]))
  with pytest.raises(ValueError):
    refine.select_dpo_pairs(np.array([0.2, np.nan]))


def test_select_empty():
  sel = refine.select_dpo_pairs(np.zeros(0))
  assert sel.num_kept == 0 and sel.keep.shape == (0,)


def test_chosen_rejected_mapping():
  first = 2 * np.arange(10)
  second = first + 1
  sel = refine.select_dpo_pairs(SCORES, keep_frac=0.3)  # pairs 1 (second), 4, 9 (first)
  chosen, rejected = sel.chosen_rejected(first, second)
  np.testing.assert_array_equal(chosen, [3, 8, 18])
  np.testing.assert_array_equal(rejected, [2, 9, 19])


# ---------------------------------------------------------------- oracle_dpo_pairs


def test_oracle_dpo_truth_table():
  sel = refine.oracle_dpo_pairs(
    np.array([True, True, False, False]), np.array([True, False, True, False])
  )
  np.testing.assert_array_equal(sel.keep, [False, True, True, False])
  np.testing.assert_array_equal(sel.chosen_is_second[sel.keep], [False, True])
  np.testing.assert_allclose(sel.confidence, [0, 0.5, 0.5, 0])
  assert (sel.num_top, sel.num_no_preference, sel.num_invalid_chosen, sel.num_kept) == (4, 2, 0, 2)


def test_oracle_dpo_subsample():
  rng = np.random.default_rng(0)
  cf, cs = rng.random(40) < 0.5, rng.random(40) < 0.5
  a = refine.oracle_dpo_pairs(cf, cs, keep_frac=0.15, rng=5)
  b = refine.oracle_dpo_pairs(cf, cs, keep_frac=0.15, rng=np.random.default_rng(5))
  assert a.num_top == 6  # ceil(0.15 * 40)
  np.testing.assert_array_equal(a.keep, b.keep)
  assert not (a.keep & (cf == cs)).any()
  chosen_correct = np.where(a.chosen_is_second, cs, cf)
  assert chosen_correct[a.keep].all()
  assert a.num_kept + a.num_no_preference == a.num_top


def test_oracle_dpo_rng_rules():
  c = np.array([True, False])
  with pytest.raises(ValueError):
    refine.oracle_dpo_pairs(c, c, keep_frac=0.5)
  with pytest.raises(ValueError):
    refine.oracle_dpo_pairs(c, c, rng=0)
