"""The attention switch: every implementation that runs on CPU against the einsum reference, for
every preset architecture at tiny shapes; the score head's last-position-only last layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ilr_jax import attention, presets
from ilr_jax.model import Decoder, attention_mask, last_token_index, positions_from_mask


def _tiny_of(name: str, **kw):
  """Preset `name` scaled down, keeping what attention sees: GQA / MQA ratio, a head dim that is
  not D / N, the sliding window (scaled to 4 positions), rope scaling, norms and activation."""
  cfg = presets.get_preset(name)
  k = 1 if cfg.num_kv_heads == 1 else 2
  g = min(cfg.num_heads // cfg.num_kv_heads, 4)
  return cfg.replace(
    vocab_size=61,
    hidden_size=24,
    intermediate_size=40,
    num_layers=2,
    num_heads=k * g,
    num_kv_heads=k,
    head_dim=16,
    sliding_window=None if cfg.sliding_window is None else 4,
    max_position_embeddings=64,
    **kw,
  )


def _batch(side: str, b=3, t=11, vocab=61, seed=0):
  """Rows of lengths t, t - 4, t - 7 padded on `side` ('right', 'left', or 'both': the right-
  then the left-padded rows in one batch of 2b, rows being independent)."""
  if side == 'both':
    r, l = _batch('right', b, t, vocab, seed), _batch('left', b, t, vocab, seed + 1)
    return jnp.concatenate([r[0], l[0]]), jnp.concatenate([r[1], l[1]])
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  for i, n in enumerate([t, t - 4, t - 7][:b]):
    if side == 'right':
      mask[i, n:] = 0
    else:
      mask[i, : t - n] = 0
  return jnp.asarray(ids * mask), jnp.asarray(mask)


forward = nnx.jit(lambda m, ids, mask: m(ids, mask))


def _with(model: Decoder, **kw) -> Decoder:
  other = Decoder(model.cfg.replace(**kw), rngs=nnx.Rngs(0))
  return nnx.merge(nnx.graphdef(other), nnx.state(model))


def test_auto_is_einsum_on_cpu_and_bad_names_fail():
  assert attention.resolve('auto') == 'einsum'
  assert attention.resolve('einsum') == 'einsum'
  with pytest.raises(ValueError, match='attention must be one of'):
    attention.resolve('flash')
  with pytest.raises(ValueError, match='needs bfloat16 or float16'):
    attention.resolve('cudnn', jnp.float32)
  with pytest.raises(ValueError, match='attention must be one of'):
    _tiny_of('tiny', attention='flash')


@pytest.mark.parametrize('name', presets.names())
def test_xla_attention_matches_einsum_for_every_preset(name):
  """Right- and left-padded rows in one batch."""
  model = Decoder(_tiny_of(name, attention='einsum'), rngs=nnx.Rngs(3))
  ids, mask = _batch('both')
  ref = np.asarray(forward(model, ids, mask))
  for impl in ('xla',):
    got = np.asarray(forward(_with(model, attention=impl), ids, mask))
    valid = np.asarray(mask, bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=2e-5, rtol=1e-5)


def test_xla_attention_gradients_match_einsum():
  model = Decoder(_tiny_of('mistral-7b', attention='einsum'), rngs=nnx.Rngs(4))
  ids, mask = _batch('left')

  def loss(m):
    out = m(ids, mask)
    return jnp.sum(jnp.where(mask[..., None] > 0, out, 0.0) ** 2) * 1e-3

  grad = nnx.jit(nnx.grad(loss))
  for x, y in zip(
    jax.tree.leaves(grad(model)), jax.tree.leaves(grad(_with(model, attention='xla')))
  ):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('window', [None, 3])
def test_attend_functions_agree_on_gqa_and_padding(window):
  """The function itself, below the model: GQA (N = 6, K = 2), head dim 16, padded rows."""
  rng = np.random.RandomState(0)
  b, t, n, k, h = 3, 9, 6, 2, 16
  q = jnp.asarray(rng.randn(b, t, n, h), jnp.float32)
  kk = jnp.asarray(rng.randn(b, t, k, h), jnp.float32)
  v = jnp.asarray(rng.randn(b, t, k, h), jnp.float32)
  _, mask_BT = _batch('left', b, t)
  pos = positions_from_mask(mask_BT)
  slots = jnp.arange(t)
  mask = attention_mask(slots, slots, pos, pos, mask_BT.astype(bool), window)
  ref = attention.attend(q, kk, v, mask, 'einsum')
  got = attention.attend(q, kk, v, mask, 'xla')
  valid = np.asarray(mask_BT, bool)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(ref)[valid], atol=1e-5)
  assert np.isfinite(np.asarray(got)).all()  # padding queries: finite, ignored


@pytest.mark.parametrize('name', ['gemma-2b', 'mistral-7b'])
@pytest.mark.parametrize('scan', [True, False])
def test_score_runs_last_layer_at_last_token_only(name, scan):
  """Decoder.score (last layer at the last real token only) equals the score head applied to the
  full forward's hidden state at that token, for right- and left-padded rows."""
  cfg = _tiny_of(name, num_labels=2, scan_layers=scan, pad_token_id=0)
  model = Decoder(cfg, rngs=nnx.Rngs(5))
  ids, mask = _batch('both')

  @nnx.jit
  def both(m, ids, mask):
    h = m.hidden(ids, mask)
    last = last_token_index(mask)
    ref = m.score_head(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])
    return m.score(ids, mask), ref

  got, ref = both(model, ids, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)


