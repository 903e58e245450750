"""Decoding methods, and the choice of each next token from the logits.

A method is a small frozen dataclass (a static jit argument): `Greedy`, `Sample` (temperature,
top-k, top-p in transformers' order) or `BeamSearch` (transformers' candidates, finishing rule and
length penalty); `METHODS` names them for configs, flags and tasks. The token choice functions
are pure functions of [B, V] logits used inside the sampler's loops (sampler.py): they read the
vocabulary in blocks of BLOCK tokens, so that a step makes as few passes over the logits as it
can, and never sort the vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


# -- methods -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Greedy:
  """Argmax decoding (transformers' do_sample=False, num_beams=1; ties go to the lowest id)."""


@dataclasses.dataclass(frozen=True)
class Sample:
  """Ancestral sampling from softmax(logits / temperature), restricted to the top_k tokens
  (0: all) and then to the smallest set of most likely tokens whose probability reaches top_p,
  in transformers' order (temperature, top-k, top-p)."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(f'temperature must be > 0 (use Greedy for 0), got {self.temperature}')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0 (0 disables it), got {self.top_k}')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')


@dataclasses.dataclass(frozen=True)
class BeamSearch:
  """Beam search with transformers' candidates, finishing rule and length penalty."""

  num_beams: int = 4
  length_penalty: float = 1.0
  early_stopping: bool | str = False  # False, True or 'never'

  def __post_init__(self):
    if self.num_beams < 1:
      raise ValueError(f'num_beams must be >= 1, got {self.num_beams}')
    if self.early_stopping not in (False, True, 'never'):
      raise ValueError(
        f"early_stopping must be False, True or 'never', got {self.early_stopping!r}"
      )


Method = Greedy | Sample | BeamSearch
GREEDY = Greedy()


# The decoding methods by name: the one list configs, flags and tasks choose from.
METHODS: dict[str, type[Greedy] | type[Sample] | type[BeamSearch]] = {
  'greedy': Greedy,
  'sample': Sample,
  'beam': BeamSearch,
}


def method_from_name(name: str, **fields) -> Method:
  """The method called `name` (a key of METHODS), built from those of `fields` that it has.

  Callers hold the settings of every method side by side (a command's flags, a task's decoding
  table), so fields of the other methods are passed over: `method_from_name('beam',
  temperature=0.7, num_beams=2)` is BeamSearch(num_beams=2).
  """
  if name not in METHODS:
    raise ValueError(f'unknown decoding method {name!r}; expected one of {sorted(METHODS)}')
  cls = METHODS[name]
  own = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in fields.items() if k in own})


# -- token choice ------------------------------------------------------------------------------


def processed_logits(logits_BV: Array, method: Sample) -> Array:
  """Logits after temperature, top-k and top-p; removed tokens are -inf."""
  logits = logits_BV.astype(jnp.float32) / method.temperature
  v = logits.shape[-1]
  if method.top_k and method.top_k < v:
    # The k-th value as the min of the top k: slicing it out ([:, -1:]) makes XLA:CPU drop its
    # TopK kernel for a full sort of the vocabulary (docs/PERFORMANCE.md).
    kth = jnp.min(jax.lax.top_k(logits, method.top_k)[0], axis=-1, keepdims=True)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if method.top_p < 1.0:
    probs = jax.nn.softmax(logits, axis=-1)
    logits = jnp.where(probs < top_p_threshold(probs, method.top_p), -jnp.inf, logits)
  return logits


