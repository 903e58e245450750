"""Tests for ilr_jax.feedback: the judge source (both orders, cache, retries) and the human source
(annotation files, validation), alone and in `configs/arith.py:ilr,tiny` runs: one with judge
feedback from a fake OpenAI-compatible server on 127.0.0.1, then human feedback in the same
workdir with the test as the annotator."""

import http.server
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest

from ilr_jax import feedback, labels
from ilr_jax.judge import JudgeError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _p_a(a: str, b: str) -> float:
  """The fake judge's P(output A better): a fixed preference per text plus a bias for A, so
  a source that asked one order only would not reproduce the combined score."""
  pref = lambda t: (zlib.crc32(t.encode()) % 1000) / 250.0  # noqa: E731
  return 1.0 / (1.0 + math.exp(-(0.7 + pref(a) - pref(b))))


class _FakeJudge:
  """An in-process PairwiseJudge that fails or goes mute when told to."""

  def __init__(self, fail_calls=(), mute=()):
    self.calls, self.prompts = 0, []
    self.fail_calls, self.mute = set(fail_calls), set(mute)

  def prob_a_better(self, instructions, outputs_a, outputs_b):
    self.calls += 1
    if self.calls in self.fail_calls:
      raise JudgeError('http://fake answered HTTP 503: busy')
    self.prompts += list(zip(outputs_a, outputs_b))
    return np.asarray(
      [math.nan if a in self.mute else _p_a(a, b) for a, b in zip(outputs_a, outputs_b)]
    )


def test_judge_asks_both_orders_and_combines_them_as_the_evaluator(tmp_path):
  fake = _FakeJudge()
  scorer = feedback.JudgeFeedback(fake, tmp_path, 'ilr/r1/labels', retry_wait_s=0)
  qs, cur, prop = ['q1', 'q2', 'q1'], ['1', '2', '1'], ['3', '4', '3']
  s = scorer(qs, cur, prop)
  want = [0.5 * ((1 - _p_a(c, p)) + _p_a(p, c)) for c, p in zip(cur, prop)]
  np.testing.assert_allclose(s, want)
  assert sorted(fake.prompts) == sorted([('1', '3'), ('3', '1'), ('2', '4'), ('4', '2')])
  # Swapping current and proposal gives 1 - score, as the evaluator's two-order score does.
  np.testing.assert_allclose(scorer(qs, prop, cur), 1 - s)


def test_judge_retries_then_names_the_stage_and_a_rerun_asks_only_what_is_missing(tmp_path):
  qs, cur, prop = ['q'] * 4, ['a', 'b', 'c', 'd'], ['w', 'x', 'y', 'z']
  flaky = _FakeJudge(fail_calls={1})  # the first call fails, the second answers
  feedback.JudgeFeedback(flaky, tmp_path / 'f', 'st', retry_wait_s=0)(qs, cur, prop)
  assert flaky.calls == 2
  mute = _FakeJudge(mute={'c'})  # never a verdict when 'c' is output A
  scorer = feedback.JudgeFeedback(mute, tmp_path / 'm', 'ilr/r1/labels', attempts=3)
  scorer.retry_wait_s = 0
  with pytest.raises(feedback.FeedbackError, match=r'ilr/r1/labels: .* for 1 comparison prompts'):
    scorer(qs, cur, prop)
  assert mute.calls == 3  # all 8 prompts in one batch, then the mute one twice more
  cached = (tmp_path / 'm' / feedback.JUDGE_ANSWERS).read_text().splitlines()
  assert len(cached) == 7  # every answer but the mute one is on disk
  again = _FakeJudge()
  s = feedback.JudgeFeedback(again, tmp_path / 'm', 'ilr/r1/labels')(qs, cur, prop)
  assert again.prompts == [('c', 'y')]
  assert s[2] == pytest.approx(0.5 * ((1 - _p_a('c', 'y')) + _p_a('y', 'c')))


def _human(tmp_path):
  return feedback.HumanFeedback(tmp_path, 'humanilr/r1/labels', seed=3)


def _ask(h, n=6):
  qs = [f'What is {i}+1?' for i in range(n)]
  return qs, [f'#### {i}' for i in range(n)], [f'#### {i + 1}' for i in range(n)]


