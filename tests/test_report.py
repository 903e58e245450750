"""Report: results.jsonl, the markdown table, mean and spread over seeds, the plot."""

import pytest

from ilr_jax import report


def _rows():
  rows = []
  for seed, shift in ((0, 0.0), (1, 0.1)):
    rows += [
      dict(seed=seed, method='sft', round=0, test_accuracy=0.30 + shift, label_accuracy=0.25),
      dict(
        seed=seed,
        method='ilr',
        round=1,
        test_accuracy=0.40 + shift,
        label_accuracy=0.35,
        num_replaced=3,
        num_agreed=10,
        wall_s={'ilr/r1/model': 1.5},
      ),
      dict(
        seed=seed,
        method='dpo',
        round=1,
        test_accuracy=0.20 + shift,
        dpo_pairs=4,
        dpo_pair_accuracy=None,
        dpo_reward_margin=0.01,
      ),
    ]
  return rows


def test_aggregate_mean_and_std():
  agg = report.aggregate(_rows())
  assert [(r['method'], r['round']) for r in agg] == [('sft', 0), ('ilr', 1), ('dpo', 1)]
  ilr = agg[1]
  assert ilr['test_accuracy'] == pytest.approx(0.45)
  assert ilr['test_accuracy_std'] == pytest.approx(0.05)
  assert ilr['test_accuracy_n'] == 2 and ilr['seeds'] == [0, 1]
  assert 'dpo_pair_accuracy' not in agg[2]  # None in every seed: no statistic


def test_write_report(tmp_path):
  table = report.write_report(tmp_path, _rows(), title='t')
  assert '0.450 ± 0.050' in table
  lines = table.splitlines()
  assert lines[0].startswith('| method | round | test acc | label acc')
  assert len(lines) == 2 + 3
  back = report.read_results(tmp_path / 'results.jsonl')
  assert len(back) == 6 and back[0]['method'] == 'sft'
  md = (tmp_path / 'report.md').read_text()
  assert '## Per seed' in md and 'accuracy.png' in md
  png = (tmp_path / 'accuracy.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000
  assert list((tmp_path / 'tb').rglob('events.out.tfevents*'))


def test_single_seed_table_has_no_spread():
  rows = [r for r in _rows() if r['seed'] == 0]
  table = report.format_table(rows)
  assert '±' not in table and '| 0.400 |' in table


def test_feedback_accuracy_column_follows_evaluator_accuracy(tmp_path):
  rows = [
    dict(seed=0, method='sft', round=0, test_accuracy=0.3),
    dict(
      seed=0,
      method='ilr',
      round=1,
      test_accuracy=0.4,
      evaluator_accuracy=0.8,
      feedback_accuracy=0.625,
      feedback_items=16,
    ),
  ]
  header = report.format_table(rows).splitlines()[0]
  assert '| evaluator acc | feedback acc |' in header
  assert '| 0.625 |' in report.format_table(rows)
  # A column with no value (older results) is hidden.
  old = [{k: v for k, v in r.items() if not k.startswith('feedback')} for r in rows]
  assert 'feedback acc' not in report.format_table(old)
  report.write_results(tmp_path / 'results.jsonl', rows)
  back = report.read_results(tmp_path / 'results.jsonl')
  assert back[1]['feedback_accuracy'] == 0.625 and back[1]['feedback_items'] == 16


def _claim_rows(diffs):
  """Rows of seeds whose SFT is 0.40 and whose last DPO round is 0.40 + diff."""
  rows = []
  for seed, diff in enumerate(diffs):
    rows += [
      dict(seed=seed, method='supervisor', round=0, test_accuracy=0.1, label_accuracy=0.2),
      dict(seed=seed, method='sft', round=0, test_accuracy=0.40),
      dict(seed=seed, method='dpo', round=1, test_accuracy=0.9),
      dict(seed=seed, method='dpo', round=2, test_accuracy=0.40 + diff),
    ]
  return rows


def test_claims_paired_differences_intervals_and_verdicts():
  res = {r['claim']: r for r in report.claim_results(_claim_rows([-0.10, -0.12, -0.08]))}
  # Only the claims whose methods are present; the last round is the highest one.
  assert set(res) == {report.CLAIMS[0].name, report.CLAIMS[1].name}
  dpo = res[report.CLAIMS[1].name]
  assert dpo['per_seed'] == pytest.approx({0: -0.10, 1: -0.12, 2: -0.08})
  assert dpo['mean'] == pytest.approx(-0.10)
  # t(0.975, 2) = 4.303, sd 0.02, n 3: half-width 0.0497.
  assert dpo['hi'] - dpo['mean'] == pytest.approx(4.3027 * 0.02 / 3**0.5, rel=1e-3)
  assert dpo['verdict'] == 'holds'  # DPO below SFT, the interval below 0
  assert res[report.CLAIMS[0].name]['verdict'] == 'holds'  # SFT 0.40 > labels 0.20
  up = {r['claim']: r for r in report.claim_results(_claim_rows([0.10, 0.12, 0.08]))}
  assert up[report.CLAIMS[1].name]['verdict'] == 'does not hold'
  mixed = {r['claim']: r for r in report.claim_results(_claim_rows([0.10, -0.12, 0.0]))}
  assert mixed[report.CLAIMS[1].name]['verdict'] == 'not separable here'
  one = report.claim_results(_claim_rows([0.1]))
  assert all(r['verdict'] == 'not separable here' and r['n'] == 1 for r in one)
  text = report.format_claims(report.claim_results(_claim_rows([-0.10, -0.12, -0.08])))
  assert 'dpo rlast test - sft r0 test' in text and '[-0.150, -0.050]' in text


def test_report_of_several_seeds_has_the_claims(tmp_path):
  rows = _claim_rows([-0.10, -0.12, -0.08])
  report.write_report(tmp_path, rows)
  md = (tmp_path / 'report.md').read_text()
  assert "## The paper's claims" in md and 'SFT+DPO does not improve on SFT' in md
