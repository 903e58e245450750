"""Jitted batched sampling with a KV cache: greedy, temperature / top-k / top-p, beam search.

A batch of left-padded prompts [B, P] is decoded in two jitted calls:
  * prefill: the prompts run through `Decoder.decode_hidden` into an empty cache of P + M - 1 slots
    (M = max_new_tokens), the first new token is chosen from the last position's logits, and the
    rows are copied to `num_samples` (or `num_beams`) rows per prompt, so the prompt's prefill is
    shared, never recomputed;
  * decode: a `lax.while_loop` over an explicit state (tokens, done flags, positions, KV cache,
    the rows' uniforms drawn from their PRNG keys), one token per step, until every row has
    emitted a stop token or M tokens exist.
    The state is donated and the cache is updated in place (`decode_hidden` writes each layer's
    new slot into the loop-carried cache).

Model parameters are jit arguments, never static: a new model of the same architecture (another
round's adapter) reuses the compiled code. Methods are small frozen dataclasses and are static;
they and the choice of a token from the logits live in decoding.py.

Randomness is per row: a row's key is `fold_in(key(seed), row_id)`, then folded with the sample
index and the step, so a prompt's samples depend only on (seed, its row id), not on the other rows,
their order or the padding. With `stop_ids=()` exactly M tokens are generated (benchmark mode).

Beam search follows transformers' `_beam_search` (v4.50+ / v5): 2 * num_beams candidates per step
(more with several stop tokens), a hypothesis finishes when a stop token is among the top
num_beams candidates, its score is sum(log-probs) / (new tokens incl. the stop) ** length_penalty,
and a prompt stops collecting hypotheses once its best running beam cannot beat its worst finished
one (`early_stopping` False, True or 'never', with transformers' meaning).

Axis letters as in model.py, plus M new tokens and N (here) beams or samples per prompt.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ilr_jax import lora
from ilr_jax import sharding as shd
from ilr_jax.decoding import (
  GREEDY,
  BeamSearch,
  Greedy,
  Method,
  Sample,
  beam_candidates,
  choose,
)
from ilr_jax.model import Cache, Decoder, init_cache, positions_from_mask

Array = jax.Array
NEG = -1.0e9  # transformers' "impossible" beam score, added (not assigned) exactly as it does

# Number of times each jitted function was traced, by name; tests use it to bound compilations.
TRACES: collections.Counter = collections.Counter()


# -- state -------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingState:
  """Loop state of greedy / sampled decoding over R = B * num_samples rows."""

  step: Array  # [] int32, new tokens chosen so far
  tokens_RM: Array  # [R, M] int32, pad after a row's stop token
  done_R: Array  # [R] bool, the row has chosen a stop token
  lengths_R: Array  # [R] int32, new tokens including the stop token
  scores_R: Array  # [R] float32, sum of the model's log-probs of the chosen tokens
  positions_R: Array  # [R] int32, position of the last chosen token (the next input)
  kv_mask_RS: Array  # [R, S] int32, valid cache slots
  uniforms_RM: Array  # [R, M] float32, each row's uniform for each step ([R, 0] for greedy)
  cache: Cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BeamState:
  """Loop state of beam search over B prompts x N beams (R = B * N cache rows)."""

  step: Array  # [] int32
  running_BNM: Array  # [B, N, M] int32 running hypotheses, best first
  running_scores_BN: Array  # [B, N] float32 sum of log-probs (NEG-shifted if just finished)
  finished_BNM: Array  # [B, N, M] int32 best finished hypotheses, best first
  finished_scores_BN: Array  # [B, N] float32 length-penalised scores
  finished_len_BN: Array  # [B, N] int32 new tokens including the stop token
  is_finished_BN: Array  # [B, N] bool
  open_B: Array  # [B] bool: the best running beam may still beat the worst finished one
  all_hit: Array  # [] bool: every candidate of the last step hit a stopping criterion
  parent_BN: Array  # [B, N] int32: the beam each running beam continues (its cache rows' source)
  positions_R: Array  # [R] int32
  kv_mask_RS: Array  # [R, S] int32
  cache: Cache


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """Host results for B prompts with N sequences each (N = num_samples, 1 for beam search)."""

  tokens: np.ndarray  # [B, N, M] int32, pad after the stop token
  lengths: np.ndarray  # [B, N] int32, new tokens including the stop token
  scores: np.ndarray | None  # [B, N] float32: sum of log-probs (None unless asked), or beam score
  stopped: np.ndarray  # [B, N] bool: ended by a stop token (not by max_new_tokens)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything static about one decoding call (a jit cache key, with the shapes)."""

  method: Method
  max_new_tokens: int
  num_samples: int
  stop_ids: tuple[int, ...]
  pad_id: int
  scores: bool = True  # greedy / sampling: sum the chosen tokens' log-probs


