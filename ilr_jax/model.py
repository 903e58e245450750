"""One Flax NNX decoder for the Gemma 1, Mistral and Llama 2/3 families.

Axis letters, used in einsum strings and shape suffixes everywhere in ilr_jax:
  B batch, T query length, S key length (cache slots), L layers, N query heads, K kv heads,
  G query heads per kv head (N // K), H head dim, D model dim, F MLP hidden dim, V vocab,
  C score-head classes, R LoRA rank.

Families differ only in `ModelConfig` fields: Gemma uses GeGLU (tanh GeLU), (1 + w) RMSNorm, a
sqrt(D) embedding scale, tied embeddings and multi-query attention with a head dim independent of
D; Mistral adds sliding-window attention; Llama 3 adds rope scaling. The layers' parameters are
stacked along a leading L axis so the stack runs as one `lax.scan` (or unrolled, by config); the
parameter layout is the same either way, so checkpoints do not depend on that choice.

A model is used in two ways:
  * training / scoring: `model(tokens_BT, mask_BT)` over a padded batch (left or right padding);
    positions come from the padding, so a row's result does not depend on its padding.
  * decoding: `model.decode_hidden(tokens_BT, positions_BT, cache, cache_index, kv_mask_BS)` with
    an explicit KV cache (`init_cache`) and `model.logits` on the positions that need them: a
    prefill writes the prompt at slot 0, then one token at a time. Cache in, cache out; no mutable
    collections.

With `num_labels` set, the LM head is replaced by a C-class score head read at the last real token,
as transformers' `*ForSequenceClassification` does (the evaluator).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ilr_jax import attention as attention_lib

Array = jax.Array

ARCHS = ('gemma', 'mistral', 'llama')
# LoRA may target these linear layers; 'all' in a config means all of them (the paper's choice).
LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 ('llama3' rope_type) frequency scaling."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a decoder. Hashable, so it can be a static jit argument."""

  arch: str
  vocab_size: int
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  activation: str = 'silu'  # 'silu' (SwiGLU) or 'gelu_tanh' (GeGLU)
  norm_eps: float = 1e-6
  norm_offset: bool = False  # Gemma's RMSNorm multiplies by (1 + w)
  embed_scale: bool = False  # Gemma scales embeddings by sqrt(D)
  tie_embeddings: bool = False
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  sliding_window: int | None = None
  max_position_embeddings: int = 8192
  bos_token_id: int | None = 1
  eos_token_ids: tuple[int, ...] = (2,)
  pad_token_id: int | None = None
  num_labels: int | None = None  # set: score head instead of LM head
  param_dtype: str = 'float32'
  dtype: str = 'float32'  # compute dtype; logits and softmax are always float32
  remat: str = 'none'  # 'none', 'full' (recompute each layer), 'dots' (save matmul outputs)
  attention: str = 'auto'  # training / scoring attention: 'auto', 'xla', 'cudnn', 'einsum'
  scan_layers: bool = True
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_targets: tuple[str, ...] = LORA_TARGETS

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f'unsupported arch {self.arch!r}; expected one of {ARCHS}')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f'num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}'
      )
    if self.activation not in ('silu', 'gelu_tanh'):
      raise ValueError(f'unsupported activation {self.activation!r}')
    if self.attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(
        f'attention must be one of {attention_lib.IMPLEMENTATIONS}, got {self.attention!r}'
      )
    if self.remat not in ('none', 'full', 'dots'):
      raise ValueError(f"remat must be 'none', 'full' or 'dots', got {self.remat!r}")
    for name in ('param_dtype', 'dtype'):
      if getattr(self, name) not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(
          f'{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}'
        )
    bad = set(self.lora_targets) - set(LORA_TARGETS)
    if bad:
      raise ValueError(f'unknown LoRA targets {sorted(bad)}; expected a subset of {LORA_TARGETS}')
    if self.lora_rank < 0:
      raise ValueError(f'lora_rank must be >= 0, got {self.lora_rank}')

  def replace(self, **kwargs) -> ModelConfig:
    return dataclasses.replace(self, **kwargs)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f'unknown ModelConfig fields {sorted(unknown)}')
    if d.get('rope_scaling') is not None:
      d['rope_scaling'] = RopeScaling(**d['rope_scaling'])
    for key in ('eos_token_ids', 'lora_targets'):
      if key in d:
        d[key] = tuple(d[key])
    return cls(**d)

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0


