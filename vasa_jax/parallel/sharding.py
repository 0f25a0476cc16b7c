"""Logical axis names -> NamedSharding (MaxText style), sharded state creation, global batches.

Parameters carry logical axis names (`nnx.with_partitioning(init, ("embed", "mlp"))`); the
config maps each logical name to a mesh axis, a tuple of mesh axes, or None (replicated):

    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("kv", None))

so changing the parallelism is a config change. Two relaxations keep one rule set usable
from a laptop to a pod:
  - a dimension whose size is not divisible by its mesh axes keeps the longest prefix of
    those axes that divides it (often none: replicated), logged at debug level;
  - a mesh axis already used by an earlier dimension of the same array is not reused.
A logical name missing from the rules is an error (a typo must not silently replicate).

Typical trainer use:

    graphdef, state, shardings = create_sharded_state(create, mesh, rules)
    batch = data_sharding(mesh, batch_axes(rules))   # the rules' "batch" entry
    step = jax.jit(train_step, in_shardings=(shardings, batch),
                   out_shardings=(shardings, None), donate_argnums=0)
    with mesh_rules(mesh, rules):
        state, metrics = step(state, global_batch(local_batch, batch))
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalAxes = Sequence[str | None]
Rules = Sequence[tuple[str, str | Sequence[str] | None]] | Mapping[str, Any]

# The batch axes of callers without a config (tests, tools); a config's are the mesh rules'
# "batch" entry (`batch_axes`).
BATCH_AXES = ("data", "fsdp")


def normalize_rules(rules: Rules) -> dict[str, tuple[str, ...]]:
    """Returns {logical name: tuple of mesh axes} (empty tuple = replicated).

    Accepts the config form (a sequence of (name, axes) pairs) or a mapping. A name listed
    twice is an error: each logical name has exactly one placement.
    """
    pairs = rules.items() if isinstance(rules, Mapping) else rules
    out: dict[str, tuple[str, ...]] = {}
    for pair in pairs:
        pair = tuple(pair)
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"a logical-axis rule is (name, mesh axes), got {pair!r}")
        name, axes = pair
        if name in out:
            raise ValueError(f"logical axis {name!r} has more than one rule")
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        axes = tuple(axes)
        if not all(isinstance(a, str) for a in axes):
            raise ValueError(f"rule for {name!r}: mesh axes must be names, got {axes!r}")
        out[name] = axes
    return out


def logical_to_spec(
    names: LogicalAxes | PartitionSpec,
    rules: Rules,
    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Maps one array's logical axis names to a PartitionSpec.

    Args:
      names: one logical name (or None) per array dimension.
      rules: logical name -> mesh axes (see `normalize_rules`).
      mesh: if given, mesh axes are checked against it and, with `shape`, divisibility is
        enforced by dropping trailing mesh axes of a dimension until they divide its size.
      shape: the array shape, len(shape) == len(names).
    """
    rules = rules if isinstance(rules, dict) else normalize_rules(rules)
    names = tuple(names)
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical axes {names} do not match an array of shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if not isinstance(name, str):
            raise ValueError(f"logical axis names must be strings or None, got {name!r} in {names}")
        if name not in rules:
            raise ValueError(
                f"logical axis {name!r} (in {names}) has no rule; add it to the mesh config "
                f"rules (known: {sorted(rules)})"
            )
        axes = rules[name]
        if mesh is not None:
            missing = [a for a in axes if a not in mesh.axis_names]
            if missing:
                raise ValueError(
                    f"rule {name!r} -> {axes} names mesh axes {missing} that are not in the "
                    f"mesh {tuple(mesh.axis_names)}"
                )
        kept = tuple(a for a in axes if a not in used)
        if mesh is not None and shape is not None:
            while kept and shape[dim] % math.prod(mesh.shape[a] for a in kept):
                kept = kept[:-1]
        if kept != axes:
            logging.debug(
                "logical axis %r of %s (shape %s): using mesh axes %s instead of %s",
                name, names, shape, kept, axes,
            )
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*spec)


def _is_axes_leaf(x) -> bool:
    return (
        x is None
        or isinstance(x, PartitionSpec)
        or (isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x))
    )


