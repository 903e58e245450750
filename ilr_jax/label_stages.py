"""The stages of label sets and the students trained on them (ILR, METHOD.md steps 1-7).

  cor/labels               D0 restricted to the correct weak labels (methods with d0='correct')
  sft, cor/sft, <m>/r<k>/model   the student from its base, SFT on a label set, tested
  halves/<labels>/m1, m2   ILR's half-data models on a label set, each proposing for the other half
  <m>/r<k>/labels          agreement, feedback on the disagreeing proposals, the refined set D_k

How a round decides what to replace is the method's feedback source (methods.py, feedback.py):
'evaluator' and 'judge' score the disagreeing proposals and ILR's alpha threshold cuts them;
'oracle' and 'human' give verdicts, and a proposal the verdict prefers replaces its label; 'random'
(naive) replaces a random alpha of all.

Besides the label accuracy, a round reports its feedback accuracy: over the disagreeing items
where exactly one of the current label and the proposal is correct, how often the feedback score
s = P(proposal better than current label) prefers the correct one (a tie s == 0.5 is half a hit;
feedback_metrics.feedback_accuracy). Naive ILR compares nothing: None over 0 items.
"""

from __future__ import annotations

import math

import numpy as np

from ilr_jax.context import Run
from ilr_jax.feedback_metrics import feedback_accuracy
from ilr_jax.labels import label_rows, load_label_set, save_label_set
from ilr_jax.methods import Method
from ilr_jax.workdir import is_writer, read_json, write_json


def half_stage(labels: str, i: int) -> str:
  """The stage of ILR's half-data model M_i trained on a label set, with its proposals.

  Named after the label set it reads, so methods that refine the same labels (ilr, naive and
  orailr all start from D0) share the round-1 half models instead of training them three times.
  """
  return f'halves/{labels}/m{i}'


def cor_labels(run: Run) -> dict:
  """D0 restricted to the weak labels that are correct (reliable demonstrations)."""
  d0 = load_label_set(run.wd.path('weak_labels', 'labels'))
  keep = [i for i, ok in enumerate(d0['correct']) if ok]
  save_label_set(
    run.wd.path('cor/labels', 'labels'), {k: [v[i] for i in keep] for k, v in d0.items()}
  )
  return {'label_accuracy': 1.0 if keep else math.nan, 'num_labels': len(keep)}


def student(run: Run, stage: str, labels_stage: str) -> dict:
  """The student from its base with a fresh adapter, SFT on a label set; evaluated on test."""
  d = load_label_set(run.wd.path(labels_stage, 'labels'))
  model = run.base('student')
  examples = run.sft_examples('student', d['question'], d['label'])
  if not examples:
    raise RuntimeError(f'{stage}: the label set {labels_stage} holds no valid label to train on')
  model, _ = run.fit(stage, model, examples, 'sft', run.train_config(run.config.sft, stage))
  return {'num_train': len(examples), **run.evaluate(model, 'student', stage)}


def half(run: Run, labels_stage: str, i: int) -> dict:
  """ILR's M_i: trained from the base on half i of a label set, proposing for the other half."""
  from ilr_jax import refine

  stage = half_stage(labels_stage, i)
  d = load_label_set(run.wd.path(labels_stage, 'labels'))
  h1, h2 = refine.split_two(len(d['id']), run.seed(f'split:{labels_stage}'))
  own, other = (h1, h2) if i == 1 else (h2, h1)
  model = run.base('student')
  examples = run.sft_examples(
    'student', [d['question'][j] for j in own], [d['label'][j] for j in own]
  )
  model, _ = run.fit(stage, model, examples, 'sft', run.train_config(run.config.sft, stage))
  qs = [d['question'][j] for j in other]
  proposals = [t[0] for t in run.generate(model, 'student', qs, 'proposal', stage)]
  if is_writer():
    write_json(
      run.wd.path(stage, 'proposals.json'),
      {'ids': [d['id'][j] for j in other], 'proposals': proposals},
    )
  return {'num_train': len(examples), 'num_proposals': len(proposals)}


