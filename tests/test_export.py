"""export: a stage's LoRA model as an HF checkpoint transformers loads with the same logits, and a
label set as JSON lines and an HF dataset."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from test_paper_configs import _tokenizer

from ilr_jax import convert, export, fit, labels, lora

ROOT = pathlib.Path(__file__).resolve().parents[1]
_forward = nnx.jit(lambda model, tokens: model(tokens))


def _fake_run(tmp_path):
  """A workdir whose `ilr/r1/model` stage trained a LoRA adapter (B moved off zero) on a tiny
  HF Mistral, and whose `ilr/r1/labels` holds a label set."""
  fast = _tokenizer(['USER:\nadd 2 and 3\n\nASSISTANT:\n5', 'the sky is blue'], vocab_size=300)
  base_dir = tmp_path / 'mistral'
  cfg = transformers.MistralConfig(
    vocab_size=len(fast),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    eos_token_id=fast.eos_token_id,
    bos_token_id=fast.bos_token_id,
  )
  torch.manual_seed(0)
  transformers.MistralForCausalLM(cfg).save_pretrained(base_dir)
  fast.save_pretrained(base_dir)
  wd = tmp_path / 'run'
  m = dict(init='hf', model_dir=str(base_dir), tokenizer=str(base_dir))
  config = dict(
    methods=['sft', 'ilr'],
    num_rounds=1,
    student=dict(m, dtype='float32', param_dtype='float32'),
  )
  wd.mkdir()
  (wd / 'config.json').write_text(json.dumps(config))
  model = lora.add_lora(convert.load_hf(base_dir), 4, 8.0, 'all', rng=1)
  rng = np.random.default_rng(0)
  for name in ('q', 'k', 'v', 'o', 'gate', 'up', 'down'):
    var = getattr(model.layers, name).lora_b
    var[...] = rng.normal(0, 0.05, var.shape).astype(np.float32)
  fit.save_params(model, wd / 'ilr' / 'r1' / 'model' / 'fit' / 'final')
  labels.save_label_set(
    wd / 'ilr' / 'r1' / 'labels' / 'labels',
    dict(
      id=['a', 'b'],
      question=['q1', 'q2'],
      label=['x', 'y'],
      source=['weak', 'proposal'],
      round=[0, 1],
      score=[math.nan, 0.9],
      replaced=[False, True],
      agreed=[True, False],
      correct=[True, False],
    ),
  )
  for stage in ('ilr/r1/model', 'ilr/r1/labels'):
    (wd / 'stages' / stage).parent.mkdir(parents=True, exist_ok=True)
    (wd / 'stages' / f'{stage}.json').write_text('{}')
  return wd, model


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.fspath(ROOT))
  cmd = [sys.executable, '-m', 'ilr_jax.export', *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_exported_final_model_matches_the_stage_model_in_transformers(tmp_path):
  wd, trained = _fake_run(tmp_path)
  out = tmp_path / 'export'
  r = _cli(f'--workdir={wd}', '--stage=final', '--method=ilr', f'--out={out}')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'exported ilr/r1/model' in r.stdout
  model, _ = export.stage_model(wd, 'ilr/r1/model')
  assert model.cfg.lora_rank == 4  # the stage's model as trained: base + adapter, not merged
  tokens = np.random.default_rng(1).integers(3, model.cfg.vocab_size, (2, 10)).astype(np.int32)
  ours = np.asarray(_forward(model, tokens))
  np.testing.assert_allclose(ours, np.asarray(_forward(trained, tokens)), atol=1e-6)
  base = np.asarray(_forward(convert.load_hf(tmp_path / 'mistral'), tokens))
  assert np.abs(ours - base).max() > 1e-3  # the adapter changes the outputs
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
  tok = transformers.AutoTokenizer.from_pretrained(out)  # the tokenizer was copied
  src = transformers.AutoTokenizer.from_pretrained(tmp_path / 'mistral')
  assert tok.encode('the sky is blue') == src.encode('the sky is blue')


def test_label_export_loads_without_ilr_jax_and_errors_are_one_line(tmp_path):
  import datasets

  wd, _ = _fake_run(tmp_path)
  cfg = json.loads((wd / 'config.json').read_text())
  assert export.final_stage(cfg, 'ilr', 'labels') == 'ilr/r1/labels'
  assert export.final_stage(cfg, 'ilr') == 'ilr/r1/model'
  assert export.final_stage(cfg, 'sft') == 'sft'
  assert export.final_stage(dict(cfg, methods=['dpo']), 'dpo') == 'dpo/r1/policy'
  assert export.final_stage(dict(cfg, methods=['dpo']), 'dpo', 'labels') == 'weak_labels'
  out = export.export_labels(wd, 'ilr/r1/labels', tmp_path / 'labels')
  rows = [json.loads(x) for x in (out / 'labels.jsonl').read_text().splitlines()]
  assert [r['label'] for r in rows] == ['x', 'y']
  assert rows[0]['score'] is None and rows[1]['score'] == 0.9 and rows[1]['replaced'] is True
  ds = datasets.load_from_disk(os.fspath(out / 'dataset'))
  assert ds['id'] == ['a', 'b'] and ds['source'] == ['weak', 'proposal']
  with pytest.raises(export.ExportError, match=r"stage 'ilr/r2/model' has not finished"):
    export.stage_model(wd, 'ilr/r2/model')
  with pytest.raises(export.ExportError, match='no trained language model'):
    export.stage_model(wd, 'evaluator')
  with pytest.raises(export.ExportError, match="the run has no method 'dpo'"):
    export.final_stage(cfg, 'dpo')
