"""`python -m ilr_jax.bench`: time workloads in JAX and, with --peer=torch, in PyTorch.

Prints one JSON line per measurement, then one ratio line per workload with a peer, and a
markdown table of them on stderr (docs/BENCH.md):
  python -m ilr_jax.bench --workloads=sft_step,dpo_step --shape=bench-small --peer=torch
  python -m ilr_jax.bench --workloads=sft_step --shape=gemma-2b --arch=gemma --dtype=bfloat16 \\
      --batch=8 --seq_len=512                      # accelerators: tokens/s and MFU
  python -m ilr_jax.bench --workloads=sft_step_lora --shape=mistral-7b --dtype=bfloat16
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags

from ilr_jax import sharding as shd
from ilr_jax.bench import harness

FLAGS = flags.FLAGS
flags.DEFINE_list('workloads', ['sft_step', 'dpo_step'], 'workloads to time (see WORKLOADS)')
flags.DEFINE_string('shape', 'bench-small', 'bench-small, bench-tiny, gemma-2b or mistral-7b')
flags.DEFINE_list('arch', ['mistral', 'gemma'], 'architectures (mistral, gemma)')
flags.DEFINE_enum('peer', None, ['torch'], 'also time the PyTorch reference, interleaved')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'parameter and compute dtype')
flags.DEFINE_integer('batch', None, 'override the workload batch size')
flags.DEFINE_integer('seq_len', None, 'override the workload sequence length')
flags.DEFINE_enum('remat', 'none', ['none', 'full', 'dots'], 'rematerialisation of the layers')
flags.DEFINE_integer('seed', 0, 'seed of weights and tokens')
flags.DEFINE_integer('warmup', 2, 'untimed calls per backend')
flags.DEFINE_integer('min_reps', 10, 'timed calls per backend, at least')
flags.DEFINE_integer('max_reps', 50, 'timed calls per backend, at most')
flags.DEFINE_float('min_time', 1.0, 'seconds timed per backend, at least (until max_reps)')
flags.DEFINE_float('peak_tflops', None, 'device peak for MFU (default: PEAK_FLOPS by kind)')
flags.DEFINE_string('mesh', '-1,1,1', 'data,fsdp,tensor mesh sizes')
flags.DEFINE_string('out', None, 'also append the JSON lines to this file')


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f'bench: unexpected arguments {argv[1:]}')
  if FLAGS.shape in harness.REAL_SHAPES and jax.devices()[0].platform == 'cpu':
    # Billions of parameters in host memory would take most of an hour to initialise.
    raise SystemExit(
      f'bench: --shape={FLAGS.shape} is a real model size for accelerators (GPU / TPU); on CPU '
      'use bench-small or bench-tiny'
    )
  if FLAGS.peer == 'torch':
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
  mesh = shd.make_mesh(*[int(x) for x in FLAGS.mesh.split(',')])
  peak = harness.peak_flops(FLAGS.peak_tflops) if FLAGS.dtype == 'bfloat16' else None
  records = []
  for arch in FLAGS.arch:
    if FLAGS.shape in harness.REAL_SHAPES and not FLAGS.shape.startswith(arch):
      continue
    cfg = harness.model_config(FLAGS.shape, arch, FLAGS.dtype).replace(remat=FLAGS.remat)
    ctx = harness.BenchContext(
      FLAGS.shape, arch, cfg, FLAGS.peer, FLAGS.seed, mesh, FLAGS.batch, FLAGS.seq_len
    )
    for name in FLAGS.workloads:
      timing = dict(
        warmup=FLAGS.warmup,
        min_reps=FLAGS.min_reps,
        max_reps=FLAGS.max_reps,
        min_time=FLAGS.min_time,
      )
      for rec in harness.run_workload(name, ctx, peak=peak, **timing):
        line = json.dumps(rec)
        print(line, flush=True)
        if FLAGS.out and jax.process_index() == 0:
          with open(FLAGS.out, 'a') as fh:
            fh.write(line + '\n')
        records.append(rec)
  print(harness.format_table(records), file=sys.stderr)


if __name__ == '__main__':
  # The package's __init__ has registered every workload by now.
  app.run(main)
