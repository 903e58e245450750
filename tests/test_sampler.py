"""Sampler: golden greedy and beam search against transformers, sample frequencies, cache
consistency, batch invariance, sharding and the in-place cache update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_hf_config
from flax import nnx

from ilr_jax import convert
from ilr_jax import decoding as D
from ilr_jax import sampler as S
from ilr_jax import sharding as shd
from ilr_jax.model import Decoder
from ilr_jax.testing import peaked_model, tiny_config

V = 64
EOS, PAD = 2, 0


def _model(seed=0, **overrides) -> Decoder:
  return peaked_model(tiny_config(**{'vocab_size': V, 'eos_token_ids': (EOS,), **overrides}), seed)


@pytest.fixture(scope='module')
def model():
  # Mistral with a sliding window shorter than the sequences, so the window is exercised too.
  return _model(arch='mistral', sliding_window=4)


def _prompts(rng, n, lo=1, hi=12, vocab=V):
  lens = rng.integers(lo, hi + 1, n)
  return [[1] + [int(t) for t in rng.integers(3, vocab, k - 1)] for k in lens]


def _left(seqs, length=None):
  length = length or max(map(len, seqs))
  toks = np.zeros((len(seqs), length), np.int32)
  mask = np.zeros_like(toks)
  for i, s in enumerate(seqs):
    toks[i, length - len(s) :] = s
    mask[i, length - len(s) :] = 1
  return toks, mask


@jax.jit
def _forward(graphdef, state, tokens, mask):
  return nnx.merge(graphdef, state)(tokens, mask)


def _recompute_logits(model, seq, length=64):
  """Full forward pass without a cache (right-padded to one length: one compilation)."""
  toks = np.zeros((1, length), np.int32)
  toks[0, : len(seq)] = seq
  mask = (np.arange(length) < len(seq)).astype(np.int32)[None]
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, toks, mask)[0, : len(seq)], np.float64)


# -- golden comparisons with transformers ------------------------------------------------------


def _save_hf(path, arch, seed, eos_boost=1.0):
  import torch
  import transformers

  torch.manual_seed(seed)
  kv = 1 if arch == 'gemma' else 2
  ids = dict(bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
  cfg = tiny_hf_config(arch, num_key_value_heads=kv, head_dim=8, **ids)
  hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.mul_(5.0)  # peaked distributions, see _sharpen
    hf.get_output_embeddings().weight[EOS] *= eos_boost  # makes EOS frequent (finishing rules)
  hf.save_pretrained(path)
  return hf


def _hf_generate(hf, toks, mask, **kw):
  """transformers' deterministic `generate` (greedy or beam search) on left-padded prompts."""
  import torch

  with torch.no_grad():
    return hf.generate(
      torch.tensor(toks, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
      do_sample=False,
      pad_token_id=PAD,
      eos_token_id=EOS,
      **kw,
    )


def _check_tokens(model, prompt, ours, ref, tol=1e-4):
  """ours == ref token by token; a difference is allowed only at an exact tie of our logits (then
  the rest is not compared). Returns True when identical."""
  for t, (a, b) in enumerate(zip(ours, ref)):
    if a != b:
      logits = _recompute_logits(model, list(prompt) + list(ours[:t]))[-1]
      assert abs(logits[a] - logits[b]) < tol, f'token {t}: ours {a}, transformers {b}'
      return False
  return True


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['gemma', 'mistral', 'llama'])
def test_greedy_matches_transformers(tmp_path, arch):

  # Gemma ties its embeddings, so its EOS row needs a larger boost to be chosen at times.
  hf = _save_hf(tmp_path / arch, arch, seed=0, eos_boost=3.0 if arch == 'gemma' else 1.5)
  seqs = _prompts(np.random.default_rng(1), 16, 1, 20, vocab=128)
  toks, mask = _left(seqs)
  ref = _hf_generate(hf, toks, mask, num_beams=1, max_new_tokens=32)[:, toks.shape[1] :].numpy()
  model = convert.load_hf(tmp_path / arch)
  out = S.sample(model, toks, mask, S.Greedy(), max_new_tokens=32, stop_ids=(EOS,), pad_id=PAD)
  same = 0
  for i in range(16):
    n = int(out.lengths[i, 0])
    ours = out.tokens[i, 0, :n]
    # transformers pads a finished row; ours must end where its EOS is.
    ref_row = ref[i, : (list(ref[i]).index(EOS) + 1) if EOS in ref[i] else ref.shape[1]]
    same += _check_tokens(model, seqs[i], ours, ref_row) and len(ours) == len(ref_row)
    assert (out.tokens[i, 0, n:] == PAD).all()
  assert same >= 15, f'{same}/16 rows identical'
  assert out.stopped.any() and not out.stopped.all()  # both ways of ending are exercised


