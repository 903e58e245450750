"""Results of a pipeline run: results.jsonl, the report.md table, accuracy.png, TensorBoard scalars.

Several runs (seeds) into one report: `python -m ilr_jax.report --workdirs=A,B,C --out=DIR`.

One result row per (seed, method, round), a flat JSON object:
  seed, method, round            which run ('sft', 'ilr', 'naive', 'dpo', 'orailr', ... ; round 0
                                 is the SFT model on D0 for every method)
  test_accuracy                  the round's model on the test split (beam search)
  label_accuracy                 accuracy of the round's label set D_r (ILR-type methods; the weak
                                 labels D0 at round 0), None where there is no label set
  num_labels, num_replaced, num_agreed, num_disagreed, threshold   ILR / naive refinement counts
  evaluator_accuracy             the evaluator's val_pair_accuracy: how often it ranks the better
                                 side of a validation pair above the worse (both orders read); a
                                 tie (score 0.5 exactly) is half a hit, pairs whose two sides are
                                 the same text are left out
  feedback_accuracy, feedback_items   the round's feedback on its own items, the number that
                                 matters: over the items with exactly one correct side, how often
                                 s = P(second better than first) prefers the correct one (a tie is
                                 half a hit), and how many items that is. ILR family: the
                                 disagreeing (current label, proposal) items; SFT+DPO: every
                                 scored candidate pair, before the keep_frac cut. None where
                                 nothing is compared (naive, oracle DPO) or in older records
  dpo_pairs, dpo_reward_margin, dpo_reward_accuracy   SFT+DPO rounds
  dpo_pair_accuracy              of the kept DPO pairs with exactly one correct side, how often the
                                 chosen answer is the correct one (pairs whose two sides are
                                 equally correct are left out)
  wall_s                         {stage name: seconds} of the stages that made this row

`aggregate` turns rows of several seeds into mean and standard deviation per (method, round).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ilr_jax import methods as methods_lib
from ilr_jax import workdir as wdlib

TABLE_COLUMNS = (
  ('method', 'method'),
  ('round', 'round'),
  ('test_accuracy', 'test acc'),
  ('label_accuracy', 'label acc'),
  ('num_replaced', 'replaced'),
  ('num_agreed', 'agreed'),
  ('evaluator_accuracy', 'evaluator acc'),
  ('feedback_accuracy', 'feedback acc'),
  ('dpo_pairs', 'DPO pairs'),
  ('dpo_pair_accuracy', 'DPO pair acc'),
  ('dpo_reward_margin', 'DPO margin'),
)


def write_results(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
  """results.jsonl: one JSON object per row, written atomically."""
  text = ''.join(json.dumps(wdlib.jsonable(dict(r)), sort_keys=True) + '\n' for r in rows)
  wdlib.write_text(path, text)


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
  return wdlib.load(
    path,
    lambda p: [json.loads(line) for line in p.read_text().splitlines() if line],
    'results file',
  )


def with_other_methods(
  path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
  """`rows` plus the rows of other methods already in results.jsonl at `path` (an earlier run of
  another method in the same workdir), so that runs of different methods accumulate."""
  rows = [dict(r) for r in rows]
  if not pathlib.Path(path).exists():
    return rows
  mine = {r['method'] for r in rows}
  return [r for r in read_results(path) if r['method'] not in mine] + rows


def _num(x: Any) -> float:
  return float('nan') if x is None else float(x)


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Mean and spread over seeds: one row per (method, round) with `<field>` the mean,
  `<field>_std` the population standard deviation and `<field>_n` the number of seeds it has.

  Numeric fields only; fields missing or None in a seed's row are left out of that field's stats.
  """
  groups: dict[tuple[str, int], list[Mapping[str, Any]]] = collections.defaultdict(list)
  for r in rows:
    groups[(r['method'], int(r['round']))].append(r)
  out = []
  for (method, rnd), rs in groups.items():
    agg: dict[str, Any] = {'method': method, 'round': rnd, 'seeds': sorted(r['seed'] for r in rs)}
    fields = {
      k
      for r in rs
      for k, v in r.items()
      if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ('seed', 'round')
    }
    for k in sorted(fields):
      vals = np.array([_num(r.get(k)) for r in rs], dtype=float)
      vals = vals[~np.isnan(vals)]
      if vals.size:
        agg[k], agg[f'{k}_std'], agg[f'{k}_n'] = float(vals.mean()), float(vals.std()), vals.size
    out.append(agg)
  return _sorted(out)


