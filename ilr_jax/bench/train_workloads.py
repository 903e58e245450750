"""Train-step workloads: sft_step, dpo_step and their LoRA (rank 64, all projections) variants.

One timed call is one optimizer step on a batch of random tokens (docs/BENCH.md): SFT on --batch
sequences (default 8) of --seq_len tokens (default 128) with the loss on the last half; DPO on
--batch / 2 pairs that share a prompt of half the length, with the reference log-probs computed
in the call on both sides.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ilr_jax import sharding as shd
from ilr_jax import train as train_lib
from ilr_jax.bench.harness import BenchContext, Case, jax_model, train_flops, workload

LORA_RANK = 64


def train_config(lora_rank: int) -> train_lib.TrainConfig:
  # docs/BENCH.md: AdamW lr 5e-5, no clipping, no schedule (as torch_peer's optimizer).
  return train_lib.TrainConfig(
    optimizer='adamw',
    lr=5e-5,
    schedule='constant',
    warmup_ratio=0.0,
    clip_norm=None,
    lora_rank=lora_rank,
    lora_alpha=2.0 * lora_rank,
  )


def _answer_mask(rows: int, t: int, answer_len: int) -> np.ndarray:
  loss_mask = np.zeros((rows, t), np.int32)
  loss_mask[:, t - answer_len :] = 1
  return loss_mask


def sft_case(ctx: BenchContext, lora_rank: int) -> Case:
  b, t = ctx.batch or 8, ctx.seq_len or 128
  p = t // 2  # loss on the last half of each sequence
  tokens = ctx.tokens(b, t)
  mask = np.ones((b, t), np.int32)
  model = jax_model(ctx, lora_rank)
  trainer, state_box = train_lib.make_trainer(
    model, 'sft', train_config(lora_rank), 1000, mesh=ctx.mesh
  )
  batch = trainer.shard_batch({'tokens': tokens, 'mask': mask, 'loss_mask': _answer_mask(b, t, p)})
  box = [state_box]
  del model

  def jax_fn():
    box[0], metrics = trainer.train_step(box[0], batch, p)
    return metrics['loss']

  torch_fn = None
  if ctx.peer == 'torch':
    from ilr_jax.bench import torch_peer

    tm = torch_peer.causal_lm(ctx.cfg, ctx.seed, lora_rank, 2.0 * lora_rank)
    torch_fn = torch_peer.sft_step(tm, tokens, p)

  flops = train_flops(ctx.cfg, b * t, t, b * p, lora_rank=lora_rank)
  fields = {'batch': b, 'seq_len': t, 'loss_tokens': p, 'lora_rank': lora_rank}
  return Case(jax_fn, torch_fn, b * t, 'tokens', flops, fields)


def dpo_case(ctx: BenchContext, lora_rank: int) -> Case:
  pairs, t = (ctx.batch or 8) // 2, ctx.seq_len or 128
  p = t // 2  # shared prompt of t/2, answers of t/2
  prompt = ctx.tokens(pairs, t - p)
  answers = ctx.rng.integers(3, ctx.cfg.vocab_size, size=(2, pairs, p), dtype=np.int32)
  chosen = np.concatenate([prompt, answers[0]], axis=1)
  rejected = np.concatenate([prompt, answers[1]], axis=1)
  mask = np.ones((pairs, t), np.int32)
  loss_mask = _answer_mask(pairs, t, p)
  model = jax_model(ctx, lora_rank)
  ref_graphdef, ref_state = nnx.split(model)
  ref_state = jax.tree.map(jnp.copy, ref_state)  # the reference: a frozen copy of the start
  cfg = train_config(lora_rank)
  trainer, state0 = train_lib.make_trainer(model, 'dpo', cfg, 1000, mesh=ctx.mesh)
  del model
  host = {}
  for side, tokens in (('chosen', chosen), ('rejected', rejected)):
    host.update({f'{side}_tokens': tokens, f'{side}_mask': mask, f'{side}_loss_mask': loss_mask})
  sh = trainer.batch_shardings
  batch = {k: shd.put(v, sh[k]) for k, v in host.items()}
  two_b = lambda k: jnp.concatenate([batch[f'chosen_{k}'], batch[f'rejected_{k}']])

  @jax.jit
  def ref_logps(ref_state, batch):
    tokens, m, lm = (two_b(k) for k in ('tokens', 'mask', 'loss_mask'))
    model = nnx.merge(ref_graphdef, ref_state)
    logps, _ = train_lib.token_logps(model, tokens, m, lm, max_targets=p)
    return {'ref_chosen_logps': logps.sum(-1)[:pairs], 'ref_rejected_logps': logps.sum(-1)[pairs:]}

  box = [state0]

  def jax_fn():
    ref = ref_logps(ref_state, batch)
    box[0], metrics = trainer.train_step(box[0], {**batch, **ref}, p)
    return metrics['loss']

  torch_fn = None
  if ctx.peer == 'torch':
    from ilr_jax.bench import torch_peer

    policy = torch_peer.causal_lm(ctx.cfg, ctx.seed, lora_rank, 2.0 * lora_rank)
    torch_fn = torch_peer.dpo_step(policy, chosen, rejected, p)

  n = 2 * pairs
  flops = train_flops(ctx.cfg, n * t, t, n * p, lora_rank=lora_rank, ref_forward=True)
  fields = {'pairs': pairs, 'seq_len': t, 'answer_tokens': p, 'lora_rank': lora_rank}
  return Case(jax_fn, torch_fn, n * t, 'tokens', flops, fields)


# name -> (case, adapter rank): full fine-tuning and LoRA variants of each step.
for _name, _case, _rank in (
  ('sft_step', sft_case, 0),
  ('sft_step_lora', sft_case, LORA_RANK),
  ('dpo_step', dpo_case, 0),
  ('dpo_step_lora', dpo_case, LORA_RANK),
):
  workload(_name)(functools.partial(_case, lora_rank=_rank))