def _is_stop(tokens: Array, stop_ids: tuple[int, ...]) -> Array:
  if not stop_ids:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, jnp.asarray(stop_ids, jnp.int32))


def _prefill_logits(
  model: Decoder, head_DV: Array | None, tokens_BP: Array, mask_BP: Array, cache_len: int
):
  """Run the prompts into a fresh cache; returns (last-position logits [B, V], cache, kv_mask)."""
  b, p = tokens_BP.shape
  cache = init_cache(model.cfg, b, cache_len)
  kv_mask = jnp.zeros((b, cache_len), jnp.int32).at[:, :p].set(mask_BP)
  positions = positions_from_mask(mask_BP)
  # Only the last slot's logits are needed (every prompt ends there): the final layer's attention
  # output and MLP, and the LM head, run for that slot only.
  h, cache = model.decode_hidden(tokens_BP, positions, cache, 0, kv_mask, prefill=True)
  return model.logits(h[:, -1], head_DV), cache, kv_mask


def _step_logits(model: Decoder, head_DV, layers, s, last_R: Array, slot: Array):
  """One decode step of every row: its last token `last_R` into cache slot `slot`; returns
  (logits [R, V], new cache, new kv_mask) for a state `s` with positions_R, kv_mask_RS, cache."""
  ones = jnp.ones((s.kv_mask_RS.shape[0], 1), jnp.int32)
  kv_mask = jax.lax.dynamic_update_slice(s.kv_mask_RS, ones, (0, slot))
  h, cache = model.decode_hidden(
    last_R[:, None], s.positions_R[:, None], s.cache, slot, kv_mask, layers
  )
  return model.logits(h[:, 0], head_DV), cache, kv_mask


def _repeat_rows(x: Array, n: int, axis: int = 0) -> Array:
  return x if n == 1 else jnp.repeat(x, n, axis=axis)


def _row_uniforms(seed: Array, row_ids_B: Array, n: int, m: int) -> Array:
  """[B * n, m] uniforms in [0, 1): key(seed) folded with the row id, then with the sample index,
  then with the step. Drawn for every step before the loop: inside the decode loop the threefry
  rounds are a loop of their own on CPU, run once per step."""
  base = jax.random.key(seed)
  rows = jax.vmap(jax.random.fold_in, (None, 0))(base, row_ids_B)
  keys = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(k, jnp.arange(n)))(rows)
  keys = keys.reshape(-1)

  def one(key):
    steps = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(m))
    return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(steps)

  return jax.vmap(one)(keys)


# -- greedy / sampling -------------------------------------------------------------------------