def test_human_writes_requests_waits_and_validates(tmp_path):
  h = _human(tmp_path)
  triples = _ask(h)
  with pytest.raises(feedback.AwaitingAnnotations, match='waiting for annotations of 6'):
    h(*triples)
  rows = [json.loads(x) for x in (tmp_path / 'to_annotate.jsonl').read_text().splitlines()]
  csv_text = (tmp_path / 'to_annotate.csv').read_text()
  assert csv_text.splitlines()[0] == 'id,question,A,B,verdict' and len(rows) == 6
  side = json.loads((tmp_path / feedback.ANNOTATION_KEY).read_text())['proposal_side']
  assert set(side.values()) == {'A', 'B'}  # both sides are used (seed 3)
  for r in rows:  # the proposal is on the side the key says
    q = r['question']
    prop = triples[2][triples[0].index(q)]
    assert r[side[r['id']]] == prop
  ids = [r['id'] for r in rows]
  out = tmp_path / 'annotations.jsonl'
  bad = [
    {'id': 'nope', 'verdict': 'A'},
    {'id': ids[0], 'verdict': 'maybe'},
    {'id': ids[1], 'verdict': 'A'},
    {'id': ids[1], 'verdict': 'B'},
  ]
  out.write_text(''.join(json.dumps(x) + '\n' for x in bad) + 'not json\n')
  with pytest.raises(feedback.AnnotationError) as err:
    h(*triples)
  lines = str(err.value).splitlines()[1:]
  assert len(lines) == 4
  assert "line 1: unknown id 'nope'" in lines[0] and "bad verdict 'maybe'" in lines[1]
  assert 'again, with another verdict' in lines[2] and 'line 5: not a JSON object' in lines[3]
  assert out.read_text().count('\n') == 5  # nothing consumed
  partial = [{'id': x, 'verdict': 'B'} for x in ids[:4]] + [{'id': ids[4], 'verdict': ''}]
  out.write_text(''.join(json.dumps(x) + '\n' for x in partial))
  with pytest.raises(feedback.AwaitingAnnotations, match='2 of 6 comparisons have no verdict'):
    h(*triples)
  out.unlink()
  # The filled-in CSV works as the verdicts file; a verdict's case and spaces do not matter.
  filled = csv_text.splitlines()
  verdict = {ids[0]: ' a', ids[1]: 'TIE'}
  text = [filled[0]] + [f'{line}{verdict.get(line.split(",")[0], "B")}' for line in filled[1:]]
  (tmp_path / 'annotations.csv').write_text('\n'.join(text) + '\n')
  s = h(*triples)
  by_id = dict(zip(ids, s[[triples[0].index(r['question']) for r in rows]]))
  assert by_id[ids[1]] == 0.5
  for x in ids[2:]:
    assert by_id[x] == (1.0 if side[x] == 'B' else 0.0)
  assert by_id[ids[0]] == (1.0 if side[ids[0]] == 'A' else 0.0)


# -- whole runs: judge feedback from a fake server, then a person -------------------------------


class _FakeServer(http.server.BaseHTTPRequestHandler):
  """OpenAI-compatible chat completions answering with `_p_a`; the first reply is not JSON."""

  asked: list = []
  replies = 0

  def log_message(self, *args):
    pass

  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
    prompt = body['messages'][-1]['content']
    m = re.search(r'## Output A:\n(.*?)\n\n## Output B:\n(.*?)\n\nReply with', prompt, re.S)
    cls = type(self)
    cls.replies += 1
    if cls.replies == 1:
      data = b'<html>proxy error</html>'
    else:
      a, b = m.group(1), m.group(2)
      cls.asked.append((a, b))
      p = _p_a(a, b)
      top = [{'token': 'A', 'logprob': math.log(p)}, {'token': 'B', 'logprob': math.log(1 - p)}]
      content = [{'token': 'A', 'logprob': top[0]['logprob'], 'top_logprobs': top}]
      data = json.dumps({'choices': [{'logprobs': {'content': content}}]}).encode()
    self.send_response(200)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)


def _main(wd, cache, *extra):
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    TOKENIZERS_PARALLELISM='false',
    XLA_FLAGS='--xla_force_host_platform_device_count=2',
    PYTHONPATH=str(ROOT),
  )
  cmd = [sys.executable, '-m', 'ilr_jax.main', '--config=configs/arith.py:ilr,tiny']
  cmd += [f'--workdir={wd}', f'--config.compile_cache_dir={cache}', *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope='module')
def judged(tmp_path_factory, compile_cache_dir):
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _FakeServer)
  thread = threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
  thread.start()
  wd = tmp_path_factory.mktemp('feedback') / 'wd'
  try:
    url = f'http://127.0.0.1:{httpd.server_address[1]}/v1'
    r = _main(
      wd,
      compile_cache_dir,
      '--config.feedback.source=judge',
      '--config.feedback.judge.backend=http',
      f'--config.feedback.judge.base_url={url}',
      '--config.feedback.judge.model=fake',
      '--config.feedback.judge.api_key_env=',
      '--config.feedback.retry_wait_s=0.01',
    )
  finally:
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)
  assert r.returncode == 0, r.stderr[-5000:]
  return wd, r


