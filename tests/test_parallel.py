"""Meshes, logical-axis sharding, sharded state creation and a jitted train step (8 CPU devices)."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from configs.common import mesh_config
from vasa_jax.parallel import distributed, mesh as mesh_lib, sharding

wp = nnx.with_partitioning

RULES = (
    ("batch", ("data", "fsdp")),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("vocab", ("data", "tensor")),
)


class TinyNet(nnx.Module):
    """Conv -> mean pool -> Linear -> Linear; every parameter named with logical axes."""

    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.conv = nnx.Conv(
            3, 8, (3, 3),
            kernel_init=wp(init, (None, None, "conv_in", "conv_out")),
            bias_init=wp(nnx.initializers.zeros, ("conv_out",)),
            rngs=rngs,
        )
        self.hidden = nnx.Linear(
            8, 16,
            kernel_init=wp(init, ("embed", "mlp")),
            bias_init=wp(nnx.initializers.zeros, ("mlp",)),
            rngs=rngs,
        )
        # 6 outputs: not divisible by data*tensor = 2*2 -> this dim falls back.
        self.head = nnx.Linear(16, 6, kernel_init=wp(init, ("mlp", "vocab")), rngs=rngs)

    def __call__(self, x):  # x: [B, H, W, 3] -> [B, 6]
        h = nnx.relu(self.conv(x)).mean(axis=(1, 2))
        h = sharding.with_logical_constraint(h, ("batch", "embed"))
        return self.head(nnx.relu(self.hidden(h)))


@pytest.fixture(autouse=True)
def fast_cpu_rng():
    # XLA:CPU compiles the partitionable threefry for >2-D shapes (conv kernels) ~5x slower;
    # values differ but everything tested here is independent of the random stream.
    with jax.threefry_partitionable(False):
        yield


def create_train_state():
    model = TinyNet(nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)


def spec_of(x):
    return x.sharding.spec


# ------------------------------------------------------------------------------ mesh


def test_create_mesh_resolves_minus_one_and_uses_auto_axes():
    mesh = mesh_lib.create_mesh((("data", -1), ("fsdp", 2), ("tensor", 1)))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))

    small = mesh_lib.create_mesh([["data", 2], ["fsdp", -1]], devices=jax.devices()[:4])
    assert dict(small.shape) == {"data": 2, "fsdp": 2}
    # The config presets build valid meshes on 8 devices.
    for kind in ("conv", "transformer"):
        assert mesh_lib.create_mesh(mesh_config(kind).axes).size == 8


@pytest.mark.parametrize(
    "axes, match",
    [
        ((("data", -1), ("fsdp", 3)), "multiple of 3 devices"),
        ((("data", 2), ("fsdp", 2)), "cover 4 devices, but there are 8"),
        ((("data", -1), ("fsdp", -1)), "at most one mesh axis may be -1"),
        ((("data", 4), ("data", 2)), "names repeat"),
        ((("data", 0),), "positive or -1"),
        ((), "non-empty"),
    ],
)
def test_create_mesh_errors(axes, match):
    with pytest.raises(ValueError, match=match):
        mesh_lib.create_mesh(axes)


def test_multi_slice_grid_puts_dcn_axis_across_slices():
    # Fake devices of 2 slices x 4 chips: the data axis must be split between slices so
    # that only data-parallel traffic crosses the slow network.
    devices = [
        SimpleNamespace(id=i, slice_index=i // 4, process_index=i // 4, platform="gpu",
                        device_kind="fake")
        for i in range(8)
    ]
    grid = mesh_lib.device_grid(("data", "fsdp"), (4, 2), devices, dcn_axis="data")
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    np.testing.assert_array_equal(slices, [[0, 0], [0, 0], [1, 1], [1, 1]])
    with pytest.raises(ValueError, match="must be a multiple"):
        mesh_lib.device_grid(("data", "fsdp"), (1, 8), devices, dcn_axis="data")


# ------------------------------------------------------------------------------ rules


def test_logical_to_spec_rules_fallbacks_and_errors():
    mesh = mesh_lib.create_mesh((("data", 2), ("fsdp", 4), ("tensor", 1)))
    spec = sharding.logical_to_spec
    assert spec(("embed", "mlp"), RULES) == P("fsdp", "tensor")
    want = P(("data", "fsdp"), None, None)
    assert spec(("batch", None, "embed"), RULES, mesh, (16, 3, 8)) == want
    # Not divisible by data*fsdp=8, divisible by data=2: keeps the prefix ("data",).
    assert spec(("batch",), RULES, mesh, (6,)) == P("data")
    # Not divisible at all: replicated.
    assert spec(("embed",), RULES, mesh, (6,)) == P(None)
    # A mesh axis is used at most once per array: the second "embed" is replicated.
    assert spec(("embed", "embed"), RULES, mesh, (8, 8)) == P("fsdp", None)
    assert spec(("conv_in",), RULES) == P(None)

    with pytest.raises(ValueError, match="'heads'.*has no rule"):
        spec(("heads",), RULES)
    with pytest.raises(ValueError, match="not in the mesh"):
        spec(("x",), (("x", "model"),), mesh)
    with pytest.raises(ValueError, match="more than one rule"):
        sharding.normalize_rules((("x", "data"), ("x", "fsdp")))
    with pytest.raises(ValueError, match="do not match"):
        spec(("embed",), RULES, mesh, (4, 4))


def test_logical_to_sharding_tree():
    mesh = mesh_lib.create_mesh((("data", 2), ("fsdp", 4), ("tensor", 1)))
    tree = {"w": ("embed", "mlp"), "b": None, "x": ("batch", None)}
    shapes = {
        "w": jnp.zeros((8, 3)),
        "b": jnp.zeros(3),
        "x": jax.ShapeDtypeStruct((4, 5), jnp.float32),
    }
    out = sharding.logical_to_sharding(tree, mesh, RULES, shapes)
    assert out["w"] == NamedSharding(mesh, P("fsdp", "tensor"))
    assert out["b"] == NamedSharding(mesh, P())
    assert out["x"] == NamedSharding(mesh, P("data", None))  # 4 rows: data only


def test_with_logical_constraint_is_noop_without_mesh_and_shards_inside():
    x = jnp.arange(32.0).reshape(8, 4)
    assert sharding.with_logical_constraint(x, ("batch", "embed")) is x

    mesh = mesh_lib.create_mesh((("data", 2), ("fsdp", 4), ("tensor", 1)))
    f = jax.jit(lambda a: sharding.with_logical_constraint(a * 2, ("batch", "embed")))
    with sharding.mesh_rules(mesh, RULES):
        y = f(x)
    # 4 columns would fit fsdp, but fsdp is already used by the batch dim.
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None)), 2)
    np.testing.assert_array_equal(y, x * 2)


# ------------------------------------------------------------------------------ state + step


def test_create_sharded_state_places_params_and_optimizer_state():
    mesh = mesh_lib.create_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
    graphdef, state, shardings = sharding.create_sharded_state(create_train_state, mesh, RULES)
    model, opt = nnx.merge(graphdef, state)

    assert spec_of(model.conv.kernel) == P(None, None, None, "fsdp")
    assert spec_of(model.conv.bias) == P("fsdp")
    assert spec_of(model.hidden.kernel) == P("fsdp", "tensor")
    assert spec_of(model.hidden.bias) == P("tensor")
    # vocab -> (data, tensor) but tensor is taken by dim 0 and 6 % data(2) == 0.
    assert spec_of(model.head.kernel) == P("tensor", "data")
    assert spec_of(model.head.bias) == P()  # not annotated: replicated
    assert model.head.kernel.sharding.mesh == mesh
    # Adam moments follow their parameters; the step counter is replicated.
    assert spec_of(opt.opt_state[0].mu["hidden"]["kernel"]) == P("fsdp", "tensor")
    assert spec_of(opt.opt_state[0].nu["conv"]["kernel"]) == P(None, None, None, "fsdp")
    assert spec_of(opt.step) == P()
    # The returned shardings are exactly the arrays' shardings.
    for array, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert array.sharding == want
    # Values equal an unsharded build of the same deterministic create function.
    with nnx.use_eager_sharding(False):  # flax would otherwise demand a mesh here
        ref_model, _ = create_train_state()
    np.testing.assert_allclose(model.hidden.kernel[...], ref_model.hidden.kernel[...])

    # A parameter named with a logical axis the rules do not know is reported by name.
    with pytest.raises(ValueError, match="'heads'.*has no rule"):
        sharding.abstract_state(
            lambda: nnx.Linear(2, 2, kernel_init=wp(nnx.initializers.ones, ("embed", "heads")),
                               rngs=nnx.Rngs(0)),
            mesh, RULES,
        )
    # abstract_state gives the same structure, as sharded ShapeDtypeStructs.
    _, abstract, _ = sharding.abstract_state(create_train_state, mesh, RULES)
    for a, array in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype, a.sharding) == (array.shape, array.dtype, array.sharding)


def test_jitted_functional_train_step_learns_and_keeps_shardings():
    mesh = mesh_lib.create_mesh((("data", 4), ("fsdp", 2), ("tensor", 1)))
    graphdef, state, shardings = sharding.create_sharded_state(create_train_state, mesh, RULES)
    batch_sharding = sharding.data_sharding(mesh)
    assert batch_sharding.spec == P(("data", "fsdp"))

    def train_step(state, batch):
        model, opt = nnx.merge(graphdef, state)

        def loss_fn(model):
            logits = model(batch["image"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return nnx.split((model, opt))[1], loss

    step = jax.jit(
        train_step,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    rng = np.random.default_rng(0)
    local = {
        "image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
        "label": rng.integers(0, 6, size=(16,)).astype(np.int32),
    }
    batch = sharding.global_batch(local, batch_sharding)
    assert batch["image"].sharding == batch_sharding and batch["image"].shape == (16, 8, 8, 3)
    np.testing.assert_array_equal(batch["label"], local["label"])

    losses = []
    with sharding.mesh_rules(mesh, RULES):
        for _ in range(8):
            old = state
            state, loss = step(state, batch)
            losses.append(float(loss))
    assert jax.tree.leaves(old)[0].is_deleted()  # donated
    assert all(np.isfinite(losses))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # one fixed batch
    assert losses[-1] < 0.85 * losses[0], losses
    for array, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert array.sharding == want
    _, opt = nnx.merge(graphdef, state)
    assert int(opt.step[...]) == 8


def test_global_batch_error_names_the_leaf():
    mesh = mesh_lib.create_mesh((("data", -1),))
    with pytest.raises(ValueError, match=r"\['x'\].*local shape \(3, 2\)"):
        sharding.global_batch({"x": np.zeros((3, 2))}, sharding.data_sharding(mesh))


# ------------------------------------------------------------------------------ distributed


def test_initialize_kwargs_from_environment():
    kwargs = distributed.initialize_kwargs
    assert kwargs({}) is None
    assert kwargs({"VASA_DISTRIBUTED": "0"}) is None
    assert kwargs({"VASA_DISTRIBUTED": "1"}) == {}  # auto-detect (TPU, Slurm, ...)
    env = {"VASA_COORDINATOR": "10.0.0.1:1234", "VASA_NUM_PROCESSES": "4", "VASA_PROCESS_ID": "2"}
    assert kwargs(env) == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)
    assert kwargs({**env, "VASA_LOCAL_DEVICE_IDS": "0,1"})["local_device_ids"] == [0, 1]
    with pytest.raises(ValueError, match="needs all of"):
        kwargs({"VASA_COORDINATOR": "10.0.0.1:1234"})
    with pytest.raises(ValueError, match="outside"):
        kwargs({**env, "VASA_PROCESS_ID": "4"})
    with pytest.raises(ValueError, match="must be an integer"):
        kwargs({**env, "VASA_NUM_PROCESSES": "four"})
    with pytest.raises(ValueError, match="VASA_DISTRIBUTED must be"):
        kwargs({"VASA_DISTRIBUTED": "maybe"})
    # Not asked: nothing is initialised in a single-process run.
    assert distributed.maybe_initialize({}) is False
    assert distributed.is_main_process()
    distributed.barrier("single-process no-op")


def test_round_batch_size_to_the_batch_axes():
    mesh = mesh_lib.create_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))  # 4 batch shards
    assert [sharding.round_batch_size(mesh, b) for b in (0, 1, 4, 5, 16)] == [4, 4, 4, 8, 16]
    assert sharding.round_batch_size(mesh, 3, batch_axes=("data",)) == 4
    assert sharding.round_batch_size(mesh, 5, batch_axes=("data",)) == 6


def test_batch_mapper_pads_shards_and_compiles_once():
    mesh = mesh_lib.create_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
    mapper = sharding.BatchMapper(mesh, (("batch", ("data", "fsdp")),), 6)
    assert mapper.batch_size == 8
    seen = []

    @jax.jit
    def fn(x, y):
        seen.append(x.shape)  # traced once per shape
        return {"sum": x.sum(axis=1) + y, "first": x[:, 0]}

    x = np.arange(19 * 3, dtype=np.float32).reshape(19, 3)
    y = np.arange(19, dtype=np.float32)
    out = mapper.map(fn, [x, y])
    np.testing.assert_allclose(out["sum"], x.sum(axis=1) + y)
    np.testing.assert_allclose(out["first"], x[:, 0])
    assert seen == [(8, 3)]  # 3 batches, the last padded: one compilation
    assert mapper.put(x[:5]).sharding.spec == P(("data", "fsdp"))
    with pytest.raises(ValueError, match="no rows"):
        mapper.map(fn, [x[:0], y[:0]])