def _sample_prefill(graphdef, weights, tokens_BP, mask_BP, row_ids_B, seed, *, spec: _Spec):
  params, head = weights
  model = nnx.merge(graphdef, params)
  b, p = tokens_BP.shape
  n, m = spec.num_samples, spec.max_new_tokens
  logits, cache, kv_mask = _prefill_logits(model, head, tokens_BP, mask_BP, p + m - 1)
  # n samples per prompt share the prompt's prefill: copy its cache rows, do not recompute.
  cache = jax.tree.map(lambda c: _repeat_rows(c, n), cache)
  logits = _repeat_rows(logits, n)
  if isinstance(spec.method, Greedy):  # no randomness: skip the key derivation (compile time)
    uniforms = jnp.zeros((b * n, 0), jnp.float32)
  else:
    uniforms = _row_uniforms(seed, row_ids_B, n, m)
  step = jnp.zeros((), jnp.int32)
  u = uniforms[:, 0] if isinstance(spec.method, Sample) else None
  tok, logp = choose(logits, u, spec.method, spec.scores)
  done = _is_stop(tok, spec.stop_ids)
  r = b * n
  return SamplingState(
    step=step + 1,
    tokens_RM=jnp.full((r, m), spec.pad_id, jnp.int32).at[:, 0].set(tok),
    done_R=done,
    lengths_R=jnp.ones((r,), jnp.int32),
    scores_R=jnp.zeros((r,), jnp.float32) if logp is None else logp,
    positions_R=_repeat_rows(jnp.sum(mask_BP, axis=-1).astype(jnp.int32), n),
    kv_mask_RS=_repeat_rows(kv_mask, n),
    uniforms_RM=uniforms,
    cache=cache,
  )


def _sample_decode(graphdef, weights, state: SamplingState, *, spec: _Spec) -> SamplingState:
  params, head = weights
  model = nnx.merge(graphdef, params)
  layers = model.layer_states()  # sliced once, not on every step
  m = spec.max_new_tokens
  prompt_len = state.kv_mask_RS.shape[1] - (m - 1)

  def cond(s: SamplingState):
    return (s.step < m) & ~jnp.all(s.done_R)

  def body(s: SamplingState) -> SamplingState:
    last = jax.lax.dynamic_index_in_dim(s.tokens_RM, s.step - 1, axis=1, keepdims=False)
    logits, cache, kv_mask = _step_logits(model, head, layers, s, last, prompt_len + s.step - 1)
    u = None
    if isinstance(spec.method, Sample):
      u = jax.lax.dynamic_index_in_dim(s.uniforms_RM, s.step, axis=1, keepdims=False)
    tok, logp = choose(logits, u, spec.method, spec.scores)
    tok = jnp.where(s.done_R, spec.pad_id, tok)
    live = ~s.done_R
    return SamplingState(
      step=s.step + 1,
      tokens_RM=jax.lax.dynamic_update_slice(s.tokens_RM, tok[:, None], (0, s.step)),
      done_R=s.done_R | _is_stop(tok, spec.stop_ids),
      lengths_R=s.lengths_R + live.astype(jnp.int32),
      scores_R=s.scores_R if logp is None else s.scores_R + jnp.where(live, logp, 0.0),
      positions_R=s.positions_R + 1,
      kv_mask_RS=kv_mask,
      uniforms_RM=s.uniforms_RM,
      cache=cache,
    )

  return jax.lax.while_loop(cond, body, state)


# -- beam search -------------------------------------------------------------------------------


def _gather(x_BK: Array, idx_BJ: Array) -> Array:
  """x[b, idx[b, j], ...] (transformers' _gather_beams)."""
  idx = idx_BJ.reshape(idx_BJ.shape + (1,) * (x_BK.ndim - 2))
  return jnp.take_along_axis(x_BK, idx, axis=1)