def test_query_blocks_cover_every_query_once():
  for t in (1, 5, 31, 32, 33, 128, 192, 257, 2048):
    blocks = attention.query_blocks(t)
    assert blocks[0][0] == 0 and blocks[-1][1] == t
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert len(blocks) <= attention.MAX_QUERY_BLOCKS
    size = max(attention.QUERY_BLOCK, -(-t // attention.MAX_QUERY_BLOCKS))
    assert all(e - s == size for s, e in blocks[:-1])


@pytest.mark.parametrize('t', [1, 7, 32, 45, 300])
@pytest.mark.parametrize('k,window', [(2, None), (1, None), (2, 5)])
def test_causal_blocks_match_einsum_values_and_gradients(t, k, window):
  """Blocked causal attention (query blocks skipping later keys) against the one-block einsum:
  GQA (N = 4, K = 2) and MQA, a sliding window, right- and left-padded rows (t >= 8), one block
  (t < 32), several, a ragged last block, and t = 300, which would take more than
  MAX_QUERY_BLOCKS blocks of 32 rows and so gets longer ones."""
  rng = np.random.RandomState(t)
  n, h = 4, 8
  _, mask_BT = _batch('both', 2, t) if t >= 8 else (None, jnp.ones((4, t), jnp.int32))
  b = mask_BT.shape[0]
  q = jnp.asarray(rng.randn(b, t, n, h), jnp.float32)
  kk = jnp.asarray(rng.randn(b, t, k, h), jnp.float32)
  v = jnp.asarray(rng.randn(b, t, k, h), jnp.float32)
  pos = positions_from_mask(mask_BT)
  slots = jnp.arange(t)
  mask = attention_mask(slots, slots, pos, pos, mask_BT.astype(bool), window)
  valid = np.asarray(mask_BT, bool)
  w = jnp.asarray(rng.randn(b, t, n, h), jnp.float32) * mask_BT[:, :, None, None]

  def loss(fn, q, kk, v):
    return jnp.sum(fn(q, kk, v, mask) * w)

  ref_fn, got_fn = attention.attend_einsum, attention.attend_causal_blocks
  ref, got = jax.jit(ref_fn)(q, kk, v, mask), jax.jit(got_fn)(q, kk, v, mask)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(ref)[valid], atol=2e-6)
  assert np.isfinite(np.asarray(got)).all()
  grads = [
    jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)(f, q, kk, v)
    for f in (ref_fn, got_fn)
  ]
  for x, y in zip(*grads):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5)
  # Through the switch: causal=True on 'einsum' is the blocked function.
  switched = attention.attend(q, kk, v, mask, 'einsum', causal=True)
  np.testing.assert_allclose(np.asarray(switched), np.asarray(got), atol=1e-6)


def test_causal_blocks_refuse_queries_that_are_not_the_keys():
  q = jnp.zeros((1, 3, 2, 4))
  kv = jnp.zeros((1, 5, 1, 4))
  with pytest.raises(ValueError, match='causal blocks need T queries over T keys'):
    attention.attend(q, kv, kv, jnp.ones((1, 3, 5), bool), 'einsum', causal=True)