def _proposals(run: Run, stage: str, prev: str, ids) -> list[str]:
  """The half models' proposal for every row of the label set `prev`, in its row order."""
  proposal = [None] * len(ids)
  pos = {x: j for j, x in enumerate(ids)}
  for i in (1, 2):
    got = read_json(run.wd.path(half_stage(prev, i), 'proposals.json'))
    for x, p in zip(got['ids'], got['proposals']):
      proposal[pos[x]] = p
  if any(p is None for p in proposal):
    raise RuntimeError(
      f'{stage}: the half models proposed for {len(ids) - proposal.count(None)} of {len(ids)} rows'
    )
  return proposal


def _decide(run: Run, method: Method, stage: str, d, proposal, examples):
  """(agree, scores, refine.RefineDecision) of a round, by the method's feedback source."""
  from ilr_jax import refine

  n, ilr = len(proposal), run.config.ilr
  scores = np.full(n, math.nan)
  if method.feedback == 'random':  # naive: no comparison at all
    return np.zeros(n, bool), scores, refine.naive_replace(n, ilr.alpha, run.seed(stage))
  agree = np.asarray(run.task.agree_batch(proposal, d['label'], examples), bool)
  dis = np.flatnonzero(~agree)
  if dis.size:
    scores[dis] = run.scorer(method.feedback, stage)(
      [d['question'][j] for j in dis], [d['label'][j] for j in dis], [proposal[j] for j in dis]
    )
  if method.feedback in ('oracle', 'human'):
    # Binary verdicts (a grade, a person's choice) have no quantile to cut: (1 - alpha) of them
    # tie at 1, and the strict threshold would then replace nothing. The proposal replaces the
    # label iff the verdict prefers it.
    return agree, scores, refine.oracle_replace(agree, scores > 0.5)
  return agree, scores, refine.ilr_replace(agree, scores, ilr.alpha, ilr.alpha_scope, ilr.floor)


def refine_labels(run: Run, method: Method, k: int, prev: str) -> dict:
  """ILR round k (METHOD.md steps 3-7): cross proposals, agreement, feedback, threshold -> D_k."""
  stage = f'{method.name}/r{k}/labels'
  d = load_label_set(run.wd.path(prev, 'labels'))
  n = len(d['id'])
  proposal = _proposals(run, stage, prev, d['id'])
  by_id = {e.id: e for e in run.half_b}
  examples = [by_id[x] for x in d['id']]
  agree, scores, decision = _decide(run, method, stage, d, proposal, examples)
  rep = decision.replace
  labels = [proposal[j] if rep[j] else d['label'][j] for j in range(n)]
  proposal_correct = run.correct(proposal, examples)
  correct = [proposal_correct[j] if rep[j] else d['correct'][j] for j in range(n)]
  rows = label_rows(
    d['id'],
    d['question'],
    labels,
    ['proposal' if rep[j] else d['source'][j] for j in range(n)],
    [k if rep[j] else d['round'][j] for j in range(n)],
    scores.tolist(),
    rep.tolist(),
    agree.tolist(),
    correct,
    proposal=proposal,
    proposal_correct=proposal_correct,
    previous_label=list(d['label']),
    valid=[run.task.is_valid_label(x) for x in labels],
  )
  save_label_set(run.wd.path(stage, 'labels'), rows)
  prev_correct = np.asarray(d['correct'], bool)
  # Scores are NaN where no feedback was asked (agreeing items, every item of a naive round), so
  # this counts the disagreeing items only.
  fb_accuracy, fb_items = feedback_accuracy(
    scores, prev_correct, np.asarray(proposal_correct, bool)
  )
  return {
    'label_accuracy': float(np.mean(correct)) if n else math.nan,
    'num_labels': n,
    'num_replaced': decision.num_replaced,
    'num_agreed': decision.num_agree,
    'num_disagreed': decision.num_disagree,
    'threshold': decision.threshold,
    'replaced_wrong_to_right': int((rep & ~prev_correct & np.asarray(proposal_correct)).sum()),
    'replaced_right_to_wrong': int((rep & prev_correct & ~np.asarray(proposal_correct)).sum()),
    'feedback_accuracy': fb_accuracy,
    'feedback_items': fb_items,
  }
