"""Checkpoints: state + grain iterator + config, restore onto another mesh, params export."""

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vasa_jax import checkpointing
from vasa_jax.parallel import mesh as mesh_lib, sharding

wp = nnx.with_partitioning
RULES = (("embed", "fsdp"), ("mlp", "data"))
MESH_A = (("data", 8), ("fsdp", 1))
MESH_B = (("data", 2), ("fsdp", 4))


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(8, 16, kernel_init=wp(init, ("embed", "mlp")), rngs=rngs)
        self.down = nnx.Linear(16, 8, kernel_init=wp(init, ("mlp", "embed")), rngs=rngs)

    def __call__(self, x):  # [B, 8] -> [B, 8]
        return self.down(nnx.relu(self.up(x)))


def create():
    model = MLP(nnx.Rngs(1))
    return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)


def pipeline():
    return grain.MapDataset.range(64).shuffle(seed=3).batch(4).to_iter_dataset()


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(autouse=True)
def fast_cpu_rng():
    with jax.threefry_partitionable(False):  # faster XLA:CPU compiles; see test_parallel.py
        yield


def test_save_then_restore_onto_another_mesh_with_iterator_and_config(tmp_path):
    mesh_a, mesh_b = mesh_lib.create_mesh(MESH_A), mesh_lib.create_mesh(MESH_B)
    graphdef_a, state, _ = sharding.create_sharded_state(create, mesh_a, RULES)
    kernel_sharding_a = nnx.merge(graphdef_a, state)[0].up.kernel.sharding
    # Host copy of a device copy: numpy views of `state` itself would block its donation.
    saved = jax.device_get(jax.jit(lambda s: jax.tree.map(lambda x: x * 1, s))(state))
    it = iter(pipeline())
    for _ in range(3):
        next(it)
    config = ml_collections.ConfigDict({"lr": 1e-3, "mesh": {"axes": MESH_A}})

    ckpt = checkpointing.Checkpointer(tmp_path / "ckpt")
    assert ckpt.latest_step() is None
    assert ckpt.save(3, state, data_iter=it, config=config)
    # The save is asynchronous, yet both the iterator position and the arrays are captured
    # when save returns: advancing the iterator and donating the state must not leak in.
    expected_next = next(it)
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    bump(state)  # reuses the state's buffers whenever XLA accepts the donation
    ckpt.wait()
    assert ckpt.latest_step() == 3

    graphdef, abstract_b, shardings_b = sharding.abstract_state(create, mesh_b, RULES)
    new_it = iter(pipeline())
    restored = checkpointing.Checkpointer(tmp_path / "ckpt").restore(abstract_b, data_iter=new_it)
    np.testing.assert_array_equal(next(new_it), expected_next)
    assert_trees_equal(jax.device_get(restored), saved)
    for array, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings_b)):
        assert array.sharding == want
    model, opt = nnx.merge(graphdef, restored)
    assert model.up.kernel.sharding.spec == P("fsdp", "data")
    assert model.up.kernel.sharding.mesh == mesh_b
    assert not model.up.kernel.sharding.is_equivalent_to(kernel_sharding_a, 2)
    assert opt.opt_state[0].mu["up"]["kernel"].sharding.mesh == mesh_b

    assert ckpt.restore_config() == {"lr": 1e-3, "mesh": {"axes": (("data", 8), ("fsdp", 1))}}
    ckpt.close()


