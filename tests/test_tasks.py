"""Tests for ilr_jax.tasks: loading and bad-row reports, grading, agreement, decoding, the split."""

import sqlite3

import datasets
import numpy as np
import pytest

from ilr_jax import judge, tasks

# --- the seeded split ---


def test_split_halves_is_stable_and_a_partition():
  a, b = tasks.split_halves(10, 0)
  # Golden values: numpy's PCG64 permutation, the same on every machine.
  assert a.tolist() == [2, 3, 4, 6, 7] and b.tolist() == [0, 1, 5, 8, 9]
  a, b = tasks.split_halves(7473, 0)
  assert (len(a), len(b)) == (3736, 3737)
  assert np.array_equal(np.sort(np.concatenate([a, b])), np.arange(7473))
  assert a[:5].tolist() == tasks.split_halves(7473, 0)[0][:5].tolist()
  assert not np.array_equal(a, tasks.split_halves(7473, 1)[0])
  assert a.dtype.kind == 'i' and b.dtype.kind == 'i'


# --- GSM8K: answers and grading ---

NORMALISED = [
  ('#### 72', '#### 72', True),
  ('#### 1,080', '#### 1080', True),
  ('#### 18.0', '#### 18', True),
  ('#### 18.00', '#### 18', True),
  ('#### $18', '#### 18', True),
  ('#### $ 1,080.00', '#### 1080', True),
  ('#### 18 apples.', '#### 18', True),
  ('She has 18 apples.\n#### 18.', '#### 18', True),
  ('#### The answer is 18', '#### 18', True),
  ('####18', '#### 18', True),
  ('#### 18%', '#### 18', True),
  ('#### 1,000,000', '#### 1000000', True),
  ('#### 0.50', '#### .5', True),
  ('#### -3', '#### -3', True),
  ('#### -$3', '#### -3', True),
  ('#### 3', '#### -3', False),
  ('#### 18.5', '#### 18', False),
  ('#### 180', '#### 18', False),
  ('#### 5\nwait\n#### 18', '#### 18', True),  # the last '####' counts
  ('#### 18\n#### 5', '#### 18', False),
  ('18', '#### 18', False),  # no '####': no answer
  ('#### ', '#### 18', False),
  ('#### eighteen', '#### 18', False),
]
RAW = [
  ('#### 72', '#### 72', True),
  ('#### 1,080', '#### 1080', False),
  ('#### 18.0', '#### 18', False),
  ('#### $18', '#### 18', False),
  ('#### 18 apples.', '#### 18', True),
  ('####18', '#### 18', False),
  ('#### 1,080', '#### 1,080', True),
  ('no hashes', 'no hashes', False),
]


@pytest.mark.parametrize('pred, ref, expected', NORMALISED)
def test_gsm8k_normalised_grading(pred, ref, expected):
  task = tasks.get_task('gsm8k', data_dir='unused')
  assert task.grade(pred, ref) is expected
  assert task.agree(pred, ref) is expected


@pytest.mark.parametrize('pred, ref, expected', RAW)
def test_gsm8k_raw_rule(pred, ref, expected):
  task = tasks.get_task('gsm8k', data_dir='unused', raw_match=True)
  assert task.grade(pred, ref) is expected


def test_bad_predictions_score_zero_and_are_counted():
  task = tasks.get_task('gsm8k', data_dir='unused')
  refs = ['#### 7'] * 5 + ['no final answer']
  preds = [None, 7, '   ', 'the answer is 7', '#### 7', '#### 7']
  graded = task.grade_batch(preds, refs)
  assert graded.scores.tolist() == [False, False, False, False, True, False]
  assert graded.failures == {
    'missing_field': 1,
    'not_a_string': 1,
    'empty': 1,
    'no_final_answer': 1,
    'bad_reference': 1,
  }
  # Two unparsable answers never agree, even when they are the same string.
  assert task.agree_batch(['x', None, '#### 7'], ['x', None, '#### 7.0']).tolist() == [
    False,
    False,
    True,
  ]
  assert [task.is_valid_label(x) for x in ('#### 7', '7', '#### ', None, 7)] == [True] + [False] * 4
  with pytest.raises(ValueError, match='lengths'):
    task.grade_batch(['#### 1'], [])


