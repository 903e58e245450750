"""The decoder against transformers' PyTorch models (golden logits), and its own properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ilr_jax import convert
from ilr_jax.model import Decoder, init_cache, positions_from_mask
from ilr_jax.testing import tiny_config

TOL = 1e-4  # max abs logit difference in float32, per the foundation issue

# Jitted entry points: one compilation per shape instead of hundreds of eager op dispatches.
forward = nnx.jit(lambda m, ids, mask: m(ids, mask))
score = nnx.jit(lambda m, ids, mask: m.score(ids, mask))


@nnx.jit
def decode(m, ids, pos, cache, index, kv):
  h, cache = m.decode_hidden(ids, pos, cache, index, kv)
  return m.logits(h), cache


LLAMA3_ROPE = dict(
  rope_scaling={
    'rope_type': 'llama3',
    'factor': 8.0,
    'low_freq_factor': 1.0,
    'high_freq_factor': 4.0,
    'original_max_position_embeddings': 16,
  },
  rope_theta=500000.0,
)
CASES = {
  'llama': ('llama', {}),
  'mistral-window': ('mistral', dict(sliding_window=5)),
  'gemma-mqa-head16': ('gemma', dict(head_dim=16, num_key_value_heads=1)),
  'llama3-rope-scaling': ('llama', LLAMA3_ROPE),
}


def _batch(side, b=3, t=14, vocab=128, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab, (b, t))
  mask = np.ones((b, t), np.int64)
  lengths = [t, t - 5, t - 3][:b]
  for i, n in enumerate(lengths):
    if side == 'right':
      mask[i, n:] = 0
    else:
      mask[i, : t - n] = 0
  ids = np.where(mask == 1, ids, 0)
  return ids, mask


def _torch_logits(model, ids, mask):
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)
    )
  return out.logits.numpy()


@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('side', ['right', 'left'])
def test_logits_match_transformers(tiny_hf, case, side):
  arch, kw = CASES[case]
  path, ref_model = tiny_hf(arch, **kw)
  model = convert.load_hf(path)
  ids, mask = _batch(side)
  ref = _torch_logits(ref_model, ids, mask)
  got = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
  err = np.abs(ref - got)[mask.astype(bool)]
  assert err.max() <= TOL, f'{case} {side}: max abs diff {err.max()}'


def test_sliding_window_is_active(tiny_hf):
  """The window really cuts attention: a wider window changes late-position logits."""
  path, _ = tiny_hf('mistral', sliding_window=5)
  narrow = convert.load_hf(path)
  wide = convert.load_hf(path, sliding_window=None)
  ids, mask = _batch('right')
  a = np.asarray(forward(narrow, jnp.asarray(ids), jnp.asarray(mask)))
  b = np.asarray(forward(wide, jnp.asarray(ids), jnp.asarray(mask)))
  assert np.abs(a[:, :5] - b[:, :5]).max() < 1e-5  # inside the window: identical
  assert np.abs(a[0, 8:] - b[0, 8:]).max() > 1e-3  # beyond it: different


@pytest.mark.parametrize('arch', ['llama', 'gemma', 'mistral'])
@pytest.mark.parametrize('side', ['right', 'left'])
def test_score_head_matches_sequence_classification(tiny_hf, arch, side):
  path, ref_model = tiny_hf(arch, classification=True)
  model = convert.load_hf(path)
  assert model.cfg.num_labels == 2
  ids, mask = _batch(side)
  ids = np.where(mask == 1, ids, ref_model.config.pad_token_id)
  with torch.no_grad():
    ref = ref_model(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      position_ids=torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0)),
    ).logits
  got = np.asarray(score(model, jnp.asarray(ids), jnp.asarray(mask)))
  assert got.shape == (3, 2)
  np.testing.assert_allclose(got, ref.numpy(), atol=TOL)


def _tiny_cfg(**kw):
  return tiny_config(**{'vocab_size': 97, **kw})


@pytest.mark.parametrize('window', [None, 4])
def test_prefill_then_decode_equals_full_forward(window):
  cfg = _tiny_cfg(sliding_window=window)
  model = Decoder(cfg, rngs=nnx.Rngs(1))
  ids, mask = _batch('left', t=10, vocab=97)
  full = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
  p = 6  # prompt: the first 6 slots (left-padded), then 4 tokens one at a time
  total = ids.shape[1]
  cache = init_cache(cfg, ids.shape[0], total)
  kv_mask = np.zeros_like(mask)
  kv_mask[:, :p] = mask[:, :p]
  pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
  logits, cache = decode(
    model, jnp.asarray(ids[:, :p]), jnp.asarray(pos[:, :p]), cache, 0, jnp.asarray(kv_mask)
  )
  outs = [np.asarray(logits)]
  for t in range(p, total):
    kv_mask[:, t] = 1
    logits, cache = decode(
      model,
      jnp.asarray(ids[:, t : t + 1]),
      jnp.asarray(pos[:, t : t + 1]),
      cache,
      jnp.asarray(t),
      jnp.asarray(kv_mask),
    )
    outs.append(np.asarray(logits))
  stepped = np.concatenate(outs, axis=1)
  valid = mask.astype(bool)
  np.testing.assert_allclose(stepped[valid], full[valid], atol=1e-5)


@pytest.mark.parametrize('window', [None, 4])
def test_prefill_of_the_last_position_only_writes_the_same_cache(window):
  # decode_hidden(prefill=True), the sampler's prefill: the last position's hidden state and
  # every layer's cache equal those of the full prefill (which runs every position everywhere and
  # attends over the whole cache, not just the prompt's new slots).
  cfg = _tiny_cfg(sliding_window=window, num_layers=3)
  model = Decoder(cfg, rngs=nnx.Rngs(2))
  ids, mask = _batch('left', t=10, vocab=97)
  s = ids.shape[1] + 3
  kv_mask = np.zeros((ids.shape[0], s), np.int32)
  kv_mask[:, : ids.shape[1]] = mask
  pos = positions_from_mask(jnp.asarray(mask))
  args = (jnp.asarray(ids), pos)

  @functools.partial(jax.jit, static_argnums=0)
  def run(prefill, ids, pos):
    cache = init_cache(cfg, ids.shape[0], s)
    return model.decode_hidden(ids, pos, cache, 0, jnp.asarray(kv_mask), prefill=prefill)

  h_all, cache_all = run(False, *args)
  h_last, cache_last = run(True, *args)
  assert h_last.shape == (ids.shape[0], 1, cfg.hidden_size)
  np.testing.assert_allclose(h_last[:, 0], h_all[:, -1], atol=1e-5)
  # Every valid slot is equal to float32 rounding: the two programs attend over 10 and 13 slots
  # (the same nonzero terms) and XLA fuses their projections differently. Padding slots, never
  # attended to, hold different values: a padding query sees no valid key and averages over all
  # the slots it is given.
  valid = kv_mask.astype(bool)
  for name, m in (('k', valid[:, None, None, :]), ('v', valid[:, None, :, None])):
    for a, b in zip(cache_all[name], cache_last[name], strict=True):
      np.testing.assert_allclose(np.where(m, a, 0), np.where(m, b, 0), rtol=1e-6, atol=1e-6)


def test_padding_does_not_change_a_row():
  model = Decoder(_tiny_cfg(), rngs=nnx.Rngs(2))
  ids = np.random.RandomState(3).randint(3, 97, (1, 7))
  alone = np.asarray(forward(model, jnp.asarray(ids), jnp.ones((1, 7), jnp.int32)))[0]
  padded = np.concatenate([np.zeros((1, 5), int), ids], axis=1)
  mask = np.concatenate([np.zeros((1, 5), int), np.ones((1, 7), int)], axis=1)
  got = np.asarray(forward(model, jnp.asarray(padded), jnp.asarray(mask)))[0, 5:]
  np.testing.assert_allclose(got, alone, atol=1e-5)


def test_outputs_are_causal():
  model = Decoder(_tiny_cfg(), rngs=nnx.Rngs(3))
  ids = np.random.RandomState(4).randint(3, 97, (1, 8))
  changed = ids.copy()
  changed[0, 5] = (ids[0, 5] + 1) % 97
  ones = jnp.ones((1, 8), jnp.int32)
  a = np.asarray(forward(model, jnp.asarray(ids), ones))
  b = np.asarray(forward(model, jnp.asarray(changed), ones))
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
  assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-4


@pytest.mark.parametrize(
  'variant', [dict(scan_layers=False), dict(remat='full'), dict(remat='dots')]
)
def test_layer_execution_variants_agree(variant):
  """Unrolled or scanned layers, with or without remat: one parameter layout, one function."""
  cfg = _tiny_cfg()
  base = Decoder(cfg, rngs=nnx.Rngs(5))
  other = nnx.merge(
    nnx.graphdef(Decoder(cfg.replace(**variant), rngs=nnx.Rngs(0))), nnx.state(base)
  )
  ids, mask = _batch('right', vocab=97)

  def loss(m):
    return jnp.sum(m(jnp.asarray(ids), jnp.asarray(mask)) ** 2) * 1e-3

  grad = nnx.jit(nnx.grad(loss))
  np.testing.assert_allclose(
    np.asarray(forward(other, jnp.asarray(ids), jnp.asarray(mask))),
    np.asarray(forward(base, jnp.asarray(ids), jnp.asarray(mask))),
    atol=1e-5,
  )
  g_base = grad(base)
  g_other = grad(other)
  for x, y in zip(jax.tree.leaves(g_base), jax.tree.leaves(g_other)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_close_to_float32():
  """bf16 compute (f32 params) stays within 5% of the logit range of float32 compute."""
  cfg = _tiny_cfg(hidden_size=64, intermediate_size=128, num_heads=4, head_dim=16)
  f32 = Decoder(cfg, rngs=nnx.Rngs(6))
  bf16 = nnx.merge(
    nnx.graphdef(Decoder(cfg.replace(dtype='bfloat16'), rngs=nnx.Rngs(0))), nnx.state(f32)
  )
  ids, mask = _batch('right', vocab=97)
  a = np.asarray(forward(f32, jnp.asarray(ids), jnp.asarray(mask)))
  b = np.asarray(forward(bf16, jnp.asarray(ids), jnp.asarray(mask)))
  assert b.dtype == np.float32  # logits stay float32
  valid = mask.astype(bool)
  scale = np.abs(a[valid]).max()
  assert np.abs(a[valid] - b[valid]).max() <= 0.05 * scale
  assert (a[valid].argmax(-1) == b[valid].argmax(-1)).mean() >= 0.9


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match='num_kv_heads'):
    _tiny_cfg(num_kv_heads=3)
  with pytest.raises(ValueError, match='unsupported arch'):
    _tiny_cfg(arch='gpt2')
  with pytest.raises(ValueError, match='LoRA targets'):
    _tiny_cfg(lora_rank=4, lora_targets=('qkv',))
