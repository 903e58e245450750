"""The fit loop: learns a GSM8K-format set, resumes exactly, stops on NaN, early-stops."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import _mesh, fast_model

from ilr_jax import fit, tokens
from ilr_jax.examples import DpoPair
from ilr_jax.model import ModelConfig
from ilr_jax.train import TrainConfig


class CharTokenizer:
  """Characters of a fixed alphabet as ids 3.. (0 pad, 1 bos, 2 eos): tokens.py's interface."""

  ALPHABET = sorted(
    set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?:+=<>#'\n")
  )
  bos_id, eos_id, pad_id = 1, 2, 0

  def __init__(self):
    self.ids = {c: i + 3 for i, c in enumerate(self.ALPHABET)}
    self.vocab_size = len(self.ALPHABET) + 3

  def encode(self, text):
    return [self.ids[c] for c in text]

  def encode_with_bos(self, text):
    return [self.bos_id] + self.encode(text)


TOK = CharTokenizer()


def _cfg(**kw):
  base = dict(
    arch='llama',
    vocab_size=TOK.vocab_size,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    scan_layers=False,
  )
  return ModelConfig(**{**base, **kw})


def gsm8k_examples(n, seed=0):
  """GSM8K-format (question, answer with <<calc>> and '#### N') SFT examples."""
  rng = np.random.default_rng(seed)
  names = ['Sam', 'Ana', 'Tom', 'Eve']
  out = []
  for _ in range(n):
    name, a, b = rng.choice(names), int(rng.integers(2, 50)), int(rng.integers(2, 50))
    q = f'{name} has {a} apples and buys {b} more. How many apples does {name} have?'
    ans = f'{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}'
    out.append(tokens.sft_example(TOK, q, ans))
  return out


@pytest.mark.slow
def test_tiny_model_fits_gsm8k_format(tmp_path):
  examples = gsm8k_examples(32)
  cfg = TrainConfig(
    lr=1e-2,
    epochs=12,
    global_batch=8,
    warmup_ratio=0.05,
    max_len=160,
    pad_multiple=160,
    log_every=12,
  )
  losses = []
  _, result = fit.fit(
    fast_model(_cfg()),
    examples,
    loss='sft',
    config=cfg,
    workdir=tmp_path,
    progress=False,
    on_log=lambda step, m: losses.append(m['loss']),
  )
  assert result.steps == result.total_steps == 48
  # The untrained model starts near log(V) = 4.3 nats per token; the template is learnable,
  # the names and numbers are not, and mean token loss falls below 1.0.
  assert losses[0] > 2.0
  assert losses[-1] < 1.0, losses
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  # Every log_every steps and at each epoch's end (4 steps).
  assert [json.loads(ln)['step'] for ln in lines] == list(range(4, 49, 4))
  assert set(json.loads(lines[-1])) >= {'loss', 'grad_norm', 'param_norm', 'lr', 'epoch'}
  assert any(p.name.startswith('events') for p in (tmp_path / 'tb').iterdir())


def _params(model):
  return jax.device_get(jax.tree.leaves(fit.lora_lib.split_trainable(model)[1]))


class Killed(Exception):
  pass