def top_p_threshold(probs_BV: Array, top_p: float) -> Array:
  """[B, 1]: the least probability that top-p keeps. A token is kept when the mass of the tokens
  strictly likelier than it is below top_p (transformers' rule: the smallest set of likeliest
  tokens whose mass reaches top_p; the most likely token, with nothing likelier, is always kept),
  so the kept tokens are those with p >= the smallest p_i whose likelier mass S(p_i) =
  sum(p_j > p_i) is below top_p.

  S is a non-increasing step function that steps down exactly at the probabilities, so that
  p_i is the smallest t with S(t) < top_p: a bisection over t on the float's bit pattern
  (probabilities are >= 0, so their int32 patterns order as the floats do; 31 halvings cover
  [0, 1]) finds it exactly, with one masked sum over the vocabulary per halving, where a sort of
  the vocabulary on XLA:CPU would cost more than the rest of a decode step (docs/PERFORMANCE.md);
  ties at the threshold are all kept either way."""
  probs = probs_BV.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
  hi = jnp.max(bits, axis=-1, keepdims=True)  # S(max p) = 0 < top_p: always a valid threshold
  lo = jnp.full_like(hi, -1)  # below every probability (S there is the whole mass)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    mass = jnp.sum(jnp.where(bits > mid, probs, 0.0), axis=-1, keepdims=True)
    below = mass < top_p
    open_ = hi - lo > 1
    return jnp.where(open_ & ~below, mid, lo), jnp.where(open_ & below, mid, hi)

  _, hi = jax.lax.fori_loop(0, 31, halve, (lo, hi))
  return jax.lax.bitcast_convert_type(hi, jnp.float32)


BLOCK = 128  # tokens per block: inverse CDF, greedy argmax and beam candidates


