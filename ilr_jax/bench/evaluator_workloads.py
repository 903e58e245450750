"""Evaluator workloads: classify_batched, classify_single and pair_scorer (evaluator.py).

A random 2-class evaluator scores 64 random prompts of --seq_len tokens (default 192;
docs/BENCH.md): in batches of --batch prompts (default 16), one prompt per call, or as 32
comparison pairs read in both orders by the pair scorer, host-side bucketing included, against
the released code's loop of one prompt per PyTorch call.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from flax import nnx

from ilr_jax import evaluator
from ilr_jax import sharding as shd
from ilr_jax.bench.harness import BenchContext, Case, forward_flops, workload
from ilr_jax.model import Decoder
from ilr_jax.tokens import Tokenizer

PROMPTS = 64


def _setup(ctx: BenchContext):
  """(JAX scorer, transformers' classifier or None, prompts [64, T], prompts per batch, fields,
  FLOPs of one pass over the prompts)."""
  # The scorer logs its throughput on every call; the harness reports timings itself.
  logging.getLogger(evaluator.__name__).setLevel(logging.WARNING)
  # pad id 0 never occurs in the prompts (ids in [3, vocab)), so HF reads the last token too.
  cfg = ctx.cfg.replace(num_labels=2, pad_token_id=0)
  batch, t = ctx.batch or 16, ctx.seq_len or 192
  tokens = ctx.tokens(PROMPTS, t)
  tok = Tokenizer(
    encode=list,
    decode=str,
    bos_id=1,
    eos_id=2,
    pad_id=0,
    vocab_size=cfg.vocab_size,
    source='bench',
  )
  model = shd.create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(ctx.seed)), ctx.mesh)
  scorer = evaluator.EvaluatorScorer(model, tok, batch_size=batch // 2, bucket=t, progress=False)
  torch_cls = None
  if ctx.peer == 'torch':
    from ilr_jax.bench import torch_peer

    torch_cls = torch_peer.classifier(cfg, ctx.seed)
  fields = {'prompts': PROMPTS, 'seq_len': t, 'batch': batch}
  return scorer, torch_cls, tokens, batch, fields, forward_flops(cfg, PROMPTS * t, t, 0)


def _classify_case(ctx: BenchContext, single: bool) -> Case:
  """Class probabilities of all prompts, `batch` (or, with `single`, 1) prompts per call."""
  scorer, torch_cls, tokens, batch, fields, flops = _setup(ctx)
  if single:
    batch, fields = 1, {**fields, 'batch': 1}
  n, t = tokens.shape
  starts = range(0, n, batch)
  placed_mask = scorer.place(np.ones((batch, t), np.int32))
  placed = [scorer.place(tokens[s : s + batch]) for s in starts]

  def jax_fn():
    return [jax.nn.softmax(scorer.classify(x, placed_mask), axis=-1) for x in placed]

  torch_fn = None
  if torch_cls is not None:
    from ilr_jax.bench import torch_peer

    def torch_fn():
      return [torch_peer.classify(torch_cls, tokens[s : s + batch]) for s in starts]

  return Case(jax_fn, torch_fn, n, 'items', flops, fields)


@workload('classify_batched')
def _classify_batched(ctx: BenchContext) -> Case:
  return _classify_case(ctx, single=False)


@workload('classify_single')
def _classify_single(ctx: BenchContext) -> Case:
  return _classify_case(ctx, single=True)


@workload('pair_scorer')
def _pair_scorer(ctx: BenchContext) -> Case:
  """The two-order pair scorer on 32 pairs (the 64 prompts: first and second orders)."""
  scorer, torch_cls, tokens, _, fields, flops = _setup(ctx)
  pairs = tokens.shape[0] // 2
  firsts, seconds = [list(r) for r in tokens[:pairs]], [list(r) for r in tokens[pairs:]]

  def jax_fn():
    return scorer.score_ids(firsts, seconds)

  torch_fn = None
  if torch_cls is not None:
    from ilr_jax.bench import torch_peer

    def torch_fn():
      out = np.zeros(pairs)
      for i in range(pairs):
        p_ab = torch_peer.classify(torch_cls, tokens[i : i + 1])[0].cpu().numpy()
        p_ba = torch_peer.classify(torch_cls, tokens[pairs + i : pairs + i + 1])[0].cpu().numpy()
        out[i] = 0.5 * (p_ab[1] + p_ba[0])
      return out

  return Case(jax_fn, torch_fn, pairs, 'items', flops, {**fields, 'pairs': pairs})
