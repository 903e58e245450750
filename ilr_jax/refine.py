"""Model-free decision rules of ILR and SFT+DPO: which labels to replace, which pairs to train on.

Everything here is a pure numpy function of arrays: the pipeline computes agreement, evaluator
scores and correctness, and these functions decide. Randomness comes only from an explicit
`np.random.Generator` (or a seed turned into one), so every decision is reproducible.

Counting conventions (one place, because several rules turn a fraction into a count):
  * `floor(frac * n)` and `ceil(frac * n)` are computed with a 1e-9 tolerance, so that a product
    that is an integer up to float rounding (0.29 * 100 = 28.999999999999996) counts as that
    integer.

ILR (METHOD.md "ILR", step 6): for the items where the proposal disagrees with the current label,
the evaluator gives s = P(proposal better than label); the label is replaced iff s > t (strict).
  * scope 'disagreeing' (the released code, default): t = max(floor, q) with q the (1 - alpha)
    quantile of the disagreeing scores, numpy's 'linear' method (the released code calls
    `np.percentile`, which defaults to it; `torch.quantile`'s default 'linear' is the same rule):
    sort the d scores ascending as a[0..d-1], position p = (1 - alpha) * (d - 1),
    q = a[floor(p)] + (p - floor(p)) * (a[floor(p) + 1] - a[floor(p)]).
  * scope 'all': alpha caps the fraction of the whole set that may change. With m = floor(alpha * N)
    (N all items, agreeing ones included): if m >= d, t = floor; otherwise t = max(floor, the
    (m + 1)-th largest disagreeing score). Since replacement needs s > t, at most m items are
    replaced (fewer when scores tie at the cut: tied items are all kept, never split arbitrarily).
  * No disagreeing items: t = floor and nothing is replaced.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SCOPES = ('disagreeing', 'all')
_TOL = 1e-9


def _floor_count(frac: float, n: int) -> int:
  return int(math.floor(frac * n + _TOL))


def _ceil_count(frac: float, n: int) -> int:
  return int(math.ceil(frac * n - _TOL))


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
  if isinstance(rng, np.random.Generator):
    return rng
  return np.random.default_rng(rng)


def _check_frac(name: str, value: float) -> None:
  if not 0.0 <= value <= 1.0:
    raise ValueError(f'{name} must be in [0, 1], got {value}')


def _bool_1d(name: str, x) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 1 or x.dtype != np.bool_:
    raise ValueError(f'{name} must be a 1-D bool array, got dtype {x.dtype} shape {x.shape}')
  return x


def _float_1d(name: str, x) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {x.shape}')
  if np.isnan(x).any():
    raise ValueError(f'{name} contains NaN')
  return x


@dataclasses.dataclass(frozen=True, eq=False)
class RefineDecision:
  """Which labels one refinement round replaces by the proposal.

  Attributes:
    replace: bool[N], True where the label becomes the proposal.
    threshold: the score a proposal had to exceed (NaN for naive ILR, which has no scores).
    num_agree: items whose proposal agreed with the label (never replaced).
    num_disagree: items that were candidates for replacement.
    num_replaced: `replace.sum()`.
  """

  replace: np.ndarray
  threshold: float
  num_agree: int
  num_disagree: int
  num_replaced: int


def _decision(replace: np.ndarray, threshold: float, agree: np.ndarray | None) -> RefineDecision:
  num_agree = 0 if agree is None else int(agree.sum())
  return RefineDecision(
    replace=replace,
    threshold=float(threshold),
    num_agree=num_agree,
    num_disagree=int(replace.shape[0] - num_agree),
    num_replaced=int(replace.sum()),
  )


def ilr_threshold(scores, alpha: float, floor: float = 0.5) -> float:
  """Threshold t = max(floor, (1 - alpha) quantile of `scores`), numpy 'linear' quantile.

  Args:
    scores: float[d], the disagreeing items' scores P(proposal better than label).
    alpha: fraction of the disagreeing items that may be replaced, in [0, 1].
    floor: the threshold never goes below this (0.5: the evaluator must prefer the proposal).

  Returns:
    t as a Python float; `floor` when `scores` is empty (nothing to replace).
  """
  _check_frac('alpha', alpha)
  scores = _float_1d('scores', scores)
  if scores.size == 0:
    return float(floor)
  return float(max(floor, np.quantile(scores, 1.0 - alpha, method='linear')))


def _cap_threshold(scores: np.ndarray, max_replaced: int, floor: float) -> float:
  """Smallest threshold of the form max(floor, score) that lets at most `max_replaced` exceed it."""
  if max_replaced >= scores.size:
    return float(floor)
  ranked = np.sort(scores)[::-1]
  return float(max(floor, ranked[max_replaced]))


def ilr_replace(
  agree,
  scores,
  alpha: float,
  scope: str = 'disagreeing',
  floor: float = 0.5,
) -> RefineDecision:
  """ILR's replacement rule for one round (see the module docstring for the exact threshold).

  Args:
    agree: bool[N], proposal agrees with the current label (kept, no feedback asked).
    scores: float[N], P(proposal better than label); read only where `~agree` (other entries may be
      anything, NaN included).
    alpha: 0.15 in the paper; meaning depends on `scope`.
    scope: 'disagreeing' (quantile over the disagreeing scores, the released code) or 'all'
      (at most floor(alpha * N) of all N labels are replaced).
    floor: lower bound of the threshold.

  Returns:
    RefineDecision; `replace` is True only for disagreeing items with score > threshold.
  """
  _check_frac('alpha', alpha)
  if scope not in SCOPES:
    raise ValueError(f'scope must be one of {SCOPES}, got {scope!r}')
  agree = _bool_1d('agree', agree)
  scores = np.asarray(scores, dtype=np.float64)
  if scores.shape != agree.shape:
    raise ValueError(f'scores shape {scores.shape} != agree shape {agree.shape}')
  disagree = ~agree
  dis_scores = _float_1d('scores[~agree]', scores[disagree])
  if scope == 'disagreeing':
    threshold = ilr_threshold(dis_scores, alpha, floor)
  else:
    threshold = _cap_threshold(dis_scores, _floor_count(alpha, agree.size), floor)
  replace = np.zeros(agree.shape, dtype=bool)
  replace[disagree] = dis_scores > threshold
  return _decision(replace, threshold, agree)


def oracle_replace(agree, proposal_correct) -> RefineDecision:
  """The `ora` variant: reliable feedback scores a proposal by its ground-truth correctness.

  Score = 1.0 if the proposal is correct else 0.0, threshold 0.5, no alpha (as the released code),
  so a disagreeing label is replaced iff its proposal is correct. That includes a label that was
  itself correct but disagrees with a correct proposal (possible where agreement is stricter than
  correctness, e.g. two different correct SQL texts): swapping one correct label for another is
  harmless, and the score does not look at the label's correctness, exactly as released.

  Args:
    agree: bool[N], proposal agrees with the current label.
    proposal_correct: bool[N], ground-truth correctness of each proposal.

  Returns:
    RefineDecision with threshold 0.5.
  """
  agree = _bool_1d('agree', agree)
  proposal_correct = _bool_1d('proposal_correct', proposal_correct)
  if proposal_correct.shape != agree.shape:
    raise ValueError(f'proposal_correct shape {proposal_correct.shape} != agree {agree.shape}')
  scores = proposal_correct.astype(np.float64)
  replace = ~agree & (scores > 0.5)
  return _decision(replace, 0.5, agree)


def naive_replace(n: int, alpha: float, rng: np.random.Generator | int) -> RefineDecision:
  """Naive ILR: replace exactly floor(alpha * n) labels chosen uniformly without replacement.

  floor matches the released `int(len * max_replace)`. No agreement and no evaluator: every label
  is a candidate (num_agree 0, num_disagree n) and the threshold is NaN.

  Args:
    n: number of labels.
    alpha: fraction of all labels to replace.
    rng: a Generator, or a seed for one.
  """
  _check_frac('alpha', alpha)
  if n < 0:
    raise ValueError(f'n must be >= 0, got {n}')
  count = _floor_count(alpha, n)
  replace = np.zeros(n, dtype=bool)
  replace[_as_rng(rng).choice(n, size=count, replace=False)] = True
  return _decision(replace, math.nan, None)


def permutation_split(
  n: int, num_first: int, rng: np.random.Generator | int
) -> tuple[np.ndarray, np.ndarray]:
  """A seeded split of range(n): the first `num_first` entries of a uniform permutation, then the
  rest, each sorted ascending (int64). numpy's PCG64 permutation is the same on every machine for
  a given seed, so every split of the pipeline (halves A/B, ILR's H1/H2, train/validation) is."""
  if n < 0:
    raise ValueError(f'n must be >= 0, got {n}')
  perm = _as_rng(rng).permutation(n)
  return np.sort(perm[:num_first]), np.sort(perm[num_first:])


def split_two(n: int, rng: np.random.Generator | int) -> tuple[np.ndarray, np.ndarray]:
  """Random halving of the current labels (ILR step 1).

  A uniform permutation cut after its first n // 2 entries: H1 gets n // 2 items, H2 the other
  n - n // 2. The caller passes a different seed each round (e.g. seed + round).

  Returns:
    (idx_h1, idx_h2): disjoint int64 index arrays, each sorted ascending, covering range(n).
  """
  return permutation_split(n, max(n, 0) // 2, rng)


def dpo_pairs(num_prompts: int, num_samples: int = 6) -> tuple[np.ndarray, np.ndarray]:
  """Pairs (1,2), (3,4), (5,6) of each prompt's samples, in a flat prompt-major layout.

  Sample j of prompt p sits at flat index p * num_samples + j. Pairs are ordered by prompt, then
  by position; pair k's prompt is first_idx[k] // num_samples.

  Returns:
    (first_idx, second_idx): int64[num_prompts * num_samples // 2] each.
  """
  if num_samples <= 0 or num_samples % 2:
    raise ValueError(f'num_samples must be a positive even number, got {num_samples}')
  if num_prompts < 0:
    raise ValueError(f'num_prompts must be >= 0, got {num_prompts}')
  first = np.arange(0, num_prompts * num_samples, 2, dtype=np.int64)
  return first, first + 1


@dataclasses.dataclass(frozen=True, eq=False)
class DpoSelection:
  """Which preference pairs train DPO, and which side of each is chosen.

  Attributes:
    keep: bool[P], the pair is used for training.
    chosen_is_second: bool[P], the chosen answer is the pair's second one (meaningful where kept).
    confidence: float[P], |s - 0.5| (oracle: 0.5 where the correctness differs, 0 where equal).
    num_top: pairs that passed the confidence (or oracle subsampling) cut.
    num_no_preference: of those, pairs with no preference (s == 0.5 or equal correctness), dropped.
    num_invalid_chosen: of those, pairs dropped because the chosen answer is invalid or wrong.
    num_kept: `keep.sum()`.
  """

  keep: np.ndarray
  chosen_is_second: np.ndarray
  confidence: np.ndarray
  num_top: int
  num_no_preference: int
  num_invalid_chosen: int
  num_kept: int

  def chosen_rejected(self, first_idx, second_idx) -> tuple[np.ndarray, np.ndarray]:
    """Map the kept pairs to (chosen_idx, rejected_idx) in the order of the pairs."""
    first_idx, second_idx = np.asarray(first_idx), np.asarray(second_idx)
    second = self.chosen_is_second[self.keep]
    first_k, second_k = first_idx[self.keep], second_idx[self.keep]
    return np.where(second, second_k, first_k), np.where(second, first_k, second_k)


def _chosen_valid(chosen_is_second, valid_first, valid_second, num_pairs) -> np.ndarray:
  if (valid_first is None) != (valid_second is None):
    raise ValueError('give both valid_first and valid_second, or neither')
  if valid_first is None:
    return np.ones(num_pairs, dtype=bool)
  valid_first = _bool_1d('valid_first', valid_first)
  valid_second = _bool_1d('valid_second', valid_second)
  if valid_first.shape != (num_pairs,) or valid_second.shape != (num_pairs,):
    raise ValueError(f'valid_first/valid_second must have shape ({num_pairs},)')
  return np.where(chosen_is_second, valid_second, valid_first)


def _select(top, chosen_is_second, confidence, chosen_ok) -> DpoSelection:
  has_pref = confidence > 0
  no_pref = top & ~has_pref
  invalid = top & has_pref & ~chosen_ok
  keep = top & has_pref & chosen_ok
  return DpoSelection(
    keep=keep,
    chosen_is_second=chosen_is_second,
    confidence=confidence,
    num_top=int(top.sum()),
    num_no_preference=int(no_pref.sum()),
    num_invalid_chosen=int(invalid.sum()),
    num_kept=int(keep.sum()),
  )


def select_dpo_pairs(
  scores,
  keep_frac: float = 0.15,
  valid_first=None,
  valid_second=None,
) -> DpoSelection:
  """SFT+DPO pair selection from evaluator scores (METHOD.md "SFT+DPO", step 3).

  1. Rank all P pairs by confidence |s - 0.5|, descending; ties by ascending pair index (a stable
     sort), so the result is deterministic; shuffle the pairs first to break ties at random.
  2. The top ceil(keep_frac * P) pairs pass. (The released loop keeps indices 0..floor(P * frac),
     i.e. the same count except one more when keep_frac * P is an integer.)
  3. Chosen is the side the evaluator prefers: the second iff s > 0.5. A passing pair with
     s == 0.5 exactly has no preference and is dropped (the released code would pick the first).
  4. If validity is given (GSM8K: the answer has `####`), passing pairs whose chosen answer is
     invalid are dropped. This happens after the cut, as released, so fewer pairs may remain.

  Args:
    scores: float[P] in [0, 1], P(second answer better than first), both orders averaged.
    keep_frac: fraction of all pairs that pass the confidence cut.
    valid_first, valid_second: optional bool[P], whether each side is a well-formed answer.

  Returns:
    DpoSelection.
  """
  _check_frac('keep_frac', keep_frac)
  scores = _float_1d('scores', scores)
  if ((scores < 0) | (scores > 1)).any():
    raise ValueError('scores must be probabilities in [0, 1]')
  confidence = np.abs(scores - 0.5)
  order = np.argsort(-confidence, kind='stable')
  top = np.zeros(scores.shape, dtype=bool)
  top[order[: _ceil_count(keep_frac, scores.size)]] = True
  chosen_is_second = scores > 0.5
  chosen_ok = _chosen_valid(chosen_is_second, valid_first, valid_second, scores.size)
  return _select(top, chosen_is_second, confidence, chosen_ok)


def oracle_dpo_pairs(
  correct_first,
  correct_second,
  keep_frac: float | None = None,
  rng: np.random.Generator | int | None = None,
) -> DpoSelection:
  """The `ora` DPO variant: reliable comparisons prefer the correct answer.

  A pair has a preference only when exactly one side is correct; that side is chosen. Pairs whose
  sides are equally correct (both right or both wrong) carry no preference and are dropped; the
  released code instead chose the first side and then dropped the pair only if that side was wrong,
  so it also trained on both-correct pairs with an arbitrary winner.

  With `keep_frac`, first ceil(keep_frac * P) pairs pass, drawn uniformly at random from all P
  (`rng` required). That mirrors the released code, where oracle scores are 0/1, every confidence
  ties at 0.5 and its 15% cut is thus a random subset (in its shuffled order). Without `keep_frac`,
  every pair passes.

  Args:
    correct_first, correct_second: bool[P], ground-truth correctness of each side.
    keep_frac: optional fraction of all pairs to subsample before the preference filter.
    rng: Generator or seed; required iff keep_frac is given.

  Returns:
    DpoSelection; kept pairs are exactly those that passed and whose correctness differs.
    num_invalid_chosen is always 0 here: a chosen answer is never wrong.
  """
  correct_first = _bool_1d('correct_first', correct_first)
  correct_second = _bool_1d('correct_second', correct_second)
  if correct_first.shape != correct_second.shape:
    raise ValueError('correct_first and correct_second must have the same shape')
  num_pairs = correct_first.size
  if keep_frac is None:
    if rng is not None:
      raise ValueError('rng is only used with keep_frac')
    top = np.ones(num_pairs, dtype=bool)
  else:
    _check_frac('keep_frac', keep_frac)
    if rng is None:
      raise ValueError('oracle subsampling with keep_frac needs an rng')
    top = np.zeros(num_pairs, dtype=bool)
    count = _ceil_count(keep_frac, num_pairs)
    top[_as_rng(rng).choice(num_pairs, size=count, replace=False)] = True
  scores = 0.5 + 0.5 * (correct_second.astype(np.float64) - correct_first.astype(np.float64))
  chosen_is_second = scores > 0.5
  chosen_ok = np.where(chosen_is_second, correct_second, correct_first)
  return _select(top, chosen_is_second, np.abs(scores - 0.5), chosen_ok)
