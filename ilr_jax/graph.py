"""The stage graph of a run, declared once: every stage with its config keys, inputs, body and
the result rows it contributes. The plan (workdir.py), the executor (pipeline.py) and the result
rows (`results`, report.py) all walk this one structure.

Stages (METHOD.md), each a resumable unit with outputs under the workdir:

  pretrain/<role>              arith only: a tiny base pretrained on the arith corpus
  supervisor                   the weak supervisor, SFT on half A's ground truth
  weak_labels                  its labels on half B: D0 (label set, with provenance)
  evaluator_data, evaluator    comparison data from the supervisor's snapshots; the classifier
  sft                          round 0: the student SFT on D0, evaluated on test
  cor/labels, cor/sft          methods with d0='correct': D0 restricted to correct weak labels
  halves/<labels>/m1, m2       ILR-family methods: half-data models from the base on a label set,
                               each proposing for the other half (shared by methods that refine
                               the same labels: round 1 of ilr, naive and orailr)
  <m>/r<k>/labels, model       ILR round k: the refined label set D_k; the student on it
  <m>/r<k>/pairs, policy       SFT+DPO round k: pairs from policy k-1; DPO from policy k-1

Every stage loads its inputs from disk (never from another stage's memory), so a resumed run
computes the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ilr_jax import methods as methods_lib
from ilr_jax.workdir import Stage

# Config keys each kind of stage depends on (beyond those of the stages it reads from). The mesh,
# batch sizes of inference and the debug section are deliberately absent: they do not change
# results, so a run may resume on a host of another shape.
DATA_KEYS = ('seed', 'task')
STUDENT_KEYS = ('student', 'sft')
# Metrics of the comparing stages (<m>/r<k>/labels, <m>/r<k>/pairs) that older records lack.
FEEDBACK_KEYS = ('feedback_accuracy', 'feedback_items')


@dataclasses.dataclass(frozen=True)
class Contribution:
  """What a stage adds to one result row (method, round).

  keys: metrics copied from the stage's record; `optional` ones may be missing (None).
  wall: whether the row's wall_s reports the stage's time. needed: whether the row exists only
  once the stage has finished (else a missing record gives None for its keys).
  """

  method: str
  round: int
  keys: tuple[str, ...] = ()
  optional: tuple[str, ...] = ()
  wall: bool = True
  needed: bool = True


@dataclasses.dataclass
class Node:
  """A stage: its workdir.Stage (name, config keys, inputs), its body and its result rows."""

  stage: Stage
  body: Callable[..., dict]
  args: tuple = ()
  rows: list[Contribution] = dataclasses.field(default_factory=list)

  @property
  def name(self) -> str:
    return self.stage.name

  def run(self, run) -> dict:
    return self.body(run, *self.args)


class Graph:
  """The stages of a configured run, upstream before downstream (module docstring)."""

  def __init__(self):
    self.nodes: dict[str, Node] = {}

  def add(self, name, body, *args, keys=(), after=()) -> Node:
    node = Node(Stage(name, keys=tuple(keys), after=tuple(after)), body, args)
    known = self.nodes.setdefault(name, node)  # a shared stage (cor/labels, halves) comes once
    if (known.stage, known.body, known.args) != (node.stage, node.body, node.args):
      raise ValueError(f'stage {name} is declared twice with different keys, inputs or body')
    return known

  def contribute(self, name: str, method: str, rnd: int, *keys, **options) -> None:
    self.nodes[name].rows.append(Contribution(method, rnd, keys, **options))

  def stages(self) -> list[Stage]:
    return [n.stage for n in self.nodes.values()]


# The round-0 (label-set stage, model stage) of each methods.D0 choice.
D0_STAGES = {'weak': ('weak_labels', 'sft'), 'correct': ('cor/labels', 'cor/sft')}


def _base_after(config, role: str) -> tuple[str, ...]:
  from ilr_jax.context import pretrain_stage

  return (pretrain_stage(role),) if config[role].init == 'pretrain' else ()


def build(config) -> Graph:
  """Every stage of the configured run and the result rows they make."""
  from ilr_jax import label_stages, supervisor_stages

  g = Graph()
  run_methods = methods_lib.of_config(config)
  for role in ('supervisor', 'student'):
    if config[role].init == 'pretrain':
      keys = DATA_KEYS + (
        'pretrain',
        f'{role}.preset',
        f'{role}.pretrain_steps',
        f'{role}.pretrain_comparison_frac',
        f'{role}.tokenizer',
      )
      g.add(f'pretrain/{role}', supervisor_stages.pretrain, role, keys=keys)
  sup_keys = DATA_KEYS + ('supervisor', 'supervisor_sft', 'evaluator_train.num_checkpoints')
  g.add(
    'supervisor',
    supervisor_stages.supervisor,
    keys=sup_keys,
    after=_base_after(config, 'supervisor'),
  )
  g.add('weak_labels', supervisor_stages.weak_labels, after=('supervisor',))
  g.contribute('supervisor', 'supervisor', 0, 'test_accuracy')
  g.contribute('weak_labels', 'supervisor', 0, 'label_accuracy', 'num_labels')
  if any(m.uses_evaluator for m in run_methods):
    g.add(
      'evaluator_data',
      supervisor_stages.evaluator_data,
      keys=('evaluator_train',),
      after=('supervisor',),
    )
    g.add(
      'evaluator',
      supervisor_stages.evaluator,
      keys=('evaluator', 'evaluator_train'),
      after=('evaluator_data',) + _base_after(config, 'evaluator'),
    )
  base = _base_after(config, 'student')
  # Round 0 of every method; SFT's row is always reported, the reference of every other row.
  d0 = D0_STAGES
  shown = [methods_lib.get('sft')] + [m for m in run_methods if m.name != 'sft']
  for m in shown:
    labels, model = d0[m.d0]
    if m.d0 == 'correct':
      g.add('cor/labels', label_stages.cor_labels, after=('weak_labels',))
    g.add(model, label_stages.student, model, labels, keys=STUDENT_KEYS, after=(labels,) + base)
    g.contribute(labels, m.name, 0, 'label_accuracy', 'num_labels', wall=False)
    g.contribute(model, m.name, 0, 'test_accuracy')
  # Rounds 1..num_rounds of each method, each round reading the one before.
  for m in run_methods:
    if not m.has_rounds:
      continue
    labels, model = d0[m.d0]
    for k in range(1, config.num_rounds + 1):
      if m.family == 'ilr':
        labels = _ilr_round(g, m, k, labels, base)
      else:
        model = _dpo_round(g, m, k, model)
      if m.uses_evaluator:
        g.contribute(
          'evaluator', m.name, k, optional=('evaluator_accuracy',), wall=False, needed=False
        )
  return g


def final_stages(m: methods_lib.Method, num_rounds: int) -> tuple[str, str]:
  """(label-set stage, model stage) of a method's last round."""
  labels, model = D0_STAGES[m.d0]
  if not (num_rounds and m.has_rounds):
    return labels, model
  r = f'{m.name}/r{num_rounds}'
  if m.family == 'ilr':
    return f'{r}/labels', f'{r}/model'
  return labels, f'{r}/policy'  # SFT+DPO trains on pairs: its label set stays D0