def _param(value: Array, names: tuple[str | None, ...], kind=nnx.Param) -> nnx.Variable:
  # Sharding is applied in one place (sharding.py) from these logical names, not eagerly here.
  return kind(value, out_sharding=names, eager_sharding=False)


def lora_a_bound(fan_in: int) -> float:
  """Bound of a fresh LoRA A ~ U(+-bound): PEFT's kaiming_uniform(a=sqrt(5)), gain
  sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)."""
  return 1.0 / math.sqrt(fan_in)


class Linear(nnx.Module):
  """A dense map from trailing axes `in_shape` to `out_shape`, optionally with a LoRA adapter.

  The kernel has shape (L?,) + in_shape + out_shape, so attention projections keep their head
  structure (D -> N x H); a call merges those axes (free reshapes) into one 2-D matmul. With
  `stack` set, every parameter carries a leading L axis (the layer stack); the module is then
  only called on one layer's slice.
  """

  def __init__(
    self,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    *,
    cfg: ModelConfig,
    rngs: nnx.Rngs,
    stack: int | None = None,
    lora: bool = False,
  ):
    self.num_in = len(in_shape)
    self.dtype = jnp.dtype(cfg.dtype)
    lead, lead_axes = ((stack,), ('layers',)) if stack else ((), ())
    shape = lead + in_shape + out_shape
    param_dtype = jnp.dtype(cfg.param_dtype)
    kernel = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    self.kernel = _param(kernel.astype(param_dtype), lead_axes + axes)
    lora_a = lora_b = None
    if lora and cfg.lora_rank:
      r = cfg.lora_rank
      fan_in = math.prod(in_shape)
      # A ~ PEFT's kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)); B = 0: a fresh adapter
      # leaves the base model's outputs.
      bound = lora_a_bound(fan_in)
      a = jax.random.uniform(rngs.params(), lead + in_shape + (r,), jnp.float32, -bound, bound)
      in_axes, out_axes = axes[: self.num_in], axes[self.num_in :]
      lora_a = _param(a.astype(param_dtype), lead_axes + in_axes + (None,), nnx.LoRAParam)
      lora_b = _param(
        jnp.zeros(lead + (r,) + out_shape, param_dtype),
        lead_axes + (None,) + out_axes,
        nnx.LoRAParam,
      )
    self.lora_a = nnx.data(lora_a)
    self.lora_b = nnx.data(lora_b)
    self.lora_scale = cfg.lora_scale

  def __call__(self, x: Array) -> Array:
    # One 2-D matmul [rows, in] x [in, out]: with the leading axes and the head axes merged (free
    # reshapes) the weight gradient contracts over one axis, which XLA:CPU runs as a plain matmul;
    # a tensordot over [B, T, ...] made it transpose the activations in the backward pass.
    kernel = self.kernel[...]
    lead, out_shape = x.shape[: x.ndim - self.num_in], kernel.shape[self.num_in :]
    x2 = x.astype(self.dtype).reshape(math.prod(lead), -1)
    y = x2 @ kernel.astype(self.dtype).reshape(x2.shape[1], -1)
    if self.lora_a is not None:
      h = x2 @ self.lora_a[...].astype(self.dtype).reshape(x2.shape[1], -1)
      b = self.lora_b[...].astype(self.dtype).reshape(h.shape[1], -1)
      y = y + self.lora_scale * (h @ b)
    return y.reshape(lead + out_shape)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32; Gemma's variant multiplies by (1 + w) with w initialised at 0."""

  def __init__(self, dim: int, *, cfg: ModelConfig, stack: int | None = None):
    lead, lead_axes = ((stack,), ('layers',)) if stack else ((), ())
    init = jnp.zeros if cfg.norm_offset else jnp.ones
    self.scale = _param(init(lead + (dim,), jnp.dtype(cfg.param_dtype)), lead_axes + ('norm',))
    self.eps = cfg.norm_eps
    self.offset = 1.0 if cfg.norm_offset else 0.0
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(self.dtype)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [H/2] in float32, with Llama 3 scaling when configured."""
  h = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float32) / h))
  sc = cfg.rope_scaling
  if sc is None:
    return inv_freq.astype(np.float32)
  low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
  high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
  smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
    sc.high_freq_factor - sc.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BTnH: Array, positions_BT: Array, inv_freq: np.ndarray) -> Array:
  """Rotary embedding in the rotate-half layout that Hugging Face checkpoints use."""
  angles = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # B T H/2
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x = x_BTnH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x_BTnH.dtype)


def attention_mask(
  q_slot_T: Array,
  k_slot_S: Array,
  q_pos_BT: Array,
  k_pos_BS: Array,
  k_valid_BS: Array,
  sliding_window: int | None,
) -> Array:
  """[B, T, S] boolean mask: causal by cache slot, valid keys only, optional sliding window.

  The window is measured in positions (not slots), so it ignores padding.
  """
  mask = (k_slot_S[None, None, :] <= q_slot_T[None, :, None]) & k_valid_BS[:, None, :]
  if sliding_window is not None:
    mask &= (q_pos_BT[:, :, None] - k_pos_BS[:, None, :]) < sliding_window
  return mask


def attend_kv_first(q_BTNH: Array, k_BKHS: Array, v_BKSH: Array, mask_BTS: Array) -> Array:
  """`attention.attend_einsum` over a cache laid out keys [B, K, H, S], values [B, K, S, H]: both
  matmuls then batch over (B, K) with each cache in the layout its matmul reads (keys as the
  [H, S] right-hand side of q . k, values as the [S, H] one of p . v), so neither is transposed
  when decoding (with keys [B, K, S, H] XLA:CPU repacks the whole key cache for every q . k)."""
  b, t, n, h = q_BTNH.shape
  k, s = k_BKHS.shape[1], k_BKHS.shape[3]
  g = n // k
  q_BKQH = q_BTNH.reshape(b, t, k, g, h).transpose(0, 2, 1, 3, 4).reshape(b, k, t * g, h)
  logits = jnp.einsum('BKQH,BKHS->BKQS', q_BKQH, k_BKHS, preferred_element_type=jnp.float32)
  logits = logits * (h**-0.5)
  mask_BKQS = jnp.broadcast_to(mask_BTS[:, None, :, None, :], (b, k, t, g, s)).reshape(b, k, -1, s)
  logits = jnp.where(mask_BKQS, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BKSH.dtype)
  out = jnp.einsum('BKQS,BKSH->BKQH', probs, v_BKSH)
  return out.reshape(b, k, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


class Block(nnx.Module):
  """One pre-norm decoder layer; its parameters hold all L layers (leading axis), see Linear."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f, n, k, h, L = (
      cfg.hidden_size,
      cfg.intermediate_size,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      cfg.num_layers,
    )
    lin = functools.partial(Linear, cfg=cfg, rngs=rngs, stack=L)
    lora = set(cfg.lora_targets)
    self.attn_norm = RMSNorm(d, cfg=cfg, stack=L)
    self.q = lin((d,), (n, h), ('embed', 'q_heads', 'head_dim'), lora='q' in lora)
    self.k = lin((d,), (k, h), ('embed', 'kv_heads', 'head_dim'), lora='k' in lora)
    self.v = lin((d,), (k, h), ('embed', 'kv_heads', 'head_dim'), lora='v' in lora)
    self.o = lin((n, h), (d,), ('q_heads', 'head_dim', 'embed'), lora='o' in lora)
    self.mlp_norm = RMSNorm(d, cfg=cfg, stack=L)
    self.gate = lin((d,), (f,), ('embed', 'mlp'), lora='gate' in lora)
    self.up = lin((d,), (f,), ('embed', 'mlp'), lora='up' in lora)
    self.down = lin((f,), (d,), ('mlp', 'embed'), lora='down' in lora)
    self.activation = cfg.activation
    self.sliding_window = cfg.sliding_window
    self.attention = cfg.attention

  def __call__(
    self,
    x_BTD,
    q_pos_BT,
    mask_BTS,
    inv_freq,
    kv=None,
    cache_index=None,
    last_only=False,
    empty_cache=False,
    at_BP=None,
  ):
    """One layer; returns (x, new kv or None).

    With `kv`, this layer's own cache buffers, keys [B, K, H, S] and values [B, K, S, H] (loop
    carries, one per layer), the new keys/values are written into them at `cache_index` in place
    and attention reads the buffers as they are: no transpose, and no slice of a stacked
    [L, ...] cache, which XLA on CPU would copy out every step (see decode_hidden).

    With `last_only` (with a cache) every position's keys and values are written but the rest of
    the layer runs for the last position only, which is all a prefill's final layer needs.

    With `empty_cache` (the cache holds nothing before `cache_index` = 0) attention runs over the
    T new keys and values themselves rather than the whole cache: only they can be valid, so that
    is half of a prefill's attention when M new tokens follow a prompt of T.

    With `at_BP` (no cache; int [B, P]) keys and values cover every position but the rest of the
    layer runs at positions at_BP[b] of each row only: x comes back [B, P, D] (a score read at
    one token, a loss at its target positions). Attention without a cache goes through the
    `attention` switch (attention.py).
    """
    y = self.attn_norm(x_BTD)
    q = apply_rope(self.q(y), q_pos_BT, inv_freq)
    k = apply_rope(self.k(y), q_pos_BT, inv_freq)
    v = self.v(y)
    if kv is not None:
      k_c, v_c = kv  # [B, K, H, S] and [B, K, S, H]
      new_k = k.transpose(0, 2, 3, 1).astype(k_c.dtype)
      k_c = jax.lax.dynamic_update_slice(k_c, new_k, (0, 0, 0, cache_index))
      new_v = v.transpose(0, 2, 1, 3).astype(v_c.dtype)
      v_c = jax.lax.dynamic_update_slice(v_c, new_v, (0, 0, cache_index, 0))
      kv = (k_c, v_c)
      if last_only:
        q, x_BTD, mask_BTS = q[:, -1:], x_BTD[:, -1:], mask_BTS[:, -1:]
      if empty_cache:
        t = k.shape[1]
        # The T new tokens sit at slots 0..T-1: query blocks skip the keys after each block.
        attn = attention_lib.attend(
          q, k.astype(q.dtype), v.astype(q.dtype), mask_BTS[:, :, :t], causal=not last_only
        )
      else:
        attn = attend_kv_first(q, k_c.astype(q.dtype), v_c.astype(q.dtype), mask_BTS)
    else:
      if at_BP is not None:
        idx = lambda a: at_BP.reshape(at_BP.shape + (1,) * (a.ndim - 2))
        pick = lambda a: jnp.take_along_axis(a, idx(a), axis=1)
        q, x_BTD, mask_BTS = pick(q), pick(x_BTD), pick(mask_BTS)
      # Without at_BP, query t is key slot t: the causal query blocks apply (attention.py).
      attn = attention_lib.attend(
        q,
        k.astype(q.dtype),
        v.astype(q.dtype),
        mask_BTS,
        self.attention,
        causal=at_BP is None,
      )
    x_BTD = x_BTD + self.o(attn)
    y = self.mlp_norm(x_BTD)
    gate = self.gate(y)
    if self.activation == 'silu':
      gate = jax.nn.silu(gate)
    else:
      gate = jax.nn.gelu(gate, approximate=True)
    x_BTD = x_BTD + self.down(gate * self.up(y))
    return x_BTD, kv


