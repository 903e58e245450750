"""The ILR and SFT+DPO pipeline: validate, check the workdir, run every unfinished stage of the
stage graph (graph.py) in order, write the report (report.py).

    python -m ilr_jax.main --config=configs/arith.py:compare --workdir=/tmp/arith

The config schema is schema.py, the methods methods.py; the stage bodies are grouped by concern in
supervisor_stages.py, label_stages.py and dpo_stages.py, sharing context.Run.
"""

from __future__ import annotations

import time

from ilr_jax import graph, report
from ilr_jax.schema import NO_RESULT_KEYS, validate
from ilr_jax.workdir import Workdir, is_writer, sync, write_json


def plan(config):
  """Every stage of the configured run, upstream before downstream (graph.plan)."""
  return graph.plan(config)


def check_workdir(config, workdir: str, recompute_changed: bool = False, redo: str = '') -> Workdir:
  """Build the stage plan and compare it with what the workdir holds; no work is done, except
  that `redo` forgets that stage and everything downstream of it first.

  Returns the Workdir. Raises ConfigChangedError naming a changed key (see workdir.py).
  """
  wd = Workdir(
    workdir,
    config.to_dict(),
    graph.plan(config),
    recompute_changed=recompute_changed,
    kill_at=config.debug.kill_at,
    ignore=NO_RESULT_KEYS,
  )
  if redo:
    wd.redo(redo)
  wd.check()
  return wd


def _execute(runner, wd: Workdir) -> None:
  """Run every unfinished stage of the graph, upstream first.

  A stage waiting for human verdicts (feedback.AwaitingAnnotations) holds back the stages that
  read it; the others still run, and then one AwaitingAnnotations names every waiting stage.
  """
  from ilr_jax.feedback import AwaitingAnnotations

  nodes = graph.build(runner.config).nodes
  waiting, held = [], set()
  for name in wd.stages:
    if wd.done(name):
      continue
    if held & set(wd.stages[name].after):
      held.add(name)
      continue
    t0 = time.perf_counter()
    try:
      metrics = wd.run(name, lambda node=nodes[name]: node.run(runner))
    except AwaitingAnnotations as e:
      waiting.append(str(e))
      held.add(name)
      continue
    if is_writer():
      shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
      print(f'[ilr_jax] stage {name} done in {time.perf_counter() - t0:.1f} s: {shown}', flush=True)
  if waiting:
    raise AwaitingAnnotations('\n\n'.join(waiting))


def _enable_compile_cache(path, config) -> None:
  """JAX's persistent compilation cache: every stage builds its own jitted train and sample
  functions, and those of equal shapes compile to the same program, which is then compiled once
  per run instead of once per stage (most of a CPU run's time otherwise). Not where
  compile_cache.usable says it breaks collectives (sharded CPU meshes, several CPU processes)."""
  from ilr_jax import compile_cache, sharding

  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  compile_cache.enable(path, dict(mesh.shape))


def run(config, workdir: str, recompute_changed: bool = False) -> str:
  """Validate, check the workdir, run every unfinished stage, write the report; returns the table.

  Every process runs the same stages on the same data in the same order; only process 0 writes
  non-array artifacts.
  """
  import datasets

  datasets.disable_progress_bars()
  validate(config)
  wd = check_workdir(config, workdir, recompute_changed)
  if is_writer():
    write_json(wd.root / 'config.json', config.to_dict())
  if config.compile_cache:
    _enable_compile_cache(config.compile_cache_dir or wd.root / 'jax_cache', config)
  from ilr_jax import lengths
  from ilr_jax.context import Run

  runner = Run(config, wd)
  splits = {'train': runner.train, 'test': runner.test}
  lengths.check_max_len(config, splits, runner.tok, runner.task.decoding['label'].max_new_tokens)
  _execute(runner, wd)
  rows = report.with_other_methods(wd.root / 'results.jsonl', graph.results(config, wd))
  methods = dict.fromkeys(r['method'] for r in rows if r['method'] not in ('supervisor', 'sft'))
  title = f'{config.task.name}: {", ".join(methods) or "sft"} (seed {config.seed})'
  table = ''
  if is_writer():
    table = report.write_report(wd.root, rows, title=title)
  sync('report')
  return table
