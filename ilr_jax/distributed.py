"""Several JAX processes, one run: how `--distributed` connects them (jax.distributed, no launcher).

Every process runs the same command; JAX's coordination service joins them into one set of
global devices, so one mesh spans all hosts. Where the coordinator comes from, first match wins:

  1. flags: --coordinator_address=HOST:PORT --num_processes=N --process_id=I
  2. environment: JAX_COORDINATOR_ADDRESS (read by JAX itself), and JAX_NUM_PROCESSES /
     JAX_PROCESS_ID (read here, JAX has no variable for them)
  3. JAX's cluster autodetection for whatever is still unset: Cloud TPU VMs (every worker of a
     slice, from the TPU metadata server), SLURM (SLURM_NTASKS / SLURM_PROCID / the node list),
     Open MPI, Kubernetes jobs.

Failure detection: every process sends heartbeats to the coordinator; a process that stops
(SIGKILL, a lost host) is noticed within `heartbeat_timeout_s` and the coordination service then
aborts every other process with "Terminating process because the JAX distributed service detected
fatal errors" instead of leaving them at a barrier. Nothing finished is lost: only process 0 writes
artifacts and every write is atomic (workdir.py), so a rerun of all processes resumes.

On CPU the processes exchange collectives through gloo (JAX's CPU default has none across
processes); each process then gets `--xla_force_host_platform_device_count` devices of its own.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Coordinator:
  """What `jax.distributed.initialize` is given; None leaves a value to the environment/JAX."""

  address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  initialization_timeout_s: int = 300
  heartbeat_timeout_s: int = 100
  shutdown_timeout_s: int = 300


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == '':
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'environment variable {name}={value!r} is not an integer') from None


def resolve(coord: Coordinator) -> Coordinator:
  """Fill unset fields from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; check
  what is set. Fields still None are left to JAX's cluster autodetection."""
  c = dataclasses.replace(
    coord,
    address=coord.address or os.environ.get('JAX_COORDINATOR_ADDRESS') or None,
    num_processes=(
      coord.num_processes if coord.num_processes is not None else _env_int('JAX_NUM_PROCESSES')
    ),
    process_id=coord.process_id if coord.process_id is not None else _env_int('JAX_PROCESS_ID'),
  )
  if c.address is not None and (':' not in c.address or not c.address.rsplit(':', 1)[1].isdigit()):
    raise ValueError(f'coordinator address {c.address!r} is not HOST:PORT')
  if c.num_processes is not None and c.num_processes < 1:
    raise ValueError(f'num_processes must be >= 1, got {c.num_processes}')
  if c.process_id is not None and c.process_id < 0:
    raise ValueError(f'process_id must be >= 0, got {c.process_id}')
  if c.num_processes is not None and c.process_id is not None:
    if c.process_id >= c.num_processes:
      raise ValueError(f'process_id {c.process_id} is not below num_processes {c.num_processes}')
  for name in ('initialization_timeout_s', 'heartbeat_timeout_s', 'shutdown_timeout_s'):
    if getattr(c, name) < 1:
      raise ValueError(f'{name} must be >= 1 second, got {getattr(c, name)}')
  return c


def initialize(coord: Coordinator) -> None:
  """Join this process to the others (call before anything touches a JAX device)."""
  import jax

  c = resolve(coord)
  # Cross-process collectives of the CPU backend (tests, CPU clusters); GPU and TPU backends have
  # their own, and the setting only concerns the CPU client.
  if not os.environ.get('JAX_CPU_COLLECTIVES_IMPLEMENTATION'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=c.address,
    num_processes=c.num_processes,
    process_id=c.process_id,
    initialization_timeout=c.initialization_timeout_s,
    heartbeat_timeout_seconds=c.heartbeat_timeout_s,
    shutdown_timeout_seconds=c.shutdown_timeout_s,
  )


def describe() -> str:
  """One line naming this process and the devices it sees (printed by every process)."""
  import jax

  return (
    f'process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local '
    f'of {jax.device_count()} {jax.devices()[0].platform} devices'
  )