def _sorted(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  order = {m: i for i, m in enumerate(methods_lib.DISPLAY_ORDER)}
  return sorted(
    (dict(r) for r in rows),
    key=lambda r: (order.get(r['method'], 99), r['method'], int(r['round']), r.get('seed', 0)),
  )


def _fmt(row: Mapping[str, Any], key: str) -> str:
  v = row.get(key)
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return ''
  if isinstance(v, float):
    std = row.get(f'{key}_std')
    s = f'{v:.3f}' if abs(v) < 10 else f'{v:.1f}'
    return f'{s} ± {std:.3f}' if std is not None and row.get(f'{key}_n', 1) > 1 else s
  return str(v)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """A markdown table of the rows (or of `aggregate`'s rows, shown as mean ± std)."""
  cols = [
    (k, h) for k, h in TABLE_COLUMNS if k in ('method', 'round') or any(_fmt(r, k) for r in rows)
  ]
  if rows and 'seed' in rows[0] and 'seeds' not in rows[0]:
    cols.insert(0, ('seed', 'seed'))
  lines = [
    '| ' + ' | '.join(h for _, h in cols) + ' |',
    '|' + '|'.join('---' if k in ('method', 'seed') else '---:' for k, _ in cols) + '|',
  ]
  for r in rows:
    lines.append('| ' + ' | '.join(_fmt(r, k) for k, _ in cols) + ' |')
  return '\n'.join(lines) + '\n'


# -- the paper's claims over seeds -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Claim:
  """A claim as a paired difference per seed: `a` minus `b`, each (method, round, field) with round
  -1 the method's last round; `expect` '>' (a is above b) or '<' (a is below b)."""

  name: str
  a: tuple[str, int, str]
  b: tuple[str, int, str]
  expect: str


LAST = -1


def _test(method: str, rnd: int = LAST) -> tuple[str, int, str]:
  return (method, rnd, 'test_accuracy')


SFT = _test('sft', 0)
CLAIMS = (
  Claim('1. SFT beats the labels it was trained on', SFT, ('supervisor', 0, 'label_accuracy'), '>'),
  Claim('2. SFT+DPO does not improve on SFT', _test('dpo'), SFT, '<'),
  Claim('3a. SFT+ILR improves on SFT', _test('ilr'), SFT, '>'),
  Claim('3b. SFT+ILR ends above SFT+DPO', _test('ilr'), _test('dpo'), '>'),
  Claim('4. naive ILR degrades', _test('naive'), SFT, '<'),
  Claim('control: SFT+DPO with oracle pairs improves on SFT', _test('oradpo'), SFT, '>'),
  Claim('control: SFT+ILR with oracle comparisons improves on SFT', _test('orailr'), SFT, '>'),
)


def _value(rows, seed, method: str, rnd: int, field: str) -> float | None:
  mine = [r for r in rows if r.get('seed', 0) == seed and r['method'] == method]
  if not mine:
    return None
  rnd = max(int(r['round']) for r in mine) if rnd == LAST else rnd
  got = [r.get(field) for r in mine if int(r['round']) == rnd]
  return None if not got or got[0] is None else float(got[0])


def claim_results(rows: Sequence[Mapping[str, Any]], claims=CLAIMS) -> list[dict[str, Any]]:
  """Per claim: the paired difference a - b of every seed that has both, their mean, a 95%
  t-interval over seeds (Student's t, n - 1 degrees of freedom; none for one seed) and a verdict:
  'holds' when the interval lies on the expected side of 0, 'does not hold' when it lies on the
  other side, 'not separable here' when it contains 0 (or there are fewer than 2 seeds). A claim
  whose methods are not in the rows is left out."""
  from scipy import stats

  seeds = sorted({r.get('seed', 0) for r in rows})
  out = []
  for c in claims:
    diffs = {}
    for seed in seeds:
      a, b = _value(rows, seed, *c.a), _value(rows, seed, *c.b)
      if a is not None and b is not None and not (math.isnan(a) or math.isnan(b)):
        diffs[seed] = a - b
    if not diffs:
      continue
    d = np.array(list(diffs.values()))
    mean, n = float(d.mean()), d.size
    lo = hi = math.nan
    if n > 1:
      half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n))
      lo, hi = mean - half, mean + half
    above, below = lo > 0, hi < 0  # False for NaN bounds
    if not (above or below):
      verdict = 'not separable here'
    elif above == (c.expect == '>'):
      verdict = 'holds'
    else:
      verdict = 'does not hold'
    out.append(dict(claim=c.name, mean=mean, lo=lo, hi=hi, n=n, per_seed=diffs, verdict=verdict))
  return out


