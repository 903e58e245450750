"""LoRA: a fresh adapter keeps base outputs; merged exports load in transformers; what trains."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from test_train import _sft_batch

from ilr_jax import convert, lora, train
from ilr_jax.model import num_params
from ilr_jax.testing import device_mesh, random_model, tiny_config

# Unrolled layers: half the compile time of the scan at 2 layers.
CFG = tiny_config('mistral', scan_layers=False)

# One compiled forward per model structure (eager calls would compile every op separately).
_forward = nnx.jit(lambda model, tokens: model(tokens))


def fwd(model, tokens):
  return np.asarray(_forward(model, np.asarray(tokens, np.int32)))


def test_fresh_adapter_keeps_base_outputs_and_is_sharded():
  mesh = device_mesh(1, 2, 4)
  base = random_model(CFG, mesh)
  tokens = np.random.default_rng(0).integers(3, 128, (2, 12))
  model = lora.add_lora(base, 4, 8.0, 'all', rng=1)
  # The base arrays are reused, not copied.
  assert model.layers.q.kernel[...] is base.layers.q.kernel[...]
  # The adapter is created sharded like its kernel's input axes.
  spec = model.layers.q.lora_a[...].sharding.spec
  assert spec == jax.sharding.PartitionSpec(None, 'fsdp', None)
  want = fwd(base, tokens)
  assert model.cfg.lora_rank == 4 and model.cfg.lora_targets == lora.resolve_targets('all')
  np.testing.assert_array_equal(fwd(model, tokens), want)
  assert _num_trainable(model) == 2 * (
    4 * (32 + 32) + 2 * 4 * (32 + 16) + 4 * (32 + 32) + 3 * 4 * (32 + 64)
  )
  with pytest.raises(ValueError, match='already has a rank-4 adapter'):
    lora.add_lora(model, 4, 8.0)


def test_merged_export_matches_transformers(tmp_path):
  model = lora.add_lora(random_model(CFG), 4, 8.0, ('q', 'v', 'down'), rng=2)
  # Move every B away from zero so the adapter changes the outputs.
  rng = np.random.default_rng(0)
  for name in ('q', 'v', 'down'):
    var = getattr(model.layers, name).lora_b
    var[...] = rng.normal(0, 0.05, var.shape).astype(np.float32)
  tokens = rng.integers(3, 128, (2, 12))
  ours = fwd(model, tokens)
  assert np.abs(ours - fwd(random_model(CFG), tokens)).max() > 1e-3
  merged = lora.merge_lora(model)
  assert merged.cfg.lora_rank == 0
  np.testing.assert_allclose(fwd(merged, tokens), ours, atol=1e-5)
  convert.save_hf(merged, tmp_path / 'hf')
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').float().eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_only_the_adapter_trains():
  model = lora.add_lora(random_model(CFG), 4, 8.0, 'all', rng=3)
  base_q = np.asarray(model.layers.q.kernel[...])
  cfg = train.TrainConfig(lr=1e-2, warmup_ratio=0.0, lora_rank=4, lora_alpha=8.0)
  trainer, state = train.make_trainer(model, 'sft', cfg, 10)
  n_adapter = _num_trainable(model)
  # Optimizer state holds the adapter's moments only (Adam: mu and nu), not the frozen base.
  opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert sum(x.size for x in opt_leaves) == 2 * n_adapter
  batch = trainer.shard_batch(_sft_batch(np.random.default_rng(0), 8, 16))
  state, metrics = trainer.train_step(state, batch)
  state, metrics = trainer.train_step(state, batch)
  trained = trainer.model(state)
  np.testing.assert_array_equal(np.asarray(trained.layers.q.kernel[...]), base_q)
  assert np.abs(np.asarray(trained.layers.q.lora_b[...])).max() > 0
  with pytest.raises(ValueError, match='lora_rank=8 but the model has lora_rank=4'):
    train.make_trainer(trained, 'sft', cfg.replace(lora_rank=8), 10)


def test_targets_and_dropout_errors():
  assert lora.resolve_targets('q,v') == ('q', 'v')
  with pytest.raises(ValueError, match='LoRA targets'):
    lora.resolve_targets(['q', 'wq'])
  with pytest.raises(ValueError, match='lora_dropout=0.05 is not supported'):
    lora.check_dropout(0.05)
  with pytest.raises(ValueError, match='no LoRA adapter'):
    lora.merge_lora(random_model(CFG))


def test_lora_model_outputs_unchanged_by_nnx_split_merge():
  # The trainable/frozen split rebuilds the same model (what every train step does).
  model = lora.add_lora(random_model(CFG), 2, 4.0, 'all', rng=4)
  graphdef, trainable, frozen = lora.split_trainable(model)
  assert all(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(trainable, is_leaf=_is_var))
  assert not any(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(frozen, is_leaf=_is_var))
  tokens = np.arange(3, 15).reshape(1, 12)
  np.testing.assert_array_equal(
    fwd(nnx.merge(graphdef, trainable, frozen), tokens), fwd(model, tokens)
  )


def _is_var(x):
  return isinstance(x, nnx.Variable)


def _num_trainable(model):
  return num_params(lora.split_trainable(model)[1])