def logical_to_sharding(
    logical_axes_tree: Any, mesh: Mesh, rules: Rules, shapes: Any = None
) -> Any:
    """Maps a tree of logical-axis tuples to a tree of NamedSharding on `mesh`.

    Args:
      logical_axes_tree: leaves are tuples of logical names (or None = replicated).
      shapes: optional tree of the same structure whose leaves have `.shape` (arrays,
        ShapeDtypeStruct); enables the divisibility fallback.
    """
    rules = normalize_rules(rules)

    def one(names, x=None):
        if names is None:
            return NamedSharding(mesh, PartitionSpec())
        shape = None if x is None else x.shape
        return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))

    if shapes is None:
        return jax.tree.map(one, logical_axes_tree, is_leaf=_is_axes_leaf)
    return jax.tree.map(one, logical_axes_tree, shapes, is_leaf=_is_axes_leaf)


def variable_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a Variable was annotated with, or None."""
    names = variable.get_metadata().get("out_sharding")
    if not names:
        return None
    if isinstance(names, NamedSharding):
        names = names.spec
    return tuple(names)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding for every array of an nnx.State (or any tree holding Variables).

    Variables annotated with logical names (`nnx.with_partitioning`, `out_sharding=` metadata)
    are placed by `rules`; the rest (step counters, RNG keys, unannotated arrays) are
    replicated. The result has the structure of `abstract_state` (Variables hold the
    shardings), as `jax.jit(in_shardings=..., out_shardings=...)` expects.
    """
    rules = normalize_rules(rules)

    def one(x):
        if isinstance(x, nnx.Variable):
            value = x.get_value()
            names = variable_axes(x)
            if names is None or not hasattr(value, "shape"):
                return x.replace(NamedSharding(mesh, PartitionSpec()))
            return x.replace(NamedSharding(mesh, logical_to_spec(names, rules, mesh, value.shape)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Attaches shardings to an abstract tree: leaves become sharded ShapeDtypeStructs."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


class ShardedState(NamedTuple):
    graphdef: nnx.GraphDef
    state: Any  # nnx.State of arrays (real or ShapeDtypeStruct)
    shardings: Any  # same structure, NamedSharding leaves


def abstract_state(create_fn: Callable[[], Any], mesh: Mesh, rules: Rules) -> ShardedState:
    """Shapes and shardings of `nnx.split(create_fn())` without allocating anything.

    `create_fn` builds the graph nodes of the train state, e.g.
    `lambda: (model, nnx.Optimizer(model, tx, wrt=nnx.Param))`. The returned state holds
    ShapeDtypeStructs carrying their NamedSharding: the restore target for checkpoints.
    """
    graphdefs = []

    def split():
        graphdef, state = nnx.split(create_fn())
        graphdefs.append(graphdef)  # static: identical for the abstract and the real state
        return state

    # Shardings come from `state_shardings` (divisibility fallback, clear errors for unknown
    # names), so flax's own placement is off: no eager sharding of variables as they are
    # created, and jax.eval_shape rather than nnx.eval_shape (which would attach shardings).
    with mesh_rules(mesh, rules), nnx.use_eager_sharding(False):
        abstract = jax.eval_shape(split)
    shardings = state_shardings(abstract, mesh, rules)
    return ShardedState(graphdefs[0], with_shardings(abstract, shardings), shardings)


def create_sharded_state(create_fn: Callable[[], Any], mesh: Mesh, rules: Rules) -> ShardedState:
    """Builds the real state directly sharded: nothing is ever materialised on one device.

    Returns (graphdef, state, shardings); `nnx.merge(graphdef, state)` gives back the objects
    `create_fn` returned. `create_fn` must be deterministic (it runs twice: once abstractly).
    """
    graphdef, _, shardings = abstract_state(create_fn, mesh, rules)

    def init():
        with nnx.use_eager_sharding(False):
            return nnx.split(create_fn())[1]

    with mesh_rules(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return ShardedState(graphdef, state, shardings)


def batch_axes(rules: Rules) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over: the rules' "batch" entry (an error
    when they have none, as for any logical name). () = every device sees the whole batch."""
    rules = rules if isinstance(rules, dict) else normalize_rules(rules)
    if "batch" not in rules:
        raise ValueError(f"the mesh rules have no 'batch' entry (they name {sorted(rules)}): "
                         "add one, e.g. ('batch', ('data', 'fsdp'))")
    return rules["batch"]


def data_sharding(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """Batch sharding: leading dim over the mesh's batch axes, other dims replicated."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def round_batch_size(mesh: Mesh, batch_size: int, batch_axes: Sequence[str] = BATCH_AXES) -> int:
    """The smallest multiple of the mesh's batch-axis device count that is >= batch_size
    (and >= 1): a fixed batch that `data_sharding` splits evenly."""
    shards = math.prod(mesh.shape[a] for a in batch_axes if a in mesh.shape)
    return max(1, math.ceil(batch_size / shards)) * shards


def global_batch(local_batch: Any, sharding: NamedSharding) -> Any:
    """Turns each process's slice of the batch into global jax.Arrays.

    Every leaf of `local_batch` is this process's rows ([local_batch, ...] numpy arrays);
    the result has leaves [local_batch * (processes holding distinct rows), ...].
    """

    def one(path, x):
        try:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        except ValueError as e:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} of local shape {np.shape(x)} cannot "
                f"be laid out as {sharding.spec} on mesh {dict(sharding.mesh.shape)} with "
                f"{jax.process_count()} processes: {e}"
            ) from e

    return jax.tree_util.tree_map_with_path(one, local_batch)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules: Rules):
    """Context for tracing model code: the mesh plus the logical-axis rules.

    `with_logical_constraint` (and flax's own logical-name helpers) resolve names here.
    """
    flax_rules = tuple(
        (name, None if not axes else axes[0] if len(axes) == 1 else axes)
        for name, axes in normalize_rules(rules).items()
    )
    with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(flax_rules):
        yield


