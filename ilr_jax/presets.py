"""Model presets as data: the published config.json values of the paper's models, plus tiny ones.

A preset is looked up by name; nothing inspects a path string to learn what a model is. Real
presets give the architecture only (weights come from an HF directory); `tiny-*` presets are for
CPU runs and tests.
"""

from __future__ import annotations

from typing import Any

from ilr_jax.model import ModelConfig

# config.json fields, as published on the Hugging Face hub for each model. Models of one family
# share their family's fields and differ in their sizes.
_GEMMA = dict(
  model_type='gemma',
  vocab_size=256000,
  head_dim=256,
  hidden_activation='gelu_pytorch_tanh',
  max_position_embeddings=8192,
  rms_norm_eps=1e-6,
  rope_theta=10000.0,
  bos_token_id=2,
  eos_token_id=1,
  pad_token_id=0,
  tie_word_embeddings=True,
)
_LLAMA_3 = dict(
  model_type='llama',
  vocab_size=128256,
  num_key_value_heads=8,
  hidden_act='silu',
  max_position_embeddings=8192,
  rms_norm_eps=1e-5,
  rope_theta=500000.0,
  bos_token_id=128000,
  eos_token_id=128001,
  tie_word_embeddings=False,
)
# CPU presets (vocab fits the arith SentencePiece model: unk 0, bos 1, eos 2, pad 3).
_TINY = dict(
  model_type='llama',
  vocab_size=512,
  num_key_value_heads=2,
  hidden_act='silu',
  max_position_embeddings=512,
  rms_norm_eps=1e-6,
  rope_theta=10000.0,
  bos_token_id=1,
  eos_token_id=2,
  pad_token_id=3,
  tie_word_embeddings=True,
)


def _sizes(hidden: int, intermediate: int, layers: int, heads: int, **more) -> dict[str, Any]:
  return dict(
    hidden_size=hidden,
    intermediate_size=intermediate,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    **more,
  )


HF_CONFIGS: dict[str, dict[str, Any]] = {
  'gemma-2b': {**_GEMMA, **_sizes(2048, 16384, 18, 8, num_key_value_heads=1)},
  'gemma-7b': {**_GEMMA, **_sizes(3072, 24576, 28, 16, num_key_value_heads=16)},
  'mistral-7b': dict(
    model_type='mistral',
    vocab_size=32000,
    **_sizes(4096, 14336, 32, 32, num_key_value_heads=8),
    hidden_act='silu',
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    sliding_window=4096,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
  ),
  'llama-3-8b': {**_LLAMA_3, **_sizes(4096, 14336, 32, 32)},
  'llama-3-70b': {**_LLAMA_3, **_sizes(8192, 28672, 80, 64)},
  'tiny': {**_TINY, **_sizes(64, 192, 2, 4)},
  'tiny-large': {**_TINY, **_sizes(128, 384, 4, 4)},
}


def names() -> list[str]:
  return sorted(HF_CONFIGS)


def hf_config(name: str):
  """transformers' config object for preset `name`."""
  import transformers

  return transformers.AutoConfig.for_model(**_lookup(name))


def get_preset(name: str, **overrides) -> ModelConfig:
  """ModelConfig of preset `name`, with ModelConfig fields overridden (dtype, vocab_size, ...)."""
  from ilr_jax.convert import config_from_hf

  return config_from_hf(hf_config(name), **overrides)


def _lookup(name: str) -> dict[str, Any]:
  if name not in HF_CONFIGS:
    raise ValueError(f'unknown model preset {name!r}; known presets: {", ".join(names())}')
  return dict(HF_CONFIGS[name])