def test_intervals_retention_and_errors(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2)
    state = {"w": jnp.arange(4.0), "step": jnp.int32(0)}
    started = [ckpt.save(s, {**state, "step": jnp.int32(s)}) for s in range(7)]
    assert started == [True, False, True, False, True, False, True]
    assert ckpt.save(7, {**state, "step": jnp.int32(7)}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
    assert int(ckpt.restore(state, step=6)["step"]) == 6
    assert int(ckpt.restore(state)["step"]) == 7
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 4"):
        ckpt.restore(state, step=4)
    with pytest.raises(FileNotFoundError, match="no data iterator state"):
        ckpt.restore(state, data_iter=iter(pipeline()))
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpointing.Checkpointer(tmp_path / "empty").restore(state)
    with pytest.raises(ValueError, match="save_interval_steps"):
        checkpointing.Checkpointer(tmp_path / "bad", save_interval_steps=0)
    ckpt.close()


def test_restore_or_create_resumes_from_directory(tmp_path):
    state = {"w": jnp.zeros(3)}
    calls = []

    def create_fn():
        calls.append(1)
        return state

    with checkpointing.Checkpointer(tmp_path) as ckpt:
        fresh, step = ckpt.restore_or_create(state, create_fn)
        assert step == 0 and calls == [1] and fresh is state
        ckpt.save(5, {"w": jnp.full(3, 2.0)})
    # A restarted run (new Checkpointer on the same directory) picks up step 5.
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        resumed, step = ckpt.restore_or_create(state, create_fn)
    assert step == 5 and calls == [1]
    np.testing.assert_array_equal(resumed["w"], [2.0, 2.0, 2.0])


def test_export_and_load_params_only(tmp_path):
    mesh_a, mesh_b = mesh_lib.create_mesh(MESH_A), mesh_lib.create_mesh(MESH_B)
    graphdef, state, _ = sharding.create_sharded_state(create, mesh_a, RULES)
    model, _ = nnx.merge(graphdef, state)
    params = nnx.state(model, nnx.Param)
    path = tmp_path / "params"
    checkpointing.export_params(path, params, dtype=jnp.bfloat16)
    with pytest.raises(FileExistsError, match="never overwritten"):
        checkpointing.export_params(path, params)

    # No target: a plain dict on one device, in the stored dtype.
    plain = checkpointing.load_params(path)
    assert set(plain) == {"up", "down"}
    assert plain["up"]["kernel"].dtype == jnp.bfloat16
    assert plain["up"]["kernel"].sharding.device_set == {jax.local_devices()[0]}
    np.testing.assert_array_equal(plain["up"]["kernel"], model.up.kernel[...].astype(jnp.bfloat16))

    # nnx.State target on another mesh: its shardings and dtypes (float32) are used.
    graphdef_b, abstract_b, _ = sharding.abstract_state(lambda: MLP(nnx.Rngs(0)), mesh_b, RULES)
    inference_model = nnx.merge(graphdef_b, abstract_b)
    target = nnx.state(inference_model, nnx.Param)
    loaded = checkpointing.load_params(path, target)
    assert isinstance(loaded, nnx.State)
    kernel = loaded["up"]["kernel"][...]
    assert kernel.dtype == jnp.float32
    assert kernel.sharding.mesh == mesh_b and kernel.sharding.spec == P("fsdp", "data")
    np.testing.assert_allclose(kernel, model.up.kernel[...], rtol=1e-2, atol=1e-2)
    nnx.update(inference_model, loaded)
    x = jnp.ones((2, 8))
    np.testing.assert_allclose(inference_model(x), model(x), rtol=0.05, atol=0.05)
    with pytest.raises(FileNotFoundError):
        checkpointing.load_params(tmp_path / "missing")


def test_weights_item_restores_the_inference_module_alone(tmp_path):
    """The `weights` item (what the loop saves of the EMA module) restores into a fresh
    module on another mesh, without the train state; a step without it says so."""
    mesh_a, mesh_b = mesh_lib.create_mesh(MESH_A), mesh_lib.create_mesh(MESH_B)
    graphdef, state, _ = sharding.create_sharded_state(create, mesh_a, RULES)
    model, _ = nnx.merge(graphdef, state)
    with checkpointing.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state, force=True)
        ckpt.save(2, state, weights=nnx.state(model), force=True)
        assert not ckpt.has_weights(1) and ckpt.has_weights(2) and ckpt.has_weights()
        with pytest.raises(FileNotFoundError, match="no 'weights' item"):
            ckpt.restore_weights(nnx.state(model), 1)
        restored = ckpt.restore_module(lambda: MLP(nnx.Rngs(9)), mesh_b, RULES)
    assert isinstance(restored, MLP)
    kernel = restored.up.kernel[...]
    assert kernel.sharding.mesh == mesh_b and kernel.sharding.spec == P("fsdp", "data")
    assert_trees_equal(nnx.state(restored), nnx.state(model))


def test_open_run_checks_the_folder_stage_and_step(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpointing.open_run(tmp_path / "missing", "face_latent")
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoints/ folder"):
        checkpointing.open_run(tmp_path / "not_a_run", "face_latent")
    assert not (tmp_path / "not_a_run" / checkpointing.CHECKPOINT_DIR).exists()  # not created
    run = tmp_path / "run"
    (run / checkpointing.CHECKPOINT_DIR).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        checkpointing.open_run(run, "face_latent")
    config = ml_collections.ConfigDict({"stage": "motion_dit", "seed": 3})
    with checkpointing.Checkpointer(run / checkpointing.CHECKPOINT_DIR) as ckpt:
        ckpt.save(4, {"w": jnp.zeros(2)}, config=config, force=True)
    with pytest.raises(ValueError, match="holds a 'motion_dit' run, not 'face_latent'"):
        checkpointing.open_run(run, "face_latent")
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 3"):
        checkpointing.open_run(run, "motion_dit", step=3)
    ckpt, step, saved = checkpointing.open_run(run, "motion_dit")
    with ckpt:
        assert step == 4 and saved == {"stage": "motion_dit", "seed": 3}
