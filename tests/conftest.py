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
def shared_data():
  """Path to ../shared/data; skips the test where the folder is absent (a user's clone)."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'{SHARED_DATA} is absent: the shared datasets exist only on the project machines')
  return SHARED_DATA
