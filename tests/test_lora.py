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
  # Equal to float32 rounding, not bit for bit: XLA is free to compile x @ W beside the adapter's
  # x @ A (same left operand) differently from x @ W alone.
  np.testing.assert_allclose(fwd(model, tokens), want, rtol=1e-6, atol=1e-7)
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


# Our kernel names -> PEFT's module names on a transformers Mistral/Llama decoder layer.
_PEFT_NAMES = dict(
  q='self_attn.q_proj',
  k='self_attn.k_proj',
  v='self_attn.v_proj',
  o='self_attn.o_proj',
  gate='mlp.gate_proj',
  up='mlp.up_proj',
  down='mlp.down_proj',
)


def _peft_lora_a(rank: int) -> dict[str, np.ndarray]:
  """PEFT's fresh lora_A of every target of a tiny transformers Mistral, as [in, R] per layer."""
  peft = pytest.importorskip('peft')
  hf_cfg = transformers.MistralConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
  )
  torch.manual_seed(0)
  hf = transformers.MistralForCausalLM(hf_cfg)
  lcfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(_PEFT_NAMES.values()))
  wrapped = peft.get_peft_model(hf, lcfg)
  out = {}
  for ours, name in _PEFT_NAMES.items():
    mats = [
      m.lora_A['default'].weight.detach().numpy().T
      for n, m in wrapped.named_modules()
      if n.endswith(name) and hasattr(m, 'lora_A')
    ]
    out[ours] = np.stack(mats)
  return out


@pytest.mark.slow
@pytest.mark.parametrize('how', ['add_lora', 'model_init'])
def test_fresh_adapter_a_follows_peft_init(how):
  """A ~ U(+-1/sqrt(fan_in)) as PEFT's kaiming_uniform(a=sqrt(5)): bound and spread per target."""
  rank = 16
  peft_a = _peft_lora_a(rank)
  stacked = tiny_config('mistral')  # scanned layers: each kernel stacks the two layers
  if how == 'add_lora':
    model = lora.add_lora(random_model(stacked), rank, 2.0 * rank, 'all', rng=3)
  else:  # model.Linear's own initialiser (a Decoder built with lora_rank in its config)
    from ilr_jax.model import Decoder

    cfg = stacked.replace(lora_rank=rank, lora_alpha=2.0 * rank)
    model = Decoder(cfg, rngs=nnx.Rngs(3))
  for name, theirs in peft_a.items():
    ours = np.asarray(getattr(model.layers, name).lora_a[...])
    fan_in = int(np.prod(ours.shape[1:-1]))
    assert ours.shape[0] * fan_in * rank == theirs.size, name
    assert fan_in == theirs.shape[1], name  # the same fan-in as PEFT's in_features
    bound = 1.0 / np.sqrt(fan_in)
    # Both stay inside the bound and fill it: a uniform's largest draw of >= 1,000 is within 1%.
    for a in (ours, theirs):
      assert np.abs(a).max() <= bound * (1 + 1e-6), name
      assert np.abs(a).max() >= 0.98 * bound, name
    # Same spread as PEFT's draws (std of U(+-b) is b / sqrt(3)); the old sqrt(3 / fan_in)
    # bound gives 1.73x the spread.
    assert np.std(ours) == pytest.approx(np.std(theirs), rel=0.1), name
    assert np.std(ours) == pytest.approx(bound / np.sqrt(3), rel=0.1), name
    # A fresh B is zero in both.
    assert not np.asarray(getattr(model.layers, name).lora_b[...]).any()
