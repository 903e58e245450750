"""HF import / export and our checkpoint format: round trips, sharded placement, bad input."""

import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from ilr_jax import convert
from ilr_jax import sharding as shd

forward = nnx.jit(lambda m, ids: m(ids))
IDS = np.random.RandomState(0).randint(3, 128, (2, 9))


def _torch(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize(
  'arch,kw',
  [
    ('gemma', dict(head_dim=16, num_key_value_heads=1)),
    ('mistral', dict(sliding_window=4)),
    ('llama', {}),
  ],
)
def test_export_loads_in_transformers_with_same_logits(tiny_hf, tmp_path, arch, kw):
  path, ref = tiny_hf(arch, **kw)
  model = convert.load_hf(path)
  out = tmp_path / 'export'
  convert.save_hf(model, out)
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_allclose(_torch(back, IDS), _torch(ref, IDS), atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(forward(model, jnp.asarray(IDS))), _torch(ref, IDS), atol=1e-4
  )


def test_score_head_export_round_trip(tiny_hf, tmp_path):
  path, ref = tiny_hf('llama', classification=True)
  model = convert.load_hf(path)
  convert.save_hf(model, tmp_path / 'export')
  back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / 'export')
  np.testing.assert_allclose(_torch(back.eval(), IDS), _torch(ref, IDS), atol=1e-6)


def test_sharded_import_and_checkpoint_round_trip(tiny_hf, tmp_path):
  """Imported straight into a 2x2x2 mesh; our checkpoint restores the same function."""
  path, ref = tiny_hf('mistral')
  mesh = shd.make_mesh(2, 2, 2)
  model = convert.load_hf(path, mesh=mesh)
  q = model.layers.q.kernel[...]
  assert q.sharding.mesh.shape == mesh.shape
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
  assert len({d.id for d in q.devices()}) == 8
  ckpt = tmp_path / 'ckpt'
  convert.save_checkpoint(model, ckpt, tokenizer_dir=path)
  restored = convert.load_checkpoint(ckpt)
  np.testing.assert_allclose(
    np.asarray(forward(restored, jnp.asarray(IDS))), _torch(ref, IDS), atol=1e-4
  )
  assert convert.load_model(ckpt).cfg == model.cfg
  assert not [f for f in os.listdir(tmp_path) if '.tmp' in f]  # no temporary directory left


def test_bfloat16_params_import(tiny_hf):
  path, ref = tiny_hf('llama')
  model = convert.load_hf(path, param_dtype='bfloat16', dtype='bfloat16')
  assert model.layers.q.kernel[...].dtype == jnp.bfloat16
  got = np.asarray(forward(model, jnp.asarray(IDS)))
  assert np.abs(got - _torch(ref, IDS)).max() < 0.05 * np.abs(_torch(ref, IDS)).max()


def _rewrite_tensors(path, edit):
  """Rewrite model.safetensors with `edit(dict name -> array)` applied (test helper)."""
  st = convert.SafetensorsDir(path)
  tensors = {n: np.asarray(st.get(n)) for n in st.entries}
  del st
  tensors = edit(tensors)
  specs = [(n, a.shape, a.dtype) for n, a in tensors.items()]
  os.remove(path / 'model.safetensors')
  convert.write_safetensors(path, iter(tensors.items()), specs)


@pytest.mark.parametrize(
  'edit,message',
  [
    (
      lambda t: {k: v for k, v in t.items() if k != 'model.layers.1.mlp.up_proj.weight'},
      'missing tensor model.layers.1.mlp.up_proj.weight',
    ),
    (
      lambda t: {**t, 'model.layers.0.extra.weight': np.zeros((2,), np.float32)},
      'unexpected tensor model.layers.0.extra.weight',
    ),
    (
      lambda t: {**t, 'model.norm.weight': np.zeros((31,), np.float32)},
      r'tensor model.norm.weight has shape \(31,\), expected \(32,\)',
    ),
  ],
)
def test_bad_tensors_are_one_line_errors(tiny_hf, edit, message):
  path, _ = tiny_hf('llama')
  _rewrite_tensors(path, edit)
  with pytest.raises(convert.CheckpointError, match=message) as info:
    convert.load_hf(path)
  assert '\n' not in str(info.value)


def test_bad_directories_are_one_line_errors(tmp_path, tiny_hf):
  with pytest.raises(convert.CheckpointError, match='does not exist'):
    convert.load_hf(tmp_path / 'nope')
  path, _ = tiny_hf('llama')
  cfg = json.loads((path / 'config.json').read_text())
  cfg['model_type'] = 'gpt2'
  (path / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(convert.CheckpointError, match="unsupported model_type 'gpt2'"):
    convert.load_hf(path)
  with pytest.raises(convert.CheckpointError, match='not an ilr_jax checkpoint'):
    convert.load_checkpoint(tmp_path)


def test_safetensors_reader_reads_bfloat16(tmp_path):
  import ml_dtypes

  a = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
  convert.write_safetensors(tmp_path, iter([('a', a)]), [('a', (2, 3), a.dtype)])
  with open(tmp_path / 'model.safetensors', 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    assert json.loads(f.read(n))['a']['dtype'] == 'BF16'
  np.testing.assert_array_equal(np.asarray(convert.SafetensorsDir(tmp_path).get('a')), a)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  return subprocess.run(
    [sys.executable, '-m', 'ilr_jax.convert', *args],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )


@pytest.mark.slow
def test_cli_both_directions_and_errors(tiny_hf, tmp_path):
  path, ref = tiny_hf('gemma', num_key_value_heads=1)
  r = _cli(f'--from_hf={path}', f'--out={tmp_path / "ck"}')
  assert r.returncode == 0, r.stderr
  r = _cli(f'--checkpoint={tmp_path / "ck"}', f'--to_hf={tmp_path / "hf"}')
  assert r.returncode == 0, r.stderr
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()
  np.testing.assert_allclose(_torch(back, IDS), _torch(ref, IDS), atol=1e-6)
  # Bad input: one line on stderr, exit code 1, nothing written.
  r = _cli(f'--from_hf={tmp_path / "missing"}', f'--out={tmp_path / "never"}')
  assert r.returncode == 1
  assert (
    r.stderr.strip().splitlines()[-1] == f'convert: model directory {tmp_path / "missing"} '
    'does not exist'
  )
  assert not (tmp_path / 'never').exists()
  r = _cli(f'--from_hf={path}', f'--out={tmp_path / "ck"}')  # refuses to overwrite
  assert r.returncode == 1 and 'already exists' in r.stderr
