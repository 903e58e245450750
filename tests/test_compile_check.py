"""The ahead-of-time fit check: programs built on abstract inputs, compiled or estimated."""

import importlib.util
import runpy

import jax
import pytest

from ilr_jax import compile_check as cc

ROOT = __import__('pathlib').Path(__file__).resolve().parents[1]


def _config(path, arg, **mesh):
  config = runpy.run_path(str(ROOT / path))['get_config'](arg)
  for k, v in mesh.items():
    config.mesh[k] = v
  return config


@pytest.fixture(scope='module')
def gsm8k_h100():
  config = _config('configs/gsm8k.py', 'compare')
  mesh = cc.target_mesh(config, cc.TARGETS['h100x1'])
  return mesh, cc.steps(config, mesh)


@pytest.mark.slow
def test_every_program_of_a_config_is_listed(gsm8k_h100):
  names = [s.prog.name for s in gsm8k_h100[1]]
  assert names[:5] == [
    'supervisor SFT',
    'student SFT',
    'student DPO',
    'evaluator train',
    'evaluator scoring',
  ]
  # Beam search (labels, proposals, tests) and sampling (evaluator data; DPO's 6 per prompt).
  assert 'decode (beam x4: label)' in names and 'decode (sample x6: dpo)' in names


@pytest.mark.slow
def test_gpu_estimate_counts_the_real_parameters(gsm8k_h100):
  # Mistral-7B's 7.24e9 parameters in float32 on one device, LoRA r64 on top: the frozen part of
  # the student's SFT step is exactly their bytes (the estimate's arithmetic is checkable).
  mesh, steps = gsm8k_h100
  step = next(s for s in steps if s.prog.name == 'student SFT')
  total, detail = cc.estimate(step, mesh)
  assert detail['frozen'] == 4 * 7_241_732_096
  assert 0 < detail['trainable'] < detail['frozen'] / 20
  assert 2 * detail['trainable'] <= detail['optimizer'] <= 2 * detail['trainable'] + 64  # AdamW
  assert total == sum(detail.values()) and detail['activations'] > 0
  decode = next(s for s in steps if s.prog.name == 'decode (beam x4: label)')
  _, detail = cc.estimate(decode, mesh)
  # Gemma-2B's KV cache: 64 prompts x 4 beams, 512 + 256 - 1 slots, 18 layers, 1 kv head of 256,
  # keys and values in bfloat16.
  assert detail['decode state (KV cache)'] >= 256 * 767 * 18 * 256 * 2 * 2


def test_mesh_that_cannot_split_a_batch_is_one_line_error():
  config = _config('configs/gsm8k.py', 'sft', fsdp=-1)  # micro-batches of 8 over 64 shards
  mesh = jax.sharding.AbstractMesh((1, 64, 1), ('data', 'fsdp', 'tensor'))
  with pytest.raises(ValueError, match='micro-batches of 8 rows cannot be split over the 64'):
    cc.steps(config, mesh)


@pytest.mark.slow
def test_cpu_compile_reports_xla_memory():
  config = _config('configs/arith.py', 'sft,tiny', data=4, fsdp=2)
  mesh = cc.target_mesh(config, cc.TARGETS['cpu'])
  steps = [s for s in cc.steps(config, mesh) if s.prog.name in ('student SFT',)]
  steps += [s for s in cc.steps(config, mesh) if s.kind == 'decode'][:1]
  for s in steps:
    total, detail = cc.compiled_bytes(s.fn, s.args)
    assert detail['arguments'] > 0 and total >= detail['arguments'] + detail['temporaries']
    # The compiled arguments are the estimate's sharded parameter bytes and more (the batch).
    est, parts = cc.estimate(s, mesh)
    weights = parts.get('frozen', 0) + parts.get('trainable', 0) + parts.get('weights', 0)
    assert detail['arguments'] >= weights


@pytest.mark.slow
@pytest.mark.skipif(
  importlib.util.find_spec('libtpu') is None,
  reason='libtpu is not installed (pip install -e ".[aot]"): TPU targets compile with XLA:TPU',
)
def test_tpu_topology_compiles_without_a_tpu():
  config = _config('configs/arith.py', 'sft,tiny', data=1, fsdp=-1)
  target = cc.TARGETS['v4-8']
  mesh = cc.target_mesh(config, target)
  assert mesh.devices.size == 4 and mesh.devices.flat[0].platform == 'tpu'
  step = next(s for s in cc.steps(config, mesh) if s.prog.name == 'student SFT')
  total, detail = cc.compiled_bytes(step.fn, step.args)
  assert 0 < total < target.memory_bytes and detail['arguments'] > 0
