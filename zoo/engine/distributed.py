"""Multi-host start-up through JAX's own runtime (`jax.distributed.initialize`)."""

import os

import jax

# Cluster environments in which `jax.distributed.initialize()` finds the coordinator by itself.
_AUTO_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def maybe_initialize(coordinator_address=None, num_processes=None, process_id=None):
  """Join a multi-process run when one is described, by arguments or environment; else do nothing.

  Explicit: `coordinator_address` ('host:port'), `num_processes`, `process_id` (or the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). Automatic: on TPU pods, SLURM and Open MPI with more
  than one process. CPU processes talk through gloo collectives.

  Returns:
    True when running as one of several processes.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes or (int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None)
  if process_id is None and "JAX_PROCESS_ID" in env:
    process_id = int(env["JAX_PROCESS_ID"])
  auto = any(_multi(env.get(k)) for k in _AUTO_ENV)
  if not coordinator_address and not auto:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  else:
    jax.distributed.initialize()
  return jax.process_count() > 1


def _multi(value):
  """An auto-detect variable that describes more than one process."""
  if not value:
    return False
  return int(value) > 1 if value.isdigit() else "," in value