def max_and_first_argmax(x_BV: Array, block: int = BLOCK) -> tuple[Array, Array]:
  """Each row's maximum and the index of its first occurrence (jnp.argmax's tie rule), from one
  pass over x (block maxima), then the first block that holds the maximum and the first match in
  it. (XLA:CPU's argmax reduction, or a max followed by a min over a [B, V] array of indices, takes
  two or three passes over the logits; a row of NaNs gives V - 1.)"""
  b, v = x_BV.shape
  nb = -(-v // block)
  xb = jnp.pad(x_BV, ((0, 0), (0, nb * block - v)), constant_values=-jnp.inf)
  xb = xb.reshape(b, nb, block)
  block_max = jnp.max(xb, axis=-1)
  top = jnp.max(block_max, axis=-1)
  blk = jnp.min(jnp.where(block_max == top[:, None], jnp.arange(nb, dtype=jnp.int32), nb), axis=-1)
  blk = jnp.minimum(blk, nb - 1)
  inner = jnp.take_along_axis(xb, blk[:, None, None], axis=1)[:, 0]
  pos = jnp.min(jnp.where(inner == top[:, None], jnp.arange(block, dtype=jnp.int32), block), -1)
  return top, jnp.minimum(blk * block + pos, v - 1)


def inverse_cdf(weights_BV: Array, u_B: Array) -> Array:
  """Per row, the token i with cdf[i - 1] <= u * total < cdf[i], for weights >= 0 (unnormalised)
  and u in [0, 1): the block sums' running total picks a block of BLOCK tokens, then that block's
  running total picks the token. (A flat cumsum over the vocabulary is an associative scan on XLA
  CPU, several times slower.) Tokens of weight 0 are never chosen, even where rounding brings
  u * total up to the total."""
  b, v = weights_BV.shape
  nb = -(-v // BLOCK)
  w = jnp.pad(weights_BV, ((0, 0), (0, nb * BLOCK - v))).reshape(b, nb, BLOCK)
  block_cdf = jnp.cumsum(jnp.sum(w, axis=-1), axis=-1)
  total = block_cdf[:, -1:]
  t = u_B[:, None] * total
  # The second count is the last block (token) that carries weight: the clamp for rounding.
  j = jnp.minimum(jnp.sum(block_cdf <= t, axis=-1), jnp.sum(block_cdf < total, axis=-1))
  before = jnp.take_along_axis(block_cdf, jnp.maximum(j - 1, 0)[:, None], axis=-1)
  before = jnp.where(j[:, None] > 0, before, 0.0)
  inner_cdf = before + jnp.cumsum(jnp.take_along_axis(w, j[:, None, None], axis=1)[:, 0], axis=-1)
  k = jnp.minimum(jnp.sum(inner_cdf <= t, axis=-1), jnp.sum(inner_cdf < inner_cdf[:, -1:], axis=-1))
  return (j * BLOCK + k).astype(jnp.int32)


def greedy_choice(logits_BV: Array, with_logp: bool = True) -> tuple[Array, Array | None]:
  """(argmax token, its log-prob or None) per row; the argmax's max shifts the logsumexp."""
  x = logits_BV.astype(jnp.float32)
  top, tok = max_and_first_argmax(x)
  if not with_logp:
    return tok, None
  return tok, -jnp.log(jnp.sum(jnp.exp(x - top[:, None]), axis=-1))


def sample_choice(
  logits_BV: Array, u_B: Array, method: Sample, with_logp: bool = True
) -> tuple[Array, Array | None]:
  """(sampled token, its log-prob under the model's logits or None) per row, by inverse CDF of the
  processed distribution with one uniform u in [0, 1) per row (cheaper than Gumbel noise over the
  vocabulary). One max serves both exponentials: top-k and top-p always keep the most likely
  token, so the processed logits' max is the logits' max / temperature."""
  x = logits_BV.astype(jnp.float32)
  m = jnp.max(x, axis=-1, keepdims=True)
  weights = jnp.exp(processed_logits(x, method) - m / method.temperature)  # removed tokens: 0
  tok = inverse_cdf(weights, u_B)
  if not with_logp:
    return tok, None
  picked = jnp.take_along_axis(x, tok[:, None], axis=-1)[:, 0]
  return tok, picked - m[:, 0] - jnp.log(jnp.sum(jnp.exp(x - m), axis=-1))


def choose(
  logits_BV: Array, u_B: Array | None, method: Greedy | Sample, with_logp: bool = True
) -> tuple[Array, Array | None]:
  """(next token, its log-prob under the model or None) of every row for `method`; `u_B` are the
  rows' uniforms for this step (unused by greedy)."""
  if isinstance(method, Greedy):
    return greedy_choice(logits_BV, with_logp)
  return sample_choice(logits_BV, u_B, method, with_logp)


# -- beam candidates ---------------------------------------------------------------------


def beam_candidates(
  logits_BNV: Array, running_BN: Array, k: int, block: int = BLOCK
) -> tuple[Array, Array]:
  """The top k of each prompt's candidates log_softmax(logits) + running score over its N beams'
  [N * V] tokens: `top_k` of them, with the same values, indices and tie order, without writing
  the [B, N * V] candidates. A candidate is f(x) = ((x - max) - logsumexp) + running, the
  operations of jax.nn.log_softmax and the add, in that order: f is non-decreasing (each rounding
  is), so a block's largest candidate is f of its largest logit; f is applied to the block maxima
  to choose the k blocks, and to those blocks' entries only."""
  b, nb, v = logits_BNV.shape
  x = logits_BNV.astype(jnp.float32)
  nblk = -(-v // block)
  xb = jnp.pad(x, ((0, 0), (0, 0), (0, nblk * block - v)), constant_values=-jnp.inf)
  xb = xb.reshape(b, nb, nblk, block)
  block_max = jnp.max(xb, axis=-1)  # [B, N, nblk]
  mx = jnp.max(block_max, axis=-1, keepdims=True)  # [B, N, 1]
  lse = jnp.log(jnp.sum(jnp.exp(x - mx), axis=-1, keepdims=True))
  run = running_BN[:, :, None]

  def f(y, mx, lse, run):
    return ((y - mx) - lse) + run

  if nb * nblk <= k:  # too few blocks to skip any
    return jax.lax.top_k(f(x, mx, lse, run).reshape(b, nb * v), k)
  blocks = jax.lax.top_k(f(block_max, mx, lse, run).reshape(b, nb * nblk), k)[1]
  blocks = jnp.sort(blocks, axis=-1)  # candidates in index order keep lax.top_k's tie order
  beam, blk = blocks // nblk, blocks % nblk
  cand = xb[jnp.arange(b)[:, None], beam, blk]  # [B, k, block]

  def of_beam(a):  # a row's [B, N, 1] value for each chosen block: [B, k, 1]
    return jnp.take_along_axis(a[..., 0], beam, axis=1)[..., None]

  cand = f(cand, of_beam(mx), of_beam(lse), of_beam(run)).reshape(b, k * block)
  values, pos = jax.lax.top_k(cand, k)
  token = jnp.take_along_axis(blk, pos // block, axis=1) * block + pos % block
  idx = jnp.take_along_axis(beam, pos // block, axis=1) * v + token
  return values, idx.astype(jnp.int32)