@pytest.mark.e2e
@pytest.mark.slow
def test_judge_feedback_run_asks_both_orders(judged):
  wd, r = judged
  assert 'judgeilr' in r.stdout and not (wd / 'evaluator').exists()
  d = labels.load_label_set(wd / 'judgeilr/r1/labels/labels')
  dis = [j for j, a in enumerate(d['agreed']) if not a]
  assert dis, 'the tiny run must have disagreeing proposals to judge'
  asked = set(_FakeServer.asked)
  for j in dis:
    cur, prop = d['previous_label'][j], d['proposal'][j]
    assert (cur, prop) in asked and (prop, cur) in asked
    assert d['score'][j] == pytest.approx(0.5 * ((1 - _p_a(cur, prop)) + _p_a(prop, cur)))
  # Nothing else was asked (an item may be another's reverse, so compare sets, not counts).
  items = {(d['previous_label'][j], d['proposal'][j]) for j in dis}
  assert asked == items | {(p, c) for c, p in items}


def _verdicts(path, rows, pick):
  path.write_text(''.join(json.dumps({'id': r['id'], 'verdict': pick(r)}) + '\n' for r in rows))


@pytest.mark.e2e
@pytest.mark.slow
def test_human_feedback_run_waits_validates_and_continues(judged, compile_cache_dir):
  (wd, _), cache = judged, compile_cache_dir
  stage = wd / 'humanilr/r1/labels'
  r = _main(wd, cache, '--config.feedback.source=human')
  assert r.returncode == 3, r.stderr[-3000:]
  assert (
    'waiting for annotations' in r.stdout and not (wd / 'stages/humanilr/r1/labels.json').exists()
  )
  rows = [json.loads(x) for x in (stage / 'to_annotate.jsonl').read_text().splitlines()]
  side = json.loads((stage / feedback.ANNOTATION_KEY).read_text())['proposal_side']
  out = stage / 'annotations.jsonl'
  _verdicts(out, rows[:-1], lambda r: 'A')
  r = _main(wd, cache, '--config.feedback.source=human')
  assert r.returncode == 3 and f'1 of {len(rows)} comparisons have no verdict' in r.stdout
  _verdicts(out, rows + [{'id': 'nope'}], lambda r: 'A')
  r = _main(wd, cache, '--config.feedback.source=human')
  assert r.returncode == 2 and "unknown id 'nope'" in r.stderr
  # The annotator prefers the proposal where its id's first hex digit is even.
  prefer = {r['id']: int(r['id'][0], 16) % 2 == 0 for r in rows}
  other = {'A': 'B', 'B': 'A'}
  _verdicts(out, rows, lambda r: side[r['id']] if prefer[r['id']] else other[side[r['id']]])
  r = _main(wd, cache, '--config.feedback.source=human')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'humanilr' in r.stdout
  d = labels.load_label_set(stage / 'labels')
  shown = {(q['question'], q['A'], q['B']): q['id'] for q in rows}
  for j, agree in enumerate(d['agreed']):
    if agree:
      assert not d['replaced'][j]
      continue
    cur, prop = d['previous_label'][j], d['proposal'][j]
    x = shown.get((d['question'][j], cur, prop)) or shown[(d['question'][j], prop, cur)]
    assert d['replaced'][j] == prefer[x] and d['score'][j] == float(prefer[x])


def test_dpo_pairs_from_judge_feedback(tmp_path):
  import types

  from ilr_jax import dpo_stages, methods

  fake = _FakeJudge()
  run = types.SimpleNamespace(
    config=types.SimpleNamespace(dpo=types.SimpleNamespace(keep_frac=1.0)),
    scorer=lambda source, stage: feedback.JudgeFeedback(fake, tmp_path, stage),
    task=types.SimpleNamespace(is_valid_label=lambda x: True),
  )
  a, b = ['#### 1', '#### 2', '#### 3'], ['#### 4', '#### 5', '#### 6']
  ok = np.ones(3, bool)
  scores, sel = dpo_stages._select(
    run, methods.get('judgedpo'), 'judgedpo/r1/pairs', ['q'] * 3, a, b, ok, ok
  )
  np.testing.assert_allclose(scores, [0.5 * ((1 - _p_a(x, y)) + _p_a(y, x)) for x, y in zip(a, b)])
  assert len(fake.prompts) == 6  # both orders of every pair
  chosen, rejected = sel.chosen_rejected(np.arange(3), np.arange(3) + 3)
  flat = a + b
  for i in range(3):
    better = b[i] if scores[i] > 0.5 else a[i]
    assert flat[chosen[i]] == better and flat[rejected[i]] != better