@pytest.mark.slow
def test_resume_after_kill_ends_with_the_same_params(tmp_path):
  examples = gsm8k_examples(16, seed=1)
  base = fast_model(_cfg(), _mesh(1, 2, 2))
  cfg = TrainConfig(
    lr=1e-2,
    epochs=3,
    global_batch=4,
    max_len=160,
    pad_multiple=160,
    log_every=1,
    checkpoint_every=4,
    checkpoint_fractions=(0.5, 1.0),
    lora_rank=4,
    lora_alpha=8.0,
  )
  run = lambda wd, **kw: fit.fit(
    base, examples, loss='sft', config=cfg, workdir=tmp_path / wd, progress=False, **kw
  )
  whole, result = run('whole')

  def kill(step, metrics):
    if step == 7:
      raise Killed()

  with pytest.raises(Killed):
    run('resumed', on_log=kill)
  # Killed after step 7: the last checkpoint is step 6 (the 0.5 snapshot step), not 7.
  assert ocp.CheckpointManager(tmp_path / 'resumed' / 'checkpoints').latest_step() == 6
  # The resume may save on another schedule (fit.BOOKKEEPING): the result is the same.
  resumed, result2 = fit.fit(
    base,
    examples,
    loss='sft',
    config=cfg.replace(checkpoint_every=5, keep_checkpoints=3),
    workdir=tmp_path / 'resumed',
    progress=False,
  )
  assert result2.steps == result.steps == 12
  for a, b in zip(_params(whole), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  # metrics.jsonl holds each step once, the redone step 7 included.
  lines = (tmp_path / 'resumed' / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(ln)['step'] for ln in lines] == list(range(1, 13))
  # A finished fit returns at once with its final params.
  again, result3 = run('resumed')
  assert result3 == result2
  for a, b in zip(_params(whole), _params(again)):
    np.testing.assert_array_equal(a, b)
  # The fraction snapshots are listed and load into the base model (adapter added).
  snaps = fit.fit_checkpoints(tmp_path / 'whole')
  assert [s for s, _ in snaps] == [6, 12]
  last = fit.load_params(base, snaps[-1][1])
  assert last.cfg.lora_rank == 4
  for a, b in zip(_params(whole), _params(last)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='different setup'):
    fit.fit(base, examples, loss='sft', config=cfg.replace(lr=0.1), workdir=tmp_path / 'whole')


def test_nan_loss_stops_with_step_range_and_keeps_checkpoint(tmp_path):
  model = fast_model(_cfg())
  ex = gsm8k_examples(16, seed=2)
  pairs = [DpoPair.from_examples(ex[i], ex[i + 8]) for i in range(8)]
  pairs = fit.with_reference_logps(model, pairs, batch_size=8)
  assert all(np.isfinite(p.ref_chosen_logps) and p.ref_chosen_logps < 0 for p in pairs)
  cfg = TrainConfig(
    optimizer='rmsprop',
    lr=1e-4,
    epochs=2,
    global_batch=4,
    max_len=160,
    pad_multiple=160,
    log_every=1,
    checkpoint_every=1,
  )
  lengths = np.asarray([max(len(p.chosen), len(p.rejected)) for p in pairs])
  second = fit.epoch_batches(lengths, 4, cfg.seed, 0)[1]  # the pairs of step 2
  bad = pairs[second[0]]
  pairs[second[0]] = fit.dataclasses.replace(bad, ref_chosen_logps=float('nan'))
  with pytest.raises(FloatingPointError, match='non-finite loss between steps 2 and 2'):
    fit.fit(model, pairs, loss='dpo', config=cfg, workdir=tmp_path, progress=False)
  manager = ocp.CheckpointManager(tmp_path / 'checkpoints')
  assert manager.all_steps() == [1]
  restored = manager.restore(
    1, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
  )
  leaves = jax.tree.leaves(restored.state)
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
  assert not (tmp_path / 'DONE.json').exists()


def test_early_stopping_restores_the_best_epoch(tmp_path):
  rng = np.random.default_rng(3)
  model = fast_model(_cfg(num_labels=2))
  seqs = [rng.integers(3, TOK.vocab_size, rng.integers(6, 20)) for _ in range(16)]
  labels = rng.integers(0, 2, 16)
  train_ex = list(zip(seqs, labels))
  val_ex = [(s, 1 - y) for s, y in zip(seqs, labels)]  # flipped: learning makes it worse
  cfg = TrainConfig(lr=1e-2, epochs=4, global_batch=8, max_len=32, pad_multiple=32)
  final, result = fit.fit(
    model,
    train_ex,
    loss='classifier',
    config=cfg,
    workdir=tmp_path,
    progress=False,
    val_examples=val_ex,
    early_stopping_patience=1,
  )
  assert result.stopped_early and result.steps == 4 < result.total_steps == 8
  assert len(result.val_losses) == 2 and result.val_losses[1] > result.val_losses[0]
  assert result.best_step == 2
  best = fit.load_params(model, tmp_path / 'best')
  for a, b in zip(_params(best), _params(final)):
    np.testing.assert_array_equal(a, b)


def test_bad_examples_are_clear_errors(tmp_path):
  model = fast_model(_cfg())
  cfg = TrainConfig(max_len=16, pad_multiple=16, global_batch=2)
  short, long = (np.arange(3, 8), np.ones(5)), (np.arange(3, 23), np.ones(20))
  with pytest.raises(ValueError, match='example 1 has 20 tokens > max_len=16'):
    fit.fit(model, [short, long], loss='sft', config=cfg, workdir=tmp_path)
  with pytest.raises(ValueError, match='no reference log-probs'):
    ex = gsm8k_examples(2)
    fit.fit(model, [DpoPair.from_examples(*ex)], loss='dpo', config=cfg, workdir=tmp_path)


@pytest.mark.parametrize('lora_rank', [0, 4])
def test_dpo_resumes_from_its_final_checkpoint(tmp_path, lora_rank):
  # Killed after the last checkpoint but before DONE.json: the rerun restores the final state
  # (RMSprop, the DPO optimizer; full fine-tune as in arith, or an adapter) and finishes.
  sft = gsm8k_examples(8, seed=2)
  pairs = [DpoPair.from_examples(sft[i], sft[i + 1]) for i in range(0, 8, 2)]
  base = fast_model(_cfg(), _mesh(1, 1, 1))
  pairs = fit.with_reference_logps(base, pairs, batch_size=4)
  cfg = TrainConfig(
    optimizer='rmsprop',
    lr=1e-5,
    epochs=2,
    global_batch=2,
    max_len=160,
    dpo_beta=0.1,
    lora_rank=lora_rank,
    lora_alpha=2.0 * lora_rank,
    clip_norm=1.0,
  )
  run = lambda: fit.fit(base, pairs, loss='dpo', config=cfg, workdir=tmp_path, progress=False)
  first, result = run()
  (tmp_path / 'DONE.json').unlink()
  again, result2 = run()
  assert result2.steps == result.steps == 4
  for a, b in zip(_params(first), _params(again)):
    np.testing.assert_array_equal(a, b)
