"""Parallelism: multi-process start-up, device meshes, logical-axis sharding.

    distributed  maybe_initialize(), is_main_process(), barrier()
    mesh         create_mesh(axes): the only place meshes are built
    sharding     logical names -> NamedSharding, sharded state creation, global batches
"""

from vasa_jax.parallel.distributed import barrier, is_main_process, maybe_initialize
from vasa_jax.parallel.mesh import create_mesh
from vasa_jax.parallel.sharding import (
    abstract_state,
    create_sharded_state,
    data_sharding,
    global_batch,
    logical_to_sharding,
    logical_to_spec,
    mesh_rules,
    state_shardings,
    with_logical_constraint,
)

__all__ = [
    "abstract_state",
    "barrier",
    "create_mesh",
    "create_sharded_state",
    "data_sharding",
    "global_batch",
    "is_main_process",
    "logical_to_sharding",
    "logical_to_spec",
    "maybe_initialize",
    "mesh_rules",
    "state_shardings",
    "with_logical_constraint",
]
