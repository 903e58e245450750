"""The evaluator's comparison data: pairs from graded samples, the split, save and load.

The whole build from a fit's snapshots (sampling included) is tested in test_evaluator.py, beside
the tiny models it uses.
"""

import pytest

from ilr_jax import comparisons, evaluator_data


def test_comparison_dataset_split_and_counts(tmp_path):
  n = 40
  questions = [f'q{j}' for j in range(n)]
  refs = [f'gt{j}' for j in range(n)]
  # 3 checkpoints, correctness by a fixed pattern, and 5 questions with no correct sample.
  correct = [[(j + i) % 3 != 0 for j in range(n)] for i in range(3)]
  for c in correct:
    c[:5] = [False] * 5
  samples = [[f's{i}q{j}' for j in range(n)] for i in range(3)]
  data, counts = evaluator_data.comparison_dataset(questions, refs, samples, correct, seed=1)
  assert set(data) == {'train', 'validation'}
  assert counts['train']['questions'] == 36 and counts['validation']['questions'] == 4
  for split in data:
    rows = data[split].to_list()
    c = counts[split]
    assert c['examples'] == len(rows) == 2 * c['pairs']
    assert c['pairs'] == sum(c[k] for k in comparisons.PAIR_KINDS)
    # Both examples of a pair sit together: better first -> REJECT, then worse first -> ACCEPT.
    for first, second in zip(rows[::2], rows[1::2]):
      assert (first['label'], second['label']) == (comparisons.REJECT, comparisons.ACCEPT)
      assert (first['a'], first['b']) == (second['b'], second['a'])
      assert first['text'] == comparisons.comparison_prompt(
        first['question'], first['a'], first['b']
      )
      if first['kind'] != 'correct>wrong':
        assert first['a'] == refs[int(first['question_id'])]
  assert all(counts['train'][k] + counts['validation'][k] > 0 for k in comparisons.PAIR_KINDS)
  train_q = {r['question_id'] for r in data['train']}
  assert not train_q & {r['question_id'] for r in data['validation']}
  again, _ = evaluator_data.comparison_dataset(questions, refs, samples, correct, seed=1)
  assert again['train'].to_list() == data['train'].to_list()
  evaluator_data.save_comparison_data(tmp_path / 'evaluator_data', data, counts)
  loaded, loaded_counts = evaluator_data.load_comparison_data(tmp_path / 'evaluator_data')
  assert loaded_counts == counts and loaded['validation'].to_list() == data['validation'].to_list()
  # One question: floor(0.9 * 1) = 0 train questions, and the empty split keeps its columns.
  one, one_counts = evaluator_data.comparison_dataset(['q'], ['gt'], [['s']], [[False]])
  assert len(one['train']) == 0 and one_counts['train']['pairs'] == 0
  assert one['train'].column_names == data['train'].column_names and len(one['validation']) == 2
  with pytest.raises(ValueError, match='checkpoint 1 has'):
    evaluator_data.comparison_dataset(questions, refs, [samples[0], samples[1][:3]], correct[:2])


def test_identical_pairs_are_dropped_unless_kept():
  # Checkpoints that reproduce the ground truth make (GT > correct) pairs of one text twice:
  # identical inputs with opposite labels. They are drawn as before, then dropped and counted.
  n = 30
  questions = [f'q{j}' for j in range(n)]
  refs = [f'gt{j}' for j in range(n)]
  samples = [[f'gt{j}' if j % 2 else f's{i}q{j}' for j in range(n)] for i in range(2)]
  correct = [[j % 3 != 0 for j in range(n)] for _ in range(2)]
  kept, kept_counts = evaluator_data.comparison_dataset(
    questions, refs, samples, correct, seed=2, keep_identical=True
  )
  dropped, counts = evaluator_data.comparison_dataset(questions, refs, samples, correct, seed=2)
  for split in ('train', 'validation'):
    rows = dropped[split].to_list()
    assert all(r['a'].strip() != r['b'].strip() for r in rows)
    all_rows = kept[split].to_list()
    same = [r for r in all_rows if r['a'] == r['b']]
    assert counts[split]['identical_dropped'] == len(same) // 2
    assert kept_counts[split]['identical_dropped'] == 0
    # Every other pair is unchanged: the draws do not depend on the option.
    assert rows == [r for r in all_rows if r['a'] != r['b']]
    assert counts[split]['pairs'] == kept_counts[split]['pairs'] - len(same) // 2
  assert counts['train']['identical_dropped'] > 0
