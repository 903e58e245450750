"""The ILR and SFT+DPO pipeline: the stages and the round loops (the config schema: schema.py).

    python -m ilr_jax.main --config=configs/arith.py:compare --workdir=/tmp/arith

Stages (METHOD.md), each a resumable unit with outputs under the workdir (workdir.py):

  pretrain/<preset>            arith only: a tiny base pretrained on the arith corpus
  supervisor                   the weak supervisor, SFT on half A's ground truth
  weak_labels                  its labels on half B: D0 (label set, with provenance)
  evaluator_data, evaluator    comparison data from checkpoints of a half-A model; the classifier
  sft                          round 0: the student SFT on D0, evaluated on test
  cor/labels, cor/sft          `cor` variants: D0 restricted to correct weak labels, and its SFT
  halves/<labels>/m1, m2       ILR-type methods: half-data models from the base on a label set,
                               each proposing for the other half (shared by methods that refine
                               the same labels: round 1 of ilr, naive and orailr)
  <m>/r<k>/labels              agreement, scores, the refined label set D_k
  <m>/r<k>/model               the round's model, from the base, on D_k; evaluated on test
  <m>/r<k>/pairs, policy       DPO-type methods: samples and selected pairs of policy k-1; DPO
                               from policy k-1 with reference policy k-1; evaluated on test

Every stage loads its inputs from disk (never from another stage's memory), so a resumed run
computes the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
import zlib

import ml_collections
import numpy as np

from ilr_jax import report
from ilr_jax.schema import (
  DPO_METHODS,
  EVALUATOR_METHODS,
  ILR_METHODS,
  NO_RESULT_KEYS,
  uses_evaluator,
  validate,
)
from ilr_jax.workdir import (
  Stage,
  is_writer,
  load_label_set,
  read_json,
  save_label_set,
  sync,
  write_json,
)

log = logging.getLogger(__name__)

# -- the stage plan --------------------------------------------------------------------------------

# Config keys each kind of stage depends on (beyond those of the stages it reads from). The mesh,
# batch sizes of inference and the debug section are deliberately absent: they do not change
# results, so a run may resume on a host of another shape.
_DATA_KEYS = ('seed', 'task')


def _round0(method: str) -> tuple[str, str]:
  """(label stage of D0, model stage of round 0) for a method."""
  return ('cor/labels', 'cor/sft') if method.startswith('cor') else ('weak_labels', 'sft')


def _scorer_after(method: str) -> tuple[str, ...]:
  return ('evaluator',) if method in EVALUATOR_METHODS else ()


def _pretrain_stage(config, role: str) -> tuple[str, ...]:
  if config[role].init != 'pretrain':
    return ()
  return ('pretrain/supervisor',) if role == 'evaluator' else (f'pretrain/{role}',)


def half_stage(labels: str, i: int) -> str:
  """The stage of ILR's half-data model M_i trained on a label set, with its proposals.

  Named after the label set it reads, so methods that refine the same labels (ilr, naive and
  orailr all start from D0) share the round-1 half models instead of training them three times.
  """
  return f'halves/{labels}/m{i}'


def plan(config) -> list[Stage]:
  """Every stage of the configured run, upstream before downstream (see the module docstring)."""
  methods = tuple(config.methods)
  st = []
  for role in ('supervisor', 'student'):
    if config[role].init == 'pretrain':
      st.append(
        Stage(
          f'pretrain/{role}',
          keys=_DATA_KEYS
          + ('pretrain', f'{role}.preset', f'{role}.pretrain_steps', f'{role}.tokenizer'),
        )
      )
  sup_keys = _DATA_KEYS + ('supervisor', 'supervisor_sft', 'evaluator_train.num_checkpoints')
  st.append(Stage('supervisor', keys=sup_keys, after=_pretrain_stage(config, 'supervisor')))
  st.append(Stage('weak_labels', after=('supervisor',)))
  if uses_evaluator(methods):
    st.append(Stage('evaluator_data', keys=('evaluator_train',), after=('supervisor',)))
    st.append(
      Stage(
        'evaluator',
        keys=('evaluator', 'evaluator_train'),
        after=('evaluator_data',) + _pretrain_stage(config, 'evaluator'),
      )
    )
  student = ('student', 'sft')
  base = _pretrain_stage(config, 'student')
  names = set()
  st.append(Stage('sft', keys=student, after=('weak_labels',) + base))
  if any(m.startswith('cor') for m in methods):
    st.append(Stage('cor/labels', after=('weak_labels',)))
    st.append(Stage('cor/sft', keys=student, after=('cor/labels',) + base))
  for m in methods:
    labels, model = _round0(m)
    for k in range(1, config.num_rounds + 1):
      r = f'{m}/r{k}'
      if m in ILR_METHODS:
        halves = tuple(half_stage(labels, i) for i in (1, 2))
        for h in halves:
          if h not in names:
            st.append(Stage(h, keys=student, after=(labels,) + base))
            names.add(h)
        st.append(Stage(f'{r}/labels', keys=('ilr',), after=halves + _scorer_after(m)))
        st.append(Stage(f'{r}/model', keys=student, after=(f'{r}/labels',) + base))
        labels = f'{r}/labels'
      elif m in DPO_METHODS:
        st.append(Stage(f'{r}/pairs', keys=('dpo',), after=(model,) + _scorer_after(m)))
        st.append(Stage(f'{r}/policy', keys=('dpo',), after=(f'{r}/pairs',)))
        model = f'{r}/policy'
  return st


def check_workdir(config, workdir: str, recompute_changed: bool = False, redo: str = ''):
  """Build the stage plan and compare it with what the workdir holds; no work is done, except
  that `redo` forgets that stage and everything downstream of it first.

  Returns the Workdir. Raises ConfigChangedError naming a changed key (see workdir.py).
  """
  from ilr_jax import workdir as wdlib

  wd = wdlib.Workdir(
    workdir,
    config.to_dict(),
    plan(config),
    recompute_changed=recompute_changed,
    kill_at=config.debug.kill_at,
    ignore=NO_RESULT_KEYS,
  )
  if redo:
    wd.redo(redo)
  wd.check()
  return wd


# -- the run: data, tokenizers, models shared by the stages ---------------------------------------


def _stage_seed(seed: int, stage: str) -> int:
  """A seed per (run seed, stage), the same on every process and every resume."""
  return (seed * 1_000_003 + zlib.crc32(stage.encode())) % (2**31)


def make_task(task_cfg):
  """The task of a config's `task` section (a dict, as in the workdir's config.json)."""
  from ilr_jax import tasks

  opts = {k: v for k, v in task_cfg.items() if k not in ('name', 'train_limit', 'test_limit')}
  if opts.get('data_dir') is not None:  # documented: data_dir takes precedence over the hub
    opts.pop('hub_id', None)
    opts.pop('hub_config', None)
  opts = {k: v for k, v in opts.items() if v is not None}
  return tasks.get_task(task_cfg['name'], **opts)


def pretrain_corpus(config, task, test) -> list[str]:
  """arith: the pretraining documents of a run. No test question is among them, so test accuracy
  measures what a base learned, not what it memorised."""
  from ilr_jax import arith

  p = config.pretrain
  return arith.make_corpus(
    f'{config.seed}',
    p.corpus_size,
    task.config,
    p.solved_frac,
    p.chat_frac,
    exclude=frozenset(ex.question for ex in test),
  )


class Run:
  """What the stages share: the config, the workdir, the task's data, tokenizers and the mesh."""

  def __init__(self, config, wd):
    from ilr_jax import sharding, tasks

    self.config, self.wd = config, wd
    self.task = make_task(config.task.to_dict())
    self.train = self.task.load('train', config.task.train_limit)
    self.test = self.task.load('test', config.task.test_limit)
    idx_a, idx_b = tasks.split_halves(len(self.train), config.seed)
    self.half_a = [self.train[i] for i in idx_a]
    self.half_b = [self.train[i] for i in idx_b]
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    self._toks = {}

  def tok(self, role: str):
    from ilr_jax.tokens import Tokenizer

    path = self.config[role].tokenizer
    if path not in self._toks:
      self._toks[path] = Tokenizer.load(path)
    return self._toks[path]

  def base(self, role: str):
    """A fresh copy of a role's base model (no adapter), placed on the mesh."""
    from ilr_jax import convert

    m = self.config[role]
    numerics = dict(dtype=m.dtype, remat=m.remat)
    if m.init == 'pretrain':
      src = 'pretrain/supervisor' if role == 'evaluator' else f'pretrain/{role}'
      return convert.load_checkpoint(self.wd.path(src, 'model'), mesh=self.mesh, **numerics)
    if m.init == 'checkpoint':
      return convert.load_checkpoint(m.model_dir, mesh=self.mesh, **numerics)
    return convert.load_hf(m.model_dir, mesh=self.mesh, param_dtype=m.param_dtype, **numerics)

  def load(self, stage: str, role: str = 'student'):
    """The model a finished stage trained: its fit's final params on the role's base.

    Only the trainable params are stored per stage (the adapter under LoRA), never a second copy
    of a 7B base.
    """
    from ilr_jax import evaluator, fit

    base = self.base(role)
    if role == 'evaluator':
      base = evaluator.with_score_head(base, mesh=self.mesh)
    return fit.load_params(base, self.wd.path(stage, 'fit', 'final'))

  def save_base(self, model, stage: str) -> None:
    """Save a whole model (a pretrained arith base) as the stage's `model` checkpoint."""
    from ilr_jax import convert

    path = self.wd.path(stage, 'model')
    if path.exists() and is_writer():  # left by an attempt killed before its stage record
      shutil.rmtree(path)
    sync(f'save:{stage}')
    convert.save_checkpoint(model, path)
    sync(f'saved:{stage}')


