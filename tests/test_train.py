"""Train steps: sharded = single device, DPO golden vs PyTorch, accumulation, optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from ilr_jax import convert, optimizers, train
from ilr_jax import sharding as shd
from ilr_jax.model import Decoder, ModelConfig

CFG = ModelConfig(
  arch='mistral',
  vocab_size=128,
  hidden_size=32,
  intermediate_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  scan_layers=False,  # unrolled: half the compile time of the scan at 2 layers
)
# Adam's first update is g / (|g| + eps): for entries whose gradient is pure rounding noise
# (|g| ~ 1e-9) a tiny eps turns that noise into a full-size step, so comparisons of two equal
# computations done in different orders use a larger eps.
STEP_CFG = dict(lr=1e-3, eps=1e-3, warmup_ratio=0.0, schedule='constant')


def _mesh(data, fsdp, tensor):
  return shd.make_mesh(data, fsdp, tensor, devices=jax.devices()[: data * fsdp * tensor])


def fast_model(cfg, mesh=None, seed=0):
  """A Decoder with random weights drawn in numpy: no per-test compilation of initialisers.

  Kernels ~ N(0, 0.02), norm scales as Decoder's init; placed by the train rules. Base models
  only (add an adapter with lora.add_lora).
  """
  if cfg.lora_rank:
    raise ValueError('fast_model builds base models only')
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  mesh = mesh or _mesh(1, 1, 1)
  shardings = shd.state_shardings(abstract, mesh)
  rng = np.random.default_rng(seed)

  def fill(var, sharding):
    names = var.get_metadata().get('out_sharding') or ()
    if 'norm' in names:
      value = np.full(var.shape, 0.0 if cfg.norm_offset else 1.0)
    else:
      value = rng.normal(0.0, 0.02, var.shape)
    return var.replace(shd.put(value.astype(var.dtype), sharding))

  state = jax.tree.map(fill, abstract, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


def _model(cfg, mesh, seed=0):
  return fast_model(cfg, mesh, seed)


def _sft_batch(rng, b, t, vocab=128):
  tokens = rng.integers(3, vocab, (b, t)).astype(np.int32)
  lengths = rng.integers(t // 2, t + 1, b)
  prompts = rng.integers(2, t // 2, b)
  pos = np.arange(t)
  mask = (pos < lengths[:, None]).astype(np.int32)
  loss_mask = ((pos >= prompts[:, None]) & (pos < lengths[:, None])).astype(np.int32)
  return {'tokens': tokens, 'mask': mask, 'loss_mask': loss_mask}


def _dpo_batch(rng, b, t, vocab=128):
  c, r = _sft_batch(rng, b, t, vocab), _sft_batch(rng, b, t, vocab)
  batch = {f'chosen_{k}': v for k, v in c.items()}
  batch.update({f'rejected_{k}': v for k, v in r.items()})
  batch['ref_chosen_logps'] = rng.normal(-60, 5, b).astype(np.float32)
  batch['ref_rejected_logps'] = rng.normal(-60, 5, b).astype(np.float32)
  return batch


def _classifier_batch(rng, b, t, vocab=128):
  s = _sft_batch(rng, b, t, vocab)
  return {'tokens': s['tokens'], 'mask': s['mask'], 'labels': rng.integers(0, 2, b)}


BATCHES = {'sft': _sft_batch, 'dpo': _dpo_batch, 'classifier': _classifier_batch}


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12))


def _one_step(loss, mesh, batch, **kw):
  cfg = CFG.replace(num_labels=2) if loss == 'classifier' else CFG
  model = _model(cfg, mesh)
  trainer, state = train.make_trainer(
    model, loss, train.TrainConfig(**STEP_CFG, **kw), 10, mesh=mesh
  )
  state, metrics = trainer.train_step(state, trainer.shard_batch(batch))
  return jax.device_get(metrics), jax.device_get(state.params), trainer, state


@pytest.mark.slow
@pytest.mark.parametrize('loss', ['sft', 'dpo', 'classifier'])
def test_sharded_step_equals_single_device(loss):
  batch = BATCHES[loss](np.random.default_rng(0), 8, 16)
  m1, p1, _, _ = _one_step(loss, _mesh(1, 1, 1), batch)
  m8, p8, trainer, state = _one_step(loss, _mesh(1, 2, 4), batch)
  # The 2 x 4 mesh really splits the parameters (fsdp and tensor).
  spec = state.params['layers']['q']['kernel'][...].sharding.spec
  assert spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
  assert set(m1) >= {'loss', 'grad_norm', 'param_norm', 'lr'}
  for k in ('loss', 'grad_norm', 'param_norm'):
    assert abs(m1[k] - m8[k]) <= 1e-5 * abs(m1[k]), k
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    assert _rel(a, b) < 1e-5
  # The jitted step traced once; a second batch of the same shape reuses it.
  batch2 = BATCHES[loss](np.random.default_rng(1), 8, 16)
  trainer.train_step(state, trainer.shard_batch(batch2))
  assert trainer.train_step.jitted._cache_size() == 1


def _hf_pair(tmp_path):
  torch.manual_seed(0)
  hf_cfg = transformers.AutoConfig.for_model(**convert.hf_config_dict(CFG))
  hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).float()
  hf.save_pretrained(tmp_path)
  return hf, convert.load_hf(tmp_path, mesh=_mesh(1, 1, 1))


def test_dpo_loss_and_grad_match_pytorch(tmp_path):
  hf, model = _hf_pair(tmp_path)
  batch = _dpo_batch(np.random.default_rng(3), 4, 16)
  cfg = train.TrainConfig(dpo_beta=0.1)

  graphdef, params = nnx.split(model)

  def loss_fn(params, max_targets):
    terms = train.dpo_loss(nnx.merge(graphdef, params), batch, cfg, max_targets)
    return terms.total / terms.count, terms

  value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=1)
  (loss, terms), grads = value_and_grad(params, None)
  # Logits only at each row's target positions (the most any row has), as fit.py does.
  most = max(int(batch[f'{s}_loss_mask'][:, 1:].sum(-1).max()) for s in ('chosen', 'rejected'))
  assert most < 15
  loss_gathered, _ = jax.jit(loss_fn, static_argnums=1)(params, most)

  def logps(ids, mask, lm):
    ids, mask, lm = (torch.as_tensor(np.asarray(x), dtype=torch.long) for x in (ids, mask, lm))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (lp * (lm[:, 1:] * mask[:, 1:])).sum(-1)

  pc = logps(batch['chosen_tokens'], batch['chosen_mask'], batch['chosen_loss_mask'])
  pr = logps(batch['rejected_tokens'], batch['rejected_mask'], batch['rejected_loss_mask'])
  rc, rr = (torch.as_tensor(batch[k]) for k in ('ref_chosen_logps', 'ref_rejected_logps'))
  ref_loss = -torch.nn.functional.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
  ref_loss.backward()

  np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
  np.testing.assert_allclose(float(loss_gathered), ref_loss.item(), rtol=1e-5)
  want_chosen = (0.1 * (pc - rc)).mean().item()
  np.testing.assert_allclose(terms.sums['rewards/chosen'] / 4, want_chosen, rtol=1e-4)
  pmap = convert.param_map(model.cfg)
  flat = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(grads)}
  hf_params = dict(hf.named_parameters())
  for path in [('lm_head', 'kernel'), ('layers', 'q', 'kernel'), ('layers', 'down', 'kernel')]:
    name, _, to_hf = pmap[path]
    g = np.asarray(flat[path][...])
    ours = to_hf(g[1]) if '{i}' in name else to_hf(g)
    want = hf_params[name.format(i=1)].grad.numpy()
    np.testing.assert_allclose(ours, want, rtol=2e-4, atol=1e-6 * np.abs(want).max())


def test_accumulation_equals_large_batch():
  mesh = _mesh(1, 1, 1)
  batch = _sft_batch(np.random.default_rng(5), 32, 16)
  for k in batch:
    batch[k][29:] = 0  # padding rows (a short last batch): the last micro-batch has 5 real rows
  kw = dict(global_batch=32)
  m_big, p_big, _, _ = _one_step('sft', mesh, batch, **kw)
  micro = {k: v.reshape(4, 8, 16) for k, v in batch.items()}
  m_acc, p_acc, _, _ = _one_step('sft', mesh, micro, micro_batch=8, **kw)
  np.testing.assert_allclose(m_acc['loss'], m_big['loss'], rtol=1e-6)
  np.testing.assert_allclose(m_acc['grad_norm'], m_big['grad_norm'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p_big), jax.tree.leaves(p_acc)):
    assert _rel(a, b) < 1e-5


def test_schedule_matches_transformers():
  cfg = train.TrainConfig(lr=2e-4, warmup_ratio=0.05, schedule='cosine')
  total = 97
  sched = optimizers.make_schedule(cfg, total)
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
  hf = transformers.get_cosine_schedule_with_warmup(opt, optimizers.warmup_steps(cfg, total), total)
  want = []
  for _ in range(total):
    want.append(opt.param_groups[0]['lr'])
    opt.step()
    hf.step()
  got = [float(sched(s)) for s in range(total)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  assert got[0] == 0.0  # HF's first update runs at lr 0


@pytest.mark.parametrize('name', ['adamw', 'rmsprop'])
def test_optimizer_matches_torch(name):
  cfg = train.TrainConfig(
    optimizer=name,
    lr=1e-2,
    schedule='constant',
    warmup_ratio=0.0,
    clip_norm=None,
    weight_decay=0.1,
  )
  tx = optimizers.make_optimizer(cfg, 10)
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(4, 3)).astype(np.float32)
  grads = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(3)]
  params = {'w': jnp.asarray(w0)}
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update({'w': jnp.asarray(g)}, state, params)
    params = jax.tree.map(jnp.add, params, updates)
  p = torch.nn.Parameter(torch.as_tensor(w0))
  if name == 'adamw':
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1)
  else:
    opt = torch.optim.RMSprop([p], lr=1e-2, weight_decay=0.1)
  for g in grads:
    p.grad = torch.as_tensor(g)
    opt.step()
  np.testing.assert_allclose(np.asarray(params['w']), p.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_bad_config_is_a_clear_error():
  with pytest.raises(ValueError, match='micro_batch=5 must divide global_batch=32'):
    train.TrainConfig(global_batch=32, micro_batch=5)
  with pytest.raises(ValueError, match='lora_dropout'):
    train.TrainConfig(lora_dropout=0.1)
  with pytest.raises(ValueError, match='optimizer'):
    train.TrainConfig(optimizer='sgd')


def test_run_length_does_not_change_the_compiled_step():
  # The schedule's lengths live in the optimizer state: fits of different lengths (the pipeline
  # trains on label sets of changing size) share one compiled step. Its lr still follows each
  # run's own schedule.
  mesh = _mesh(1, 1, 1)
  batch = _sft_batch(np.random.default_rng(0), 4, 16)
  texts, lrs = [], []
  for total in (10, 37):
    model = _model(CFG, mesh)
    cfg = train.TrainConfig(**{**STEP_CFG, 'warmup_ratio': 0.2, 'schedule': 'cosine'})
    trainer, state = train.make_trainer(model, 'sft', cfg, total, mesh=mesh)
    b = trainer.shard_batch(batch)
    dynamic = (state.step, state.params, state.opt_state)
    texts.append(trainer.train_step.jitted.lower(dynamic, state.frozen, b, None).as_text())
    for _ in range(3):
      state, metrics = trainer.train_step(state, b)
    lrs.append(float(metrics['lr']))
    want = float(optimizers.make_schedule(cfg, total)(2))
    assert lrs[-1] == pytest.approx(want, rel=1e-6)
  assert texts[0] == texts[1]
  assert lrs[0] != pytest.approx(lrs[1])
