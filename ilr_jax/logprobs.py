"""Target-token log-probs without the full logits: the one place the LM head meets a loss.

SFT, DPO (policy and reference) and any other sequence log-prob go through `target_logps`:
  1. only the positions that predict a target token (at most `max_targets` per row) go past the
     last layer's keys and values: that layer's attention and MLP, the final norm and the
     vocabulary projection run at those positions only, so prompt positions never pay for them;
  2. the projection and its log-softmax run over chunks of those positions (a `lax.scan`, each
     chunk rematerialised in the backward pass), so at most one [B, chunk, V] float32 block of
     logits is alive at a time, forward or backward. The chunk is sized from a fixed element
     budget (`LOGITS_BUDGET`), so peak memory does not grow with the vocabulary; when every
     position fits in the budget (bench-small) there is a single chunk, no scan and no recompute.
     Chunked, the backward pass recomputes each chunk's logits: one more [.., D] x [D, V] matmul
     per chunk (4 head matmuls instead of 3), the price of O(budget) memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# Float32 logits elements alive at once (512 MiB). Large enough that one chunk feeds the head
# matmul hundreds of rows (gemma-2b at batch 32: 16 positions, 512 rows), small next to the
# activations of a real step.
LOGITS_BUDGET = 1 << 27


def chunk_size(rows: int, positions: int, vocab: int, chunk: int | None = None) -> int:
  """Positions per logits chunk: `chunk` if given, else the most that keep rows x chunk x vocab
  within LOGITS_BUDGET (at least 1, at most `positions`)."""
  if chunk is None:
    chunk = max(1, LOGITS_BUDGET // max(rows * vocab, 1))
  return max(1, min(chunk, positions))


def _picked_logps(model, h_BPD: Array, targets_BP: Array) -> Array:
  logits_BPV = model.logits(h_BPD)
  lse_BP = jax.nn.logsumexp(logits_BPV, axis=-1)
  picked_BP = jnp.take_along_axis(logits_BPV, targets_BP[..., None], axis=-1)[..., 0]
  return picked_BP - lse_BP


def head_logps(model, h_BPD: Array, targets_BP: Array, chunk: int | None = None) -> Array:
  """log p(target) [B, P] float32 of final-norm hidden states [B, P, D] under `model`'s LM head,
  in chunks of positions (see the module docstring; `chunk` None: from LOGITS_BUDGET)."""
  b, p, d = h_BPD.shape
  c = chunk_size(b, p, model.cfg.vocab_size, chunk)
  if c >= p:
    return _picked_logps(model, h_BPD, targets_BP)
  n = -(-p // c)
  pad = n * c - p
  h = jnp.pad(h_BPD, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, d).transpose(1, 0, 2, 3)
  t = jnp.pad(targets_BP, ((0, 0), (0, pad))).reshape(b, n, c).transpose(1, 0, 2)
  # Recomputed in the backward pass: only one chunk of [B, c, V] logits is alive at a time.
  one = jax.checkpoint(lambda hc, tc: _picked_logps(model, hc, tc))
  _, out = jax.lax.scan(lambda _, xs: (None, one(*xs)), None, (h, t))
  return out.transpose(1, 0, 2).reshape(b, n * c)[:, :p]


def target_logps(
  model,
  tokens_BT: Array,
  mask_BT: Array,
  loss_mask_BT: Array,
  *,
  max_targets: int | None = None,
  chunk: int | None = None,
) -> tuple[Array, Array]:
  """Log-probs of the target tokens and their weights, ([B, P], [B, P]) float32.

  The loss at position t predicts tokens[t] from position t - 1, for every t with
  loss_mask[t] = mask[t] = 1. P is T - 1 or, with `max_targets` < T - 1, the first `max_targets`
  target positions of each row, gathered before the vocabulary projection (a row with more
  targets loses the rest: callers bound it, see `examples.target_bound`). Log-probs are zero
  where the weight is zero.
  """
  targets_BT = tokens_BT[:, 1:]
  w_BT = (loss_mask_BT[:, 1:] * mask_BT[:, 1:]).astype(jnp.float32)
  if max_targets is not None and max_targets < targets_BT.shape[1]:
    # Stable sort puts each row's target positions first, in order; position i predicts i + 1.
    idx_BP = jnp.argsort(w_BT == 0, axis=1, stable=True)[:, :max_targets]
    h_BTD = model.hidden(tokens_BT, mask_BT, at_BP=idx_BP)
    targets_BT = jnp.take_along_axis(targets_BT, idx_BP, axis=1)
    w_BT = jnp.take_along_axis(w_BT, idx_BP, axis=1)
  else:
    h_BTD = model.hidden(tokens_BT, mask_BT)[:, :-1]
  logps = head_logps(model, h_BTD, targets_BT, chunk)
  return jnp.where(w_BT > 0, logps, 0.0), w_BT