# -- model operations (training and decoding through fit.py and generate.py) ----------------------


def _train_config(tcfg, seed: int, **extra):
  """fit.TrainConfig from a config section (sft, supervisor_sft, dpo, evaluator_train, ...)."""
  from ilr_jax import train

  fields = dict(
    optimizer=tcfg.optimizer,
    lr=tcfg.lr,
    warmup_ratio=tcfg.warmup_frac,
    weight_decay=tcfg.get('weight_decay', 0.0),
    epochs=tcfg.get('epochs', tcfg.get('max_epochs', 1)),
    global_batch=tcfg.batch_size,
    seed=seed,
    lora_rank=tcfg.get('lora_rank', 0),
    lora_alpha=tcfg.get('lora_alpha', 0.0),
  )
  # micro_batch (gradient accumulation) is set only by configs whose batches need it to fit.
  for key in ('max_len', 'pad_multiple', 'micro_batch'):
    if tcfg.get(key) is not None:
      fields[key] = tcfg[key]
  fields.update(extra)
  return train.TrainConfig(**fields)


def _bookkeeping(run: Run) -> dict:
  """fit.BOOKKEEPING settings of every fit (config section `fit`)."""
  return dict(checkpoint_every=run.config.fit.checkpoint_every, log_every=run.config.fit.log_every)


