"""Benchmark harness smoke run on bench-tiny (one timed call per backend; no timing asserts)."""

import jax
import pytest

from ilr_jax import bench
from ilr_jax import sharding as shd


def _ctx(arch):
  cfg = bench.model_config('bench-tiny', arch)
  mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  return bench.BenchContext('bench-tiny', arch, cfg, 'torch', 0, mesh)


@pytest.mark.slow
@pytest.mark.parametrize('name,arch', [('sft_step', 'mistral'), ('dpo_step_lora', 'gemma')])
def test_workload_smoke_with_torch_peer(name, arch):
  records = bench.run_workload(name, _ctx(arch), warmup=1, min_reps=1, max_reps=1, min_time=0)
  jax_rec, torch_rec, ratio = records
  assert (jax_rec['backend'], torch_rec['backend']) == ('jax', 'torch')
  for rec in (jax_rec, torch_rec):
    assert rec['name'] == name and rec['arch'] == arch and rec['shape'] == 'bench-tiny'
    assert rec['reps'] == 1 and rec['min_s'] <= rec['median_s'] <= rec['max_s']
    assert rec['tokens_per_s'] > 0 and rec['seq_len'] == 128
  assert ratio['speedup'] > 0
  table = bench.format_table(records)
  assert table.count('\n') == 3 and f'| {name} | {arch} | bench-tiny | torch |' in table


def test_shapes_and_flops():
  small = bench.model_config('bench-small', 'gemma')
  assert (small.vocab_size, small.hidden_size, small.num_kv_heads, small.tie_embeddings) == (
    32000,
    256,
    1,
    True,
  )
  assert bench.model_config('bench-small', 'mistral').num_kv_heads == 4
  cfg = bench.model_config('bench-tiny', 'mistral')
  full = bench.train_flops(cfg, 1024, 128, 512)
  assert full == 3 * bench.forward_flops(cfg, 1024, 128, 512)
  assert bench.train_flops(cfg, 1024, 128, 512, lora_rank=8) < full
  with pytest.raises(ValueError, match='unknown shape'):
    bench.model_config('bench-huge', 'mistral')
  with pytest.raises(ValueError, match='registered twice'):
    bench.workload('sft_step')(lambda ctx: None)
