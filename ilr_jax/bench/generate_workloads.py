"""Generation workloads: generate_greedy, generate_sample, generate_sample_top_p, generate_beam4.

One timed call decodes a batch of random prompts (prefill included) to exactly --seq_len new
tokens (default 64, as long as the prompts) on both sides: ours with no stop token, transformers'
`generate` with min_new_tokens = max_new_tokens. On an accelerator each record also carries the
memory-bandwidth bound of the decode steps (weights plus the mean KV cache read once per step):
tokens_per_s / bw_bound_tokens_per_s is the fraction of the bound reached.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ilr_jax import sampler as sampler_lib
from ilr_jax.bench.harness import (
  BenchContext,
  Case,
  forward_flops,
  jax_model,
  layer_matmul_params,
  workload,
)
from ilr_jax.decoding import BeamSearch, Greedy, Method, Sample
from ilr_jax.model import ModelConfig

# HBM bandwidth in bytes/s by device kind (substring of jax's device_kind).
HBM_BYTES_PER_S = {'H100': 3.35e12, 'H200': 4.8e12, 'A100': 2.0e12}


def decode_bound(cfg: ModelConfig, prompts: int, rows: int, prompt: int, new: int) -> float | None:
  """New tokens/s (of the prompts) if each decode step only read the weights and the mean KV
  cache of its rows once from memory; None off the accelerators of HBM_BYTES_PER_S."""
  kind = jax.devices()[0].device_kind
  bw = next((v for k, v in HBM_BYTES_PER_S.items() if k in kind), None)
  if bw is None or jax.devices()[0].platform == 'cpu':
    return None
  itemsize = jnp.dtype(cfg.dtype).itemsize
  weights = cfg.num_layers * layer_matmul_params(cfg) + cfg.hidden_size * cfg.vocab_size
  cache = 2 * cfg.num_layers * rows * (prompt + new / 2) * cfg.num_kv_heads * cfg.head_dim
  return prompts / ((weights + cache) * itemsize / bw)


def generate_case(ctx: BenchContext, method: Method, prompts: int) -> Case:
  b, p = ctx.batch or prompts, ctx.seq_len or 64
  m = p
  tokens = ctx.tokens(b, p)
  mask = np.ones((b, p), np.int32)
  sampler = sampler_lib.Sampler(jax_model(ctx), mesh=ctx.mesh)

  def jax_fn():
    # Tokens only, as transformers' `generate` returns them (it computes no log-probs unless
    # output_scores=True); beam search scores its beams either way.
    return sampler(tokens, mask, method, max_new_tokens=m, stop_ids=(), scores=False).tokens

  torch_fn = None
  if ctx.peer == 'torch':
    from ilr_jax.bench import torch_peer

    torch_fn = torch_peer.generate(ctx.cfg, ctx.seed, tokens, method, m)

  rows = b * (method.num_beams if isinstance(method, BeamSearch) else 1)
  flops = forward_flops(ctx.cfg, rows * (p + m), p + m, rows * m)
  fields = {'prompts': b, 'prompt_len': p, 'new_tokens': m, 'rows': rows}
  bound = decode_bound(ctx.cfg, b, rows, p, m)
  if bound:
    fields['bw_bound_tokens_per_s'] = bound
  return Case(jax_fn, torch_fn, b * m, 'tokens', flops, fields)


@workload('generate_greedy')
def _generate_greedy(ctx: BenchContext) -> Case:
  return generate_case(ctx, Greedy(), 16)


@workload('generate_sample')
def _generate_sample(ctx: BenchContext) -> Case:
  return generate_case(ctx, Sample(temperature=0.7, top_k=0, top_p=1.0), 16)


@workload('generate_sample_top_p')
def _generate_sample_top_p(ctx: BenchContext) -> Case:
  # generate_sample with top-p 0.9, a common setting, whose filter is the one step of token
  # choice that could need a sort of the vocabulary (ours bisects instead).
  return generate_case(ctx, Sample(temperature=0.7, top_k=0, top_p=0.9), 16)


@workload('generate_beam4')
def _generate_beam4(ctx: BenchContext) -> Case:
  return generate_case(ctx, BeamSearch(num_beams=4, length_penalty=1.0), 4)
