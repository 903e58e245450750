"""The stages before the student: arith pretraining, the weak supervisor, D0, the evaluator.

  pretrain/<role>   arith only: a tiny base pretrained on the arith corpus
  supervisor        the weak supervisor, SFT on half A's ground truth (snapshots kept)
  weak_labels       its labels on half B: D0, with provenance
  evaluator_data    comparison data sampled from the supervisor's snapshots
  evaluator         the 2-class classifier trained on that data

Each body takes the Run (context.py) and returns its stage's metrics.
"""

from __future__ import annotations

import math

import numpy as np

from ilr_jax.context import Run, final_metric, pretrain_stage
from ilr_jax.labels import label_rows, save_label_set
from ilr_jax.tokens import encode_with_bos


def pretrain_corpus(config, task, role: str = 'student') -> list[str]:
  """arith: the pretraining documents of a run. No question of the task's train split (either
  half) or test split is among them, with or without its solution, and no multi-step solution's
  computation either (`arith.exclusions`): the bases learn to compute, never a train or test
  answer, so the supervisor knows only half A's ground truth, the student only its labels, and
  test accuracy measures what a model learned, not what it memorised. The whole splits are
  excluded, whatever task.train_limit / test_limit a run sets. A role's
  `pretrain_comparison_frac` mixes in documents in the evaluator's comparison template
  (`arith.make_corpus`), on problems under the same exclusions."""
  from ilr_jax import arith

  p = config.pretrain
  questions, chains = arith.exclusions(task.problems())
  return arith.make_corpus(
    f'{config.seed}',
    p.corpus_size,
    task.config,
    p.solved_frac,
    p.chat_frac,
    exclude=questions,
    exclude_chains=chains,
    comparison_frac=config[role].pretrain_comparison_frac,
  )


def pretrain_examples(tok, corpus, max_len: int, stage: str = 'pretrain'):
  """(ids, loss_mask) per document: BOS, the document, EOS; the loss on every token but BOS, or
  on a comparison document's verdict and EOS only (arith.split_judgement). Other documents are
  cut to max_len; a comparison document that does not fit is an error naming the flag."""
  from ilr_jax import arith

  num_bos = int(tok.bos_id is not None)
  examples = []
  for doc in corpus:
    judged = arith.split_judgement(doc)
    if judged is None:
      ids = np.asarray((encode_with_bos(tok, doc) + [tok.eos_id])[:max_len], np.int32)
      loss_mask = np.ones_like(ids)
      loss_mask[:num_bos] = 0
    else:
      head, tail = encode_with_bos(tok, judged[0]), tok.encode(judged[1]) + [tok.eos_id]
      if len(head) + len(tail) > max_len:
        raise RuntimeError(
          f'{stage}: a comparison document takes {len(head) + len(tail)} tokens, more than '
          f'--config.pretrain.max_len={max_len}'
        )
      ids = np.asarray(head + tail, np.int32)
      loss_mask = np.asarray([0] * len(head) + [1] * len(tail), np.int32)
    examples.append((ids, loss_mask))
  return examples


def pretrain(run: Run, role: str) -> dict:
  """arith: a tiny base from its preset, trained as an LM on the arith corpus: every token of a
  document but BOS, and of a comparison document only its verdict (arith.split_judgement)."""
  from flax import nnx

  from ilr_jax import presets, sharding, train
  from ilr_jax.model import Decoder

  c, stage = run.config, pretrain_stage(role)
  m = c[role]
  tok = run.tok(role)
  cfg = presets.get_preset(m.preset, vocab_size=tok.vocab_size, dtype=m.dtype, remat=m.remat)
  seed = run.seed(stage)
  model = sharding.create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(seed)), run.mesh)
  corpus = pretrain_corpus(c, run.task, role)
  examples = pretrain_examples(tok, corpus, c.pretrain.max_len, stage)
  config = train.TrainConfig(
    optimizer='adamw',
    lr=c.pretrain.lr,
    warmup_ratio=0.05,
    global_batch=c.pretrain.batch_size,
    epochs=m.pretrain_steps * c.pretrain.batch_size / len(examples),
    max_len=c.pretrain.max_len,
    seed=seed,
    checkpoint_every=c.fit.checkpoint_every,
    log_every=c.fit.log_every,
  )
  model, result = run.fit(stage, model, examples, 'sft', config)
  run.save_base(model, stage)
  return {'final_loss': final_metric(result, 'loss')}


