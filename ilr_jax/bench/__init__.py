"""Benchmarks: JAX workloads timed against transformers' PyTorch (docs/BENCH.md).

Outside the library's import path: nothing in the rest of ilr_jax imports this package, and only
`torch_peer` imports torch. Importing the package registers every workload.

  harness.py              shapes, the workload registry, FLOPs, interleaved timing, records
  torch_peer.py           the PyTorch side: models, PEFT-style LoRA, the SFT / DPO steps
  train_workloads.py      sft_step, sft_step_lora, dpo_step, dpo_step_lora
  evaluator_workloads.py  classify_batched, classify_single, pair_scorer
  generate_workloads.py   generate_greedy, generate_sample, generate_sample_top_p, generate_beam4
  __main__.py             `python -m ilr_jax.bench`: flags, then one record per line

Adding a workload: a function `fn(ctx: BenchContext) -> Case` decorated with `@workload(name)` in
the module of its kind (or a new one imported below). `Case.jax_fn` and `Case.torch_fn` take no
arguments and do one timed call (the harness blocks on what `jax_fn` returns); build the PyTorch
side only when `ctx.peer == 'torch'`.
"""

from ilr_jax.bench import evaluator_workloads, generate_workloads, train_workloads  # noqa: F401
from ilr_jax.bench.harness import (  # noqa: F401
  REAL_SHAPES,
  SHAPES,
  WORKLOADS,
  BenchContext,
  Case,
  format_table,
  forward_flops,
  model_config,
  run_workload,
  train_flops,
  workload,
)
