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