@pytest.mark.shared_data
def test_gsm8k_real_rows_grade_correct_against_themselves(shared_data):
  task = tasks.get_task('gsm8k', data_dir=shared_data / 'gsm8k')
  for split, n in (('train', 7473), ('test', 1319)):
    rows = task.load(split)
    assert len(rows) == n and task.reports[split].num_bad == 0
    answers = [ex.answer for ex in rows]
    graded = task.grade_batch(answers, rows)
    assert graded.scores.all() and not graded.failures
    assert task.agree_batch(answers, answers).all()
    assert all(task.is_valid_label(a) for a in answers)
  assert rows[0].id == 'gsm8k/test/0' and rows[0].answer.endswith('#### 18')
  # The raw rule also holds on the real references; a changed number fails under both rules.
  raw = tasks.get_task('gsm8k', data_dir=shared_data / 'gsm8k', raw_match=True)
  assert raw.grade_batch(answers, rows).scores.all()
  assert not task.grade(answers[0].replace('#### 18', '#### 19'), rows[0])


# --- loading: bad rows are counted and reported ---


def _save(tmp_path, rows, split='train'):
  path = tmp_path / 'ds'
  datasets.DatasetDict({split: datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
  return path


def test_bad_rows_are_dropped_counted_and_reported(tmp_path, caplog):
  rows = [
    {'question': 'Q0', 'answer': 'A.\n#### 1'},
    {'question': '', 'answer': '#### 2'},
    {'question': 'Q2', 'answer': None},
    {'question': 'Q3', 'answer': 'no final answer'},
    {'question': None, 'answer': '#### 4'},
    {'question': 'Q5', 'answer': '#### 5'},
  ]
  task = tasks.get_task('gsm8k', data_dir=_save(tmp_path, rows))
  out = task.load('train')
  assert [ex.id for ex in out] == ['gsm8k/train/0', 'gsm8k/train/5']
  report = task.reports['train']
  assert (report.total, report.kept, report.num_bad) == (6, 2, 4)
  assert report.bad == {'empty': (1,), 'missing_field': (2, 4), 'no_final_answer': (3,)}
  assert 'no_final_answer: 1' in str(report) and 'no_final_answer' in caplog.text
  assert [ex.id for ex in task.load('train', limit=1)] == ['gsm8k/train/0']
  with pytest.raises(KeyError, match='test'):
    task.load('test')


def test_non_string_fields_and_all_bad_sources(tmp_path, monkeypatch):
  task = tasks.get_task('gsm8k', data_dir='unused')
  rows = [
    {'question': 3, 'answer': '#### 1'},
    {'question': 'Q', 'answer': ['#### 1']},
    {'answer': '#### 1'},
    {'question': 'Q', 'answer': '#### 1'},
  ]
  monkeypatch.setattr(task, '_source_rows', lambda split: rows)
  assert len(task.load('train')) == 1
  assert task.reports['train'].bad == {'not_a_string': (0, 1), 'missing_field': (2,)}
  # A source whose rows are all unusable is a wrong source, not a run with zero data.
  other = tasks.get_task('gsm8k', data_dir=_save(tmp_path, [{'problem': 'x', 'solution': 'y'}]))
  with pytest.raises(ValueError, match=r"columns found: \['problem', 'solution'\]"):
    other.load('train')


def test_registry_and_sources():
  with pytest.raises(KeyError, match='known tasks'):
    tasks.get_task('mmlu')
  with pytest.raises(ValueError, match='data_dir'):
    tasks.get_task('gsm8k').load('train')
  with pytest.raises(ValueError, match='not both'):
    tasks.get_task('gsm8k', data_dir='x', hub_id='openai/gsm8k')
  with pytest.raises(TypeError):
    tasks.get_task('gsm8k', db_root='x')  # an option of another task is an error


def test_decoding_tables():
  g = tasks.get_task('gsm8k', data_dir='x').decoding
  assert g['eval'] == tasks.Decoding('beam', 256, num_beams=4)
  assert g['label'] == g['proposal'] == g['eval']
  # DPO's samples per prompt are the config's dpo.num_samples, passed by the pipeline.
  assert g['dpo'] == tasks.Decoding('sample', 256, temperature=0.7)
  assert g['evaluator_data'] == tasks.Decoding('sample', 256, temperature=0.6)
  s = tasks.get_task('saferpaca').decoding
  assert s['eval'] == tasks.Decoding('beam', 512, num_beams=4)
  assert s['label'] == s['proposal'] == tasks.Decoding('sample', 512, temperature=1.0)
  assert s['dpo'] == tasks.Decoding('sample', 512, temperature=1.0)
  assert tasks.get_task('bird').decoding['label'] == tasks.Decoding('beam', 256, num_beams=4)
  a = tasks.get_task('arith', max_new_tokens=40).decoding
  assert set(a) == set(tasks.USES) and all(d.max_new_tokens == 40 for d in a.values())


def test_decoding_makes_its_sampler_method():
  from ilr_jax import sampler

  assert tasks.Decoding('beam', 8, num_beams=3).sampler_method() == sampler.BeamSearch(num_beams=3)
  got = tasks.Decoding('sample', 8, temperature=0.6).sampler_method()
  assert got == sampler.Sample(temperature=0.6)


# --- arith ---


def test_arith_task_is_deterministic_and_self_consistent():
  task = tasks.get_task('arith', seed=3, num_train=300, num_test=50, max_steps=3)
  train, test = task.load('train'), task.load('test')
  assert (len(train), len(test)) == (300, 50)
  assert train == tasks.get_task('arith', seed=3, num_train=300, num_test=50, max_steps=3).load(
    'train'
  )
  assert not {ex.question for ex in train} & {ex.question for ex in test}
  assert train[0].id == 'arith/train/0'
  assert task.grade_batch([ex.answer for ex in test], test).scores.all()
  assert task.config.max_steps == 3
  with pytest.raises(KeyError):
    task.load('validation')


# --- BIRD ---


@pytest.fixture
def db_root(tmp_path):
  root = tmp_path / 'dbs'
  (root / 'shop').mkdir(parents=True)
  conn = sqlite3.connect(root / 'shop' / 'shop.sqlite')
  conn.execute('CREATE TABLE items (name TEXT, n INTEGER)')
  conn.executemany('INSERT INTO items VALUES (?, ?)', [('a', 1), ('b', 2), ('c', 3)])
  conn.commit()
  conn.close()
  return root


def test_bird_grading_and_agreement(db_root):
  task = tasks.get_task('bird', db_root=str(db_root), timeout_s=1.0, num_workers=2)
  gold = 'SELECT name FROM items WHERE n > 1'
  ex = tasks.Example('bird/test/0', 'Which items have n > 1?', gold, db_name='shop')
  preds = [
    'SELECT name FROM items WHERE n >= 2 ORDER BY name DESC',
    'DROP TABLE items',
    None,
    'SELECT nme FROM items',
  ]
  graded = task.grade_batch(preds, [ex] * 4)
  assert graded.scores.tolist() == [True, False, False, False]
  assert graded.failures == {'prediction:error': 2, 'missing_field': 1}
  assert task.agree_batch(preds[:2], [gold, 'DROP TABLE items'], [ex, ex]).tolist() == [True, False]
  assert task.agree("SELECT 'x'", "SELECT 'x'", ex)
  task.check_ready([ex])
  with pytest.raises(TypeError, match='Examples'):
    task.grade(gold, gold)
  missing = tasks.Example('bird/test/1', 'q', gold, db_name='gone')
  with pytest.raises(FileNotFoundError, match=r'gone\.sqlite'):
    task.grade_batch([gold], [missing])


@pytest.mark.shared_data
def test_bird_rows_load_without_databases(shared_data):
  task = tasks.get_task('bird', data_dir=shared_data / 'bird')
  rows = task.load('test')
  assert len(rows) == 1405 and task.reports['test'].num_bad == 0
  assert rows[0].db_name == 'california_schools' and rows[0].answer.startswith('SELECT')
  with pytest.raises(FileNotFoundError, match=r'--config\.task\.db_root'):
    task.check_ready(rows)
  with pytest.raises(FileNotFoundError, match=r'--config\.task\.db_root'):
    task.grade_batch([rows[0].answer], rows[:1])


# --- SaferPaca ---


class _LengthJudge:
  """A fake judge that prefers the longer output, with a bias toward position A."""

  def __init__(self):
    self.calls = []

  def prob_a_better(self, instructions, outputs_a, outputs_b):
    self.calls.append((list(instructions), list(outputs_a), list(outputs_b)))
    return np.array([0.9 if len(a) > len(b) else 0.3 for a, b in zip(outputs_a, outputs_b)])


class _BagEmbedder:
  def embed(self, texts):
    return np.array([[t.count(c) + 0.1 for c in 'abcdefghij'] for t in texts], float)


@pytest.mark.shared_data
def test_saferpaca_rows_prompt_format_and_categories(shared_data):
  task = tasks.get_task('saferpaca', data_dir=shared_data / 'saferpaca')
  rows = task.load('test')
  assert len(rows) == 578 and task.reports['test'].num_bad == 0
  cats = [ex.category for ex in rows]
  assert (cats.count('general'), cats.count('safety')) == (300, 278)
  for ex in rows:
    assert tasks.saferpaca_prompt(tasks.saferpaca_instruction(ex.question)) == ex.question


def test_saferpaca_alpaca_rows_and_bad_categories(monkeypatch):
  task = tasks.get_task('saferpaca')
  rows = [
    {'instruction': 'Add 2 and 2.', 'input': '', 'output': '4', 'category': 'general'},
    {
      'instruction': 'Summarise:',
      'input': 'A long text.',
      'output': 'Short.',
      'category': 'general',
    },
    {'question': 'q', 'answer': 'a', 'category': 'other'},
    {'instruction': 'x', 'input': '', 'output': '', 'category': 'safety'},
  ]
  monkeypatch.setattr(task, '_source_rows', lambda split: rows)
  out = task.load('train')
  assert [ex.question for ex in out] == [
    tasks.saferpaca_prompt('Add 2 and 2.'),
    tasks.saferpaca_prompt('Summarise:', 'A long text.'),
  ]
  assert out[1].question.endswith('Instruction:\nSummarise:\n\nInput:\nA long text.\n')
  assert task.reports['train'].bad == {'bad_category': (2,), 'empty': (3,)}


def test_saferpaca_win_rate_in_both_orders_and_agreement():
  fake = _LengthJudge()
  task = tasks.get_task('saferpaca', judge=fake, embedder=_BagEmbedder())
  q = tasks.saferpaca_prompt('Explain gravity.')
  refs = [
    tasks.Example(str(i), q, 'medium answer', category=c)
    for i, c in enumerate(['general', 'safety', 'general'])
  ]
  graded = task.grade_batch(['a much longer answer', 'short', None], refs)
  # Longer: (0.9 + (1 - 0.3)) / 2 = 0.8; shorter: (0.3 + (1 - 0.9)) / 2 = 0.2; None: 0, counted.
  np.testing.assert_allclose(graded.scores, [0.8, 0.2, 0.0])
  assert graded.failures == {'missing_field': 1}
  (i1, a1, b1), (i2, a2, b2) = fake.calls
  assert i1 == i2 == ['Explain gravity.', 'Explain gravity.']
  assert (a1, b1) == (b2, a2) == (['a much longer answer', 'short'], ['medium answer'] * 2)
  assert task.summarize(graded.scores, refs) == pytest.approx(
    {'win_rate': 1.0 / 3, 'win_rate/general': 0.4, 'win_rate/safety': 0.2}
  )
  with pytest.raises(TypeError, match='Examples'):
    task.grade('x', 'medium answer')
  agree = task.agree_batch(['abc', 'aaaa', 'jjj', 'abcd'], ['abc', 'jjjj', 'jj', 'abce'])
  assert agree.tolist() == [True, False, True, False]


def test_saferpaca_without_a_judge_says_which_key_to_set():
  task = tasks.get_task('saferpaca', judge={'backend': None, 'base_url': None})
  with pytest.raises(judge.JudgeConfigError, match=r'--config\.task\.judge\.backend'):
    task.check_ready()