def _fit(run: Run, stage: str, model, examples, loss: str, tcfg, **options):
  """Train `model` on `examples`, resumable from the checkpoints under `<stage>/fit`."""
  from ilr_jax import fit

  seed = _stage_seed(run.config.seed, stage)
  cfg = _train_config(tcfg, seed, **_bookkeeping(run), **options.pop('train_options', {}))
  return fit.fit(
    model,
    examples,
    loss=loss,
    config=cfg,
    workdir=run.wd.path(stage, 'fit'),
    mesh=run.mesh,
    after_save=run.wd.fit_hook(stage),
    **options,
  )


def _sft_examples(run: Run, role: str, questions, answers):
  from ilr_jax.tokens import sft_example

  tok = run.tok(role)
  return [sft_example(tok, q, a) for q, a in zip(questions, answers) if run.task.is_valid_label(a)]


def _generate(run: Run, model, role: str, questions, use: str, stage: str) -> list[list[str]]:
  """Answers per question (a list of num_samples texts each) with the task's decoding for `use`."""
  from ilr_jax import decoding, generate

  d = run.task.decoding[use]
  method = decoding.method_from_name(d.method, temperature=d.temperature, num_beams=d.num_beams)
  result = generate.generate_answers(
    model,
    run.tok(role),
    list(questions),
    method,
    max_new_tokens=d.max_new_tokens,
    num_samples=d.num_samples,
    seed=_stage_seed(run.config.seed, stage + '/' + use),
    batch_size=run.config.sampling.batch_size,
    mesh=run.mesh,
    desc=f'{stage} ({use})',
    scores=False,  # only the texts are used
  )
  return result.texts


def _evaluate(run: Run, model, role: str, stage: str) -> dict:
  """Test accuracy of a model (beam search), predictions saved beside the stage's model."""
  preds = [
    t[0] for t in _generate(run, model, role, [ex.question for ex in run.test], 'eval', stage)
  ]
  graded = run.task.grade_batch(preds, run.test)
  summary = run.task.summarize(graded.scores, run.test)
  if is_writer():
    write_json(
      run.wd.path(stage, 'test_predictions.json'),
      {
        'ids': [ex.id for ex in run.test],
        'predictions': preds,
        'scores': graded.scores.tolist(),
        'failures': dict(graded.failures),
      },
    )
  return {'test_accuracy': float(np.mean(graded.scores)), 'test_summary': summary}


# -- stages ----------------------------------------------------------------------------------------