@pytest.mark.slow
def test_beam_search_matches_transformers(tmp_path):

  hf = _save_hf(tmp_path / 'beam', 'llama', seed=1, eos_boost=3.0)
  seqs = _prompts(np.random.default_rng(2), 32, 1, 20, vocab=128)
  toks, mask = _left(seqs)
  r = _hf_generate(
    hf,
    toks,
    mask,
    num_beams=4,
    length_penalty=1.0,
    early_stopping=False,
    max_new_tokens=16,
    return_dict_in_generate=True,
    output_scores=True,
  )
  ref = r.sequences[:, toks.shape[1] :].numpy()
  ref_scores = r.sequences_scores.numpy()
  model = convert.load_hf(tmp_path / 'beam')
  out = S.sample(model, toks, mask, S.BeamSearch(4), max_new_tokens=16, stop_ids=(EOS,))
  same = 0
  for i in range(32):
    n = int(out.lengths[i, 0])
    ref_row = ref[i, : (list(ref[i]).index(EOS) + 1) if EOS in ref[i] else ref.shape[1]]
    same += len(ref_row) == n and (out.tokens[i, 0, :n] == ref_row).all()
    # Never a worse final beam than transformers' (float32 rounding aside).
    assert out.scores[i, 0] >= ref_scores[i] - 1e-5
  assert same >= 31, f'{same}/32 best beams identical'
  assert 0 < out.stopped.sum() < 32  # finished and length-capped beams are both exercised


# -- sampling distributions --------------------------------------------------------------------


def chi2_critical(df: int, z: float = 3.0902) -> float:
  """Chi-square quantile by the Wilson-Hilferty approximation; z = 3.0902 is the normal 0.999
  quantile, so tests reject at significance 0.001 (within 3% of the exact value for df >= 1)."""
  a = 2.0 / (9.0 * df)
  return df * (1.0 - a + z * np.sqrt(a)) ** 3


def _target(logits, temperature, top_k, top_p):
  """transformers' warpers, written independently in numpy: temperature, top-k, top-p."""
  x = np.asarray(logits, np.float64) / temperature
  if top_k:
    x = np.where(x < np.sort(x)[::-1][top_k - 1], -np.inf, x)
  p = np.exp(x - x.max())
  p /= p.sum()
  if top_p < 1:
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, bool)
    keep[order[before < top_p]] = True
    keep[order[0]] = True
    p = np.where(keep, p, 0)
    p /= p.sum()
  return p


@pytest.mark.parametrize(
  'method',
  [
    S.Sample(temperature=0.7),
    S.Sample(temperature=1.0, top_k=3),
    S.Sample(temperature=1.3, top_p=0.8),
    S.Sample(temperature=0.5, top_k=5, top_p=0.9),
  ],
  ids=['temperature', 'top_k', 'top_p', 'combined'],
)
def test_sample_frequencies_match_target(method):
  logits = np.array([1.2, 0.3, -0.5, 2.0, 0.9, -1.5, 0.0, 1.6], np.float32)
  n = 20000
  u = jax.random.uniform(jax.random.key(0), (n,), jnp.float32)
  choice = jax.jit(lambda x, u: D.sample_choice(x, u, method, with_logp=False)[0])
  draws = choice(jnp.broadcast_to(logits, (n, 8)), u)
  counts = np.bincount(np.asarray(draws), minlength=8)
  p = _target(logits, method.temperature, method.top_k, method.top_p)
  assert (counts[p == 0] == 0).all(), 'a removed token was sampled'
  support = p > 0
  expected = n * p[support]
  chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
  assert chi2 < chi2_critical(int(support.sum()) - 1), (chi2, counts, expected)


