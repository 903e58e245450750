"""Tests for ilr_jax.arith and its tokenizer: reproducible data, correct solutions, round trips."""

import hashlib
import importlib.util
import pathlib
import re

import pytest
import sentencepiece as spm

from ilr_jax import arith, comparisons

REPO = pathlib.Path(__file__).resolve().parents[1]
SPM_MODEL = REPO / 'data' / 'arith' / 'spm.model'
HARD = arith.ArithConfig(
  min_steps=3, max_steps=4, max_operand=100, max_factor=9, distractor_prob=0.5, ops='+-*'
)


def _digest(strings) -> str:
  return hashlib.sha256('\x00'.join(strings).encode()).hexdigest()


def _problem_strings(problems):
  return [p.question + '\x01' + p.answer for p in problems]


def test_generation_is_byte_for_byte_reproducible():
  # Golden digests pin the data across runs, machines and Python versions.
  assert _digest(_problem_strings(arith.generate(0, 300))) == (
    '30420833d88f354132a08225444164e259c3da30647aa4048ca05ac632068add'
  )
  assert _digest(arith.make_corpus(0, 300)) == (
    '2ba80ce8c7857f5aaa38b55b46b469cbd4250640624dc9ad4acbef24afcfa09e'
  )
  assert _digest(_problem_strings(arith.generate('x', 300, HARD))) == (
    '7fa9252ac48d20760213fc4ecc9df342224f157766cb01abbbc46ed716e04e3d'
  )
  assert arith.generate(5, 50) == arith.generate(5, 50)
  assert arith.generate(5, 50) != arith.generate(6, 50)
  # A longer run extends a shorter one: sizes can change without changing the first rows.
  assert arith.generate(3, 100)[:40] == arith.generate(3, 40)


_STEP = re.compile(r'^(\d+)([-+*/])(\d+)=(\d+) ([a-z]+)\.$')