# {'k': L buffers [B, K, H, S], 'v': L buffers [B, K, S, H]} (tuples, one buffer per layer)
Cache = dict[str, Any]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> Cache:
  """An empty KV cache of `max_len` slots for `batch` rows, in `decode_hidden`'s layout: per layer
  a key buffer [B, K, H, S] and a value buffer [B, K, S, H]."""
  dt = jnp.dtype(dtype or cfg.dtype)
  k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)
  v_shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  return {
    name: tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers))
    for name, shape in (('k', k_shape), ('v', v_shape))
  }


def positions_from_mask(mask_BT: Array) -> Array:
  """Positions 0, 1, ... over a row's real tokens (left or right padding); 0 on padding."""
  return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def last_token_index(mask_BT: Array) -> Array:
  """Index of each row's last real token (rightmost mask entry), as HF's classification heads."""
  t = jnp.arange(mask_BT.shape[-1])
  return jnp.max(jnp.where(mask_BT.astype(bool), t, 0), axis=-1)


class Decoder(nnx.Module):
  """The decoder: embedding, L stacked blocks, final norm, and an LM head or a score head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    emb = 0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.float32)
    self.embedding = _param(emb.astype(jnp.dtype(cfg.param_dtype)), ('vocab', 'embed'))
    self.layers = Block(cfg, rngs=rngs)
    self.final_norm = RMSNorm(cfg.hidden_size, cfg=cfg)
    lm_head = score_head = None
    if cfg.num_labels:
      score_head = Linear(
        (cfg.hidden_size,), (cfg.num_labels,), ('embed', None), cfg=cfg, rngs=rngs
      )
    elif not cfg.tie_embeddings:
      lm_head = Linear(
        (cfg.hidden_size,), (cfg.vocab_size,), ('embed', 'vocab'), cfg=cfg, rngs=rngs
      )
    self.lm_head = nnx.data(lm_head)
    self.score_head = nnx.data(score_head)

  # -- the shared trunk -------------------------------------------------------------------------

  def _embed(self, tokens_BT: Array) -> Array:
    dtype = jnp.dtype(self.cfg.dtype)
    x = jnp.take(self.embedding[...], tokens_BT, axis=0).astype(dtype)
    if self.cfg.embed_scale:
      # Gemma rounds sqrt(D) to the compute dtype before scaling (as transformers does).
      x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), dtype)
    return x

  def _run_layers(self, x, q_pos_BT, mask_BTS, at_BP=None):
    """The L layers and the final norm. With `at_BP` the last layer runs at positions at_BP[b]
    of each row only (Block), and the result is [B, P, D]."""
    cfg = self.cfg
    inv_freq = rope_frequencies(cfg)
    graphdef, stacked = nnx.split(self.layers)

    def layer(x, layer_state, at_BP=None):
      block = nnx.merge(graphdef, layer_state)
      return block(x, q_pos_BT, mask_BTS, inv_freq, at_BP=at_BP)[0]

    if cfg.remat != 'none':
      policy = None
      if cfg.remat == 'dots':
        policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=not cfg.scan_layers)

    if at_BP is not None:
      # The first L - 1 layers as usual, then the last one at the read positions only.
      first = jax.tree.map(lambda p: p[:-1], stacked)
      last = jax.tree.map(lambda p: p[-1], stacked)
      if cfg.num_layers > 1 and cfg.scan_layers:
        x, _ = jax.lax.scan(lambda x, s: (layer(x, s), None), x, first)
      else:
        for i in range(cfg.num_layers - 1):
          x = layer(x, jax.tree.map(lambda p, i=i: p[i], first))
      return self.final_norm(layer(x, last, at_BP))

    if cfg.scan_layers:
      x, _ = jax.lax.scan(lambda x, layer_state: (layer(x, layer_state), None), x, stacked)
    else:
      for i in range(cfg.num_layers):
        x = layer(x, jax.tree.map(lambda p, i=i: p[i], stacked))
    return self.final_norm(x)

  # -- public API -------------------------------------------------------------------------------

  def hidden(
    self,
    tokens_BT: Array,
    mask_BT: Array | None = None,
    positions_BT: Array | None = None,
    at_BP: Array | None = None,
  ) -> Array:
    """Final-norm hidden states [B, T, D] of a padded batch (no cache).

    With `at_BP` (int [B, P]) only positions at_BP[b] of each row, [B, P, D]: the last layer then
    runs its attention and MLP at those positions only (a score's read, a loss's targets; equal
    to slicing the full result, to float rounding)."""
    b, t = tokens_BT.shape
    if mask_BT is None:
      mask_BT = jnp.ones((b, t), jnp.int32)
    if positions_BT is None:
      positions_BT = positions_from_mask(mask_BT)
    slots = jnp.arange(t)
    mask_BTS = attention_mask(
      slots, slots, positions_BT, positions_BT, mask_BT.astype(bool), self.cfg.sliding_window
    )
    return self._run_layers(self._embed(tokens_BT), positions_BT, mask_BTS, at_BP)

  def logits(self, h: Array, tied_head_DV: Array | None = None) -> Array:
    """LM logits (float32) for hidden states of any leading shape [..., D] -> [..., V].

    `tied_head_DV`: a tied embedding already transposed to [D, V], used in place of the [V, D]
    embedding (the Sampler keeps one on CPU, where the matmul is faster in that layout)."""
    if self.cfg.num_labels:
      raise ValueError('this model has a score head, not an LM head; use score()')
    if tied_head_DV is not None:
      if self.lm_head is not None:
        raise ValueError('tied_head_DV is for tied embeddings; this model has its own LM head')
      kernel = tied_head_DV.astype(h.dtype)
      return jnp.einsum('...D,DV->...V', h, kernel, preferred_element_type=jnp.float32)
    if self.lm_head is None:
      kernel = self.embedding[...].astype(h.dtype)
      return jnp.einsum('...D,VD->...V', h, kernel, preferred_element_type=jnp.float32)
    return self.lm_head(h).astype(jnp.float32)

  def __call__(
    self, tokens_BT: Array, mask_BT: Array | None = None, positions_BT: Array | None = None
  ) -> Array:
    """Logits [B, T, V] in float32 (LM head) or [B, C] (score head, at the last real token)."""
    if self.cfg.num_labels:
      return self.score(tokens_BT, mask_BT)
    return self.logits(self.hidden(tokens_BT, mask_BT, positions_BT))

  def score(self, tokens_BT: Array, mask_BT: Array | None = None) -> Array:
    """Score-head logits [B, C] (float32) read at each row's last real token."""
    if not self.cfg.num_labels:
      raise ValueError('this model has an LM head, not a score head (set num_labels)')
    if mask_BT is None:
      mask_BT = jnp.ones(tokens_BT.shape, jnp.int32)
    h_BD = self.hidden(tokens_BT, mask_BT, at_BP=last_token_index(mask_BT)[:, None])[:, 0]
    return self.score_head(h_BD).astype(jnp.float32)

  def layer_states(self) -> list[Any]:
    """Each layer's parameters sliced out of the stack ([L, ...] -> L states of [...]).

    A decode loop slices them once, before the loop, and passes them to every `decode_hidden`
    call: slicing the stack inside the loop copies every weight on every step (XLA keeps a
    dynamic slice of a loop invariant inside the loop), about as costly on CPU as the layers'
    matmuls themselves.
    """
    _, stacked = nnx.split(self.layers)
    layers = [jax.tree.map(lambda p, i=i: p[i], stacked) for i in range(self.cfg.num_layers)]
    # The barrier keeps XLA from sinking the slices back into a loop that uses them.
    return jax.lax.optimization_barrier(layers)

  def decode_hidden(
    self,
    tokens_BT: Array,
    positions_BT: Array,
    cache: Cache,
    cache_index: Array,
    kv_mask_BS: Array,
    layer_states: list[Any] | None = None,
    prefill: bool = False,
  ) -> tuple[Array, Cache]:
    """Run T new tokens against the cache: (final-norm hidden states [B, T, D], new cache).

    The new keys/values are written at slots [cache_index, cache_index + T). `kv_mask_BS` marks the
    valid slots, the new ones included; key positions are the running count of valid slots, so
    a prompt must occupy a prefix of slots with its padding before it (left padding).

    The cache (`init_cache`) holds per layer one key buffer [B, K, H, S] and one value buffer
    [B, K, S, H]: each layer writes its new slots into its own buffers in place and attends over
    them as they are, so a decode loop over donated state never copies, slices or transposes the
    cache. The layers run unrolled. The LM head is left to the caller, who applies `logits` to
    the positions it needs. With `layer_states` (from `layer_states()`) the layers use those
    pre-sliced weights.

    With `prefill` (the cache is empty and `cache_index` is 0, as for a sampler's prompts) the
    layers attend over the T new keys and values only, and the hidden states are [B, 1, D], the
    last position's: the final layer runs its attention output and MLP for that position only (the
    cache is complete without them; the first new token needs only the last logits).
    """
    cfg = self.cfg
    t = tokens_BT.shape[1]
    s = cache['v'][0].shape[2]
    q_slot = cache_index + jnp.arange(t)
    k_pos = positions_from_mask(kv_mask_BS)
    mask_BTS = attention_mask(
      q_slot, jnp.arange(s), positions_BT, k_pos, kv_mask_BS.astype(bool), cfg.sliding_window
    )
    inv_freq = rope_frequencies(cfg)
    graphdef, stacked = nnx.split(self.layers)
    if layer_states is None:
      layer_states = [jax.tree.map(lambda p, i=i: p[i], stacked) for i in range(cfg.num_layers)]
    x, ks, vs = self._embed(tokens_BT), list(cache['k']), list(cache['v'])
    for i, layer_state in enumerate(layer_states):
      block = nnx.merge(graphdef, layer_state)
      last = prefill and i == len(layer_states) - 1
      x, (ks[i], vs[i]) = block(
        x,
        positions_BT,
        mask_BTS,
        inv_freq,
        (ks[i], vs[i]),
        cache_index,
        last_only=last,
        empty_cache=prefill,
      )
    return self.final_norm(x), {'k': tuple(ks), 'v': tuple(vs)}


def num_params(state: Any) -> int:
  """Total number of parameters in a state (or abstract state) pytree."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
