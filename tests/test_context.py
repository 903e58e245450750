"""What the stages share: per-stage seeds, the training config of a section, decoding options."""

import types

import ml_collections

from ilr_jax import context, generate, sampler, schema, tasks


def test_stage_seeds_differ_by_stage_and_repeat():
  assert context.stage_seed(0, 'sft') == context.stage_seed(0, 'sft')
  assert context.stage_seed(0, 'sft') != context.stage_seed(0, 'cor/sft')
  assert context.stage_seed(0, 'sft') != context.stage_seed(1, 'sft')


def test_every_training_section_reaches_its_train_config():
  c = schema.base_config('compare', 'arith')
  for name in schema.TRAIN_SECTIONS:
    t = c[name]
    got = context.train_config(t, 7, c.fit)
    assert (got.lr, got.epochs, got.global_batch, got.optimizer) == (
      t.lr,
      t.epochs,
      t.batch_size,
      t.optimizer,
    )
    assert (got.max_len, got.pad_multiple, got.weight_decay) == (
      t.max_len,
      t.pad_multiple,
      t.weight_decay,
    )
    assert got.seed == 7 and got.checkpoint_every == c.fit.checkpoint_every
  assert context.train_config(c.sft, 0, c.fit).lora_rank == c.sft.lora_rank == 64
  assert context.train_config(c.evaluator_train, 0, c.fit).lora_rank == 0
  # DPO continues the policy's adapter: its section has no LoRA fields, the stage passes them.
  assert 'lora_rank' not in c.dpo
  assert context.train_config(c.dpo, 0, c.fit, lora_rank=8, lora_alpha=16.0).lora_rank == 8


def test_dpo_samples_per_prompt_come_from_the_config(monkeypatch):
  run = object.__new__(context.Run)
  run.config = ml_collections.ConfigDict(
    {'seed': 0, 'sampling': {'batch_size': 4}, 'debug': {'timing': False}}
  )
  run.task, run.mesh = tasks.get_task('arith'), None
  run.tok = lambda role: None
  seen = {}

  def fake(model, tok, questions, method, **kw):
    seen.update(kw, method=method)
    return types.SimpleNamespace(texts=[['a'] * kw['num_samples'] for _ in questions])

  monkeypatch.setattr(generate, 'generate_answers', fake)
  out = run.generate(None, 'student', ['q1', 'q2'], 'dpo', 'dpo/r1/pairs', num_samples=4)
  assert seen['num_samples'] == 4 and [len(s) for s in out] == [4, 4]
  assert seen['method'] == sampler.Sample(temperature=run.task.decoding['dpo'].temperature)
  run.generate(None, 'student', ['q1'], 'eval', 'sft')
  assert seen['num_samples'] == 1 and seen['method'] == sampler.BeamSearch(num_beams=4)
