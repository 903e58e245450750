"""The stages of SFT+DPO rounds (METHOD.md "SFT+DPO"): preference pairs, then DPO.

<m>/r<k>/pairs    policy k-1 samples dpo.num_samples answers per half-B prompt; the pairs
                  (1,2), (3,4), ... are compared by the method's feedback and the most confident
                  dpo.keep_frac of them kept
<m>/r<k>/policy   DPO from policy k-1 with reference policy k-1; evaluated on test

The pairs stage reports the feedback accuracy over every scored candidate pair (before the
keep_frac cut) with exactly one correct side: how often s = P(second better than first) prefers
the correct one, a tie s == 0.5 half a hit (feedback_metrics.feedback_accuracy). Oracle feedback
gives no scores: None over 0 pairs. dpo_pair_accuracy is over the kept pairs with exactly one
correct side: how often the chosen answer is the correct one.
"""

from __future__ import annotations

import math

import numpy as np

from ilr_jax.context import Run, final_metric
from ilr_jax.feedback_metrics import feedback_accuracy
from ilr_jax.methods import Method
from ilr_jax.workdir import is_writer, read_json, sync, write_json


def _select(run: Run, method: Method, stage: str, questions, a, b, correct_a, correct_b):
  """(scores, refine.DpoSelection) of candidate pairs by the method's feedback source."""
  from ilr_jax import refine

  keep_frac = run.config.dpo.keep_frac
  scores = np.full(len(a), math.nan)
  if method.feedback in ('evaluator', 'judge', 'human'):
    scores = run.scorer(method.feedback, stage)(questions, a, b)
    valid_a = np.asarray([run.task.is_valid_label(x) for x in a])
    valid_b = np.asarray([run.task.is_valid_label(x) for x in b])
    return scores, refine.select_dpo_pairs(scores, keep_frac, valid_a, valid_b)
  if method.feedback == 'oracle':
    return scores, refine.oracle_dpo_pairs(correct_a, correct_b, keep_frac, run.seed(stage))
  raise ValueError(f'{method.name}: DPO has no pair selection for feedback {method.feedback!r}')


def pairs(run: Run, method: Method, k: int, policy_stage: str) -> dict:
  """SFT+DPO round k, data: policy k-1 samples, the pairs (1,2),(3,4),..., top by confidence."""
  from ilr_jax import refine

  c, stage = run.config, f'{method.name}/r{k}/pairs'
  policy = run.load(policy_stage)
  qs = [e.question for e in run.half_b]
  ns = c.dpo.num_samples
  samples = run.generate(policy, 'student', qs, 'dpo', stage, num_samples=ns)
  flat = [a for s in samples for a in s]
  first, second = refine.dpo_pairs(len(qs), ns)
  pq = [qs[j // ns] for j in first]
  a, b = [flat[j] for j in first], [flat[j] for j in second]
  ex = [run.half_b[j // ns] for j in first]
  correct_a, correct_b = np.asarray(run.correct(a, ex)), np.asarray(run.correct(b, ex))
  scores, sel = _select(run, method, stage, pq, a, b, correct_a, correct_b)
  chosen_idx, rejected_idx = sel.chosen_rejected(first, second)
  kept = np.flatnonzero(sel.keep)
  chosen, rejected = [flat[j] for j in chosen_idx], [flat[j] for j in rejected_idx]
  flat_correct = np.empty(len(flat), bool)
  flat_correct[first], flat_correct[second] = correct_a, correct_b
  ch_ok, rej_ok = flat_correct[chosen_idx], flat_correct[rejected_idx]
  if is_writer():
    write_json(
      run.wd.path(stage, 'pairs.json'),
      {
        'policy_stage': policy_stage,
        'samples': samples,
        'pair_index': kept.tolist(),
        'question': [pq[i] for i in kept],
        'chosen': chosen,
        'rejected': rejected,
        'chosen_index': chosen_idx.tolist(),
        'rejected_index': rejected_idx.tolist(),
        'score': scores[kept].tolist(),
        'chosen_correct': ch_ok.tolist(),
        'rejected_correct': rej_ok.tolist(),
      },
    )
  differ = ch_ok != rej_ok
  fb_accuracy, fb_items = feedback_accuracy(scores, correct_a, correct_b)
  return {
    'dpo_pairs': int(sel.num_kept),
    'dpo_candidates': int(len(a)),
    'dpo_top': int(sel.num_top),
    'dpo_pair_accuracy': float(np.mean(ch_ok[differ])) if differ.any() else None,
    'dpo_chosen_accuracy': float(np.mean(ch_ok)) if len(ch_ok) else None,
    'sample_accuracy': float(np.mean(flat_correct)),
    'feedback_accuracy': fb_accuracy,
    'feedback_items': fb_items,
  }


def policy(run: Run, method: Method, k: int, policy_stage: str) -> dict:
  """SFT+DPO round k, training: DPO from policy k-1 (reference = policy k-1), then evaluation.

  The reference log-probs are computed here, with policy k-1, before training (deterministic, so
  a resumed stage recomputes the same values).
  """
  from ilr_jax import examples as examples_lib
  from ilr_jax import fit

  c, stage = run.config, f'{method.name}/r{k}/policy'
  data = read_json(run.wd.path(f'{method.name}/r{k}/pairs', 'pairs.json'))
  model = run.load(policy_stage)
  tok = run.tok('student')
  examples = [
    examples_lib.dpo_example(tok, q, ch, rj)
    for q, ch, rj in zip(data['question'], data['chosen'], data['rejected'])
  ]
  out = {'dpo_pairs': len(examples)}
  if examples:
    examples = fit.with_reference_logps(model, examples, batch_size=c.dpo.batch_size)
    config = run.train_config(
      c.dpo,
      stage,
      dpo_beta=c.dpo.beta,
      lora_rank=model.cfg.lora_rank,
      lora_alpha=model.cfg.lora_alpha,
    )
    model, result = run.fit(stage, model, examples, 'dpo', config)
    out['dpo_reward_margin'] = final_metric(result, 'rewards/margin')
    out['dpo_reward_accuracy'] = final_metric(result, 'rewards/accuracy')
  else:  # no pair survived the cut: policy k is policy k-1 (orbax saves on every process)
    fit.save_params(model, run.wd.path(stage, 'fit', 'final'), force=True)
  sync(f'policy:{stage}')
  out.update(run.evaluate(model, 'student', stage))
  return out
