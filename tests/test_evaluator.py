"""The evaluator: comparison data, the two-order pair scorer, the oracle scorer, training."""

import re
import zlib

import jax
import numpy as np
import pytest
from flax import nnx

from ilr_jax import comparisons, evaluator, evaluator_data, fit, tasks, tokens, train
from ilr_jax import sharding as shd
from ilr_jax.model import Decoder, ModelConfig
from ilr_jax.tokens import Tokenizer

CFG = ModelConfig(
  arch='llama',
  vocab_size=128,
  hidden_size=32,
  intermediate_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  max_position_embeddings=1024,
  bos_token_id=1,
  eos_token_ids=(2,),
)


def char_tokenizer() -> Tokenizer:
  """Bytes 32..126 -> ids 3..97, newline -> 98; BOS 1, EOS 2, PAD 0: a tokenizer with no files."""

  def encode(text):
    return [98 if c == '\n' else 3 + ord(c) - 32 for c in text]

  def decode(ids):
    return ''.join('\n' if i == 98 else chr(i - 3 + 32) for i in ids if 3 <= i <= 98)

  return Tokenizer(
    encode=encode, decode=decode, bos_id=1, eos_id=2, pad_id=0, vocab_size=128, source='chars'
  )


def word_tokenizer() -> Tokenizer:
  """Words and newlines hashed to ids 3..127: short prompts for fast model tests (no decode)."""

  def encode(text):
    return [3 + zlib.crc32(w.encode()) % 125 for w in re.findall(r'\S+|\n', text)]

  return Tokenizer(
    encode=encode, decode=str, bos_id=1, eos_id=2, pad_id=0, vocab_size=128, source='words'
  )


CHARS, WORDS = char_tokenizer(), word_tokenizer()


def good(i, filler=0):
  return f'{i} + {i + 1} = {2 * i + 1}' + ' so' * filler + f'\n#### {2 * i + 1}'


def bad(i, filler=0):
  return f'I do not know {i}' + ' really' * filler


# Held-out pairs in the trained format, of several lengths (buckets of 16 tokens).
QUESTIONS = [f'What is {i} + {i + 1}?' for i in (20, 21, 22, 23, 24)]
CURRENTS = [good(20), bad(21, 9), good(22, 20), bad(23), bad(24, 3)]
PROPOSALS = [bad(20, 2), good(21), bad(22), good(23, 14), good(24)]


@pytest.fixture(scope='module')
def mesh():
  return shd.make_mesh(2, 2, 2)


