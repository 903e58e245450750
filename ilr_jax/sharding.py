"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter carries logical axis names (model.py); this module alone decides where each one
lives. The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism with
parameters and optimizer state sharded) and `tensor` (heads and MLP columns split). Batches are
sharded over data x fsdp. The same code runs on 1 CPU device, 8 fake CPU devices, a GPU host or a
TPU slice; only the mesh shape changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH = ('data', 'fsdp')  # the mesh axes a batch dimension is split over

# Logical name -> mesh axis (or None: replicated). Training rules: parameters sharded over fsdp
# (their embed dim) and tensor (heads, MLP hidden, vocab).
TRAIN_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ('layers', None),
  ('vocab', 'tensor'),
  ('embed', 'fsdp'),
  ('mlp', 'tensor'),
  ('q_heads', 'tensor'),
  ('kv_heads', 'tensor'),
  ('head_dim', None),
  ('norm', None),
)
# Decoding rules: no fsdp gathering inside the decode loop, so parameters are only split over
# tensor (and replicated over data/fsdp, which then act as batch axes).
DECODE_RULES = tuple((name, None if axis == 'fsdp' else axis) for name, axis in TRAIN_RULES)


def make_mesh(
  data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1, meaning all remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(
      f'at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}'
    )
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'{len(devices)} devices cannot be split into mesh axes {sizes}')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
      f'mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs '
      f'{int(np.prod(sizes))} devices, but {len(devices)} are available'
    )
  if len(devices) > 1 and jax.process_count() == 1:
    grid = jax.experimental.mesh_utils.create_device_mesh(sizes, devices)
  else:
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(names: Sequence[str | None] | None, rules=TRAIN_RULES) -> P:
  """PartitionSpec for a tuple of logical axis names; unknown names are an error."""
  if names is None:
    return P()
  table = dict(rules)
  axes = []
  for name in names:
    if name is None:
      axes.append(None)
      continue
    if name not in table:
      raise ValueError(f'logical axis {name!r} has no sharding rule; rules cover {sorted(table)}')
    axes.append(table[name])
  # A mesh axis may shard only one dimension: keep the first use.
  used, out = set(), []
  for a in axes:
    if a is not None and a in used:
      a = None
    used.add(a)
    out.append(a)
  return P(*out)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  # A dimension that the mesh axis does not divide stays replicated (e.g. 1 kv head over tensor=4).
  out = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axis is not None and dim % mesh.shape[axis]:
      axis = None
    out.append(axis)
  return P(*out)


def state_shardings(state: Any, mesh: Mesh, rules=TRAIN_RULES) -> Any:
  """NamedShardings for an NNX state (abstract or concrete), from each variable's logical names.

  Returns a pytree of the same structure whose leaves are NamedShardings.
  """

  def one(var):
    names = var.get_metadata().get('out_sharding') if isinstance(var, nnx.Variable) else None
    spec = logical_to_spec(names, rules)
    return NamedSharding(mesh, _fit(spec, var.shape, mesh))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def create_sharded(ctor, mesh: Mesh, rules=TRAIN_RULES):
  """Build an NNX module with every parameter created already sharded (never whole on one device).

  `ctor` is a no-argument function returning the module (e.g. `lambda: Decoder(cfg, rngs=...)`).
  """
  abstract = nnx.eval_shape(ctor)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  @jax.jit
  def init():
    return nnx.split(ctor())[1]

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)
