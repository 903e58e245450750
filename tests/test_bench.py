"""Benchmark harness smoke run on bench-tiny (one timed call per backend; no timing asserts)."""

import subprocess
import sys

import pytest

from ilr_jax import bench
from ilr_jax import sharding as shd


def _ctx(arch):
  cfg = bench.model_config('bench-tiny', arch)
  return bench.BenchContext('bench-tiny', arch, cfg, 'torch', 0, shd.single_device_mesh())


def test_library_imports_no_torch_and_the_package_registers_every_workload():
  # The benchmarks and their PyTorch peer are outside the library's import path: importing every
  # other module of ilr_jax leaves torch unimported, and so does importing the bench package.
  code = (
    'import importlib, pkgutil, sys, ilr_jax\n'
    'for m in pkgutil.iter_modules(ilr_jax.__path__):\n'
    '  importlib.import_module("ilr_jax." + m.name)\n'
    'import ilr_jax.bench as b\n'
    'print("torch" in sys.modules, ",".join(sorted(b.WORKLOADS)))\n'
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  torch_loaded, names = out.stdout.split()
  assert torch_loaded == 'False'
  assert names.split(',') == sorted(
    ['sft_step', 'sft_step_lora', 'dpo_step', 'dpo_step_lora', 'classify_batched']
    + ['classify_single', 'pair_scorer', 'generate_greedy', 'generate_sample']
    + ['generate_sample_top_p', 'generate_beam4']
  )


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


def test_real_shape_refused_on_cpu(tmp_path):
  # mistral-7b / gemma-2b are accelerator sizes: on CPU the command stops with one line before it
  # builds anything (a 7B model in host memory would take most of an hour to initialise), and
  # writes no records.
  out = tmp_path / 'records.jsonl'
  cmd = [sys.executable, '-m', 'ilr_jax.bench', '--workloads=generate_greedy']
  cmd += ['--shape=mistral-7b', '--arch=mistral', f'--out={out}']
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and not out.exists()
  assert 'bench: --shape=mistral-7b is a real model size for accelerators' in proc.stderr


@pytest.mark.slow
def test_gpu_generate_script_dry_run_on_cpu(tmp_path):
  # launch/bench_generate_gpu.sh with its CPU overrides: one run per row count and method group,
  # each writing its records (rows as asked, beam rows = 4 x prompts, new tokens = prompt length).
  import json
  import os
  from pathlib import Path

  script = Path(__file__).resolve().parents[1] / 'launch' / 'bench_generate_gpu.sh'
  # (8 rows: the tests' 8 fake CPU devices make the default mesh 8-way data parallel.)
  env = dict(os.environ, SHAPE='bench-tiny', DTYPE='float32', ROWS='8', BEAM_PROMPTS='8')
  env.update(SEQ_LEN='4', MIN_REPS='1', LIMIT_S='100')
  proc = subprocess.run(
    ['bash', str(script), str(tmp_path)], env=env, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr
  records = {}
  for f in ('generate_rows8.jsonl', 'beam4_rows32.jsonl'):
    for line in (tmp_path / f).read_text().splitlines():
      rec = json.loads(line)
      records[rec['name']] = rec
  assert sorted(records) == ['generate_beam4', 'generate_greedy', 'generate_sample']
  assert records['generate_greedy']['rows'] == 8 and records['generate_beam4']['rows'] == 32
  assert all(r['new_tokens'] == 4 and r['prompt_len'] == 4 for r in records.values())