def test_inverse_cdf_over_many_blocks():
  # A vocabulary of several blocks with zero-weight tokens (removed ones) in between and at the
  # end; u = 0 and u just below 1 hit the first and the last token that carry weight.
  rng = np.random.default_rng(0)
  v = 3 * D.BLOCK + 17
  w = np.exp(2.0 * rng.standard_normal(v)).astype(np.float32)
  w[rng.random(v) < 0.3] = 0.0
  w[-40:] = 0.0
  n = 40000
  u = jax.random.uniform(jax.random.key(1), (n,))
  draws = np.asarray(jax.jit(D.inverse_cdf)(jnp.broadcast_to(w, (n, v)), u))
  counts = np.bincount(draws, minlength=v)
  assert (counts[w == 0] == 0).all()
  p = w / w.sum()
  big = n * p >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(n * p[big], n * p[~big].sum())
  chi2 = float(((obs - exp) ** 2 / exp).sum())
  assert chi2 < chi2_critical(len(obs) - 1), chi2
  ends = np.asarray(D.inverse_cdf(jnp.asarray([w, w]), jnp.asarray([0.0, 1.0 - 1e-7])))
  assert list(ends) == [np.flatnonzero(w)[0], np.flatnonzero(w)[-1]]


def test_top_k_filter_compiles_to_xla_top_k_not_a_sort():
  # Slicing the k-th value out of lax.top_k made XLA:CPU replace its TopK kernel with a full sort
  # of the vocabulary on every step (80 ms instead of 1 ms for [16, 32000]).
  x = jax.ShapeDtypeStruct((4, 1000), jnp.float32)
  hlo = jax.jit(lambda x: D.processed_logits(x, S.Sample(top_k=5))).lower(x).compile().as_text()
  assert 'TopK' in hlo and ' sort(' not in hlo


def test_top_p_threshold_is_exact_with_ties_and_boundaries():
  # Probabilities that are multiples of 2^-12 make every float32 sum exact, so the kept set can be
  # compared exactly with the rule written out in numpy (keep a token when the mass of strictly
  # likelier tokens is below top_p), ties and top_p equal to a partial sum (which is not below
  # it) included. The tie groups are kept whole.
  rng = np.random.default_rng(7)
  fn = jax.jit(D.top_p_threshold, static_argnums=1)
  for trial in range(40):
    b, v = int(rng.integers(1, 5)), int(rng.integers(2, 700))
    counts = rng.multinomial(
      4096, rng.dirichlet(np.full(v, float(rng.choice([0.05, 1.0, 20.0])))), b
    )
    counts[:, : v // 3] = np.minimum(counts[:, : v // 3], 3)  # many small ties
    counts[:, 0] += 4096 - counts.sum(axis=1)
    probs = counts / 4096.0
    sums = np.cumsum(-np.sort(-probs[0]))  # partial sums of the likeliest tokens, ascending
    top_p = float(rng.choice([rng.uniform(0.05, 0.99), sums[rng.integers(0, len(sums) - 1)]]))
    if not 0.0 < top_p < 1.0:
      continue
    kept = probs >= np.asarray(fn(jnp.asarray(probs, jnp.float32), top_p))
    likelier = np.stack([(row[None, :] * (row[None, :] > row[:, None])).sum(-1) for row in probs])
    want = likelier < top_p
    np.testing.assert_array_equal(kept, want, err_msg=f'trial {trial}, top_p {top_p}')
    assert kept[np.arange(b), probs.argmax(-1)].all()


def test_top_p_filter_does_not_sort():
  # The threshold is found by bisection; a sort of the vocabulary cost XLA:CPU about 100 ms per
  # decode step for [16, 32000].
  x = jax.ShapeDtypeStruct((4, 1000), jnp.float32)
  hlo = jax.jit(lambda x: D.processed_logits(x, S.Sample(top_p=0.9))).lower(x).compile().as_text()
  assert ' sort(' not in hlo


@pytest.mark.parametrize('kind', ['normal', 'ties', 'removed'])
def test_beam_candidates_equal_top_k_of_log_softmax(kind):
  # beam_candidates gives lax.top_k of log_softmax(logits) + running score over a prompt's beams:
  # the same values (bit for bit), indices and tie order, for vocabularies that are not a whole
  # number of blocks, exact ties and -inf logits.
  rng = np.random.default_rng(20 + ['normal', 'ties', 'removed'].index(kind))
  fn = jax.jit(D.beam_candidates, static_argnums=(2, 3))

  @jax.jit
  def want(x, run):
    cand = jax.nn.log_softmax(x, axis=-1) + run[:, :, None]
    return jax.lax.top_k(cand.reshape(x.shape[0], -1), 8)

  for _ in range(15):
    b, nb, v = int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(20, 900))
    block = int(rng.choice([4, 16, 128]))
    if kind == 'ties':
      x = rng.integers(0, 3, (b, nb, v)).astype(np.float32)
    else:
      x = rng.standard_normal((b, nb, v)).astype(np.float32)
    if kind == 'removed':
      x[rng.random((b, nb, v)) < 0.6] = -np.inf
      x[..., 0] = 0.0
    run = rng.standard_normal((b, nb)).astype(np.float32)
    if kind == 'ties':
      run[:] = 0.0
    got_v, got_i = fn(x, run, 8, block)
    want_v, want_i = want(x, run)
    np.testing.assert_array_equal(got_v, want_v)
    np.testing.assert_array_equal(got_i, want_i)


