"""Export what a run produced for use without ilr_jax: a trained model as an HF checkpoint, a
label set as JSON lines and an HF dataset.

  python -m ilr_jax.export --workdir=W --stage=ilr/r6/model --out=DIR
  python -m ilr_jax.export --workdir=W --stage=final --method=ilr --out=DIR
  python -m ilr_jax.export --workdir=W --labels=final --method=ilr --out=DIR

A stage stores only what it trained (the adapter under LoRA, never a second copy of the base), so
a model export rebuilds the stage's model from the run's config.json (the role's base model, then
the stage's `fit/final` params), merges the adapter into the kernels and writes config.json,
safetensors and the role's tokenizer files: `transformers.AutoModelForCausalLM.from_pretrained`
and vLLM load the folder as they load the base.

`final` names a method's last round: `<m>/r<K>/model` for ILR methods, `<m>/r<K>/policy` for DPO
methods (K = the run's num_rounds), round 0 (`sft`, `cor/sft`) when K = 0 or for `sft`; for
`--labels`, the label set that round trained on (`weak_labels` / `cor/labels` for round 0 and
DPO methods, whose labels never change).

A label export writes `DIR/labels.jsonl` (one JSON object per row, every column of the label set,
NaN scores as null) and `DIR/dataset` (`datasets.load_from_disk`).
"""

from __future__ import annotations

import json
import math
import os
import pathlib

from absl import app, flags

from ilr_jax import graph, methods


class ExportError(ValueError):
  """A stage that cannot be exported (unknown, unfinished, not a language model)."""


def _config(workdir: pathlib.Path) -> dict:
  path = workdir / 'config.json'
  if not path.exists():
    raise ExportError(f'{workdir} is not a run workdir (no config.json)')
  return json.loads(path.read_text())


def final_stage(config: dict, method: str, what: str = 'model') -> str:
  """The stage of `method`'s last round: its model (`what='model'`) or its label set."""
  if method not in methods.METHODS:
    raise ExportError(f'unknown method {method!r}; known: {methods.NAMES}')
  if method not in config['methods'] and method != 'sft':
    raise ExportError(f'the run has no method {method!r} (it ran {config["methods"]})')
  labels, model = graph.final_stages(methods.get(method), config['num_rounds'])
  return model if what == 'model' else labels


def _check_done(workdir: pathlib.Path, stage: str) -> None:
  if not (workdir / 'stages' / f'{stage}.json').exists():
    raise ExportError(f'stage {stage!r} has not finished in {workdir} (no stages/{stage}.json)')


def role_of(stage: str) -> str:
  """Which model a stage trained: the supervisor's, or the student's (every other LM stage)."""
  if stage == 'supervisor':
    return 'supervisor'
  if stage in ('evaluator', 'evaluator_data') or stage.startswith(('pretrain/', 'evaluator_data')):
    raise ExportError(f'stage {stage!r} holds no trained language model to export')
  return 'student'


def stage_model(workdir, stage: str, *, dtype: str | None = None):
  """The model a finished stage trained (adapter not merged), on one device.

  Args:
    workdir: the run's workdir.
    stage: a stage that trained an LM (supervisor, sft, <m>/r<k>/model, <m>/r<k>/policy, ...).
    dtype: parameter and compute dtype (default: the role's param_dtype of the run).
  """
  from ilr_jax import convert, fit

  workdir = pathlib.Path(workdir)
  config = _config(workdir)
  role = role_of(stage)
  _check_done(workdir, stage)
  m = config[role]
  numerics = dict(dtype=dtype or m['dtype'])
  if m['init'] == 'pretrain':
    base = convert.load_checkpoint(workdir / f'pretrain/{role}' / 'model', **numerics)
  elif m['init'] == 'checkpoint':
    base = convert.load_checkpoint(m['model_dir'], **numerics)
  else:
    base = convert.load_hf(m['model_dir'], param_dtype=dtype or m['param_dtype'], **numerics)
  return fit.load_params(base, workdir / stage / 'fit' / 'final'), m['tokenizer']


def export_model(workdir, stage: str, out_dir, *, dtype: str | None = None) -> pathlib.Path:
  """Write a finished stage's model, adapter merged, as an HF checkpoint with its tokenizer."""
  from ilr_jax import convert, lora

  model, tokenizer = stage_model(workdir, stage, dtype=dtype)
  if model.cfg.lora_rank:
    model = lora.merge_lora(model)
  tok_dir = tokenizer if tokenizer and os.path.isdir(tokenizer) else None
  convert.save_hf(model, out_dir, tokenizer_dir=tok_dir)
  if tokenizer and not tok_dir:  # a SentencePiece file (arith): copied beside the weights
    import shutil

    shutil.copy2(tokenizer, pathlib.Path(out_dir) / pathlib.Path(tokenizer).name)
  return pathlib.Path(out_dir)


def export_labels(workdir, stage: str, out_dir) -> pathlib.Path:
  """Write a finished stage's label set as `labels.jsonl` and an HF dataset under `out_dir`."""
  import datasets

  workdir, out = pathlib.Path(workdir), pathlib.Path(out_dir)
  _check_done(workdir, stage)
  src = workdir / stage / 'labels'
  if not (src / 'dataset_info.json').exists():
    raise ExportError(f'stage {stage!r} holds no label set ({src} is missing)')
  ds = datasets.load_from_disk(os.fspath(src))
  out.mkdir(parents=True, exist_ok=True)
  with open(out / 'labels.jsonl.tmp', 'w') as f:
    for row in ds:
      clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
      f.write(json.dumps(clean) + '\n')
  os.replace(out / 'labels.jsonl.tmp', out / 'labels.jsonl')
  ds.save_to_disk(os.fspath(out / 'dataset'))
  return out


def _define_flags() -> None:
  """The CLI's flags, defined only when run as a program: the library import defines none, so it
  can share a process with ilr_jax.main (whose --workdir would clash)."""
  global _WORKDIR, _STAGE, _LABELS, _METHOD, _OUT, _DTYPE
  _WORKDIR = flags.DEFINE_string('workdir', None, 'the run workdir')
  _STAGE = flags.DEFINE_string('stage', None, "a model stage (e.g. 'ilr/r6/model') or 'final'")
  _LABELS = flags.DEFINE_string(
    'labels', None, "a label-set stage (e.g. 'ilr/r6/labels') or 'final'"
  )
  _METHOD = flags.DEFINE_string('method', None, "with 'final': the method whose last round to take")
  _OUT = flags.DEFINE_string('out', None, 'the folder to write')
  _DTYPE = flags.DEFINE_string('dtype', None, 'dtype of the export (default: the run config)')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if (_STAGE.value is None) == (_LABELS.value is None):
    raise app.UsageError('give exactly one of --stage and --labels')
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError('--workdir and --out are required')
  workdir = pathlib.Path(_WORKDIR.value)
  name = _STAGE.value or _LABELS.value
  try:
    if name == 'final':
      if not _METHOD.value:
        raise ExportError('--stage=final / --labels=final needs --method (e.g. --method=ilr)')
      name = final_stage(_config(workdir), _METHOD.value, 'model' if _STAGE.value else 'labels')
    if _STAGE.value:
      out = export_model(workdir, name, _OUT.value, dtype=_DTYPE.value)
    else:
      out = export_labels(workdir, name, _OUT.value)
  except (ExportError, FileNotFoundError) as e:
    raise SystemExit(f'ilr_jax.export: {e}') from None
  print(f'exported {name} to {out}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
