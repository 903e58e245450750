"""Generation driver: bucketed batch plans, one compilation per shape, input order, per-prompt
randomness independent of batching, stop-token cutting, and the command line."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ilr_jax import generate as G
from ilr_jax import sampler as S
from ilr_jax.testing import peaked_model, tiny_config
from ilr_jax.tokens import Tokenizer

V = 64
EOS = 2
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def model():
  return peaked_model(tiny_config(vocab_size=V, eos_token_ids=(EOS,)))


@pytest.fixture(scope='module')
def tok():
  # Characters <-> ids 4..63; 1 BOS, 2 EOS, 0 pad.
  return Tokenizer(
    encode=lambda s: [4 + ord(c) % 60 for c in s],
    decode=lambda ids: ''.join(chr(ord('!') + i - 4) for i in ids if i >= 4),
    bos_id=1,
    eos_id=EOS,
    pad_id=0,
    vocab_size=V,
    source='test',
  )


def test_plan_batches_bounds_shapes_and_covers_every_prompt():
  rng = np.random.default_rng(0)
  lengths = list(rng.integers(1, 100, 203))
  plan = G.plan_batches(lengths, batch_size=16, buckets=(16, 32, 64, 128), row_multiple=2)
  seen = sorted(i for b in plan for i in b.indices)
  assert seen == list(range(203))
  shapes = {(b.batch, b.length) for b in plan}
  assert {length for _, length in shapes} <= {16, 32, 64, 128}
  assert {batch for batch, _ in shapes} <= {2, 4, 8, 16}  # full batches or powers of two
  for b in plan:
    assert len(b.indices) <= b.batch and b.batch % 2 == 0
    fit = [x for x in (16, 32, 64, 128) if x >= max(lengths[i] for i in b.indices)][0]
    assert b.length == fit  # each prompt is in the smallest bucket that holds it
  assert plan[0].length == 128  # longest first
  with pytest.raises(ValueError, match='more than the largest bucket'):
    G.plan_batches([5, 200], 16, (16, 128))
  with pytest.raises(ValueError, match='empty'):
    G.plan_batches([5, 0], 16, (16,))
  with pytest.raises(ValueError, match='multiple of 4'):
    G.plan_batches([5], 6, (16,), row_multiple=4)


def _token_prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [[1] + [int(t) for t in rng.integers(4, V, n - 1)] for n in lengths]


def test_one_compilation_per_bucket_shape_and_batching_independence(model, tok):
  # Buckets 8 and 16: a full batch of 4 and a partial one (3 prompts and a dummy row).
  prompts = _token_prompts([3, 12, 5, 9, 2, 14, 6])
  extra = _token_prompts([11], seed=1)
  kw = dict(max_new_tokens=5, num_samples=2, batch_size=4, buckets=(8, 16), progress=False)
  shapes = {(b.batch, b.length) for b in G.plan_batches([len(p) for p in prompts], 4, (8, 16))}
  assert shapes == {(4, 8), (4, 16)}
  sampler = S.Sampler(model)
  method = S.Sample(temperature=1.5)
  S._JITS.clear()  # compiled functions are shared across Samplers: start from none
  before = dict(S.TRACES)
  res = G.generate(sampler, tok, prompts, method, seed=5, **kw)
  new = {k: S.TRACES[k] - before.get(k, 0) for k in ('prefill', 'decode')}
  assert new == {'prefill': 2, 'decode': 2}  # once per bucket shape
  before = dict(S.TRACES)
  again = G.generate(sampler, tok, prompts, method, seed=5, **kw)
  # One more prompt fills the partial batch and moves rows around: the first 7 answers stay.
  more = G.generate(sampler, tok, prompts + extra, method, seed=5, **kw)
  other = G.generate(sampler, tok, prompts, method, seed=6, **kw)
  assert dict(S.TRACES) == before  # nothing traced again
  assert again.ids == res.ids and more.ids[:7] == res.ids and other.ids != res.ids
  assert len(res.ids) == 7 and all(len(x) == 2 for x in res.ids) and len(res.texts[0]) == 2
  assert all(len(x) == 2 for field in (res.texts, res.scores, res.stopped) for x in field)
  assert any(x[0] != x[1] for x in res.ids)  # a prompt's samples differ
  # Input order: the bucket-8 prompts decoded directly, with their input indices as row ids.
  idx = [0, 2, 4, 6]
  toks, mask = np.zeros((4, 8), np.int32), np.zeros((4, 8), np.int32)
  for r, i in enumerate(idx):
    toks[r, 8 - len(prompts[i]) :], mask[r, 8 - len(prompts[i]) :] = prompts[i], 1
  direct = sampler(
    toks, mask, method, max_new_tokens=5, num_samples=2, stop_ids=(EOS,), seed=5, row_ids=idx
  )
  for r, i in enumerate(idx):
    for j in range(2):
      n = int(direct.lengths[r, j]) - int(direct.stopped[r, j])
      assert res.ids[i][j] == [int(t) for t in direct.tokens[r, j, :n]]


def test_answers_are_cut_at_the_first_stop_token(model, tok):
  prompts = _token_prompts([9, 16, 12, 10], seed=2)
  kw = dict(max_new_tokens=8, buckets=(16,), batch_size=4, progress=False)
  free = G.generate(model, tok, prompts, S.Greedy(), stop_ids=(), **kw)
  # One answer per prompt is still a list of one: the result's shape never depends on n.
  assert all(len(x) == 1 for field in (free.ids, free.texts, free.stopped) for x in field)
  assert not any(s for x in free.stopped for s in x) and all(len(x[0]) == 8 for x in free.ids)
  stop = free.ids[0][0][3]  # a token that does occur: some answers end there
  res = G.generate(model, tok, prompts, S.Greedy(), stop_ids=(stop,), **kw)
  for (full,), (ids,), (text,), (stopped,) in zip(free.ids, res.ids, res.texts, res.stopped):
    cut = full.index(stop) if stop in full else len(full)
    assert ids == full[:cut] and stopped == (stop in full)
    assert text == tok.decode(ids)
  beam = G.generate(model, tok, prompts, S.BeamSearch(2), **kw)
  assert all(len(t) == 1 and isinstance(t[0], str) for t in beam.texts)
  assert all(len(s) == 1 and isinstance(s[0], float) for s in beam.scores)
  # Without scores (two batches of 2): the same answers, no scores; beam search keeps its own.
  kw['batch_size'] = 2
  quiet = G.generate(model, tok, prompts, S.Greedy(), stop_ids=(stop,), scores=False, **kw)
  assert quiet.scores is None and quiet.ids == res.ids and quiet.stopped == res.stopped
  beam2 = G.generate(model, tok, prompts, S.BeamSearch(2), scores=False, **kw)
  np.testing.assert_allclose(beam2.scores, beam.scores, rtol=1e-5)


def test_generate_answers_applies_the_prompt_template(model, tok, monkeypatch):
  from ilr_jax import tokens

  seen = {}

  def fake(m, t, prompts, method, **kw):
    seen.update(p=prompts)
    return G.GenerationResult(ids=[[], []], texts=['', ''], scores=None, stopped=[False] * 2)

  monkeypatch.setattr(G, 'generate', fake)
  G.generate_answers(model, tok, ['hi', 'yo'], S.Greedy(), max_new_tokens=2)
  template = tokens.PROMPT_TEMPLATE
  assert seen['p'] == [[1] + tok.encode(template.format(question=q)) for q in ('hi', 'yo')]
  # Formatted strings get BOS like tokens.prompt_ids; id lists are used as they are.
  assert G.encode_prompts(tok, ['ab', [7, 8]]) == [[1] + tok.encode('ab'), [7, 8]]
  with pytest.raises(ValueError, match='no tokenizer'):
    G.encode_prompts(None, ['text'])


def test_generate_answers_strips_surrounding_whitespace(model, tok, monkeypatch):
  """Answers are stripped before anyone grades or stores them (one sample or several per
  prompt); the token ids are left as generated."""
  raw = [' 42 \n', ['\tx = 1\n\n', '  ', 'y']]
  ids = [[5, 6], [[7], [8], [9]]]

  def fake(m, t, prompts, method, **kw):
    return G.GenerationResult(ids=ids, texts=raw, scores=None, stopped=[True, [True] * 3])

  monkeypatch.setattr(G, 'generate', fake)
  out = G.generate_answers(model, tok, ['a', 'b'], S.Greedy(), max_new_tokens=2)
  assert out.texts == ['42', ['x = 1', '', 'y']]
  assert out.ids == ids


@pytest.mark.slow
def test_command_line_prints_answers(tmp_path):
  from ilr_jax import convert

  cfg = tiny_config(vocab_size=512, bos_token_id=1, eos_token_ids=(2,), pad_token_id=3)
  model_dir = tmp_path / 'model'
  convert.save_checkpoint(peaked_model(cfg), model_dir)
  shutil.copy(REPO / 'data' / 'arith' / 'spm.model', model_dir / 'spm.model')
  cmd = [
    sys.executable,
    '-m',
    'ilr_jax.generate',
    f'--model={model_dir}',
    '--prompt=What is 2 + 3?',
    '--prompt=Add 7 and 8.',
    '--method=sample',
    '--num_samples=2',
    '--max_new_tokens=4',
    '--mesh_data=1',
  ]
  env = {'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'}
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
  rows = [json.loads(line) for line in out.stdout.splitlines()]
  assert [r['prompt'] for r in rows] == ['What is 2 + 3?', 'Add 7 and 8.']
  assert all(len(r['outputs']) == 2 and len(r['scores']) == 2 for r in rows)
  cmd[3] = f'--model={tmp_path / "missing"}'
  bad = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
  assert bad.returncode != 0 and 'does not exist' in bad.stderr


@pytest.mark.slow
def test_bench_generate_workloads_smoke():
  # The generate_* benchmark workloads on bench-tiny with short overrides: both backends decode
  # exactly the requested number of new tokens, and the harness reports them.
  import torch

  from ilr_jax import bench
  from ilr_jax import sharding as shd

  cfg = bench.model_config('bench-tiny', 'mistral')
  mesh = shd.single_device_mesh()
  ctx = bench.BenchContext('bench-tiny', 'mistral', cfg, 'torch', 0, mesh, batch=4, seq_len=8)
  for name in ('generate_greedy', 'generate_sample', 'generate_sample_top_p', 'generate_beam4'):
    case = bench.WORKLOADS[name](ctx)
    assert np.asarray(case.jax_fn()).shape == (4, 1, 8)
    with torch.inference_mode():
      assert tuple(case.torch_fn().shape) == (4, 16)
    assert case.count == 4 * 8 and case.fields['new_tokens'] == 8
  records = bench.run_workload('generate_beam4', ctx, warmup=1, min_reps=1, max_reps=1, min_time=0)
  jax_rec, torch_rec, ratio = records
  assert (jax_rec['backend'], torch_rec['backend']) == ('jax', 'torch')
  assert jax_rec['rows'] == 16 and jax_rec['tokens_per_s'] > 0 and ratio['speedup'] > 0
