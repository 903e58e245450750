"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter carries logical axis names (model.py); this module alone decides where each one
lives. The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism with
parameters and optimizer state sharded) and `tensor` (heads and MLP columns split). Batches are
sharded over data x fsdp. The same code runs on 1 CPU device, 8 fake CPU devices, a GPU host or a
TPU slice; only the mesh shape changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
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


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """The (data, fsdp, tensor) sizes of a mesh over `num_devices`, one -1 filled in; a shape that
  cannot be made is a ValueError naming the sizes."""
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(
      f'at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}'
    )
  if any(s != -1 and s < 1 for s in sizes):
    raise ValueError(f'mesh sizes must be >= 1 or -1, got {sizes}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'{num_devices} devices cannot be split into mesh axes {sizes}')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
      f'mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs '
      f'{int(np.prod(sizes))} devices, but {num_devices} are available'
    )
  return tuple(sizes)


def make_mesh(
  data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1, meaning all remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = list(mesh_shape(data, fsdp, tensor, len(devices)))
  if len(devices) > 1 and jax.process_count() == 1:
    grid = mesh_utils.create_device_mesh(sizes, devices)
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
  if len(spec) > len(shape):
    # Names of a differently shaped array (Adafactor's factored moments carry their parameter's
    # metadata): they do not describe this array's dimensions, so it stays replicated.
    return P()
  out = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axis is not None and dim % mesh.shape[axis]:
      axis = None
    out.append(axis)
  return P(*out)


def array_sharding(
  names: Sequence[str | None], shape: tuple[int, ...], mesh: Mesh, rules=TRAIN_RULES
) -> NamedSharding:
  """The sharding of one array with logical axes `names` (state_shardings' rule for a Param)."""
  return NamedSharding(mesh, _fit(logical_to_spec(names, rules), tuple(shape), mesh))


def state_shardings(state: Any, mesh: Mesh, rules=TRAIN_RULES) -> Any:
  """NamedShardings for an NNX state (abstract or concrete), from each variable's logical names.

  Returns a pytree of the same structure whose leaves are NamedShardings.
  """

  def one(var):
    names = var.get_metadata().get('out_sharding') if isinstance(var, nnx.Variable) else None
    spec = logical_to_spec(names, rules)
    return NamedSharding(mesh, _fit(spec, var.shape, mesh))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_axis: int = 0) -> NamedSharding:
  """Dimension `batch_axis` (default the leading one) over data x fsdp, the rest replicated.

  `batch_axis=1` is the layout of accumulated batches [A, M, ...]: the A micro-batches are steps
  of a scan and each micro-batch is split over the devices.
  """
  axes = [None] * ndim
  axes[batch_axis] = BATCH
  return NamedSharding(mesh, P(*axes))


def batch_size_multiple(mesh: Mesh) -> int:
  """The number of batch shards: a batch dimension must be a multiple of this."""
  return mesh.shape['data'] * mesh.shape['fsdp']


def put(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """Place a host array (the same global value on every process) into `sharding`.

  Each process copies only the shards its devices hold, so this works on multi-host slices too.
  """
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(x: jax.Array) -> np.ndarray:
  """The whole value of a placed array as numpy, on every process (gathered across hosts on a
  multi-host slice, where no process holds all the shards)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, batch_axis: int = 0) -> dict:
  """Place a dict of host arrays with dimension `batch_axis` split over data x fsdp."""
  n = batch_size_multiple(mesh)
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim <= batch_axis or value.shape[batch_axis] % n:
      raise ValueError(
        f'batch field {key!r} of shape {value.shape} cannot be split over {n} batch shards '
        f'along axis {batch_axis}'
      )
    out[key] = put(value, batch_sharding(mesh, value.ndim, batch_axis))
  return out


def mesh_of(tree: Any) -> Mesh | None:
  """The mesh that a pytree's arrays are placed on, or None if they carry no NamedSharding."""
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def single_device_mesh() -> Mesh:
  """A 1 x 1 x 1 mesh on the first device: where a model goes when no mesh is given."""
  return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def model_mesh(model: Any, mesh: Mesh | None = None) -> Mesh:
  """`mesh` if given, else the mesh the model's parameters live on, else `single_device_mesh()`.

  A model built without a mesh (a test's, a freshly converted one) then works in every function
  that takes an optional mesh, and a placed model keeps its placement.
  """
  if mesh is not None:
    return mesh
  return mesh_of(nnx.state(model)) or single_device_mesh()


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