def with_logical_constraint(
    x: jax.Array, names: LogicalAxes, rules: Rules | None = None
) -> jax.Array:
    """Constrains an activation's sharding by logical names, e.g. ("batch", "length", "embed").

    A no-op outside a mesh context, so model code runs unchanged in single-device tests.
    `rules` defaults to the ones set by `mesh_rules` (or `nnx.logical_axis_rules`).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if rules is None:
        rules = flax_spmd.get_logical_axis_rules()
        if not rules:
            return x
    spec = logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


class BatchMapper:
    """Jitted functions over row-aligned host arrays, in fixed-size batches laid out over
    the mesh's batch axes (data parallel): the one batch mapper of the evaluators and the
    latent extraction.

    Every call sees exactly `batch_size` rows (rounded up to the batch-axis device count;
    the last batch padded by repeating its first row), so each function compiles once.
    Batch i + 1 is dispatched before batch i is fetched, so the host's copies overlap the
    device's work; results are cut back to the real rows.

        mapper = BatchMapper(mesh, rules, 64)
        z = mapper.map(lambda x: encode(state, x), [frames])      # numpy [N, ...]
    """

    def __init__(self, mesh: Mesh, rules: Rules, batch_size: int):
        self.mesh, self.rules = mesh, rules
        axes = batch_axes(rules)
        self.batch_size = round_batch_size(mesh, batch_size, axes)
        self.data_sharding = data_sharding(mesh, axes)

    def put(self, x: np.ndarray) -> jax.Array:
        """Host rows [n <= batch_size, ...] -> a padded [batch_size, ...] device batch."""
        pad = self.batch_size - len(x)
        if pad:
            x = np.concatenate([x, np.repeat(x[:1], pad, axis=0)])
        return jax.device_put(x, self.data_sharding)

    def map(self, fn: Callable[..., Any], inputs: Sequence[Any], *, desc: str = "",
            progress: bool = False) -> Any:
        """fn(*device batches [batch_size, ...]) -> pytree of [batch_size, ...] arrays, over
        inputs [N, ...] (anything sliceable by rows); returns the pytree of numpy [N, ...]."""
        n = len(inputs[0])
        starts = range(0, n, self.batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=desc, leave=False, dynamic_ncols=True)
        pieces, pending = [], None

        def fetch(item):
            res, rows = item
            pieces.append(jax.tree.map(lambda a: np.asarray(a)[:rows], res))

        with mesh_rules(self.mesh, self.rules):
            for i in starts:
                rows = min(self.batch_size, n - i)
                item = (fn(*[self.put(np.asarray(x[i:i + rows])) for x in inputs]), rows)
                if pending is not None:
                    fetch(pending)
                pending = item
        if pending is not None:
            fetch(pending)
        if not pieces:
            raise ValueError("BatchMapper.map: no rows")
        return jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)
