"""Attention over a padded batch: one entry point, `attend`, with the implementation as a switch.

  'einsum'  two einsums over [B, K, G, T, S] float32 scores (the reference; the sampler's decode
            steps always use it, in the kv-first cache layout, `attend_kv_first` in model.py).
            Where queries are the keys' own slots under a causal mask (a forward without a cache,
            a prefill: `causal=True`), it runs in query blocks that skip the keys after each
            block (`attend_causal_blocks`).
  'xla'     `jax.nn.dot_product_attention(implementation='xla')`: the same math written by JAX.
  'cudnn'   `jax.nn.dot_product_attention(implementation='cudnn')`: cuDNN's fused (flash)
            kernel, GPU only; the boolean mask is passed as an additive bias (cuDNN's sequence-
            length padding assumes right padding, and rows here may be left-padded).
  'auto'    'cudnn' on GPU, 'xla' on TPU, 'einsum' on CPU: there the two compute the same FLOPs,
            but XLA:CPU's program for jax's version moves more bytes (bench-small attention, one
            layer's forward and backward: 141 MB against 117 MB, two more transposes).
On TPU the installed jax ships a splash-attention Pallas kernel (jax.experimental.pallas.ops.tpu.
splash_attention); it is not wired in: it needs a static mask object (causal / local window) plus
segment ids for the padding, and has not been run here. TPU runs use 'xla'.

All take queries [B, T, N, H], keys and values [B, S, K, H] (grouped-query: G = N // K query
heads share a kv head, MQA is K = 1), any head dim H (Gemma's is not D / N), a boolean mask
[B, T, S] that already holds causality, padding and any sliding window (model.attention_mask),
and return [B, T, N, H] in the values' dtype, with scores and softmax in float32. A query row
with no valid key (a padding position) gets an arbitrary finite output, which callers ignore.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'einsum')


_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Causal query blocks of the einsum path (attend_causal_blocks): rows per block, and at most this
# many blocks (longer sequences get longer blocks). 32 rows ran fastest on a 2-core EPYC (2 MB L2
# per core) at T = 128 and 192, forward and backward.
QUERY_BLOCK = 32
MAX_QUERY_BLOCKS = 8


def resolve(implementation: str, dtype=jnp.bfloat16) -> str:
  """The concrete implementation for the default backend and the compute `dtype`: 'auto' is
  'cudnn' on GPU for bf16 / f16 (cuDNN's fused kernel takes no float32; float32 gets 'xla'),
  'einsum' on CPU, 'xla' elsewhere."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'attention must be one of {IMPLEMENTATIONS}, got {implementation!r}')
  half = jnp.dtype(dtype) in _HALF
  if implementation == 'cudnn' and not half:
    raise ValueError(f"attention='cudnn' needs bfloat16 or float16 compute, got {dtype}")
  if implementation != 'auto':
    return implementation
  backend = jax.default_backend()
  if backend == 'gpu':
    return 'cudnn' if half else 'xla'
  return 'einsum' if backend == 'cpu' else 'xla'


def attend_einsum(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array) -> Array:
  """Grouped-query attention (K kv heads shared by G = N // K query heads), float32 softmax."""
  b, t, n, h = q_BTNH.shape
  k = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
  logits = jnp.einsum('BTKGH,BSKH->BKGTS', q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  logits = logits * (h**-0.5)
  logits = jnp.where(mask_BTS[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKH.dtype)
  out = jnp.einsum('BKGTS,BSKH->BTKGH', probs, v_BSKH)
  return out.reshape(b, t, n, h)


def query_blocks(t: int) -> list[tuple[int, int]]:
  """[start, end) of the query blocks of `attend_causal_blocks` for T queries: blocks of
  QUERY_BLOCK rows, or T / MAX_QUERY_BLOCKS rows when that is more (a bounded program size)."""
  size = max(QUERY_BLOCK, -(-t // MAX_QUERY_BLOCKS))
  return [(s, min(t, s + size)) for s in range(0, t, size)]


def attend_causal_blocks(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_BTS: Array) -> Array:
  """`attend_einsum` for queries that sit at key slots 0..T-1 of a mask that is causal by slot
  (model.attention_mask without a cache): each block of queries reads only the keys up to its
  last row, the only ones its mask can admit. About half the scores of a long sequence are never
  computed, and each block's [B, K, G, Tq, S] scores stay small enough for the CPU's caches
  (bench-small, B 16 x T 192: 32 ms -> 6 ms a layer forward). Equal to `attend_einsum` to float
  rounding: the skipped keys have probability exactly 0 there."""
  t, s = q_BTNH.shape[1], k_BSKH.shape[1]
  if t != s or mask_BTS.shape[1:] != (t, s):
    raise ValueError(f'causal blocks need T queries over T keys, got {t} and {s}')
  outs = [
    attend_einsum(q_BTNH[:, a:e], k_BSKH[:, :e], v_BSKH[:, :e], mask_BTS[:, a:e, :e])
    for a, e in query_blocks(t)
  ]
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def attend(
  q_BTNH: Array,
  k_BSKH: Array,
  v_BSKH: Array,
  mask_BTS: Array,
  implementation: str = 'einsum',
  *,
  causal: bool = False,
) -> Array:
  """Attention of q over (k, v) under `mask_BTS` with the chosen implementation (module doc).

  `causal`: query i sits at key slot i and the mask is causal by slot (T = S); 'einsum' then runs
  in query blocks that skip the keys no query of the block can see (`attend_causal_blocks`). The
  other implementations read causality from the mask."""
  impl = resolve(implementation, v_BSKH.dtype)
  if impl == 'einsum':
    if causal:
      return attend_causal_blocks(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
    return attend_einsum(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
  # Both JAX implementations want q, k, v in one dtype; the mask broadcasts over the N heads.
  dtype = v_BSKH.dtype
  out = jax.nn.dot_product_attention(
    q_BTNH.astype(dtype),
    k_BSKH.astype(dtype),
    v_BSKH,
    mask=mask_BTS[:, None],
    scale=q_BTNH.shape[-1] ** -0.5,
    implementation=impl,
  )
  return out.astype(dtype)