def _beam_step(s: BeamState, logits_RV: Array, method: BeamSearch, spec: _Spec):
  """One step of transformers' beam search; returns (new state without cache, parent beams)."""
  b, nb, m = s.running_BNM.shape
  v = logits_RV.shape[-1]
  k2 = max(2, 1 + len(spec.stop_ids)) * nb
  lp = method.length_penalty
  top_scores, top_idx = beam_candidates(logits_RV.reshape(b, nb, v), s.running_scores_BN, k2)
  parent = top_idx // v
  tok = (top_idx % v).astype(jnp.int32)
  seqs = _gather(s.running_BNM, parent)
  seqs = jax.lax.dynamic_update_slice(seqs, tok[:, :, None], (0, 0, s.step))
  hits = _is_stop(tok, spec.stop_ids) | (s.step + 1 >= m)

  # Running beams for the next step: the best num_beams candidates that did not stop.
  run_scores = top_scores + hits.astype(jnp.float32) * NEG
  keep = jax.lax.top_k(run_scores, nb)[1]
  running = _gather(seqs, keep)
  running_scores = _gather(run_scores, keep)
  running_parent = _gather(parent, keep)

  # Finished hypotheses: only stops among the top num_beams candidates count.
  gen_len = s.step + 1
  fin = top_scores / (gen_len.astype(jnp.float32) ** lp)
  if method.early_stopping is True:
    fin += jnp.all(s.is_finished_BN, axis=-1, keepdims=True).astype(jnp.float32) * NEG
  fin += (~s.open_B[:, None]).astype(jnp.float32) * NEG
  just = hits & (jnp.arange(k2) < nb)[None, :]
  fin += (~just).astype(jnp.float32) * NEG
  merged_scores = jnp.concatenate([s.finished_scores_BN, fin], axis=1)
  best = jax.lax.top_k(merged_scores, nb)[1]
  finished = _gather(jnp.concatenate([s.finished_BNM, seqs], axis=1), best)
  finished_scores = _gather(merged_scores, best)
  new_len = jnp.broadcast_to(gen_len, (b, k2)).astype(jnp.int32)
  finished_len = _gather(jnp.concatenate([s.finished_len_BN, new_len], axis=1), best)
  is_finished = _gather(jnp.concatenate([s.is_finished_BN, just], axis=1), best)

  # transformers' _check_early_stop_heuristic, at the new length.
  if method.early_stopping == 'never' and lp > 0.0:
    best_len = jnp.asarray(m, jnp.float32)
  else:
    best_len = gen_len.astype(jnp.float32)
  best_running = running_scores[:, :1] / (best_len**lp)
  worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), NEG)
  open_b = s.open_B & jnp.any(best_running > worst, axis=-1)
  new = dataclasses.replace(
    s,
    step=s.step + 1,
    running_BNM=running,
    running_scores_BN=running_scores,
    finished_BNM=finished,
    finished_scores_BN=finished_scores,
    finished_len_BN=finished_len,
    is_finished_BN=is_finished,
    open_B=open_b,
    all_hit=jnp.all(hits),
  )
  return new, running_parent


def _reorder_cache(cache: Cache, parent_BN: Array, first_slot: int) -> Cache:
  """Cache rows of each prompt's beams reordered to their parents (within the prompt's rows, so
  the gather stays local to a batch shard). Only slots from `first_slot` on (the new tokens') are
  moved: the prompt's slots are the same in all beams of a prompt (copies of its prefill) and are
  never written again, so a step moves M - 1 slots per row instead of P + M - 1."""

  def one(c, axis):  # one layer's keys [R, K, H, S] (slots on axis 3) or values [R, K, S, H] (2)
    r = c.shape[0]
    b, nb = parent_BN.shape
    new = jax.lax.slice_in_dim(c, first_slot, c.shape[axis], axis=axis)
    new = new.reshape((b, nb) + new.shape[1:])
    idx = parent_BN.reshape((b, nb) + (1,) * (new.ndim - 2))
    new = jnp.take_along_axis(new, idx, axis=1).reshape((r,) + new.shape[2:])
    return jax.lax.dynamic_update_slice_in_dim(c, new, first_slot, axis=axis)

  return {
    'k': tuple(one(c, 3) for c in cache['k']),
    'v': tuple(one(c, 2) for c in cache['v']),
  }


