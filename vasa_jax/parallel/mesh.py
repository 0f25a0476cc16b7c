"""Device meshes: the one place that builds a `jax.sharding.Mesh`.

A mesh comes from the config (`configs.common.mesh_config(kind).axes`), a sequence of
`(axis_name, size)` pairs where one size may be -1 ("all remaining devices"):

    create_mesh((("data", -1), ("fsdp", 4), ("tensor", 1)))   # 32 devices -> data=8

Every axis is `AxisType.Auto`: parameters and activations are placed by logical-axis rules
(vasa_jax.parallel.sharding) and XLA's sharding propagation fills in the rest. `jax.make_mesh`
defaults to Explicit axes since jax 0.9, so the axis types are always passed.

Multi-slice TPU (devices report several `slice_index` values): the `dcn_axis` (default "data")
is split across slices, so only data-parallel gradient reductions cross the slow data-centre
network; every other axis stays inside a slice.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AxisSpec = Sequence[tuple[str, int]]


def resolve_axes(axes: AxisSpec, num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Returns (names, sizes) with the -1 size (if any) replaced by the remaining devices.

    Raises ValueError if names repeat, sizes are invalid, or the sizes do not tile exactly
    `num_devices` devices.
    """
    axes = [tuple(a) for a in axes]
    if not axes or any(len(a) != 2 for a in axes):
        raise ValueError(f"mesh axes must be a non-empty sequence of (name, size), got {axes}")
    names = tuple(str(n) for n, _ in axes)
    sizes = [int(s) for _, s in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"mesh axis names repeat: {names}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(names, sizes))}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(names, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh axes {dict(zip(names, sizes))} need a multiple of {known} devices, "
                f"but there are {num_devices}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh axes {dict(zip(names, sizes))} cover {known} devices, but there are "
            f"{num_devices}; use -1 on one axis to take the remaining devices"
        )
    return names, tuple(sizes)


def _num_slices(devices: Sequence) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(
    names: Sequence[str], sizes: Sequence[int], devices: Sequence, dcn_axis: str = "data"
) -> np.ndarray:
    """Arranges `devices` into an array of shape `sizes`, slice-aware on multi-slice TPU."""
    num_slices = _num_slices(devices)
    if num_slices == 1:
        return np.asarray(jax.make_mesh(tuple(sizes), tuple(names), devices=devices).devices)
    from jax.experimental import mesh_utils  # only multi-slice needs the hybrid layout

    if dcn_axis not in names:
        raise ValueError(f"{num_slices} slices: the dcn axis {dcn_axis!r} is not in {names}")
    i = list(names).index(dcn_axis)
    if sizes[i] % num_slices:
        raise ValueError(
            f"{num_slices} slices: mesh axis {dcn_axis}={sizes[i]} must be a multiple of it"
        )
    ici = list(sizes)
    ici[i] //= num_slices
    dcn = [1] * len(sizes)
    dcn[i] = num_slices
    return mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, allow_split_physical_axes=True
    )


def create_mesh(axes: AxisSpec, devices: Sequence | None = None, *, dcn_axis: str = "data") -> Mesh:
    """Builds a Mesh with Auto axes from `(name, size)` pairs (-1 = remaining devices).

    Args:
      axes: e.g. `(("data", -1), ("fsdp", 1), ("tensor", 1))`.
      devices: the devices to use; default all global devices (`jax.devices()`).
      dcn_axis: the axis spread over slices on a multi-slice TPU.
    """
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = resolve_axes(axes, len(devices))
    grid = device_grid(names, sizes, devices, dcn_axis)
    mesh = Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))
    logging.info("mesh %s over %d %s devices", dict(mesh.shape), len(devices), devices[0].platform)
    return mesh


def create_mesh_or_data_parallel(axes: AxisSpec) -> Mesh:
    """`create_mesh(axes)` if this machine's devices fit it, else every device on the first
    axis and size 1 on the others (data parallel): for evaluating or sampling a run
    somewhere else than where it trained."""
    axes = tuple((str(name), int(size)) for name, size in axes)
    try:
        return create_mesh(axes)
    except ValueError as e:
        logging.warning("the run's mesh %s does not fit here (%s); using data parallelism",
                        axes, e)
        return create_mesh(tuple((name, -1 if i == 0 else 1) for i, (name, _) in enumerate(axes)))