def _difference(c: Claim) -> str:
  def side(m, rnd, field):
    return f'{m} r{"last" if rnd == LAST else rnd} {field.replace("_accuracy", "")}'

  return f'{side(*c.a)} - {side(*c.b)}'


def format_claims(results: Sequence[Mapping[str, Any]], claims=CLAIMS) -> str:
  """A markdown table of `claim_results`: the difference, its mean, 95% interval, per-seed values
  and the verdict."""
  by_name = {c.name: c for c in claims}
  lines = [
    '| claim | difference | mean | 95% interval | per seed | verdict |',
    '|---|---|---:|---|---|---|',
  ]
  for r in results:
    interval = '' if math.isnan(r['lo']) else f'[{r["lo"]:+.3f}, {r["hi"]:+.3f}]'
    per_seed = ', '.join(f'{s}: {v:+.3f}' for s, v in r['per_seed'].items())
    lines.append(
      f'| {r["claim"]} | {_difference(by_name[r["claim"]])} | {r["mean"]:+.3f} | {interval} | '
      f'{per_seed} | {r["verdict"]} |'
    )
  return '\n'.join(lines) + '\n'


def _refines_labels(method: str) -> bool:
  """Whether a row's method has a label set per round (the ILR family)."""
  m = methods_lib.METHODS.get(method)
  return m is not None and m.family == 'ilr'