@pytest.mark.parametrize('kind', ['normal', 'ties', 'removed'])
def test_blocked_argmax_and_greedy_log_prob(kind):
  # max_and_first_argmax gives jnp.max and jnp.argmax (the first index on ties) for rows that are
  # not a whole number of blocks, with exact ties and -inf entries; greedy_choice's log-prob is
  # log_softmax at that token.
  rng = np.random.default_rng(10 + ['normal', 'ties', 'removed'].index(kind))
  fn = jax.jit(D.max_and_first_argmax, static_argnums=1)
  for _ in range(20):
    b, v, block = int(rng.integers(1, 6)), int(rng.integers(1, 1500)), int(rng.choice([4, 128]))
    if kind == 'ties':
      x = rng.integers(0, 3, (b, v)).astype(np.float32)
    else:
      x = rng.standard_normal((b, v)).astype(np.float32)
    if kind == 'removed':
      x[rng.random((b, v)) < 0.7] = -np.inf
      x[:, 0] = 0.0  # at least one finite entry per row
    top, idx = fn(x, block)
    np.testing.assert_array_equal(top, x.max(axis=-1))
    np.testing.assert_array_equal(idx, x.argmax(axis=-1))
  tok, logp = jax.jit(D.greedy_choice)(x)
  want = jax.nn.log_softmax(x, axis=-1)[np.arange(b), x.argmax(axis=-1)]
  np.testing.assert_array_equal(tok, x.argmax(axis=-1))
  np.testing.assert_allclose(logp, want, rtol=1e-6, atol=1e-6)


def test_samples_share_prefill_and_follow_the_model(model):
  # n samples of one prompt (one prefill, copied cache rows): first-token frequencies follow the
  # model's softmax, the samples are independent of each other, and the seed decides them.
  prompt = [1, 5, 9, 4]
  toks, mask = _left([prompt])
  n = 4000
  sampler = S.Sampler(model)
  out = sampler(toks, mask, S.Sample(), max_new_tokens=1, num_samples=n, seed=7)
  first = out.tokens[0, :, 0]
  logits = _recompute_logits(model, prompt)[-1]
  p = np.exp(logits - logits.max())
  p /= p.sum()
  counts = np.bincount(first, minlength=V)
  big = n * p >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(n * p[big], n * p[~big].sum())
  chi2 = float(((obs - exp) ** 2 / exp).sum())
  assert chi2 < chi2_critical(len(obs) - 1), (chi2, obs, exp)
  np.testing.assert_allclose(out.scores[0], np.log(p[first]), atol=1e-4)
  again = sampler(toks, mask, S.Sample(), max_new_tokens=1, num_samples=n, seed=7)
  np.testing.assert_array_equal(again.tokens, out.tokens)
  other = sampler(toks, mask, S.Sample(), max_new_tokens=1, num_samples=n, seed=8)
  assert (other.tokens != out.tokens).mean() > 0.3


# -- cache, batch and padding properties -------------------------------------------------------


# The tests below share one model and these calls' shapes, so they share compilations.
B, P, M = 8, 12, 6
METHODS = [(S.Sample(temperature=2.0), 2), (S.BeamSearch(3), 1)]


@pytest.fixture(scope='module')
def batch():
  seqs = _prompts(np.random.default_rng(4), B, 2, P)
  return seqs, *_left(seqs, length=P)


def _run(sampler, toks, mask, method, n, **kw):
  return sampler(toks, mask, method, max_new_tokens=M, num_samples=n, stop_ids=(EOS,), **kw)


