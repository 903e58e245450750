"""Losses without the full logits equal today's full-logits formulas (values and gradients), and a
compiled SFT step holds no float32 logits buffer larger than one chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ilr_jax import costs, examples, logprobs
from ilr_jax import train as train_lib
from ilr_jax.model import Decoder, ModelConfig, last_token_index

CFG = ModelConfig(
  arch='gemma',
  vocab_size=89,
  hidden_size=32,
  intermediate_size=48,
  num_layers=2,
  num_heads=4,
  num_kv_heads=1,
  head_dim=16,
  activation='gelu_tanh',
  norm_offset=True,
  embed_scale=True,
  tie_embeddings=True,
)


def _sft_batch(b=4, t=12, seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, CFG.vocab_size, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  loss_mask = np.zeros((b, t), np.int32)
  for i in range(b):
    n = t - 2 * i  # right padding
    mask[i, n:] = 0
    loss_mask[i, n // 2 : n] = 1
  return {'tokens': tokens * mask, 'mask': mask, 'loss_mask': loss_mask}


def _full_logps(model, tokens, mask, loss_mask):
  """Today's formula: logits at every position, log-softmax, pick the next token."""
  logp = jax.nn.log_softmax(model(tokens, mask)[:, :-1], axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  w = (loss_mask[:, 1:] * mask[:, 1:]).astype(jnp.float32)
  return jnp.where(w > 0, picked, 0.0), w


def _grads(loss, model):
  return jax.tree.leaves(nnx.jit(nnx.grad(loss))(model))


def _assert_trees_close(a, b):
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('chunk', [None, 4])
def test_sft_loss_and_gradients_match_full_logits(chunk):
  model = Decoder(CFG, rngs=nnx.Rngs(0))
  batch = {k: jnp.asarray(v) for k, v in _sft_batch().items()}
  cfg = train_lib.TrainConfig(logits_chunk=chunk)

  def reference(m):
    lp, w = _full_logps(m, batch['tokens'], batch['mask'], batch['loss_mask'])
    n = w.sum(-1)
    return jnp.sum(-lp.sum(-1) / n)  # every row has targets

  def ours(m):
    return train_lib.sft_loss(m, batch, cfg, max_targets=6).total

  np.testing.assert_allclose(nnx.jit(ours)(model), nnx.jit(reference)(model), rtol=1e-6)
  _assert_trees_close(_grads(ours, model), _grads(reference, model))


def test_dpo_loss_and_gradients_match_full_logits():
  model = Decoder(CFG, rngs=nnx.Rngs(1))
  c, r = _sft_batch(seed=1), _sft_batch(seed=2)
  batch = {f'chosen_{k}': jnp.asarray(v) for k, v in c.items()}
  batch.update({f'rejected_{k}': jnp.asarray(v) for k, v in r.items()})
  batch['ref_chosen_logps'] = jnp.asarray([-40.0, -30.0, -20.0, -10.0])
  batch['ref_rejected_logps'] = jnp.asarray([-35.0, -33.0, -21.0, -9.0])
  cfg = train_lib.TrainConfig(dpo_beta=0.1, logits_chunk=3)

  def reference(m):
    seq = lambda s: _full_logps(m, *(batch[f'{s}_{k}'] for k in ('tokens', 'mask', 'loss_mask')))
    pc, pr = seq('chosen')[0].sum(-1), seq('rejected')[0].sum(-1)
    margin = (pc - batch['ref_chosen_logps']) - (pr - batch['ref_rejected_logps'])
    return jnp.sum(-jax.nn.log_sigmoid(0.1 * margin))

  def ours(m):
    return train_lib.dpo_loss(m, batch, cfg, max_targets=6).total

  np.testing.assert_allclose(nnx.jit(ours)(model), nnx.jit(reference)(model), rtol=1e-6)
  _assert_trees_close(_grads(ours, model), _grads(reference, model))


def test_reference_logps_match_full_logits_and_bound_targets():
  model = Decoder(CFG, rngs=nnx.Rngs(2))
  b = _sft_batch(seed=3)
  got = train_lib.sequence_logps(model, b['tokens'], b['mask'], b['loss_mask'])
  lp, _ = _full_logps(model, *(jnp.asarray(b[k]) for k in ('tokens', 'mask', 'loss_mask')))
  np.testing.assert_allclose(np.asarray(got), np.asarray(lp.sum(-1)), rtol=1e-6)
  assert examples.target_bound(6, 12) == 6 and examples.target_bound(2, 12) == 3
  assert examples.target_bound(7, 12) == 11


def test_classifier_loss_and_gradients_match_full_hidden():
  cfg = CFG.replace(num_labels=2, pad_token_id=0)
  model = Decoder(cfg, rngs=nnx.Rngs(3))
  b = _sft_batch(seed=4)
  batch = {'tokens': jnp.asarray(b['tokens']), 'mask': jnp.asarray(b['mask'])}
  batch['labels'] = jnp.asarray([0, 1, 1, 0], jnp.int32)

  def reference(m):
    h = m.hidden(batch['tokens'], batch['mask'])
    last = last_token_index(batch['mask'])
    logits = m.score_head(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, batch['labels'][:, None], axis=-1).sum()

  def ours(m):
    return train_lib.classifier_loss(m, batch, train_lib.TrainConfig()).total

  np.testing.assert_allclose(nnx.jit(ours)(model), nnx.jit(reference)(model), rtol=1e-6)
  _assert_trees_close(_grads(ours, model), _grads(reference, model))


def test_chunk_size_follows_the_budget_not_the_vocabulary():
  budget = logprobs.LOGITS_BUDGET
  assert logprobs.chunk_size(32, 256, 256000) == budget // (32 * 256000)
  assert logprobs.chunk_size(8, 64, 32000) == 64  # bench-small: one chunk
  assert logprobs.chunk_size(8, 64, 32000, chunk=5) == 5
  assert logprobs.chunk_size(10**6, 64, 10**6) == 1


@pytest.mark.slow
def test_compiled_sft_step_has_no_full_logits_buffer(monkeypatch):
  """With the budget at 4 positions of the batch, no f32 [.., V] value in the compiled step covers
  more than 4 x B positions, and the chunked step's temporaries are smaller than one unchunked
  [B, P, V] block would be."""
  cfg = CFG.replace(vocab_size=4099)
  b, t = 4, 64
  monkeypatch.setattr(logprobs, 'LOGITS_BUDGET', 4 * b * cfg.vocab_size)
  chunked = costs.workload_costs(cfg, 'sft_step', b, t)
  assert costs.vocab_buffers(chunked['hlo'], 4 * b + 1, cfg.vocab_size) == 0
  monkeypatch.setattr(logprobs, 'LOGITS_BUDGET', 1 << 40)
  whole = costs.workload_costs(cfg, 'sft_step', b, t)
  p = t // 2
  assert costs.vocab_buffers(whole['hlo'], b * p, cfg.vocab_size) > 0  # the check can fail
  assert chunked['temp_bytes'] < whole['temp_bytes'] - b * p * cfg.vocab_size * 4 // 2