@pytest.mark.parametrize(
  'cfg', [arith.ArithConfig(), HARD, arith.ArithConfig(max_operand=10, max_steps=2, ops='+-')]
)
def test_solutions_are_correct_and_respect_the_knobs(cfg):
  problems = arith.generate(1, 500, cfg)
  assert len({p.question for p in problems}) == len(problems)
  for p in problems:
    *steps, last = p.answer.split('\n')
    assert cfg.min_steps <= len(steps) <= cfg.max_steps
    x = None
    for line in steps:
      a, op, k, y, _ = _STEP.match(line).groups()
      a, k, y = int(a), int(k), int(y)
      assert op in cfg.ops
      assert x is None or a == x  # each step starts from the previous result
      assert y == {'+': a + k, '-': a - k, '*': a * k, '/': a // k}[op]
      assert op != '/' or a % k == 0
      assert 1 <= y <= cfg.max_value
      assert k <= (cfg.max_operand if op in '+-' else cfg.max_factor)
      x = y
    assert last == f'#### {x}' and p.value == x
    assert p.question.endswith('?') and '####' not in p.question


def test_exclude_and_bad_knobs():
  train = arith.generate(0, 200)
  test = arith.generate(0, 200, exclude=frozenset(p.question for p in train))
  assert not {p.question for p in train} & {p.question for p in test}
  for bad in (
    dict(ops='+*'),
    dict(min_steps=3, max_steps=2),
    dict(distractor_prob=2.0),
    dict(max_operand=50, max_value=60),
  ):
    with pytest.raises(ValueError):
      arith.ArithConfig(**bad)
  with pytest.raises(ValueError, match='distinct'):
    tiny = arith.ArithConfig(
      min_steps=1, max_steps=1, max_operand=2, max_value=10, ops='+-', distractor_prob=0.0
    )
    arith.generate(0, 5000, tiny)


def test_corpus_has_no_word_problem_format():
  docs = arith.make_corpus(2, 500)
  assert len(docs) == 500
  assert not any('####' in d or '?' in d or 'USER' in d for d in docs)
  assert sum('=' in d for d in docs) == len(docs)


@pytest.fixture(scope='module')
def sp():
  return spm.SentencePieceProcessor(model_file=str(SPM_MODEL))


def test_tokenizer_ids_and_settings(sp):
  assert 384 <= sp.get_piece_size() <= 512
  assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
  assert [sp.id_to_piece(i) for i in sp.encode('2024')] == ['2', '0', '2', '4']  # split digits
  assert sp.encode('\n') == [sp.piece_to_id('\n')]


def test_tokenizer_round_trips_every_generated_string(sp):
  problems = arith.generate(0, 1000) + arith.generate(1, 500, HARD)
  strings = [p.question for p in problems] + [p.answer for p in problems]
  strings += arith.make_corpus(0, 1000)
  strings += [f'USER:\n{p.question}\n\nASSISTANT:\n{p.answer}' for p in problems[:100]]
  strings += ['\n\n', '  two  spaces ', '\tTab\r\n', 'Ünïcode ✓ $1,080.00', '']
  for s in strings:
    assert sp.decode(sp.encode(s)) == s, repr(s)


def test_default_problems_fit_in_128_tokens(sp):
  for p in arith.generate(0, 2000):
    ids = [sp.bos_id()] + sp.encode(f'USER:\n{p.question}\n\nASSISTANT:\n{p.answer}') + [2]
    assert len(ids) <= 128, p


def test_committed_tokenizer_is_what_the_script_makes():
  spec = importlib.util.spec_from_file_location(
    'make_tokenizer', SPM_MODEL.parent / 'make_tokenizer.py'
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.train() == SPM_MODEL.read_bytes()


def test_corpus_with_solved_problems():
  docs = arith.make_corpus(3, 400, solved_frac=0.5)
  solved = [d for d in docs if '####' in d]
  assert 150 < len(solved) < 250  # about half
  for d in solved:
    question, *steps, final = d.split('\n')
    assert question.endswith('?')
    assert final == f'#### {steps[-1].split("=")[1].split()[0]}'
  # The other documents are the corpus without solved problems: no question, no final answer.
  assert not any('?' in d for d in docs if '####' not in d)
  with pytest.raises(ValueError, match='solved_frac'):
    arith.make_corpus(3, 10, solved_frac=1.5)


def test_corpus_chat_format_and_exclusion():
  cfg = arith.ArithConfig(min_steps=1, max_steps=2, max_operand=9, max_value=30, style='expression')
  plain = arith.make_corpus(4, 300, cfg, solved_frac=1.0)
  chat = arith.make_corpus(4, 300, cfg, solved_frac=1.0, chat_frac=0.5)
  in_template = [d for d in chat if d.startswith('USER:\n')]
  assert 100 < len(in_template) < 200  # about half of the solved problems
  for d in in_template:
    prompt, answer = d.split('ASSISTANT:\n')
    question = prompt[len('USER:\n') : -2]
    assert question.startswith('What is ') and answer.endswith(str(_value_of(answer)))
    assert prompt == f'USER:\n{question}\n\n'  # exactly tokens.PROMPT_TEMPLATE
  assert not any('USER:' in d for d in plain)
  # A test split's questions never appear in the corpus when excluded, and only they change.
  test = {p.question for p in arith.generate('t', 100, cfg)}
  kept = arith.make_corpus(4, 300, cfg, solved_frac=1.0, exclude=frozenset(test))
  asked = {d.split('\n')[0] for d in kept}
  assert not asked & test
  assert {d.split('\n')[0] for d in plain} & test  # the check above could fail
  with pytest.raises(ValueError, match='chat_frac'):
    arith.make_corpus(3, 10, solved_frac=1.0, chat_frac=-0.1)


def test_exclusions_and_leak_check():
  cfg = arith.ArithConfig(min_steps=1, max_steps=2, max_operand=9, max_value=30, style='expression')
  problems = arith.generate('ex', 400, cfg)
  questions, chains = arith.exclusions(problems)
  assert len(questions) == 400
  # One-step solutions are arithmetic facts, not excluded; every two-step one is.
  assert len(chains) == sum(p.answer.count('\n') >= 2 for p in problems) > 100
  p = next(p for p in problems if p.answer.count('\n') == 2)
  chain = arith.solution_chain(p.answer)
  assert len(chain) == 2 and chain in chains
  # A question is found with or without its solution, in either format; a solution is found
  # bare, with items, or inside a longer chain; an unrelated document is clean.
  assert arith.leaked(f'{p.question}\n{p.answer}', questions, chains)
  assert arith.leaked(f'USER:\n{p.question}\n\nASSISTANT:\n', questions, chains)
  (x, op1, k1, y1), (_, op2, k2, y2) = chain
  longer = (
    f'1+{x - 1}={x}\n{x}{op1}{k1}={y1} pens.\n{y1}{op2}{k2}={y2} pens.\n{y2}+1={y2 + 1} pens.'
  )
  assert arith.leaked(longer, questions, chains) and arith.computations(longer)[0][1:3] == chain
  assert not arith.leaked(f'{x}{op1}{k1}={y1}', questions, chains)  # a fact alone
  # Facts on one line that happen to chain count as the computation.
  assert arith.leaked(f'{x}{op1}{k1}={y1}, {y1}{op2}{k2}={y2}.', questions, chains)
  # make_corpus with the exclusions: no leak, though the plain corpus has some.
  kept = arith.make_corpus(5, 600, cfg, solved_frac=0.5, exclude=questions, exclude_chains=chains)
  plain = arith.make_corpus(5, 600, cfg, solved_frac=0.5)
  assert not any(arith.leaked(d, questions, chains) for d in kept)
  assert sum(bool(arith.leaked(d, questions, chains)) for d in plain) > 10


def test_comparison_documents():
  cfg = arith.ArithConfig(
    min_steps=1, max_steps=2, max_operand=9, max_value=30, ops='+-', style='expression'
  )
  questions, chains = arith.exclusions(arith.generate('ex', 300, cfg))
  docs = arith.make_corpus(
    6, 400, cfg, solved_frac=1.0, exclude=questions, exclude_chains=chains, comparison_frac=0.25
  )
  cmp = [d for d in docs if d.startswith('QUESTION:\n')]
  assert 60 < len(cmp) < 140  # about a quarter
  verdicts = set()
  for d in cmp:
    body, verdict = d.rsplit('\n', 1)
    q = body.split('\n')[1]
    a = body.split('ANSWER (A):\n')[1].split('\n\nANSWER (B)')[0]
    b = body.split('ANSWER (B):\n')[1].split('\n\nYou gave')[0]
    assert body == comparisons.comparison_prompt(q, a, b)
    # One side is the problem's worked solution, the other a slip of one step carried through.
    expr = q[len('What is ') : -1]
    value = eval(expr)  # noqa: S307 - digits and + - only
    right, wrong = (b, a) if verdict == 'Yes' else (a, b)
    assert _value_of(right) == value != _value_of(wrong)
    assert len(arith.solution_chain(wrong)) == len(arith.solution_chain(right))
    assert arith.split_judgement(d) == (body, verdict)  # pretraining learns only the verdict
    verdicts.add(verdict)
  assert verdicts == {'Yes', 'No'}
  assert not any(arith.split_judgement(d) for d in docs if d not in cmp)
  assert not any(arith.leaked(d, questions, chains) for d in docs)
  # Without comparison documents the corpus is what it was.
  assert [d for d in docs if d not in cmp][:5] != [] and arith.make_corpus(6, 50, cfg) == (
    arith.make_corpus(6, 50, cfg, comparison_frac=0.0)
  )
  with pytest.raises(ValueError, match='comparison_frac'):
    arith.make_corpus(6, 10, cfg, comparison_frac=2.0)
  with pytest.raises(ValueError, match='expression'):
    arith.make_corpus(6, 10, arith.ArithConfig(), comparison_frac=0.5)


def _value_of(answer: str) -> int:
  return int(answer.rsplit('#### ', 1)[1])


def test_expression_style():
  cfg = arith.ArithConfig(min_steps=1, max_steps=3, max_operand=9, max_value=30, style='expression')
  for p in arith.generate('e', 200, cfg):
    assert p.question.startswith('What is ') and p.question.endswith('?')
    expr = p.question[len('What is ') : -1]
    *steps, final = p.answer.split('\n')
    assert final == f'#### {p.value}'
    # The worked lines compute the expression left to right and end at its value.
    x = int(steps[0].split('=')[0].split(next(c for c in steps[0][1:] if c in '+-*/'))[0])
    assert expr.startswith(str(x))
    for line in steps:
      lhs, rhs = line.split('=')
      assert int(rhs) == arith._apply(*_op_of(lhs))
    assert int(steps[-1].split('=')[1]) == p.value
  with pytest.raises(ValueError, match='style'):
    arith.ArithConfig(style='poem')


def _op_of(lhs):
  i = next(i for i, c in enumerate(lhs) if i and c in '+-*/')
  return lhs[i], int(lhs[:i]), int(lhs[i + 1 :])
