"""Evaluator training data: comparison pairs per question and their two classification examples.

METHOD.md "Evaluator data and training". A supervisor-sized model trained on half A's ground truth
keeps n checkpoints; each samples one answer per half-A question, graded against ground truth. Per
question, with the samples in checkpoint order:
  * some sample correct: (GT > a correct sample), and if some sample is also wrong,
    (a correct sample or GT > a wrong sample);
  * no sample correct: (GT > a wrong sample);
  * no samples at all: no pairs.

Weighted choice (the released `weighted_choice`, read exactly): a side is drawn from a candidate
list kept in checkpoint order, the candidate at rank r (0-based) of a list of m having weight
2^(m-1-r), i.e. probability 2^-r / sum_k 2^-k. Earlier checkpoints weigh more; the weight depends on
the rank within the candidate list, not on the raw checkpoint index (the two agree whenever the
candidates come from consecutive checkpoints, and always for the all-correct / all-wrong lists).
For "a correct sample or GT" the list is the correct samples followed by GT, so GT is one more
candidate after the latest correct sample, with the smallest weight. Draw order per question:
the correct sample of the first pair, then the better and the worse side of the second pair.

A pair's `kind` names what its two sides are: 'gt>correct', 'correct>wrong', or 'gt>wrong' (the
last also when the second pair's better side came out as GT).

Each pair gives two examples with COMPARISON_TEMPLATE: (A = better, B = worse) labelled REJECT and
(A = worse, B = better) labelled ACCEPT. The 90/10 train/validation split is over questions, so
both examples of a pair, and all pairs of one question, land on the same side (the released code
cut its pair list, which could separate a question's two pairs at the boundary).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

from ilr_jax import refine

COMPARISON_TEMPLATE = (
  'QUESTION:\n{q}\n\nANSWER (A):\n{a}\n\nANSWER (B):\n{b}\n\n'
  'You gave the answer (A) to the question. '
  'Do you accept to change it to answer (B) proposed by another model?'
)
REJECT = 0  # keep answer (A): it is the better one
ACCEPT = 1  # change to answer (B): it is the better one
PAIR_KINDS = ('gt>correct', 'correct>wrong', 'gt>wrong')
GT = -1  # the `*_ckpt` of a side that is the ground truth


def comparison_prompt(q: str, a: str, b: str) -> str:
  """The evaluator's input for "should answer (A) to `q` be changed to answer (B)?"."""
  return COMPARISON_TEMPLATE.format(q=q, a=a, b=b)


@dataclasses.dataclass(frozen=True)
class Pair:
  """One comparison: `better` should be preferred over `worse`.

  Attributes:
    better, worse: answer texts.
    kind: one of PAIR_KINDS.
    weight: probability of drawing exactly these two sides given the question's samples (the
      product of both sides' choice probabilities; a side that is necessarily GT counts as 1).
    better_ckpt, worse_ckpt: checkpoint index of each side, GT (-1) for the ground truth.
  """

  better: str
  worse: str
  kind: str
  weight: float
  better_ckpt: int = GT
  worse_ckpt: int = GT


def rank_probs(m: int) -> np.ndarray:
  """Choice probabilities of a candidate list of m: weight 2^(m-1-r) at rank r, normalised."""
  if m <= 0:
    raise ValueError(f'need at least one candidate, got {m}')
  # 2^-r is the same ratio as 2^(m-1-r) and stays finite for any m.
  weights = np.exp2(-np.arange(m, dtype=np.float64))
  return weights / weights.sum()


def _draw(candidates: Sequence[int], rng: np.random.Generator) -> tuple[int, float]:
  probs = rank_probs(len(candidates))
  r = int(rng.choice(len(candidates), p=probs))
  return candidates[r], float(probs[r])


def build_pairs(
  ground_truth: str,
  samples: Sequence[str],
  correct: Sequence[bool],
  rng: np.random.Generator,
) -> list[Pair]:
  """Comparison pairs for one question (rules and sampling in the module docstring).

  Args:
    ground_truth: the reference answer.
    samples: one answer per checkpoint, checkpoint order i = 0 .. n-1.
    correct: whether each sample is correct.
    rng: the only source of randomness.

  Returns:
    0, 1 or 2 pairs: [] without samples; [gt>wrong] when none is correct; [gt>correct] when all
    are correct; [gt>correct, correct>wrong or gt>wrong] when mixed.
  """
  if len(samples) != len(correct):
    raise ValueError(f'{len(samples)} samples but {len(correct)} correctness flags')
  text = {GT: ground_truth, **dict(enumerate(samples))}
  pos = [i for i, c in enumerate(correct) if c]
  neg = [i for i, c in enumerate(correct) if not c]
  pairs = []
  if pos:
    worse, p = _draw(pos, rng)
    pairs.append(Pair(ground_truth, text[worse], 'gt>correct', p, GT, worse))
    if neg:
      better, p_better = _draw(pos + [GT], rng)
      worse, p_worse = _draw(neg, rng)
      kind = 'gt>wrong' if better == GT else 'correct>wrong'
      pairs.append(Pair(text[better], text[worse], kind, p_better * p_worse, better, worse))
  elif neg:
    worse, p = _draw(neg, rng)
    pairs.append(Pair(ground_truth, text[worse], 'gt>wrong', p, GT, worse))
  return pairs


def pairs_to_examples(question: str, pairs: Iterable[Pair]) -> list[dict]:
  """Two classification examples per pair: better as A -> REJECT, then worse as A -> ACCEPT.

  Returns:
    A list of dicts with keys text (the prompt), label (REJECT or ACCEPT) and kind.
  """
  examples = []
  for pair in pairs:
    examples.append(
      dict(text=comparison_prompt(question, pair.better, pair.worse), label=REJECT, kind=pair.kind)
    )
    examples.append(
      dict(text=comparison_prompt(question, pair.worse, pair.better), label=ACCEPT, kind=pair.kind)
    )
  return examples


def train_val_split(n: int, val_frac: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Seeded split of n questions (not pairs, not examples) into train and validation.

  A uniform permutation from `np.random.default_rng(seed)`; the first floor((1 - val_frac) * n)
  entries train (the released `int(len * 0.9)`, with a 1e-9 tolerance for float rounding), the
  rest validate. Split questions, then build each side's examples from its questions.

  Returns:
    (train_idx, val_idx): disjoint int64 index arrays, each sorted ascending, covering range(n).
  """
  if not 0.0 <= val_frac <= 1.0:
    raise ValueError(f'val_frac must be in [0, 1], got {val_frac}')
  num_train = int(math.floor((1.0 - val_frac) * max(n, 0) + 1e-9))
  return refine.permutation_split(n, num_train, seed)


def same_text(a: str, b: str) -> bool:
  """Whether a pair's two sides are the same text (up to surrounding whitespace): a checkpoint
  reproducing the ground truth, or two equal samples. Its two examples are one input with opposite
  labels, which teach nothing, and no metric can score it (METHOD.md)."""
  return a.strip() == b.strip()


def pair_kind_counts(
  items: Iterable[Pair | dict], kinds: Sequence[str] = PAIR_KINDS
) -> dict[str, int]:
  """Count of each kind (every kind in `kinds` present, in that order) for the report.

  Accepts Pairs or the example dicts of `pairs_to_examples` (examples count twice per pair).
  """
  counts = collections.Counter(x['kind'] if isinstance(x, dict) else x.kind for x in items)
  unknown = set(counts) - set(kinds)
  if unknown:
    raise ValueError(f'unknown pair kinds {sorted(unknown)}')
  return {kind: counts[kind] for kind in kinds}
