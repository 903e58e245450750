"""Test setup: 8 fake CPU devices (set before jax is imported) so 2x4 meshes are exercised."""

import os
import pathlib

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_flags = os.environ.get('XLA_FLAGS', '')
if 'xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def compile_cache_dir(tmp_path_factory) -> pathlib.Path:
  """One persistent compilation cache for every whole-pipeline subprocess of this test session
  (`--config.compile_cache_dir=`), shared by the xdist workers: the tiny runs of several files have
  equal shapes, so most of their programs compile once per session instead of once per run. JAX
  writes an entry only where its key is absent and results do not depend on the cache (a served
  program computes what a fresh compile does; test_pipeline compares runs that compiled and runs
  that were served). Sharded CPU meshes never use it (ilr_jax/compile_cache.py)."""
  root = tmp_path_factory.getbasetemp()
  if root.name.startswith('popen-gw'):  # xdist: one basetemp per worker under a common root
    root = root.parent
  path = root / 'jax_cache'
  path.mkdir(exist_ok=True)
  return path


@pytest.fixture(scope='session')
def shared_data():
  """Path to ../shared/data; skips the test where the folder is absent (a user's clone)."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'{SHARED_DATA} is absent: the shared datasets exist only on the project machines')
  return SHARED_DATA


TINY_HF = dict(
  vocab_size=128,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=128,
)


def tiny_hf_config(arch: str, classification: bool = False, **overrides):
  """A tiny transformers config of `arch` ('gemma', 'mistral', 'llama')."""
  import transformers

  cls = {
    'gemma': transformers.GemmaConfig,
    'mistral': transformers.MistralConfig,
    'llama': transformers.LlamaConfig,
  }[arch]
  kw = dict(TINY_HF, **overrides)
  if classification:
    kw.setdefault('num_labels', 2)
    kw.setdefault('pad_token_id', 0)
  return cls(**kw)


def save_tiny_hf(path, arch: str, classification: bool = False, seed: int = 0, **overrides):
  """Random-weight transformers model saved with `save_pretrained`; returns the torch model."""
  import torch
  import transformers

  torch.manual_seed(seed)
  cfg = tiny_hf_config(arch, classification, **overrides)
  auto = (
    transformers.AutoModelForSequenceClassification
    if classification
    else transformers.AutoModelForCausalLM
  )
  model = auto.from_config(cfg).eval()
  model.save_pretrained(path)
  return model


@pytest.fixture
def tiny_hf(tmp_path):
  """Factory: tiny_hf(arch, classification=False, **config) -> (model_dir, torch_model)."""
  counter = iter(range(1000))

  def make(arch, classification=False, **overrides):
    path = tmp_path / f'{arch}-{next(counter)}'
    return path, save_tiny_hf(path, arch, classification, **overrides)

  return make