def plot_accuracy(
  rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = ''
) -> None:
  """The paper's figures: test accuracy per round per method (left) and, for ILR-type methods,
  label accuracy per round (right). Rows of several seeds are shown as mean with std error bars."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  agg = aggregate([dict(r, seed=r.get('seed', 0)) for r in rows])
  fig, (ax_test, ax_label) = plt.subplots(1, 2, figsize=(13, 4.2))
  methods = list(dict.fromkeys(r['method'] for r in agg))  # aggregate's order: sft, ilr, ...
  # One colour per method in both panels (matplotlib's cycle would restart on the right).
  colors = {m: f'C{i % 10}' for i, m in enumerate(methods)}
  for method in methods:
    rs = [r for r in agg if r['method'] == method]
    for ax, key in ((ax_test, 'test_accuracy'), (ax_label, 'label_accuracy')):
      if key == 'label_accuracy' and not _refines_labels(method):
        continue
      pts = [(r['round'], r[key], r.get(f'{key}_std', 0.0)) for r in rs if key in r]
      if not pts:
        continue
      x, y, e = map(np.array, zip(*sorted(pts)))
      marker = 'o' if len(x) > 1 else 's'
      ax.errorbar(x, y, yerr=e, marker=marker, capsize=3, label=method, color=colors[method])
  ax_test.set(title='test accuracy', xlabel='round', ylabel='accuracy')
  ax_label.set(title='label accuracy (ILR)', xlabel='round', ylabel='accuracy of D_r')
  for ax in (ax_test, ax_label):
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize='small', loc='upper left', bbox_to_anchor=(1.0, 1.0))
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  with wdlib.atomic_file(path) as tmp:
    fig.savefig(tmp, dpi=110, format=pathlib.Path(path).suffix[1:])
  plt.close(fig)


def write_tensorboard(log_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
  """Scalars `<method>/<field>` at step = round, one run folder per seed."""
  from tensorboardX import SummaryWriter

  by_seed = collections.defaultdict(list)
  for r in rows:
    by_seed[r.get('seed', 0)].append(r)
  for seed, rs in by_seed.items():
    with SummaryWriter(os.fspath(pathlib.Path(log_dir) / f'seed_{seed}')) as w:
      for r in rs:
        for k, v in r.items():
          if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ('seed', 'round'):
            w.add_scalar(f'{r["method"]}/{k}', float(v), int(r['round']))


def write_report(
  out_dir: str | os.PathLike,
  rows: Sequence[Mapping[str, Any]],
  title: str = 'ILR vs SFT+DPO',
  notes: str = '',
) -> str:
  """results.jsonl, report.md (per-seed table, and mean ± std when several seeds), accuracy.png
  and tb/ under `out_dir`. Returns the table text that was printed into report.md."""
  out = pathlib.Path(out_dir)
  rows = _sorted(rows)
  write_results(out / 'results.jsonl', rows)
  seeds = sorted({r.get('seed', 0) for r in rows})
  table = format_table(aggregate(rows)) if len(seeds) > 1 else format_table(rows)
  parts = [f'# {title}\n']
  if notes:
    parts.append(notes.strip() + '\n')
  if len(seeds) > 1:
    parts.append(f'Mean ± standard deviation over seeds {seeds}.\n')
  parts += [table, '\n![accuracy per round](accuracy.png)\n']
  if len(seeds) > 1:
    claims = claim_results(rows)
    if claims:
      parts += [
        "\n## The paper's claims\n\n",
        'Paired differences over seeds (test accuracy at round 0 or at the last round), the mean '
        "with a 95% t-interval; a claim holds when the interval lies on the claim's side of 0.\n\n",
        format_claims(claims),
      ]
    parts += ['\n## Per seed\n\n', format_table(rows)]
  wdlib.write_text(out / 'report.md', ''.join(p if p.endswith('\n') else p + '\n' for p in parts))
  plot_accuracy(rows, out / 'accuracy.png', title=title)
  write_tensorboard(out / 'tb', rows)
  return table


def partial_results(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """Rows of the finished rounds of a run that may still be going (from its stage records)."""
  import ml_collections

  from ilr_jax import graph

  root = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(wdlib.read_json(root / 'config.json'))
  wd = wdlib.Workdir(root, config.to_dict(), graph.plan(config))
  return graph.results(config, wd, partial=True)


def combine(
  workdirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, title: str, partial=False
) -> str:
  """One report over several runs (e.g. seeds): their results.jsonl rows, mean ± std tables and
  the claims' paired differences. Returns the mean ± std table and the claims table (printed).

  With `partial`, a run without results.jsonl contributes the rounds it has finished so far.
  """
  rows = []
  for wd in workdirs:
    path = pathlib.Path(wd) / 'results.jsonl'
    if path.exists():
      rows += read_results(path)
    elif partial:
      rows += partial_results(wd)
    else:
      raise FileNotFoundError(f'{path} does not exist: has the run in {wd} finished?')
  pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
  table = write_report(out_dir, rows, title=title)
  claims = claim_results(rows)
  return table + ('\n' + format_claims(claims) if claims else '')


def _main(argv):
  del argv
  from absl import flags

  f = flags.FLAGS
  print(combine(f.workdirs, f.out, f.title, partial=f.partial), flush=True)


if __name__ == '__main__':
  from absl import app, flags

  flags.DEFINE_list('workdirs', None, 'finished pipeline workdirs to combine (e.g. one per seed)')
  flags.DEFINE_string('out', None, 'where results.jsonl, report.md and accuracy.png go')
  flags.DEFINE_string('title', 'ILR vs SFT+DPO, mean over seeds', 'report title')
  flags.DEFINE_bool('partial', False, 'include the finished rounds of runs still going')
  flags.mark_flags_as_required(['workdirs', 'out'])
  app.run(_main)