def _scorer_after(m: methods_lib.Method) -> tuple[str, ...]:
  return ('evaluator',) if m.uses_evaluator else ()


def _feedback_keys(m: methods_lib.Method) -> tuple[str, ...]:
  """Config keys of a comparing stage beyond its own section: a judge's identity."""
  from ilr_jax.schema import JUDGE_RESULT_KEYS

  return JUDGE_RESULT_KEYS if m.feedback == 'judge' else ()


def _ilr_round(g: Graph, m, k: int, labels: str, base) -> str:
  """Stages of ILR round k on the label set `labels`; returns the refined set's stage."""
  from ilr_jax import label_stages

  halves = tuple(label_stages.half_stage(labels, i) for i in (1, 2))
  for i, h in enumerate(halves, 1):
    g.add(h, label_stages.half, labels, i, keys=STUDENT_KEYS, after=(labels,) + base)
  r = f'{m.name}/r{k}'
  g.add(
    f'{r}/labels',
    label_stages.refine_labels,
    m,
    k,
    labels,
    keys=('ilr',) + _feedback_keys(m),
    after=halves + _scorer_after(m),
  )
  g.add(
    f'{r}/model',
    label_stages.student,
    f'{r}/model',
    f'{r}/labels',
    keys=STUDENT_KEYS,
    after=(f'{r}/labels',) + base,
  )
  refine_keys = (
    'label_accuracy',
    'num_labels',
    'num_replaced',
    'num_agreed',
    'num_disagreed',
    'threshold',
  )
  g.contribute(f'{r}/labels', m.name, k, *refine_keys, optional=FEEDBACK_KEYS)
  g.contribute(f'{r}/model', m.name, k, 'test_accuracy')
  for h in halves:
    g.contribute(h, m.name, k)
  return f'{r}/labels'


def _dpo_round(g: Graph, m, k: int, policy: str) -> str:
  """Stages of SFT+DPO round k from the policy stage `policy`; returns the new policy's stage."""
  from ilr_jax import dpo_stages

  r = f'{m.name}/r{k}'
  g.add(
    f'{r}/pairs',
    dpo_stages.pairs,
    m,
    k,
    policy,
    keys=('dpo',) + _feedback_keys(m),
    after=(policy,) + _scorer_after(m),
  )
  g.add(f'{r}/policy', dpo_stages.policy, m, k, policy, keys=('dpo',), after=(f'{r}/pairs',))
  g.contribute(f'{r}/pairs', m.name, k, optional=('dpo_pairs', 'dpo_pair_accuracy') + FEEDBACK_KEYS)
  g.contribute(
    f'{r}/policy', m.name, k, 'test_accuracy', optional=('dpo_reward_margin', 'dpo_reward_accuracy')
  )
  return f'{r}/policy'


def plan(config) -> list[Stage]:
  """Every stage of the configured run, upstream before downstream."""
  return build(config).stages()


def results(config, wd, partial: bool = False) -> list[dict]:
  """One row per (method, round) from the finished stages' records (fields: report.py).

  With `partial`, rows whose stages have not all finished are left out (a report of a run still
  going); otherwise a missing record is an error.
  """
  rows: dict[tuple[str, int], list[tuple[str, Contribution]]] = {}
  for node in build(config).nodes.values():
    for c in node.rows:
      rows.setdefault((c.method, c.round), []).append((node.name, c))
  out = []
  for (method, rnd), parts in rows.items():
    if partial and not all(wd.done(s) for s, c in parts if c.needed):
      continue
    row = dict(seed=config.seed, method=method, round=rnd, wall_s={})
    for stage, c in parts:
      if not c.needed and not wd.done(stage):
        row.update({k: None for k in c.keys + c.optional})
        continue
      rec = wd.record(stage)
      row.update({k: rec['metrics'][k] for k in c.keys})
      row.update({k: rec['metrics'].get(k) for k in c.optional})
      if c.wall:
        row['wall_s'][stage] = rec['wall_s']
    out.append(row)
  return out
