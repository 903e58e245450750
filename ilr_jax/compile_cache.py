"""When JAX's persistent compilation cache may serve a run's programs (config `compile_cache`).

Not on the CPU backend when the mesh shards the parameters (fsdp or tensor > 1) or spans several
processes. There an XLA:CPU executable taken from the cache (jax/jaxlib 0.10.2) runs the
collectives of a training step in a different order on different devices of one group:

  - one process, 8 CPU devices, mesh data=2 x fsdp=4 (`configs/arith.py:sft,tiny`): the student's
    fit, whose step the cache served from the supervisor's compile, aborted after XLA's 40 s
    rendezvous timeout with devices 0-3 split between `all gather` op_id=38 and `all reduce`
    op_id=1 of the same run (2 of 5 runs);
  - two processes x 4 devices (gloo collectives): process 0 aborted in the first steps of a later
    fit with gloo's "Received data size doesn't match expected size ... collective mismatch"
    (8192 vs 16 bytes) every time the cache served that step (2 of 2), never with the cache off.

Freshly compiled programs never did this (including a run with one process held back 12 s), and
the default data-parallel mesh (parameters replicated) has run from the cache in every test run.
Several CPU processes lose little by it: JAX writes cache entries from process 0 only, the other
processes' keys never matched process 0's (no hit in a whole run), so they compiled everything
anyway and process 0 waited for them at the first collective. TPU and GPU keep the cache.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def usable(mesh_shape: Mapping[str, int]) -> bool:
  """Whether the persistent cache may be used for a run on a mesh of this shape (see above)."""
  import jax

  if jax.default_backend() != 'cpu':
    return True
  sharded = mesh_shape.get('fsdp', 1) > 1 or mesh_shape.get('tensor', 1) > 1
  return jax.process_count() == 1 and not sharded


def enable(path: str | os.PathLike, mesh_shape: Mapping[str, int]) -> bool:
  """Turn the cache on at `path` for every compile, however quick; False (and a printed line)
  where `usable` says no."""
  import jax

  if not usable(mesh_shape):
    print(
      f'[ilr_jax] persistent compilation cache off: CPU mesh {dict(mesh_shape)} over '
      f'{jax.process_count()} process(es) (see ilr_jax/compile_cache.py)',
      flush=True,
    )
    return False
  jax.config.update('jax_compilation_cache_dir', os.fspath(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return True
