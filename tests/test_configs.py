"""Configs: every task file and method arg loads, overrides work, bad values fail in one line."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

from ilr_jax import arith, context, methods, schema, supervisor_stages, tasks

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = ('arith', 'gsm8k', 'bird', 'saferpaca')


def _get_config(task, arg):
  spec = importlib.util.spec_from_file_location(f'cfg_{task}', ROOT / 'configs' / f'{task}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('task', TASKS)
@pytest.mark.parametrize('method', schema.ARGS)
def test_every_method_arg_loads(task, method):
  c = _get_config(task, method)
  assert c.task.name == task
  expected = methods.COMPARE if method == 'compare' else (method,)
  assert tuple(c.methods) == expected
  assert c.ilr.alpha == 0.15 and c.dpo.beta == 0.1 and c.dpo.num_samples == 6


def test_paper_model_pairs():
  g = _get_config('gsm8k', 'ilr')
  assert (g.supervisor.preset, g.evaluator.preset, g.student.preset) == (
    'gemma-2b',
    'gemma-2b',
    'mistral-7b',
  )
  big = _get_config('gsm8k', 'ilr,mistral7b-llama70b')
  assert (big.supervisor.preset, big.student.preset) == ('mistral-7b', 'llama-3-70b')
  assert big.sft.optimizer == 'adafactor'
  assert _get_config('bird', 'dpo').student.preset == 'llama-3-70b'
  s = _get_config('saferpaca', 'sft')
  assert s.student.preset == 'mistral-7b' and s.sft.epochs == 4
  # Required model directories are placeholders, and the evaluator follows the supervisor.
  assert g.student.model_dir is None
  g.supervisor.model_dir = '/m/gemma'
  schema.resolve(g)
  assert g.evaluator.model_dir == '/m/gemma' and g.supervisor.tokenizer == '/m/gemma'


def test_method_md_training_settings():
  """METHOD.md: Gemma-2B supervisor lr 5e-4, a Mistral-7B supervisor (the 70B pair) 1e-4, the
  student 1e-4; SaferPaca's SFT and DPO both 4 epochs, other tasks' 2."""
  g = _get_config('gsm8k', 'compare')
  assert (g.supervisor_sft.lr, g.sft.lr) == (5e-4, 1e-4)
  big = _get_config('gsm8k', 'compare,mistral7b-llama70b')
  assert big.supervisor.preset == 'mistral-7b'
  assert (big.supervisor_sft.lr, big.sft.lr) == (1e-4, 1e-4)
  s = _get_config('saferpaca', 'compare')
  assert (s.supervisor_sft.epochs, s.sft.epochs, s.dpo.epochs) == (4, 4, 4)
  for task in ('gsm8k', 'bird'):
    c = _get_config(task, 'compare')
    assert (c.sft.epochs, c.dpo.epochs) == (2, 2), task


def test_arith_tiny_switch_and_all():
  full, tiny = _get_config('arith', 'compare'), _get_config('arith', 'compare,tiny')
  assert tiny.task.num_train < full.task.num_train and tiny.num_rounds < full.num_rounds
  assert tuple(_get_config('arith', 'compare,all').methods) == methods.NAMES
  with pytest.raises(schema.ConfigError, match='unknown config switches'):
    _get_config('arith', 'compare,huge')
  with pytest.raises(schema.ConfigError, match='unknown method'):
    _get_config('gsm8k', 'rlhf')


# Every arith setting a user runs or the docs report: the main one, the tiny one, and the seeds
# of docs/RESULTS.md (a seed draws its own problems and corpus).
ARITH_SETTINGS = [('compare', 0), ('compare,tiny', 0)] + [('compare,all', s) for s in range(1, 5)]


@pytest.mark.parametrize('arg,seed', ARITH_SETTINGS)
def test_arith_pretraining_corpus_holds_no_train_or_test_problem(arg, seed):
  # No leak: the bases never see a question of the train split (either half) or of the test
  # split, with or without its solution, nor the computation of a multi-step solution, so the
  # supervisor knows only half A's ground truth and the student only the labels it is given.
  c = _get_config('arith', arg)
  c.seed = seed
  task = context.make_task(c.task.to_dict())
  train, test = task.load('train'), task.load('test')
  assert (len(train), len(test)) == (c.task.num_train, c.task.num_test)
  corpus = supervisor_stages.pretrain_corpus(c, task)
  assert len(corpus) == c.pretrain.corpus_size
  problems = [arith.Problem(e.question, e.answer, 0) for e in train + test]
  questions, chains = arith.exclusions(problems)
  assert len(questions) == len(problems) and chains  # multi-step solutions are excluded too
  leaks = {d: found for d in set(corpus) if (found := arith.leaked(d, questions, chains))}
  assert not leaks, f'{len(leaks)} documents hold train/test problems, e.g. {next(iter(leaks))!r}'
  # The check can fail: the same corpus without the exclusions holds train and test problems.
  p = c.pretrain
  plain = arith.make_corpus(f'{c.seed}', p.corpus_size, task.config, p.solved_frac, p.chat_frac)
  assert any(arith.leaked(d, questions, chains) for d in plain)


def test_pretraining_learns_only_the_verdict_of_a_comparison_document():
  from ilr_jax.tokens import Tokenizer

  c = _get_config('arith', 'compare')
  task = context.make_task(c.task.to_dict())
  tok = Tokenizer.load(str(ROOT / c.supervisor.tokenizer))
  corpus = supervisor_stages.pretrain_corpus(c, task, 'supervisor')[:400]
  examples = supervisor_stages.pretrain_examples(tok, corpus, c.pretrain.max_len)
  judged = [(d, ex) for d, ex in zip(corpus, examples) if arith.split_judgement(d)]
  assert judged and len(judged) < len(corpus)  # the supervisor's corpus holds about 5% of them
  for d, (ids, mask) in judged:
    verdict = tok.encode(d.rsplit('\n', 1)[1]) + [tok.eos_id]
    assert mask.sum() == len(verdict) and list(ids[mask == 1]) == verdict
    assert list(mask[-len(verdict) :]) == [1] * len(verdict)
  for d, (_, mask) in zip(corpus, examples):
    if not arith.split_judgement(d):
      assert mask[0] == 0 and mask[1:].all()  # every token but BOS
  # The student's corpus holds none; a comparison document that does not fit is an error.
  assert not any(map(arith.split_judgement, supervisor_stages.pretrain_corpus(c, task, 'student')))
  with pytest.raises(RuntimeError, match='pretrain.max_len=64'):
    supervisor_stages.pretrain_examples(tok, [judged[0][0]], 64)


def test_validate_one_line_errors(tmp_path):
  c = _get_config('arith', 'compare,tiny')
  schema.validate(c, num_devices=8)  # the shipped tiny config is valid on the test mesh
  cases = [
    ('sft.batch_size', 12, 'sft.batch_size=12 is not divisible'),
    ('methods', ('ilr', 'rlhf'), 'unknown methods'),
    ('ilr.alpha_scope', 'some', 'alpha_scope'),
    ('dpo.num_samples', 5, 'num_samples'),
    ('dpo.optimizer', 'sgd', 'dpo.optimizer must be one of'),  # train.py has no sgd
    ('evaluator_train.epochs', 0, 'evaluator_train.epochs must be > 0'),
    ('mesh.fsdp', 3, '--config.mesh: 8 devices cannot be split'),
    ('feedback.source', 'crowd', 'feedback.source must be one of'),
    ('feedback.source', 'judge', 'feedback.judge.backend must be "http"'),
  ]
  for key, value, msg in cases:
    bad = _get_config('arith', 'compare,tiny')
    section, _, field = key.rpartition('.')
    (bad[section] if section else bad)[field] = value
    with pytest.raises(schema.ConfigError, match=msg) as e:
      schema.validate(bad, num_devices=8)
    assert '\n' not in str(e.value)
  j = _get_config('arith', 'ilr,tiny')
  j.feedback.source, j.feedback.judge.backend = 'judge', 'http'
  with pytest.raises(schema.ConfigError, match='judge.base_url and --config.feedback.judge.model'):
    schema.validate(j, num_devices=8)
  j.feedback.judge.base_url, j.feedback.judge.model = 'http://127.0.0.1:9/v1', 'm'
  schema.validate(j, num_devices=8)
  assert schema.model_roles(j) == ('supervisor', 'student')  # no evaluator to train
  g = _get_config('gsm8k', 'dpo')
  with pytest.raises(schema.ConfigError, match='supervisor.model_dir is required'):
    schema.validate(g, num_devices=8)
  g.supervisor.model_dir = str(tmp_path / 'missing')
  with pytest.raises(schema.ConfigError, match='does not exist'):
    schema.validate(g, num_devices=8)
  # sft needs no evaluator; dpo does (it is the evaluator's model that is missing here).
  s = _get_config('gsm8k', 'sft')
  s.supervisor.model_dir = s.student.model_dir = str(tmp_path)
  schema.validate(s, num_devices=8)
  d = _get_config('gsm8k', 'dpo')
  d.supervisor.model_dir = d.student.model_dir = str(tmp_path)
  d.evaluator.model_dir = str(tmp_path / 'nope')
  with pytest.raises(schema.ConfigError, match='evaluator.model_dir'):
    schema.validate(d, num_devices=8)


def test_main_rejects_bad_key_in_one_line(tmp_path):
  cmd = [
    sys.executable,
    '-m',
    'ilr_jax.main',
    '--config=configs/arith.py:compare,tiny',
    f'--workdir={tmp_path}/w',
  ]
  for extra, msg in (
    ('--config.sft.nope=1', 'unknown config key --config.sft.nope'),
    ('--config.sft.batch_size=7', 'sft.batch_size=7 is not divisible'),
  ):
    r = subprocess.run(
      cmd + [extra],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=120,
      env={
        'JAX_PLATFORMS': 'cpu',
        'PATH': '/usr/bin:/bin',
        'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
      },
    )
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr and msg in r.stderr.strip().splitlines()[-1], r.stderr
  assert not (tmp_path / 'w').exists()  # nothing was written before the error


def test_correctness_of_graded_scores_is_a_threshold_not_bool():
  # SaferPaca grades with win probabilities; bool(0.3) would call a losing answer correct.
  import numpy as np

  graded = tasks.Graded(np.array([0.3, 0.7, 1.0, 0.0, 0.5]), {})
  assert graded.correct.tolist() == [False, True, True, False, False]


def test_solved_frac_is_validated():
  c = _get_config('arith', 'sft')
  c.pretrain.solved_frac = 1.5
  with pytest.raises(schema.ConfigError, match='solved_frac'):
    schema.validate(c, num_devices=1)


def test_chat_frac_is_validated():
  c = _get_config('arith', 'sft')
  c.pretrain.chat_frac = 2.0
  with pytest.raises(schema.ConfigError, match='chat_frac'):
    schema.validate(c, num_devices=1)