def test_cached_decoding_equals_recomputation(model, batch):
  # Every sampled token's log-prob, summed by the sampler from its cached decoding, equals the
  # full forward pass over the finished sequence (sliding window included).
  seqs, toks, mask = batch
  method, n = METHODS[0]
  out = _run(S.Sampler(model), toks, mask, method, n, seed=3)
  for i, prompt in enumerate(seqs):
    for j in range(n):
      new = [int(t) for t in out.tokens[i, j, : out.lengths[i, j]]]
      logits = _recompute_logits(model, prompt + new)[len(prompt) - 1 : -1]
      logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
      np.testing.assert_allclose(out.scores[i, j], logp[np.arange(len(new)), new].sum(), atol=1e-4)
  assert (out.lengths == M).any()


def test_lora_model_decodes_as_its_unmerged_forward(model, batch):
  # The sampler merges an adapter into the kernels once; the sequences it samples score, under
  # the adapted model's own (unmerged) forward pass, what the sampler says they score.
  from ilr_jax import lora

  seqs, toks, mask = batch
  adapted = lora.add_lora(model, 4, 8.0, 'all', rng=5)
  for name in ('q', 'k', 'v', 'o', 'gate', 'up', 'down'):
    var = getattr(adapted.layers, name).lora_b
    var[...] = 0.5 * jax.random.normal(jax.random.key(len(name)), var[...].shape)
  sampler = S.Sampler(adapted)
  assert sampler.cfg.lora_rank == 0 and adapted.cfg.lora_rank == 4  # the input is left as it is
  method, n = METHODS[0]
  out = _run(sampler, toks, mask, method, n, seed=3)
  base = _run(S.Sampler(model), toks, mask, method, n, seed=3)
  assert (out.tokens != base.tokens).any()  # the adapter changes what is sampled
  for i, prompt in enumerate(seqs[:4]):
    new = [int(t) for t in out.tokens[i, 0, : out.lengths[i, 0]]]
    logits = _recompute_logits(adapted, prompt + new)[len(prompt) - 1 : -1]
    logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    np.testing.assert_allclose(out.scores[i, 0], logp[np.arange(len(new)), new].sum(), atol=1e-3)


@pytest.mark.parametrize('method,n', METHODS, ids=['sample', 'beam'])
def test_rows_do_not_depend_on_batch_order_or_padding(model, batch, method, n):
  seqs, toks, mask = batch
  perm = np.random.default_rng(0).permutation(B)
  toks2, mask2 = _left([seqs[i] for i in perm], length=P + 5)
  sampler = S.Sampler(model)
  a = _run(sampler, toks, mask, method, n, seed=3)
  b = _run(sampler, toks2, mask2, method, n, seed=3, row_ids=perm)
  np.testing.assert_array_equal(b.tokens, a.tokens[perm])
  np.testing.assert_allclose(b.scores, a.scores[perm], rtol=1e-5, atol=1e-5)
  again = _run(sampler, toks, mask, method, n, seed=3)
  np.testing.assert_array_equal(again.tokens, a.tokens)  # deterministic for a seed
  if n > 1:
    assert (a.tokens[:, 0] != a.tokens[:, 1]).any()  # the samples of a prompt differ
    other = _run(sampler, toks, mask, method, n, seed=4)
    assert (other.tokens != a.tokens).any()


def test_stop_tokens_and_padding(model, batch):
  _, toks, mask = batch
  sampler = S.Sampler(model)
  method, n = METHODS[0]
  base = _run(sampler, toks, mask, method, n, seed=3)
  # Also stop at whichever of two more tokens comes first (same seed: same draws until then).
  stops = (EOS, int(base.tokens[0, 0, 2]), int(base.tokens[1, 1, 4]))
  out = sampler(
    toks, mask, method, max_new_tokens=M, num_samples=n, stop_ids=stops, pad_id=63, seed=3
  )
  cut = 0
  for i in range(B):
    for j in range(n):
      row = list(base.tokens[i, j, : base.lengths[i, j]])
      hit = [t for t, x in enumerate(row) if x in stops]
      k = hit[0] + 1 if hit else len(row)
      cut += k < len(row)
      assert out.lengths[i, j] == k and out.stopped[i, j] == bool(hit)
      assert list(out.tokens[i, j, :k]) == row[:k]
      assert (out.tokens[i, j, k:] == 63).all()
  assert cut >= 2  # the extra stop tokens did end some sequences early