def supervisor(run: Run) -> dict:
  """The weak supervisor: SFT on half A's ground truth, checkpoints kept for the evaluator data."""
  c, stage = run.config, 'supervisor'
  n = c.evaluator_train.num_checkpoints
  model = run.base('supervisor')
  examples = run.sft_examples(
    'supervisor', [e.question for e in run.half_a], [e.answer for e in run.half_a]
  )
  config = run.train_config(
    c.supervisor_sft, stage, checkpoint_fractions=tuple((i + 1) / n for i in range(n))
  )
  model, _ = run.fit(stage, model, examples, 'sft', config)
  return run.evaluate(model, 'supervisor', stage)


def weak_labels(run: Run) -> dict:
  """D0: the supervisor's answers on half B (label decoding), with provenance."""
  stage = 'weak_labels'
  model = run.load('supervisor', 'supervisor')
  qs = [e.question for e in run.half_b]
  labels = [t[0] for t in run.generate(model, 'supervisor', qs, 'label', stage)]
  correct = run.correct(labels, run.half_b)
  n = len(labels)
  valid = [run.task.is_valid_label(x) for x in labels]
  rows = label_rows(
    [e.id for e in run.half_b],
    qs,
    labels,
    ['weak'] * n,
    [0] * n,
    [math.nan] * n,
    [False] * n,
    [False] * n,
    correct,
    valid=valid,
  )
  save_label_set(run.wd.path(stage, 'labels'), rows)
  return {'label_accuracy': float(np.mean(correct)), 'num_labels': n, 'num_valid': sum(valid)}


def evaluator_data(run: Run) -> dict:
  """Comparison data: each kept snapshot of the supervisor's fit samples one answer per half-A
  prompt (temperature 0.6). The supervisor is exactly METHOD.md's supervisor-sized model trained
  on half A's ground truth, so its fit doubles as the evaluator-data model (one fit saved)."""
  from ilr_jax import evaluator_data as data_lib
  from ilr_jax import fit

  if run.task.name == 'saferpaca':  # its own pairs: general-only and safety-only models
    from ilr_jax import saferpaca_evaluator

    return saferpaca_evaluator.stage_evaluator_data(run)
  stage, et = 'evaluator_data', run.config.evaluator_train
  snapshots = fit.fit_checkpoints(run.wd.path('supervisor', 'fit'))
  if len(snapshots) != et.num_checkpoints:
    raise RuntimeError(
      f'{stage}: the supervisor kept {len(snapshots)} snapshots, expected {et.num_checkpoints} '
      '(too few training steps for --config.evaluator_train.num_checkpoints?)'
    )
  _, counts = data_lib.build_comparison_data(
    lambda: run.base('supervisor'),
    snapshots,
    run.tok('supervisor'),
    run.task,
    run.half_a,
    out_dir=run.wd.path(stage),
    seed=run.seed(stage),
    val_frac=et.val_frac,
    batch_size=run.config.sampling.batch_size,
    mesh=run.mesh,
    keep_identical=et.keep_identical_pairs,
  )
  return {'counts': counts, 'checkpoint_accuracy': counts['checkpoints']['accuracy']}


def evaluator(run: Run) -> dict:
  """The evaluator: the evaluator base with a 2-class head, trained on the comparison data."""
  from ilr_jax import evaluator as evaluator_lib
  from ilr_jax import evaluator_data as data_lib

  stage, et = 'evaluator', run.config.evaluator_train
  data, _ = data_lib.load_comparison_data(run.wd.path('evaluator_data', 'data'))
  model = evaluator_lib.with_score_head(run.base('evaluator'), seed=run.seed(stage), mesh=run.mesh)
  model, result = evaluator_lib.train_evaluator(
    model,
    run.tok('evaluator'),
    data,
    config=run.train_config(et, stage),
    workdir=run.wd.path(stage, 'fit'),
    mesh=run.mesh,
    patience=et.patience,
    max_len=et.max_len,
    too_long=et.too_long,
    score_batch_size=run.config.sampling.score_batch_size,
  )
  return {
    'evaluator_accuracy': final_metric(result, 'val_pair_accuracy'),
    'evaluator_example_accuracy': final_metric(result, 'val_accuracy'),
  }