def _beam_prefill(graphdef, weights, tokens_BP, mask_BP, row_ids_B, seed, *, spec: _Spec):
  del row_ids_B, seed  # beam search is deterministic
  method = spec.method
  params, head = weights
  model = nnx.merge(graphdef, params)
  b, p = tokens_BP.shape
  nb, m = method.num_beams, spec.max_new_tokens
  logits, cache, kv_mask = _prefill_logits(model, head, tokens_BP, mask_BP, p + m - 1)
  logits = _repeat_rows(logits, nb)
  # transformers starts beams 1.. at NEG so that the first step expands beam 0 only.
  running_scores = jnp.zeros((b, nb), jnp.float32).at[:, 1:].set(NEG)
  state = BeamState(
    step=jnp.zeros((), jnp.int32),
    running_BNM=jnp.full((b, nb, m), spec.pad_id, jnp.int32),
    running_scores_BN=running_scores,
    finished_BNM=jnp.full((b, nb, m), spec.pad_id, jnp.int32),
    finished_scores_BN=jnp.full((b, nb), NEG, jnp.float32),
    finished_len_BN=jnp.zeros((b, nb), jnp.int32),
    is_finished_BN=jnp.zeros((b, nb), bool),
    open_B=jnp.ones((b,), bool),
    all_hit=jnp.zeros((), bool),
    parent_BN=jnp.zeros((b, nb), jnp.int32),  # set by the first step below
    positions_R=_repeat_rows(jnp.sum(mask_BP, axis=-1).astype(jnp.int32), nb),
    kv_mask_RS=_repeat_rows(kv_mask, nb),
    cache=jax.tree.map(lambda c: _repeat_rows(c, nb), cache),
  )
  state, parent = _beam_step(state, logits, method, spec)
  return dataclasses.replace(state, parent_BN=parent)


def _beam_running(s: BeamState, method: BeamSearch, m: int) -> Array:
  going = (s.step < m) & jnp.any(s.open_B) & ~s.all_hit
  if method.early_stopping is True:
    going &= ~jnp.all(s.is_finished_BN)
  return going


def _beam_decode(graphdef, weights, state: BeamState, *, spec: _Spec) -> BeamState:
  method = spec.method
  params, head = weights
  model = nnx.merge(graphdef, params)
  layers = model.layer_states()  # sliced once, not on every step
  m = spec.max_new_tokens
  prompt_len = state.kv_mask_RS.shape[1] - (m - 1)

  def body(s: BeamState) -> BeamState:
    # The last step's beams continue their parents: move the new tokens' cache slots to them
    # first (before this step writes its slot, so the gather reads the loop-carried buffers and
    # writes back into them in place; after the write XLA would copy every cache each step).
    s = dataclasses.replace(s, cache=_reorder_cache(s.cache, s.parent_BN, prompt_len))
    last = jax.lax.dynamic_index_in_dim(s.running_BNM, s.step - 1, axis=2, keepdims=False)
    logits, cache, kv_mask = _step_logits(
      model, head, layers, s, last.reshape(-1), prompt_len + s.step - 1
    )
    s = dataclasses.replace(s, positions_R=s.positions_R + 1, kv_mask_RS=kv_mask)
    s, parent = _beam_step(s, logits, method, spec)
    return dataclasses.replace(s, cache=cache, parent_BN=parent)

  return jax.lax.while_loop(lambda s: _beam_running(s, method, m), body, state)


# -- compiled entry points ---------------------------------------------------------------------


def _state_shardings(mesh, abstract_state, num_kv_heads: int):
  """Rows over the batch axes, kv heads over tensor (when it divides them), scalars replicated."""

  def leaf(x):
    return NamedSharding(mesh, P() if x.ndim == 0 else P(shd.BATCH, *([None] * (x.ndim - 1))))

  out = jax.tree.map(leaf, abstract_state)
  kv_axis = 'tensor' if num_kv_heads % mesh.shape['tensor'] == 0 else None
  layer = NamedSharding(mesh, P(shd.BATCH, kv_axis, None, None))  # [R, K, H, S] / [R, K, S, H]
  cache = jax.tree.map(lambda _: layer, out.cache)
  return dataclasses.replace(out, cache=cache)