def stage_pretrain(run: Run, role: str) -> dict:
  """arith: a tiny base from its preset, trained as an LM on the arith corpus (all tokens)."""
  from flax import nnx

  from ilr_jax import presets, sharding
  from ilr_jax.model import Decoder

  c, stage = run.config, f'pretrain/{role}'
  m = c[role]
  tok = run.tok(role)
  cfg = presets.get_preset(m.preset, vocab_size=tok.vocab_size, dtype=m.dtype, remat=m.remat)
  seed = _stage_seed(c.seed, stage)
  model = sharding.create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(seed)), run.mesh)
  corpus = pretrain_corpus(c, run.task, run.test)
  bos = [tok.bos_id] if tok.bos_id is not None else []
  examples = []
  for doc in corpus:
    ids = np.asarray((bos + tok.encode(doc) + [tok.eos_id])[: c.pretrain.max_len], np.int32)
    loss_mask = np.ones_like(ids)
    loss_mask[: len(bos)] = 0
    examples.append((ids, loss_mask))
  tcfg = ml_collections.ConfigDict(
    dict(
      optimizer='adamw',
      lr=c.pretrain.lr,
      warmup_frac=0.05,
      batch_size=c.pretrain.batch_size,
      epochs=m.pretrain_steps * c.pretrain.batch_size / len(examples),
      max_len=c.pretrain.max_len,
    )
  )
  model, result = _fit(run, stage, model, examples, 'sft', tcfg)
  run.save_base(model, stage)
  return {'final_loss': _final(result, 'loss')}


def _final(result, key: str):
  metrics = getattr(result, 'final_metrics', None) or {}
  value = metrics.get(key)
  return None if value is None else float(value)


def stage_supervisor(run: Run) -> dict:
  """The weak supervisor: SFT on half A's ground truth, checkpoints kept for the evaluator data."""
  c, stage = run.config, 'supervisor'
  n = c.evaluator_train.num_checkpoints
  model = run.base('supervisor')
  examples = _sft_examples(
    run, 'supervisor', [e.question for e in run.half_a], [e.answer for e in run.half_a]
  )
  model, _ = _fit(
    run,
    stage,
    model,
    examples,
    'sft',
    c.supervisor_sft,
    train_options=dict(checkpoint_fractions=tuple((i + 1) / n for i in range(n))),
  )
  return _evaluate(run, model, 'supervisor', stage)


def _label_rows(ids, questions, labels, source, round_, score, replaced, agreed, correct, **extra):
  return dict(
    id=list(ids),
    question=list(questions),
    label=list(labels),
    source=list(source),
    round=list(round_),
    score=list(score),
    replaced=list(replaced),
    agreed=list(agreed),
    correct=list(correct),
    **extra,
  )


def _correct(run: Run, answers, examples) -> list[bool]:
  """Per answer, whether it is right: a score above 0.5. Exact-answer tasks (GSM8K, BIRD, arith)
  score 0 or 1; SaferPaca scores the judge's probability that the answer beats the reference
  response, so there 'correct' means judged better than the reference (not bool() of a
  probability, which would call almost every answer correct)."""
  scores = np.asarray(run.task.grade_batch(list(answers), list(examples)).scores, float)
  return [bool(s > 0.5) for s in scores]


def stage_weak_labels(run: Run) -> dict:
  """D0: the supervisor's answers on half B (label decoding), with provenance."""
  stage = 'weak_labels'
  model = run.load('supervisor', 'supervisor')
  qs = [e.question for e in run.half_b]
  labels = [t[0] for t in _generate(run, model, 'supervisor', qs, 'label', stage)]
  correct = _correct(run, labels, run.half_b)
  n = len(labels)
  save_label_set(
    run.wd.path(stage, 'labels'),
    _label_rows(
      [e.id for e in run.half_b],
      qs,
      labels,
      ['weak'] * n,
      [0] * n,
      [math.nan] * n,
      [False] * n,
      [False] * n,
      correct,
      valid=[run.task.is_valid_label(x) for x in labels],
    ),
  )
  return {
    'label_accuracy': float(np.mean(correct)),
    'num_labels': n,
    'num_valid': int(sum(run.task.is_valid_label(x) for x in labels)),
  }


def stage_cor_labels(run: Run) -> dict:
  """`cor`: D0 restricted to the weak labels that are correct (reliable demonstrations)."""
  d0 = load_label_set(run.wd.path('weak_labels', 'labels'))
  keep = [i for i, ok in enumerate(d0['correct']) if ok]
  save_label_set(
    run.wd.path('cor/labels', 'labels'), {k: [v[i] for i in keep] for k, v in d0.items()}
  )
  return {'label_accuracy': 1.0 if keep else math.nan, 'num_labels': len(keep)}


