"""Presets: real model sizes checked with jax.eval_shape (nothing allocated) vs transformers."""

import pytest
import torch
import transformers
from flax import nnx

from ilr_jax import presets
from ilr_jax.model import Decoder, num_params

REAL = ['gemma-2b', 'gemma-7b', 'mistral-7b', 'llama-3-8b', 'llama-3-70b']
# Published sizes, to catch a preset that drifts from its model card as well as from transformers.
PUBLISHED_BILLIONS = {
  'gemma-2b': 2.51,
  'gemma-7b': 8.54,
  'mistral-7b': 7.24,
  'llama-3-8b': 8.03,
  'llama-3-70b': 70.55,
}


@pytest.mark.parametrize('name', REAL)
def test_parameter_count_matches_transformers(name):
  cfg = presets.get_preset(name)
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  ours = num_params(nnx.state(abstract))
  with torch.device('meta'):
    ref = transformers.AutoModelForCausalLM.from_config(presets.hf_config(name))
  theirs = sum(p.numel() for p in ref.parameters())  # tied weights are counted once
  assert ours == theirs
  assert abs(ours / 1e9 - PUBLISHED_BILLIONS[name]) < 0.01


def test_preset_fields():
  g = presets.get_preset('gemma-2b')
  assert (g.num_kv_heads, g.head_dim, g.hidden_size // g.num_heads) == (1, 256, 256)
  assert g.norm_offset and g.embed_scale and g.tie_embeddings and g.activation == 'gelu_tanh'
  m = presets.get_preset('mistral-7b', dtype='bfloat16')
  assert m.sliding_window == 4096 and m.dtype == 'bfloat16' and not m.tie_embeddings
  assert presets.get_preset('llama-3-70b').rope_theta == 500000.0


def test_unknown_preset_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown model preset 'gemma-3b'; known presets: gemma-2b"):
    presets.get_preset('gemma-3b')
