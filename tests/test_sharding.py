"""The mesh helpers: where a model goes when no mesh is given."""

import jax

from ilr_jax import sharding as shd
from ilr_jax.testing import device_mesh, peaked_model, random_model, tiny_config


def test_model_mesh_is_the_given_one_else_the_models_else_one_device():
  cfg = tiny_config()
  placed = random_model(cfg, device_mesh(2, 2, 2))
  assert shd.model_mesh(placed).devices.shape == (2, 2, 2)
  other = device_mesh(1, 1, 2)
  assert shd.model_mesh(placed, other) is other
  single = shd.model_mesh(peaked_model(cfg))  # on the default device, no NamedSharding
  assert single.devices.shape == (1, 1, 1) and single.devices.flat[0] == jax.devices()[0]
  assert shd.single_device_mesh().axis_names == shd.MESH_AXES