def stage_student(run: Run, stage: str, labels_stage: str, evaluate: bool = True) -> dict:
  """The student from its base with a fresh adapter, SFT on a label set; evaluated on test."""
  d = load_label_set(run.wd.path(labels_stage, 'labels'))
  model = run.base('student')
  examples = _sft_examples(run, 'student', d['question'], d['label'])
  if not examples:
    raise RuntimeError(f'{stage}: the label set {labels_stage} holds no valid label to train on')
  model, _ = _fit(run, stage, model, examples, 'sft', run.config.sft)
  out = {'num_train': len(examples)}
  if evaluate:
    out.update(_evaluate(run, model, 'student', stage))
  return out


def _round_of(labels_stage: str) -> int:
  """The ILR round that refines a label set: 1 for D0 (weak_labels, cor/labels), k+1 for D_k."""
  return int(labels_stage.split('/r')[1].split('/')[0]) + 1 if '/r' in labels_stage else 1


def halves_split(run: Run, labels_stage: str, n: int):
  from ilr_jax import refine

  seed = _stage_seed(run.config.seed, f'split:{labels_stage}')
  return refine.split_two(n, seed)


def stage_half(run: Run, labels_stage: str, i: int) -> dict:
  """ILR's M_i: trained from the base on half i of a label set, proposing for the other half."""
  stage = half_stage(labels_stage, i)
  d = load_label_set(run.wd.path(labels_stage, 'labels'))
  h1, h2 = halves_split(run, labels_stage, len(d['id']))
  own, other = (h1, h2) if i == 1 else (h2, h1)
  model = run.base('student')
  examples = _sft_examples(
    run, 'student', [d['question'][j] for j in own], [d['label'][j] for j in own]
  )
  model, _ = _fit(run, stage, model, examples, 'sft', run.config.sft)
  qs = [d['question'][j] for j in other]
  proposals = [t[0] for t in _generate(run, model, 'student', qs, 'proposal', stage)]
  if is_writer():
    write_json(
      run.wd.path(stage, 'proposals.json'),
      {'ids': [d['id'][j] for j in other], 'proposals': proposals},
    )
  return {'num_train': len(examples), 'num_proposals': len(proposals)}


def _scorer(run: Run, method: str):
  """Comparison feedback for a method: the trained evaluator, or ground truth for `ora`."""
  from ilr_jax import evaluator

  if method in EVALUATOR_METHODS:
    et = run.config.evaluator_train
    return evaluator.EvaluatorScorer(
      run.load('evaluator', 'evaluator'),
      run.tok('evaluator'),
      batch_size=run.config.sampling.score_batch_size,
      max_len=et.max_len,
      too_long=et.too_long,
      swap_second_order=et.swap_second_order,
      mesh=run.mesh,
      progress=False,
    )
  return evaluator.OracleScorer(run.task, run.half_b)