def random_model(cfg, mesh, seed=0):
  """A Decoder with N(0, 0.02) weights drawn on the host and placed by the sharding rules
  (compiling the model's initialiser costs more than every other step of these tests)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(seed))))
  shardings = dict(nnx.to_flat_state(shd.state_shardings(abstract, mesh)))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, var in nnx.to_flat_state(abstract):
    if path[-1] == 'scale':
      value = np.ones(var.shape, np.float32)
    else:
      value = (0.02 * rng.standard_normal(var.shape)).astype(np.float32)
    flat[path] = var.replace(jax.device_put(value, shardings[path]))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope='module')
def base(mesh):
  return random_model(CFG, mesh)


def rows_for(indices, flip=False):
  """Classification rows of (worked answer > 'I do not know') pairs, both orders; `flip` swaps
  the labels (as if the unhelpful answer were the better one)."""
  labels = (comparisons.REJECT, comparisons.ACCEPT)
  first, second = labels[::-1] if flip else labels
  rows = []
  for i in indices:
    q, g, b = f'What is {i} + {i + 1}?', good(i, i % 3), bad(i, i % 4)
    rows.append(dict(question=q, a=g, b=b, label=first, kind='gt>wrong'))
    rows.append(dict(question=q, a=b, b=g, label=second, kind='gt>wrong'))
  return rows


def tiny_train(**kw):
  defaults = dict(
    lr=3e-3, warmup_ratio=0.0, global_batch=4, clip_norm=None, pad_multiple=16, log_every=100
  )
  return train.TrainConfig(**{**defaults, **kw})


@pytest.fixture(scope='module')
def trained_run(base, mesh, tmp_path_factory):
  """A tiny evaluator trained by train_evaluator to prefer worked answers ending in '####'."""
  data = {'train': rows_for(range(8)), 'validation': rows_for(range(30, 34))}
  return evaluator.train_evaluator(
    evaluator.with_score_head(base, seed=3),
    WORDS,
    data,
    config=tiny_train(epochs=8),
    workdir=tmp_path_factory.mktemp('evaluator'),
    patience=None,
    mesh=mesh,
    progress=False,
  )


@pytest.fixture(scope='module')
def trained(trained_run):
  return trained_run[0]


@pytest.mark.slow
def test_train_evaluator_reports_validation_accuracy(trained_run):
  _, result = trained_run
  m = result.final_metrics
  assert result.steps == result.total_steps == 32 and not result.stopped_early
  assert len(result.val_losses) == 8 and min(result.val_losses) < 0.4
  assert m['val_loss'] == min(result.val_losses)
  assert m['val_examples'] == 8 and m['val_pairs'] == 4
  assert m['val_accuracy'] >= 0.75 and m['val_pair_accuracy'] == 1.0
  assert m['val_pair_accuracy/gt>wrong'] == 1.0


@pytest.mark.slow
def test_early_stopping_restores_the_best_epoch(base, mesh, tmp_path):
  """Validation labels are flipped: its loss rises once training learns, so epoch 1 is best."""
  from ilr_jax import fit

  data = {'train': rows_for(range(8)), 'validation': rows_for(range(8, 12), flip=True)}
  # 4 steps per epoch, 24 in all; snapshots after epochs 1 and 2 (steps 4 and 8).
  config = tiny_train(epochs=6, checkpoint_fractions=(1 / 6, 1 / 3))
  model, result = evaluator.train_evaluator(
    evaluator.with_score_head(base, seed=3),
    WORDS,
    data,
    config=config,
    workdir=tmp_path,
    patience=1,
    mesh=mesh,
    progress=False,
  )
  assert result.stopped_early and result.steps == 8 and result.best_step == 4
  assert result.val_losses[1] > result.val_losses[0]
  assert result.final_metrics['val_loss'] == result.val_losses[0]
  start = evaluator.with_score_head(base, seed=3)
  kernel = lambda m: np.asarray(m.score_head.kernel[...])
  best = fit.load_params(start, tmp_path / 'snapshots' / 'step_4')
  last = fit.load_params(start, tmp_path / 'snapshots' / 'step_8')
  np.testing.assert_array_equal(kernel(model), kernel(best))
  assert np.abs(kernel(model) - kernel(last)).max() > 1e-4


def test_comparison_ids_and_truncation():
  ids = evaluator.comparison_ids(CHARS, 'q', 'a', 'b')
  assert ids[0] == CHARS.bos_id
  assert CHARS.decode(ids) == comparisons.comparison_prompt('q', 'a', 'b')
  full = len(ids)
  with pytest.raises(ValueError, match=f'max_len={full + 50} '):
    evaluator.fit_pair(CHARS, 'q', 'a' * 50, 'b' * 10, max_len=full + 50)
  ab, ba, cut = evaluator.fit_pair(
    CHARS, 'q', 'a' * 50, 'b' * 10, max_len=full + 30, too_long='truncate'
  )
  assert cut and len(ab) == len(ba) == full + 30
  # Only the tail of the longer answer is cut (50 -> 22); the closing instruction survives.
  assert CHARS.decode(ab) == comparisons.comparison_prompt('q', 'a' * 22, 'b' * 10)
  assert CHARS.decode(ba) == comparisons.comparison_prompt('q', 'b' * 10, 'a' * 22)
  with pytest.raises(ValueError, match='question alone'):
    evaluator.fit_pair(CHARS, 'q' * 100, 'a', 'b', max_len=full, too_long='truncate')
  rows = [dict(question='q', a='a' * 50, b='b' * 10, label=1)]
  ids, labels = evaluator.encode_examples(CHARS, rows, full + 30, too_long='truncate')
  assert ids == [ab] and labels.tolist() == [1]


class StubScorer:
  """What validation_metrics reads of a scorer: P(accept) of each prompt from a table."""

  def __init__(self, p_accept):
    self.tok, self.max_len, self.too_long = CHARS, 1024, 'error'
    self.p_accept = {comparisons.comparison_prompt(*k): v for k, v in p_accept.items()}
    self.seen = []

  def accept_probs(self, seqs):
    texts = [CHARS.decode(s) for s in seqs]
    self.seen += texts
    return np.asarray([self.p_accept[t] for t in texts], np.float64)


def test_validation_metrics_ties_and_identical_pairs():
  """A right ordering is a hit, an exact tie half of one, identical pairs are left out."""
  R, A = comparisons.REJECT, comparisons.ACCEPT
  pairs = [  # (question, better, worse, kind, P(accept) of the REJECT row, of the ACCEPT row)
    ('q1', 'good', 'bad', 'gt>wrong', 0.2, 0.9),  # score 0.15: right
    ('q2', 'good', 'bad', 'correct>wrong', 0.75, 0.75),  # score 0.5 exactly: half
    ('q3', 'good', 'bad', 'gt>correct', 0.9, 0.1),  # score 0.9: wrong
    ('q4', 'same', 'same', 'gt>correct', 0.5, 0.5),  # identical prompts
    ('q5', 'same', 'same ', 'gt>correct', 0.0, 0.0),  # the same text after strip()
  ]
  rows, table = [], {}
  for q, better, worse, kind, p_reject_row, p_accept_row in pairs:
    rows.append(dict(question=q, a=better, b=worse, label=R, kind=kind))
    rows.append(dict(question=q, a=worse, b=better, label=A, kind=kind))
    table[(q, better, worse)], table[(q, worse, better)] = p_reject_row, p_accept_row
  scorer = StubScorer(table)
  m = evaluator.validation_metrics(scorer, rows)
  assert not any('same' in t for t in scorer.seen)  # identical pairs are not even scored
  assert m['val_pairs'] == 3 and m['val_pairs_identical'] == 2 and m['val_examples'] == 6
  assert m['val_pair_accuracy'] == pytest.approx((1 + 0.5 + 0) / 3)
  assert m['val_pair_accuracy/gt>wrong'] == 1.0
  assert m['val_pair_accuracy/correct>wrong'] == 0.5
  assert m['val_pair_accuracy/gt>correct'] == 0.0
  # Per row: q1 right twice, q2 once (P(accept) = 0.75 is wrong on its REJECT row), q3 never.
  assert m['val_accuracy'] == pytest.approx(3 / 6)
  only_identical = evaluator.validation_metrics(StubScorer(table), rows[6:])
  assert only_identical['val_pairs'] == 0 and only_identical['val_pairs_identical'] == 2
  assert np.isnan(only_identical['val_pair_accuracy']) and np.isnan(only_identical['val_accuracy'])


def test_with_score_head_keeps_the_trunk(base):
  model = evaluator.with_score_head(base)
  assert model.cfg.num_labels == 2 and model.lm_head is None
  assert model.layers.q.kernel[...] is base.layers.q.kernel[...]
  assert model.score_head.kernel[...].shape == (CFG.hidden_size, 2)
  assert 0.005 < float(np.std(np.asarray(model.score_head.kernel[...]))) < 0.05
  with pytest.raises(ValueError, match='already has'):
    evaluator.with_score_head(model)


def test_batched_scores_equal_single_and_ignore_order_and_padding(trained, mesh):
  batched = evaluator.EvaluatorScorer(trained, WORDS, batch_size=2, bucket=16, progress=False)
  assert batched.mesh is mesh and jax.tree.leaves(batched.state)[0].sharding.mesh is mesh
  scores = batched(QUESTIONS, CURRENTS, PROPOSALS)
  # The trained evaluator prefers the worked answers of held-out pairs (the proposal is the
  # worked one in pairs 1, 3 and 4).
  assert np.mean((scores > 0.5) == np.array([False, True, False, True, True])) >= 0.8
  assert np.abs(scores - 0.5).max() > 0.2
  # score(a, b) + score(b, a) = 1.
  np.testing.assert_allclose(batched(QUESTIONS, PROPOSALS, CURRENTS), 1 - scores, atol=1e-6)
  # Batches are formed after sorting by length: a permutation changes which pairs share one.
  perm = np.array([2, 0, 4, 3, 1])
  permuted = batched(*([x[i] for i in perm] for x in (QUESTIONS, CURRENTS, PROPOSALS)))
  np.testing.assert_allclose(permuted, scores[perm], atol=1e-6)
  assert batched._probs._cache_size() >= 2  # several bucket lengths
  # One pair per call, each padded to 128 tokens instead of the next multiple of 16.
  single = evaluator.EvaluatorScorer(trained, WORDS, batch_size=1, bucket=128, progress=False)
  one_by_one = [single([q], [c], [p])[0] for q, c, p in zip(QUESTIONS, CURRENTS, PROPOSALS)]
  np.testing.assert_allclose(one_by_one, scores, atol=1e-6)
  assert single._probs._cache_size() == 1  # one bucket length: one compilation
  assert len(batched([], [], [])) == 0
  with pytest.raises(ValueError, match='same length'):
    batched(QUESTIONS, CURRENTS, PROPOSALS[:2])


def test_unswapped_ablation_gives_one_half(trained):
  ablation = evaluator.EvaluatorScorer(
    trained, WORDS, batch_size=8, bucket=128, swap_second_order=False, progress=False
  )
  np.testing.assert_allclose(ablation(QUESTIONS, CURRENTS, PROPOSALS), 0.5, atol=1e-6)


def test_scorer_rejects_a_model_without_two_classes():
  lm = nnx.eval_shape(lambda: Decoder(CFG, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match='num_labels=None'):
    evaluator.EvaluatorScorer(lm, WORDS)


def test_oracle_scorer_grades_the_proposal():
  task = tasks.get_task('arith')
  refs = [tasks.Example('0', 'q0', '1 + 1 = 2\n#### 2'), tasks.Example('1', 'q1', '#### 10')]
  oracle = evaluator.OracleScorer(task, refs)
  got = oracle(['q1', 'q0', 'q0'], ['#### 10', '#### 3', '#### 2'], ['#### 10.0', '#### 2', 'x'])
  np.testing.assert_array_equal(got, [1.0, 1.0, 0.0])
  assert got.dtype == np.float64
  by_text = evaluator.OracleScorer(task, {'q0': '#### 2'})
  np.testing.assert_array_equal(by_text(['q0'], ['#### 2'], ['#### 5']), [0.0])
  with pytest.raises(ValueError, match='no reference'):
    oracle(['q9'], ['a'], ['b'])


@pytest.mark.slow
def test_build_comparison_data_end_to_end(mesh, tmp_path):
  """A fit with 2 snapshots, one sample per question from each, pairs, saved dataset."""
  lm_cfg = CFG.replace(max_position_embeddings=256)
  task = tasks.get_task('arith')
  examples = [
    tasks.Example(
      str(i), f'What is {i} + {i + 1}?', f'{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}'
    )
    for i in range(10)
  ]
  config = tiny_train(epochs=2, lr=1e-3)
  sft = [tokens.sft_example(CHARS, ex.question, ex.answer) for ex in examples]
  fit.fit(
    random_model(lm_cfg, mesh),
    sft,
    loss='sft',
    config=config.replace(checkpoint_fractions=(0.5, 1.0)),
    workdir=tmp_path / 'supervisor',
    mesh=mesh,
    progress=False,
  )
  snapshots = fit.fit_checkpoints(tmp_path / 'supervisor')
  assert [s for s, _ in snapshots] == [3, 6]
  kwargs = dict(out_dir=tmp_path, seed=5, mesh=mesh, batch_size=16, progress=False)
  data, counts = evaluator_data.build_comparison_data(
    lambda: random_model(lm_cfg, mesh), snapshots, CHARS, task, examples, **kwargs
  )
  assert counts['checkpoints']['steps'] == [3, 6]
  assert counts['train']['questions'] == 9 and counts['validation']['questions'] == 1
  for split in ('train', 'validation'):
    assert counts[split]['examples'] == len(data[split]) == 2 * counts[split]['pairs']
    assert counts[split]['pairs'] >= counts[split]['questions']
  samples = [tmp_path / 'samples' / f'samples_{i}.json' for i in range(2)]
  assert all(p.exists() for p in samples)
  # A rerun reads what the first run wrote.
  again, again_counts = evaluator_data.build_comparison_data(
    lambda: pytest.fail('a finished build must not load a model'),
    snapshots,
    CHARS,
    task,
    examples,
    **kwargs,
  )
  assert again_counts == counts and again['train'].to_list() == data['train'].to_list()