def _counted(name: str, fn):
  """`fn`, counting its traces in TRACES (jit traces once per new shape or static argument)."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    TRACES[name] += 1
    return fn(*args, **kwargs)

  return wrapper


# Jitted (prefill, decode) pairs shared by every Sampler of the same graph, mesh and rules, so a new
# model of the same architecture (another round's weights) reuses the compiled code.
_JITS: dict[Any, tuple[Any, Any]] = {}


class Sampler:
  """Decoding for one model on one mesh; parameters are placed once with the decode rules.

  A LoRA adapter is merged into the kernels once, here (W + alpha / R * A @ B, as PEFT's
  merge_and_unload), so the decode loop runs the base architecture: unmerged, every adapted
  projection adds two small matmuls per layer and step. The model passed in is not changed.

  On CPU a tied embedding [V, D] is also kept transposed, [D, V], for the LM head: XLA:CPU's
  matmul with the [V, D] operand as it is runs slower (docs/PERFORMANCE.md). It costs a second
  copy of the embedding, so accelerators (whose matmuls take either layout) do not get it.

  Args:
    model: a Decoder with an LM head, with or without a LoRA adapter.
    mesh: the device mesh; default the mesh the parameters live on, else the first device.
    rules: logical-axis rules for the parameters while decoding (no fsdp gathering in the loop).
  """

  def __init__(self, model: Decoder, *, mesh=None, rules=shd.DECODE_RULES):
    if model.cfg.num_labels:
      raise ValueError('the model has a score head, not an LM head: it cannot generate')
    mesh = shd.model_mesh(model, mesh)
    self.mesh = mesh
    self.rules = tuple(rules)
    if model.cfg.lora_rank:
      model = lora.merge_lora(model, mesh=mesh, rules=self.rules)
    self.cfg = model.cfg
    self.graphdef, params = nnx.split(model)
    self.param_shardings = shd.state_shardings(params, mesh, self.rules)
    self.params = jax.device_put(params, self.param_shardings)
    self.head, self.head_sharding = None, None
    if self.cfg.tie_embeddings and mesh.devices.flat[0].platform == 'cpu':
      shape = (self.cfg.hidden_size, self.cfg.vocab_size)
      self.head_sharding = shd.array_sharding(('embed', 'vocab'), shape, mesh, self.rules)
      transpose = jax.jit(lambda e: e.T, out_shardings=self.head_sharding)
      self.head = transpose(self.params['embedding'][...])

  @property
  def weights(self) -> tuple[Any, Array | None]:
    """What the compiled prefill and decode take: (parameters, transposed tied head or None)."""
    return self.params, self.head

  @property
  def row_multiple(self) -> int:
    """Prompts per call must be a multiple of this (the number of batch shards)."""
    return shd.batch_size_multiple(self.mesh)

  def _functions(self, spec: _Spec, b: int, p: int):
    key = (self.graphdef, self.mesh, self.rules, self.head is not None, spec, b, p)
    if key not in _JITS:
      beam = isinstance(spec.method, BeamSearch)
      prefill = functools.partial(
        _beam_prefill if beam else _sample_prefill, self.graphdef, spec=spec
      )
      decode = functools.partial(_beam_decode if beam else _sample_decode, self.graphdef, spec=spec)
      rows = shd.batch_sharding(self.mesh, 1)
      tokens = shd.batch_sharding(self.mesh, 2)
      abstract = jax.eval_shape(
        prefill,
        self.weights,
        jax.ShapeDtypeStruct((b, p), jnp.int32),
        jax.ShapeDtypeStruct((b, p), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.uint32),
      )
      state = _state_shardings(self.mesh, abstract, self.cfg.num_kv_heads)
      weights = (self.param_shardings, self.head_sharding)
      _JITS[key] = (
        jax.jit(
          _counted('prefill', prefill),
          in_shardings=(weights, tokens, tokens, rows, shd.replicated(self.mesh)),
          out_shardings=state,
        ),
        jax.jit(
          _counted('decode', decode),
          in_shardings=(weights, state),
          out_shardings=state,
          donate_argnums=1,
        ),
      )
    return _JITS[key]

  def __call__(
    self,
    tokens_BP: np.ndarray,
    mask_BP: np.ndarray,
    method: Method = GREEDY,
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    stop_ids: tuple[int, ...] | list[int] = (),
    pad_id: int = 0,
    seed: int = 0,
    row_ids: np.ndarray | None = None,
    scores: bool = True,
  ) -> SampleOutput:
    """Decode a left-padded batch of prompts.

    Args:
      tokens_BP, mask_BP: int32 [B, P] host arrays, prompts right-aligned (left padding).
      method: Greedy(), Sample(...) or BeamSearch(...).
      max_new_tokens: M, the most new tokens per sequence.
      num_samples: sequences per prompt (greedy and sampling; beam search returns its best).
      stop_ids: tokens that end a sequence (kept in the output); () generates exactly M tokens.
      pad_id: written after a sequence's stop token.
      seed, row_ids: row b's randomness is key(seed) folded with row_ids[b] (default b).
      scores: greedy and sampling sum the chosen tokens' log-probs (one more logsumexp over the
        vocabulary per step; transformers' `generate` computes none unless asked); without them
        `SampleOutput.scores` is None. Beam search always returns its beam scores.
    Returns:
      SampleOutput with arrays [B, N, ...] on the host.
    """
    tokens_BP = np.asarray(tokens_BP, np.int32)
    mask_BP = np.asarray(mask_BP, np.int32)
    if tokens_BP.ndim != 2 or tokens_BP.shape != mask_BP.shape:
      raise ValueError(
        f'tokens and mask must both be [B, P]; got {tokens_BP.shape} and {mask_BP.shape}'
      )
    b, p = tokens_BP.shape
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
    if b % self.row_multiple:
      raise ValueError(f'{b} prompts cannot be split over {self.row_multiple} batch shards')
    if not mask_BP[:, -1].all():
      raise ValueError('prompts must be left-padded: every row needs a real last token')
    if isinstance(method, BeamSearch) and num_samples != 1:
      raise ValueError('beam search returns one sequence per prompt; use num_samples=1')
    if num_samples < 1:
      raise ValueError(f'num_samples must be >= 1, got {num_samples}')
    if row_ids is None:
      row_ids = np.arange(b, dtype=np.int32)
    scores = bool(scores) or isinstance(method, BeamSearch)
    spec = _Spec(
      method, int(max_new_tokens), int(num_samples), tuple(stop_ids), int(pad_id), scores
    )
    prefill, decode = self._functions(spec, b, p)
    rows = shd.batch_sharding(self.mesh, 1)
    tok_sh = shd.batch_sharding(self.mesh, 2)
    state = prefill(
      self.weights,
      shd.put(tokens_BP, tok_sh),
      shd.put(mask_BP, tok_sh),
      shd.put(np.asarray(row_ids, np.int32), rows),
      shd.put(np.asarray(int(seed) % (1 << 32), np.uint32), shd.replicated(self.mesh)),
    )
    state = decode(self.weights, state)
    return _outputs(state, spec, b)


def _outputs(state, spec: _Spec, b: int) -> SampleOutput:
  if isinstance(state, BeamState):
    tokens = shd.to_host(state.finished_BNM[:, :1])
    lengths = shd.to_host(state.finished_len_BN[:, :1])
    scores = shd.to_host(state.finished_scores_BN[:, :1])
  else:
    n = spec.num_samples
    tokens = shd.to_host(state.tokens_RM).reshape(b, n, -1)
    lengths = shd.to_host(state.lengths_R).reshape(b, n)
    scores = shd.to_host(state.scores_R).reshape(b, n) if spec.scores else None
  last = np.take_along_axis(tokens, np.maximum(lengths - 1, 0)[..., None], axis=-1)[..., 0]
  stopped = np.isin(last, np.asarray(spec.stop_ids, np.int32)) & (lengths > 0)
  return SampleOutput(tokens=tokens, lengths=lengths, scores=scores, stopped=stopped)


def sample(model: Decoder, tokens_BP, mask_BP, method: Method = GREEDY, *, mesh=None, **kwargs):
  """One-off decoding: `Sampler(model, mesh=mesh)(tokens_BP, mask_BP, method, **kwargs)`."""
  return Sampler(model, mesh=mesh)(tokens_BP, mask_BP, method, **kwargs)