def stage_refine(run: Run, method: str, k: int, prev: str) -> dict:
  """ILR round k (METHOD.md steps 3-7): cross proposals, agreement, scores, threshold -> D_k."""
  from ilr_jax import refine

  stage = f'{method}/r{k}/labels'
  d = load_label_set(run.wd.path(prev, 'labels'))
  n = len(d['id'])
  proposal = [None] * n
  pos = {x: j for j, x in enumerate(d['id'])}
  for i in (1, 2):
    got = read_json(run.wd.path(half_stage(prev, i), 'proposals.json'))
    for x, p in zip(got['ids'], got['proposals']):
      proposal[pos[x]] = p
  if any(p is None for p in proposal):
    raise RuntimeError(f'{stage}: the half models proposed for {proposal.count(None)} of {n} rows')
  by_id = {e.id: e for e in run.half_b}
  examples = [by_id[x] for x in d['id']]
  scores = np.full(n, math.nan)
  if method == 'naive':
    agree = np.zeros(n, bool)
    rng = _stage_seed(run.config.seed, stage)
    decision = refine.naive_replace(n, run.config.ilr.alpha, rng)
  else:
    agree = np.asarray(run.task.agree_batch(proposal, d['label'], examples), bool)
    dis = np.flatnonzero(~agree)
    if dis.size:
      scorer = _scorer(run, method)
      scores[dis] = scorer(
        [d['question'][j] for j in dis], [d['label'][j] for j in dis], [proposal[j] for j in dis]
      )
    if method in ('orailr', 'cororailr'):
      decision = refine.oracle_replace(agree, scores > 0.5)
    else:
      decision = refine.ilr_replace(
        agree, scores, run.config.ilr.alpha, run.config.ilr.alpha_scope, run.config.ilr.floor
      )
  rep = decision.replace
  labels = [proposal[j] if rep[j] else d['label'][j] for j in range(n)]
  proposal_correct = _correct(run, proposal, examples)
  correct = [proposal_correct[j] if rep[j] else d['correct'][j] for j in range(n)]
  rows = _label_rows(
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
  return {
    'label_accuracy': float(np.mean(correct)) if n else math.nan,
    'num_labels': n,
    'num_replaced': decision.num_replaced,
    'num_agreed': decision.num_agree,
    'num_disagreed': decision.num_disagree,
    'threshold': decision.threshold,
    'replaced_wrong_to_right': int((rep & ~prev_correct & np.asarray(proposal_correct)).sum()),
    'replaced_right_to_wrong': int((rep & prev_correct & ~np.asarray(proposal_correct)).sum()),
  }


def stage_dpo_pairs(run: Run, method: str, k: int, policy_stage: str) -> dict:
  """SFT+DPO round k, data: policy k-1 samples, the pairs (1,2),(3,4),(5,6), top by confidence."""
  from ilr_jax import refine

  c, stage = run.config, f'{method}/r{k}/pairs'
  policy = run.load(policy_stage)
  qs = [e.question for e in run.half_b]
  samples = _generate(run, policy, 'student', qs, 'dpo', stage)
  ns = c.dpo.num_samples
  if any(len(s) != ns for s in samples):
    raise RuntimeError(f'{stage}: expected {ns} samples per prompt')
  flat = [a for s in samples for a in s]
  first, second = refine.dpo_pairs(len(qs), ns)
  pq = [qs[j // ns] for j in first]
  a, b = [flat[j] for j in first], [flat[j] for j in second]
  ex = [run.half_b[j // ns] for j in first]
  correct_a, correct_b = np.asarray(_correct(run, a, ex)), np.asarray(_correct(run, b, ex))
  scores = np.full(len(a), math.nan)
  if method == 'dpo':
    scores = _scorer(run, method)(pq, a, b)
    sel = refine.select_dpo_pairs(
      scores,
      c.dpo.keep_frac,
      np.asarray([run.task.is_valid_label(x) for x in a]),
      np.asarray([run.task.is_valid_label(x) for x in b]),
    )
  else:
    sel = refine.oracle_dpo_pairs(correct_a, correct_b, c.dpo.keep_frac, _stage_seed(c.seed, stage))
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
  return {
    'dpo_pairs': int(sel.num_kept),
    'dpo_candidates': int(len(a)),
    'dpo_top': int(sel.num_top),
    'dpo_pair_accuracy': float(np.mean(ch_ok[differ])) if differ.any() else None,
    'dpo_chosen_accuracy': float(np.mean(ch_ok)) if len(ch_ok) else None,
    'sample_accuracy': float(np.mean(flat_correct)),
  }


def stage_dpo_policy(run: Run, method: str, k: int, policy_stage: str) -> dict:
  """SFT+DPO round k, training: DPO from policy k-1 (reference = policy k-1), then evaluation.

  The reference log-probs are computed here, with policy k-1, before training (deterministic, so
  a resumed stage recomputes the same values).
  """
  from ilr_jax import fit
  from ilr_jax.tokens import sft_example

  c, stage = run.config, f'{method}/r{k}/policy'
  pairs = read_json(run.wd.path(f'{method}/r{k}/pairs', 'pairs.json'))
  policy = run.load(policy_stage)
  tok = run.tok('student')
  examples = [
    fit.Pair.from_examples(sft_example(tok, q, ch), sft_example(tok, q, rj))
    for q, ch, rj in zip(pairs['question'], pairs['chosen'], pairs['rejected'])
  ]
  out = {'dpo_pairs': len(examples)}
  if examples:
    examples = fit.with_reference_logps(policy, examples, batch_size=c.dpo.batch_size)
    policy, result = _fit(
      run,
      stage,
      policy,
      examples,
      'dpo',
      c.dpo,
      train_options=dict(
        dpo_beta=c.dpo.beta, lora_rank=policy.cfg.lora_rank, lora_alpha=policy.cfg.lora_alpha
      ),
    )
    out['dpo_reward_margin'] = _final(result, 'rewards/margin')
    out['dpo_reward_accuracy'] = _final(result, 'rewards/accuracy')
  else:  # no pair survived the cut: policy k is policy k-1 (orbax saves on every process)
    fit.save_params(policy, run.wd.path(stage, 'fit', 'final'), force=True)
  sync(f'policy:{stage}')
  out.update(_evaluate(run, policy, 'student', stage))
  return out


def stage_evaluator_data(run: Run) -> dict:
  """Comparison data: each kept snapshot of the supervisor's fit samples one answer per half-A
  prompt (temperature 0.6). The supervisor is exactly METHOD.md's supervisor-sized model trained
  on half A's ground truth, so its fit doubles as the evaluator-data model (one fit saved)."""
  from ilr_jax import evaluator, fit

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
  seed = _stage_seed(run.config.seed, stage)
  samples, correct = evaluator.sample_checkpoints(
    lambda: run.base('supervisor'),
    [p for _, p in snapshots],
    run.tok('supervisor'),
    run.task,
    run.half_a,
    seed=seed,
    batch_size=run.config.sampling.batch_size,
    mesh=run.mesh,
    out_dir=run.wd.path(stage, 'samples'),
  )
  data, counts = evaluator.comparison_dataset(
    [e.question for e in run.half_a],
    [e.answer for e in run.half_a],
    samples,
    correct,
    seed=seed,
    val_frac=et.val_frac,
    ids=[e.id for e in run.half_a],
  )
  if is_writer():
    evaluator.save_comparison_data(run.wd.path(stage, 'data'), data, counts)
  sync(stage)
  return {'counts': counts, 'checkpoint_accuracy': [float(np.mean(c)) for c in correct]}


def stage_evaluator(run: Run) -> dict:
  """The evaluator: the evaluator base with a 2-class head, trained on the comparison data."""
  from ilr_jax import evaluator

  stage, et = 'evaluator', run.config.evaluator_train
  data, _ = evaluator.load_comparison_data(run.wd.path('evaluator_data', 'data'))
  model = evaluator.with_score_head(
    run.base('evaluator'), seed=_stage_seed(run.config.seed, stage), mesh=run.mesh
  )
  model, result = evaluator.train_evaluator(
    model,
    run.tok('evaluator'),
    data,
    config=_train_config(et, _stage_seed(run.config.seed, stage), **_bookkeeping(run)),
    workdir=run.wd.path(stage, 'fit'),
    mesh=run.mesh,
    patience=et.patience,
    max_len=et.max_len,
    too_long=et.too_long,
    score_batch_size=run.config.sampling.score_batch_size,
  )
  return {
    'evaluator_accuracy': _final(result, 'val_pair_accuracy'),
    'evaluator_example_accuracy': _final(result, 'val_accuracy'),
  }


# -- the whole run ---------------------------------------------------------------------------------


def _execute(run: Run, wd) -> None:
  c = run.config
  steps = {
    'pretrain/supervisor': lambda: stage_pretrain(run, 'supervisor'),
    'pretrain/student': lambda: stage_pretrain(run, 'student'),
    'supervisor': lambda: stage_supervisor(run),
    'weak_labels': lambda: stage_weak_labels(run),
    'evaluator_data': lambda: stage_evaluator_data(run),
    'evaluator': lambda: stage_evaluator(run),
    'sft': lambda: stage_student(run, 'sft', 'weak_labels'),
    'cor/labels': lambda: stage_cor_labels(run),
    'cor/sft': lambda: stage_student(run, 'cor/sft', 'cor/labels'),
  }
  for m in c.methods:
    labels, model = _round0(m)
    for k in range(1, c.num_rounds + 1):
      r = f'{m}/r{k}'
      if m in ILR_METHODS:
        for i in (1, 2):
          steps.setdefault(half_stage(labels, i), functools.partial(stage_half, run, labels, i))
        steps[f'{r}/labels'] = functools.partial(stage_refine, run, m, k, labels)
        steps[f'{r}/model'] = functools.partial(stage_student, run, f'{r}/model', f'{r}/labels')
        labels = f'{r}/labels'
      elif m in DPO_METHODS:
        steps[f'{r}/pairs'] = functools.partial(stage_dpo_pairs, run, m, k, model)
        steps[f'{r}/policy'] = functools.partial(stage_dpo_policy, run, m, k, model)
        model = f'{r}/policy'
  for name in wd.stages:
    if wd.done(name):
      continue
    t0 = time.perf_counter()
    metrics = wd.run(name, steps[name])
    if is_writer():
      shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
      print(f'[ilr_jax] stage {name} done in {time.perf_counter() - t0:.1f} s: {shown}', flush=True)


def results(config, wd, partial: bool = False) -> list[dict]:
  """One row per (method, round) from the finished stages' records (see report.py).

  With `partial`, rounds whose stages have not finished are left out (a report of a run still
  going); otherwise a missing record is an error.
  """
  seed = config.seed
  rec = lambda s: wd.record(s)  # noqa: E731
  sup, weak = rec('supervisor'), rec('weak_labels')
  ev_acc = rec('evaluator')['metrics'].get('evaluator_accuracy') if wd.done('evaluator') else None
  rows = [
    dict(
      seed=seed,
      method='supervisor',
      round=0,
      test_accuracy=sup['metrics']['test_accuracy'],
      label_accuracy=weak['metrics']['label_accuracy'],
      num_labels=weak['metrics']['num_labels'],
      wall_s={'supervisor': sup['wall_s'], 'weak_labels': weak['wall_s']},
    )
  ]
  for m in ('sft',) + tuple(x for x in config.methods if x != 'sft'):
    labels, model = _round0(m)
    if partial and not (wd.done(labels) and wd.done(model)):
      continue
    r0 = dict(
      seed=seed,
      method=m,
      round=0,
      test_accuracy=rec(model)['metrics']['test_accuracy'],
      label_accuracy=rec(labels)['metrics']['label_accuracy'],
      num_labels=rec(labels)['metrics']['num_labels'],
      wall_s={model: rec(model)['wall_s']},
    )
    if m != 'sft' and m not in config.methods:
      continue
    rows.append(r0)
    if m == 'sft':
      continue
    for k in range(1, config.num_rounds + 1):
      r = f'{m}/r{k}'
      row = dict(seed=seed, method=m, round=k)
      if partial and not wd.done(f'{r}/model' if m in ILR_METHODS else f'{r}/policy'):
        break
      if m in ILR_METHODS:
        lab, mod = rec(f'{r}/labels'), rec(f'{r}/model')
        halves = [rec(half_stage(labels, i)) for i in (1, 2)]
        row.update(
          {
            x: lab['metrics'][x]
            for x in (
              'label_accuracy',
              'num_labels',
              'num_replaced',
              'num_agreed',
              'num_disagreed',
              'threshold',
            )
          }
        )
        row['test_accuracy'] = mod['metrics']['test_accuracy']
        row['wall_s'] = {
          f'{r}/labels': lab['wall_s'],
          f'{r}/model': mod['wall_s'],
          **{h['name']: h['wall_s'] for h in halves},
        }
        labels = f'{r}/labels'
      else:
        pairs, pol = rec(f'{r}/pairs'), rec(f'{r}/policy')
        row.update({x: pairs['metrics'].get(x) for x in ('dpo_pairs', 'dpo_pair_accuracy')})
        row.update({x: pol['metrics'].get(x) for x in ('dpo_reward_margin', 'dpo_reward_accuracy')})
        row['test_accuracy'] = pol['metrics']['test_accuracy']
        row['wall_s'] = {f'{r}/pairs': pairs['wall_s'], f'{r}/policy': pol['wall_s']}
      if m in EVALUATOR_METHODS:
        row['evaluator_accuracy'] = ev_acc
      rows.append(row)
  return rows


def _enable_compile_cache(path, config) -> None:
  """JAX's persistent compilation cache: every stage builds its own jitted train and sample
  functions, and those of equal shapes compile to the same program, which is then compiled once
  per run instead of once per stage (most of a CPU run's time otherwise). Not where
  compile_cache.usable says it breaks collectives (sharded CPU meshes, several CPU processes)."""
  from ilr_jax import compile_cache, sharding

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  compile_cache.enable(path, dict(mesh.shape))


def run(config, workdir: str, recompute_changed: bool = False) -> str:
  """Validate, check the workdir, run every unfinished stage, write the report; returns the table.

  Every process runs the same stages on the same data in the same order; only process 0 writes
  non-array artifacts.
  """
  import datasets

  datasets.disable_progress_bars()
  validate(config)
  wd = check_workdir(config, workdir, recompute_changed)
  if is_writer():
    write_json(wd.root / 'config.json', config.to_dict())
  if config.compile_cache:
    _enable_compile_cache(config.compile_cache_dir or wd.root / 'jax_cache', config)
  runner = Run(config, wd)
  from ilr_jax import lengths

  splits = {'train': runner.train, 'test': runner.test}
  lengths.check_max_len(config, splits, runner.tok, runner.task.decoding['label'].max_new_tokens)
  _execute(runner, wd)
  rows = report.with_other_methods(wd.root / 'results.jsonl', results(config, wd))
  methods = dict.fromkeys(r['method'] for r in rows if r['method'] not in ('supervisor', 'sft'))
  title = f'{config.task.name}: {", ".join(methods) or "sft"} (seed {config.seed})'
  table = ''
  if is_writer():
    table = report.write_report(wd.root, rows, title=title)
  sync('report')
  return table