@pytest.mark.parametrize('method', [S.Greedy(), S.Sample(temperature=2.0, top_k=20)])
def test_decoding_without_scores_gives_the_same_tokens(model, batch, method):
  # scores=False skips the log-probs only: same tokens, lengths and stops, and no scores.
  _, toks, mask = batch
  sampler = S.Sampler(model)
  with_scores = _run(sampler, toks, mask, method, 2, seed=5)
  without = _run(sampler, toks, mask, method, 2, seed=5, scores=False)
  assert without.scores is None and with_scores.scores is not None
  np.testing.assert_array_equal(without.tokens, with_scores.tokens)
  np.testing.assert_array_equal(without.lengths, with_scores.lengths)
  np.testing.assert_array_equal(without.stopped, with_scores.stopped)


def test_tied_head_kept_transposed_on_cpu_decodes_the_same(batch):
  # A tied embedding gets a transposed [D, V] copy for the LM head on CPU; decoding with it gives
  # the tokens and scores of the model's own head.
  _, toks, mask = batch
  tied = _model(seed=3, arch='gemma', tie_embeddings=True, num_kv_heads=1)
  sampler = S.Sampler(tied)
  assert sampler.head is not None and sampler.head.shape == (32, V)
  plain = S.Sampler(tied)
  plain.head = plain.head_sharding = None  # the model's [V, D] head
  for method, n in [(S.Greedy(), 1), *METHODS]:
    a = _run(sampler, toks, mask, method, n, seed=2)
    b = _run(plain, toks, mask, method, n, seed=2)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)


def test_method_validation():
  with pytest.raises(ValueError, match='temperature'):
    S.Sample(temperature=0.0)
  with pytest.raises(ValueError, match='top_p'):
    S.Sample(top_p=0.0)
  with pytest.raises(ValueError, match='early_stopping'):
    S.BeamSearch(early_stopping='sometimes')
  with pytest.raises(ValueError, match='unknown decoding method'):
    D.method_from_name('nucleus')
  # Fields of the other methods are passed over (a caller holds every method's settings).
  assert D.method_from_name('beam', num_beams=2, temperature=0.7) == S.BeamSearch(2)
  assert D.method_from_name('sample', temperature=0.7, num_beams=2) == S.Sample(0.7)
  assert D.method_from_name('greedy', top_k=3) == S.GREEDY


# -- sharding and the compiled loop ------------------------------------------------------------


def test_sharded_decoding_matches_one_device(model, batch):
  _, toks, mask = batch
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  one = S.Sampler(model)
  many = S.Sampler(model, mesh=mesh)
  assert many.row_multiple == 4
  kernel = many.params['layers']['q']['kernel']
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, 'tensor', None)
  for method, n in METHODS:
    a = _run(one, toks, mask, method, n, seed=3)
    b = _run(many, toks, mask, method, n, seed=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='batch shards'):
    many(toks[:6], mask[:6], max_new_tokens=2)


@pytest.mark.parametrize('method,n', METHODS, ids=['sample', 'beam'])
def test_decode_loop_updates_the_cache_in_place(model, batch, method, n):
  _, toks, mask = batch
  sampler = S.Sampler(model)
  spec = S._Spec(method, M, n, (EOS,), PAD)
  prefill, decode = sampler._functions(spec, B, P)
  state = prefill(sampler.weights, toks, mask, np.arange(B, dtype=np.int32), np.uint32(0))
  hlo = decode.lower(sampler.weights, state).compile().as_text()
  rows = B * (method.num_beams if isinstance(method, S.BeamSearch) else n)
  lines = hlo.splitlines()
  copies, made = [], []
  # One layer's keys [R, K, H, S] and values [R, K, S, H].
  for cache in (f'f32[{rows},2,8,{P + M - 1}]', f'f32[{rows},2,{P + M - 1},8]'):
    assert any(cache in x and 'dynamic-update-slice' in x for x in lines)
    copies += [x for x in lines if f'{cache}{{' in x and ' copy(' in x]
    made += [x for x in lines if f'= {cache}{{' in x and 'fusion(' in x]
  # Nothing copies the cache (the scan-over-layers `decode` path copied it every step; beam
  # search reordering whole rows after the step's write copied each gathered buffer back into the
  # loop carry), and nothing but in-place updates writes a cache-sized buffer (a slice of a
  # stacked [L, ...] cache did, every layer and step). Beam search moves the new tokens' slots to
  # their parent beams with an in-place update too.
  assert not copies, copies
  assert all('dynamic-update-slice' in x for x in made), made
  assert 'input_output_alias' in hlo  # the donated state's buffers are reused
