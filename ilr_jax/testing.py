"""Tiny models for tests and benchmarks: one config, one mesh helper, two ways to fill weights.

Compiling a model's initialiser costs more than most tests' own work on CPU, so `random_model`
draws the weights with numpy on the host and places them shard by shard; `peaked_model` scales a
Decoder's own init by 5 so that its next-token distributions are peaked and argmax comparisons
have no near-ties (what sampler and generation tests want).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from ilr_jax import sharding as shd
from ilr_jax.model import Decoder, ModelConfig

# The shape every unit test uses unless it needs another one.
TINY = dict(
  vocab_size=128,
  hidden_size=32,
  intermediate_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
)


def tiny_config(arch: str = 'llama', **overrides) -> ModelConfig:
  """A 2-layer, 32-wide ModelConfig of `arch`; any field can be overridden."""
  return ModelConfig(**{'arch': arch, **TINY, **overrides})


def device_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1):
  """A (data, fsdp, tensor) mesh on the first data * fsdp * tensor devices."""
  return shd.make_mesh(data, fsdp, tensor, devices=jax.devices()[: data * fsdp * tensor])


def random_model(cfg: ModelConfig, mesh=None, seed: int = 0) -> Decoder:
  """A base Decoder with N(0, 0.02) kernels drawn by numpy and norm scales as Decoder's init,
  placed by the training rules on `mesh` (default: one device). No initialiser is compiled."""
  if cfg.lora_rank:
    raise ValueError('random_model builds base models only; add an adapter with lora.add_lora')
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  shardings = shd.state_shardings(abstract, mesh if mesh is not None else shd.single_device_mesh())
  rng = np.random.default_rng(seed)

  def fill(var, sharding):
    if 'norm' in (var.get_metadata().get('out_sharding') or ()):
      value = np.full(var.shape, 0.0 if cfg.norm_offset else 1.0, np.float32)
    else:
      value = rng.normal(0.0, 0.02, var.shape).astype(np.float32)
    return var.replace(shd.put(value.astype(var.dtype), sharding))

  is_var = lambda x: isinstance(x, nnx.Variable)
  return nnx.merge(graphdef, jax.tree.map(fill, abstract, shardings, is_leaf=is_var))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _peaked_state(cfg: ModelConfig, seed: int):
  return jax.tree.map(lambda x: 5.0 * x, nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed))))


def peaked_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
  """Decoder(cfg, seed)'s init with every parameter times 5: peaked, tie-free distributions (the
  default std 0.02 gives nearly uniform logits, whose near-ties make greedy comparisons flaky)."""
  graphdef = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(seed))))[0]
  return nnx.merge(graphdef, _peaked_state(cfg, seed))
