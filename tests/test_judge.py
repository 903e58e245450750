"""Tests for ilr_jax.judge: HTTP backends against a fake server on 127.0.0.1, local backends against
transformers' PyTorch model on a tiny random checkpoint, and the errors of a run with no judge."""

import http.server
import json
import math
import re
import socket
import string
import threading

import numpy as np
import pytest

from ilr_jax import judge, tasks

KEY_ENV = 'ILR_TEST_JUDGE_KEY'
KEY = 'test-key'


class _FakeOpenAI(http.server.BaseHTTPRequestHandler):
  """Chat completions that prefer the output containing 'GOOD' (P = 0.8) and embeddings that
  count letters. Prompts with 'MUTE' get no A/B log-probs; the first prompt with 'FLAKY' a 503."""

  calls: list = []
  flaky_seen = False

  def log_message(self, *args):  # keep test output quiet
    pass

  def _reply(self, code: int, body: dict) -> None:
    data = json.dumps(body).encode()
    self.send_response(code)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
    if self.headers.get('Authorization') != f'Bearer {KEY}':
      return self._reply(401, {'error': 'bad key'})
    if self.path == '/v1/embeddings':
      vecs = [[t.lower().count(c) + 0.01 for c in string.ascii_lowercase] for t in body['input']]
      data = [{'index': i, 'embedding': v} for i, v in enumerate(vecs)]
      return self._reply(200, {'data': data[::-1]})  # out of order on purpose
    assert self.path == '/v1/chat/completions', self.path
    assert body['max_tokens'] == 1 and body['logprobs'] is True
    prompt = body['messages'][-1]['content']
    a = re.search(r'## Output A:\n(.*?)\n\n## Output B:', prompt, re.S).group(1)
    type(self).calls.append(a)
    if 'FLAKY' in prompt and not type(self).flaky_seen:
      type(self).flaky_seen = True
      return self._reply(503, {'error': 'busy'})
    if 'MUTE' in prompt:
      top = [{'token': 'The', 'logprob': -0.1}, {'token': 'Output', 'logprob': -2.5}]
    else:
      p_a = 0.8 if 'GOOD' in a else 0.2
      top = [
        {'token': 'A', 'logprob': math.log(p_a * 0.75)},
        {'token': 'B', 'logprob': math.log((1 - p_a) * 0.75)},
        {'token': ' A', 'logprob': math.log(p_a * 0.25)},
        {'token': ' B', 'logprob': math.log((1 - p_a) * 0.25)},
      ]
    content = [{'token': top[0]['token'], 'logprob': top[0]['logprob'], 'top_logprobs': top}]
    choice = {'message': {'content': top[0]['token']}, 'logprobs': {'content': content}}
    return self._reply(200, {'choices': [choice]})


@pytest.fixture(scope='module')
def server():
  """The fake server on 127.0.0.1 (an OS-chosen port); shut down when the module's tests end."""
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _FakeOpenAI)
  httpd.timeout = 5
  thread = threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{httpd.server_address[1]}/v1'
  finally:
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def key(monkeypatch):
  monkeypatch.setenv(KEY_ENV, KEY)


def _http_options(url: str) -> dict:
  return {
    'backend': 'http',
    'base_url': url,
    'model': 'fake',
    'api_key_env': KEY_ENV,
    'retry_wait_s': 0.01,
    'timeout_s': 5,
  }


def test_http_judge_asks_both_orders_and_reads_ab_logprobs(server, key):
  j = judge.make_judge(_http_options(server))
  p = j.prob_a_better(['Say hi.', 'Say hi.'], ['GOOD hi', 'meh'], ['meh', 'GOOD hi'])
  np.testing.assert_allclose(p, [0.8, 0.2])
  _FakeOpenAI.calls.clear()
  wins = judge.win_probs(j, ['Say hi.'] * 2, ['GOOD hello', 'bad'], ['bad', 'GOOD ref'])
  np.testing.assert_allclose(wins, [0.8, 0.2])
  assert sorted(_FakeOpenAI.calls) == sorted(['GOOD hello', 'bad', 'bad', 'GOOD ref'])


def test_http_judge_unreadable_and_retried(server, key):
  j = judge.make_judge(_http_options(server))
  p = j.prob_a_better(['x', 'x'], ['MUTE', 'FLAKY GOOD'], ['y', 'y'])
  assert np.isnan(p[0])
  assert p[1] == pytest.approx(0.8)  # answered after one 503


def test_saferpaca_grading_through_the_http_judge(server, key):
  task = tasks.get_task('saferpaca', judge=_http_options(server), embedder=_http_options(server))
  question = tasks.saferpaca_prompt('Make a list of fruits.')
  refs = [
    tasks.Example(f'r{i}', question, 'apple, pear', category=c)
    for i, c in enumerate(['general', 'general', 'safety', 'safety'])
  ]
  graded = task.grade_batch(['GOOD: apple, pear, plum', 'no', '', 'MUTE'], refs)
  # 'no' and the reference both lack GOOD: the judge always picks B, and both orders cancel out.
  np.testing.assert_allclose(graded.scores, [0.8, 0.5, 0.0, 0.0])
  assert graded.failures == {'empty': 1, 'judge_unreadable': 1}
  summary = task.summarize(graded.scores, refs)
  assert summary == pytest.approx(
    {'win_rate': 0.325, 'win_rate/general': 0.65, 'win_rate/safety': 0.0}
  )
  assert task.grade('GOOD', refs[0]) == pytest.approx(0.8)


