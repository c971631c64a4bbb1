"""Several devices and several processes (hosts): joining a multi-process run, the 1-D
data-parallel mesh, and placing host arrays on it. One device is a mesh of one: the same path,
at no measurable cost (benchmarks/README.md, row "one-device mesh")."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from common.config import Config
from common.errors import ConfigError

AXIS = "data"


def managed_cluster() -> bool:
    """True where a launcher started several processes and JAX can read who is who from the
    environment: JAX_COORDINATOR_ADDRESS, a SLURM step of several tasks (srun), Open MPI (mpirun)."""
    env = os.environ
    return ("JAX_COORDINATOR_ADDRESS" in env
            or ("SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1")) > 1)
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def initialize(cfg: Config) -> None:
    """Joins the processes of a multi-process run. Must come before anything touches a device.
    One plain process calls nothing."""
    if cfg.coordinator is not None:
        jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    elif managed_cluster():
        jax.distributed.initialize()  # coordinator, process count and rank from the launcher's environment


def mesh_devices(cfg: Config) -> list:
    """The devices of the data axis: the first devices/num_processes of each process, process by
    process, so each process's part of a batch is one contiguous slice."""
    available, processes = jax.device_count(), jax.process_count()
    n = cfg.jax_devices or available
    if n > available:
        raise ConfigError(f"--devices {n}: only {available} device(s) available ({jax.default_backend()})")
    if n % processes:
        raise ConfigError(f"--devices {n} must be a multiple of the number of processes ({processes})")
    if cfg.batch_size % n:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the number of devices ({n})")
    per_process = n // processes
    chosen = [[d for d in jax.devices() if d.process_index == p][:per_process] for p in range(processes)]
    if any(len(c) < per_process for c in chosen):
        raise ConfigError(f"--devices {n}: every process needs {per_process} device(s)")
    return [d for c in chosen for d in c]


def data_mesh(cfg: Config) -> Mesh:
    """The 1-D mesh (axis "data") the batch is split over, of one device or many. Raises
    ConfigError for a --devices or --batch-size that cannot work."""
    return Mesh(np.array(mesh_devices(cfg)), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, axis: int) -> NamedSharding:
    """Split along dimension `axis` (the examples of a batch) over the data axis."""
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), AXIS))


def split_examples(tree, mesh: Mesh):
    """Keeps every array of `tree` (a batch's images, numbers, labels) split by example over the
    mesh, so each device computes on its share (XLA would infer it; this pins it)."""
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, batch_sharding(mesh, 0)), tree)


def replicate(tree, mesh: Mesh):
    """A copy of every array of `tree` on every device of the mesh. Each process passes the same
    values (same seed, same data)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)), tree)


def shard(x: np.ndarray, mesh: Mesh, axis: int = 1) -> jax.Array:
    """The global array split along `axis` over the mesh, from the whole of `x`, which every
    process holds (batch indices and crop offsets are small): each process sends only its own
    slice to its own devices."""
    sharding = batch_sharding(mesh, axis)
    slices = [index[axis].indices(x.shape[axis]) for index in sharding.addressable_devices_indices_map(x.shape).values()]
    lo, hi = min(s[0] for s in slices), max(s[1] for s in slices)
    return jax.make_array_from_process_local_data(sharding, np.take(x, np.arange(lo, hi), axis=axis), x.shape)


def local_copy(tree):
    """This process's first replica of every (replicated) array: plain single-device arrays."""
    return jax.tree.map(lambda x: x.addressable_data(0), tree)