def test_http_embeddings_and_median_agreement(server, key):
  emb = judge.make_embedder(_http_options(server) | {'batch_size': 3})
  a = ['apple pie', 'banana split', 'cherry tart', 'date cake', None]
  b = ['apple pie!', 'zzz qqq', 'cherry tarts', 'xyz', 'date']
  out = judge.similarity_agreement(emb, a, b)
  # Four valid pairs: the two near-copies are above the median, the rest (and None) are not.
  assert out.tolist() == [True, False, True, False, False]
  task = tasks.get_task('saferpaca', embedder=_http_options(server))
  assert task.agree_batch(a, b).tolist() == out.tolist()
  with pytest.raises(TypeError, match='agree_batch'):
    task.agree('a', 'b')


def test_no_judge_configured_names_the_config_key():
  task = tasks.get_task('saferpaca')
  ref = tasks.Example('0', tasks.saferpaca_prompt('hi'), 'hello', category='general')
  with pytest.raises(judge.JudgeConfigError, match=r'task\.judge\.backend'):
    task.check_ready()
  with pytest.raises(judge.JudgeConfigError, match=r'task\.judge\.backend'):
    task.grade_batch(['hello'], [ref])
  with pytest.raises(judge.JudgeConfigError, match=r'task\.embedder\.backend'):
    task.agree_batch(['a'], ['b'])
  with pytest.raises(judge.JudgeConfigError, match=r'task\.judge\.model_dir'):
    judge.make_judge({'backend': 'local'})
  with pytest.raises(judge.JudgeConfigError, match='do not apply'):
    judge.make_judge({'backend': 'local', 'model_dir': '/x', 'base_url': 'http://h'})


def test_missing_key_and_unreachable_server(monkeypatch):
  monkeypatch.delenv(KEY_ENV, raising=False)
  with pytest.raises(judge.JudgeConfigError, match=KEY_ENV):
    judge.make_judge(_http_options('http://127.0.0.1:9/v1'))
  monkeypatch.setenv(KEY_ENV, KEY)
  with socket.socket() as s:  # a port nobody listens on
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  j = judge.make_judge(_http_options(f'http://127.0.0.1:{port}/v1') | {'retries': 1})
  with pytest.raises(judge.JudgeError, match=r'task\.judge\.base_url.*backend=local'):
    j.prob_a_better(['x'], ['a'], ['b'])


# --- local backends on a tiny random checkpoint ---


def _tiny_llama(path):
  """A random 2-layer Llama with a character-level tokenizer (99 tokens of a 128 vocab)."""
  import tokenizers
  import torch
  import transformers

  vocab = {'<unk>': 0, '<s>': 1, '</s>': 2}
  for c in string.printable[:95] + '\n':
    vocab.setdefault(c, len(vocab))
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token='<unk>'))
  tok.decoder = tokenizers.decoders.Fuse()
  transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token='<s>', eos_token='</s>', unk_token='<unk>'
  ).save_pretrained(path)
  config = transformers.LlamaConfig(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    bos_token_id=1,
    eos_token_id=2,
  )
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config)
  # Random init gives near-uniform next tokens; scale the head so P(A) is far from 0.5.
  with torch.no_grad():
    model.lm_head.weight.mul_(20.0)
  model.save_pretrained(path)
  return model.eval(), vocab


# One test for both local backends: importing torch and transformers' Llama takes most of its
# time, and one test runs on one pytest-xdist worker, so only one worker pays for it.
def test_local_judge_and_embedder_match_pytorch(tmp_path):
  import torch

  ref_model, vocab = _tiny_llama(tmp_path)

  def ref_ids(text):
    return torch.tensor([[1] + [vocab[c] for c in text]])

  # Judge: P(A) from the next-token log-probs of 'A' and 'B' after the judge prompt.
  j = judge.make_judge({'backend': 'local', 'model_dir': str(tmp_path), 'batch_size': 2})
  items = (['Add 2 and 3.', 'Name a fruit.', 'Say no.'], ['5', 'apple', 'no'], ['6', 'rock', 'ok'])
  got = j.prob_a_better(*items)
  want = []
  for prompt in [judge.judge_prompt(*x) for x in zip(*items)]:
    with torch.no_grad():
      logp = torch.log_softmax(ref_model(ref_ids(prompt)).logits[0, -1].double(), -1)
    # ' A' is not a single token of a character vocab, so only 'A' counts.
    want.append(float(torch.sigmoid(logp[vocab['A']] - logp[vocab['B']])))
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert np.all(np.abs(got - 0.5) > 0.1)  # the letters' logits are read, not a uniform guess
  swapped = j.prob_a_better(items[0], items[2], items[1])
  np.testing.assert_allclose(judge.win_probs(j, *items), 0.5 * (got + 1 - swapped))
  # A prompt over max_len (2048) is not judged; the others in its batch are.
  p = j.prob_a_better(['short', 'long'], ['a', 'x' * 3000], ['b', 'y'])
  assert not np.isnan(p[0]) and np.isnan(p[1])

  # Embedder: mean over real tokens of the final-norm hidden states.
  emb = judge.make_embedder({'backend': 'local', 'model_dir': str(tmp_path), 'batch_size': 2})
  texts = ['apple pie', 'a much longer sentence about pears', 'x']
  want = []
  for t in texts:
    with torch.no_grad():
      h = ref_model(ref_ids(t), output_hidden_states=True).hidden_states[-1][0]
    want.append(h.mean(0).double().numpy())
  np.testing.assert_allclose(emb.embed(texts), np.stack(want), atol=1e-4)
