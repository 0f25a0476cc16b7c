"""The shared training skeleton (vasa_jax.trainers.loop) on a toy stage, plus optim and logger.

The toy stage regresses y = x @ teacher with a 2-layer MLP whose kernels carry logical axes;
the teacher is a frozen, replicated argument (not in the state), the MLP has an EMA copy.
"""

import glob
import os
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from PIL import Image

from configs import common
from vasa_jax import checkpointing, optim
from vasa_jax.parallel.mesh import create_mesh
from vasa_jax.trainers import logger, loop

wp = nnx.with_partitioning
RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", None))
DIM_IN, DIM_HIDDEN, DIM_OUT, BATCH = 8, 32, 4, 8


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(DIM_IN, DIM_HIDDEN, kernel_init=wp(init, ("embed", "mlp")),
                             rngs=rngs)
        self.down = nnx.Linear(DIM_HIDDEN, DIM_OUT, kernel_init=wp(init, ("mlp", "embed")),
                               rngs=rngs)

    def __call__(self, x):  # [B, 8] -> [B, 4]
        return self.down(nnx.relu(self.up(x)))


class ToyState(nnx.Module):
    def __init__(self, lr: float):
        self.model = MLP(nnx.Rngs(0))
        self.ema = MLP(nnx.Rngs(0))
        self.opt = nnx.Optimizer(self.model, optax.adam(lr), wrt=nnx.Param)


class MakeExample(grain.transforms.Map):
    def map(self, index):
        x = np.random.default_rng(int(index)).normal(size=DIM_IN).astype(np.float32)
        image = np.tile(np.tanh(x[:3])[None, None], (8, 8, 1)).astype(np.float32)
        return {"x": x, "image": image, "num_skipped": np.int32(0)}


class _InterruptIterator(grain.DatasetIterator):
    """Sends SIGINT to this process while producing batch number `at` (1-based)."""

    def __init__(self, parent, at: int):
        super().__init__(parent)
        self._at = at
        self._count = 0

    def __next__(self):
        batch = next(self._parent)
        self._count += 1
        if self._count == self._at:
            os.kill(os.getpid(), signal.SIGINT)
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class _Interrupt(grain.IterDataset):
    def __init__(self, parent, at: int):
        super().__init__(parent)
        self._at = at

    def __iter__(self):
        return _InterruptIterator(self._parent.__iter__(), self._at)


def make_dataset(process_index, process_count, interrupt_at=None):
    ds = grain.MapDataset.range(10_000).seed(0).shuffle().map(MakeExample())
    ds = ds[process_index::process_count].to_iter_dataset().batch(BATCH // process_count)
    return _Interrupt(ds, interrupt_at) if interrupt_at else ds


def toy_step(ts, batch, rng, frozen):
    x = batch["x"]
    y = x @ frozen["teacher"]

    def loss_fn(model):
        return jnp.mean(jnp.square(model(x) - y))

    loss, grads = nnx.value_and_grad(loss_fn)(ts.model)
    ts.opt.update(ts.model, grads)
    return {"loss": loss, "batch_sum": jnp.sum(x), "rng_draw": jax.random.uniform(rng)}


def toy_images(ts, batch, frozen):
    del ts, frozen
    # Not in sorted order: the grid must keep the stage's row order.
    return {"zeros": jnp.zeros_like(batch["image"]), "ones": jnp.ones_like(batch["image"])}


def make_stage(config, interrupt_at=None):
    teacher = np.random.default_rng(1).normal(size=(DIM_IN, DIM_OUT)).astype(np.float32)
    return loop.Stage(
        create_state=lambda: ToyState(config.lr),
        train_step=toy_step,
        make_dataset=lambda i, n: make_dataset(i, n, interrupt_at),
        batch_keys=("x", "image"),
        frozen={"teacher": jnp.asarray(teacher)},
        image_summary=toy_images,
        ema=loop.EMA(source="model", target="ema", decay=0.5),
    )


def toy_config(mesh_axes, **train):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.lr = 3e-2
    c.mesh = ml_collections.ConfigDict(dict(axes=mesh_axes, rules=RULES))
    c.train = common.train_config("tiny")
    c.train.update({**dict(log_every=1, image_every=0, checkpoint_every=0), **train})
    common.validate_train(c.train)
    return c


def params(result, name="model"):
    ts = nnx.merge(result.graphdef, result.state)
    return jax.device_get(nnx.to_pure_dict(nnx.state(getattr(ts, name), nnx.Param)))


def by_step(workdir):
    """{step: the last metrics.jsonl record of that step}."""
    return {r["step"]: r for r in logger.read_metrics(workdir)}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(autouse=True)
def fast_cpu_rng():
    with jax.threefry_partitionable(False):
        yield


# ----------------------------------------------------------------------------- the loop


def test_toy_stage_learns_logs_images_and_checkpoints(tmp_path):
    workdir = str(tmp_path / "run")
    config = toy_config((("data", -1), ("fsdp", 1)), total_steps=20, log_every=5,
                        image_every=10, checkpoint_every=10)
    result = loop.train(config, workdir, make_stage)

    assert result.step == 20 and not result.stopped_early
    assert result.compile_seconds > 0
    records = logger.read_metrics(workdir)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert records[-1]["loss"] < 0.3 * records[0]["loss"], [r["loss"] for r in records]
    for r in records:
        assert 0 <= r["perf/data_wait"] <= 1 and r["perf/step_seconds"] > 0
        assert r["data/skipped_records"] == 0
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    for s in (10, 20):
        grid = np.asarray(Image.open(os.path.join(workdir, "images", f"samples_{s:08d}.png")))
        # 2 rows of 4 samples, 8 px each, 2 px padding, plus a label margin.
        assert grid.shape[0] == 2 * (8 + 2) + 2 and grid.shape[2] == 3
        assert grid.shape[1] > 4 * (8 + 2)
        right = grid.shape[1] - 2  # the last sample of each row ends 2 px from the edge
        assert np.all(grid[2:10, right - 8:right] == 128)  # "zeros" row first
        assert np.all(grid[12:20, right - 8:right] == 255)  # then "ones"
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]

    # Data-parallel on 8 devices: batch split 8 ways, kernels replicated (fsdp = 1).
    ts = nnx.merge(result.graphdef, result.state)
    assert ts.model.up.kernel[...].sharding.is_fully_replicated
    # The EMA (decay 0.5) trails the live weights; the teacher is not part of the state.
    live, ema = params(result), params(result, "ema")
    assert not np.allclose(live["up"]["kernel"], ema["up"]["kernel"])
    np.testing.assert_allclose(live["up"]["kernel"], ema["up"]["kernel"], atol=0.05)
    assert "teacher" not in str(jax.tree_util.tree_structure(result.state))
    # Every checkpoint also holds the EMA module alone: what inference restores.
    mesh = create_mesh(config.mesh.axes)
    with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        assert ckpt.has_weights(10) and ckpt.has_weights(20)
        restored = ckpt.restore_module(lambda: MLP(nnx.Rngs(5)), mesh, RULES, 20)
    assert_trees_equal(nnx.to_pure_dict(nnx.state(restored)), ema)


def test_interrupted_run_resumes_like_an_uninterrupted_one(tmp_path):
    """2x4 data x fsdp mesh; Ctrl-C at step 3 saves and stops; the resumed run replays the
    exact batches and ends with bitwise the same state as a run that was never stopped."""
    mesh = (("data", 2), ("fsdp", 4))
    config = toy_config(mesh, total_steps=7)
    straight = loop.train(config, str(tmp_path / "straight"), make_stage)

    workdir = str(tmp_path / "stopped")
    first = loop.train(config, workdir, lambda c: make_stage(c, interrupt_at=3))
    assert first.stopped_early and first.step == 3
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
    resumed = loop.train(config, workdir, make_stage)
    assert resumed.step == 7 and not resumed.stopped_early
    assert sorted(by_step(workdir)) == list(range(1, 8))  # continued at step 4

    expected, got = by_step(str(tmp_path / "straight")), by_step(workdir)
    for s in range(1, 8):  # same batch, same per-step rng, same loss at every step
        for key in ("batch_sum", "rng_draw", "loss"):
            assert got[s][key] == expected[s][key], (s, key)
    assert_trees_equal(params(resumed), params(straight))
    assert_trees_equal(params(resumed, "ema"), params(straight, "ema"))
    assert_trees_equal(jax.device_get(resumed.state["opt"]), jax.device_get(straight.state["opt"]))

    # fsdp shards the "embed" dims 4 ways, also after a restore.
    ts = nnx.merge(resumed.graphdef, resumed.state)
    assert ts.model.up.kernel[...].sharding.spec == P("fsdp", None)
    assert ts.model.down.kernel[...].sharding.spec == P(None, "fsdp")

    again = loop.train(config, workdir, make_stage)  # already done: nothing is compiled
    assert again.step == 7 and again.compile_seconds is None
    assert_trees_equal(params(again), params(straight))


def test_time_budget_stops_at_a_log_step_and_resumes(tmp_path):
    config = toy_config((("data", 2), ("fsdp", 4)), total_steps=7)
    config.train.log_every = 2
    config.train.max_minutes = 1e-9  # spent after the first step
    workdir = str(tmp_path / "budget")
    first = loop.train(config, workdir, make_stage)
    assert first.stopped_early and first.step == 2  # the first log step
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    config.train.max_minutes = 0.0
    resumed = loop.train(config, workdir, make_stage)
    assert resumed.step == 7 and not resumed.stopped_early


def test_update_ema():
    live, ema = MLP(nnx.Rngs(0)), MLP(nnx.Rngs(1))
    before = nnx.to_pure_dict(nnx.state(ema, nnx.Param))
    loop.update_ema(ema, live, 0.9)
    after = nnx.to_pure_dict(nnx.state(ema, nnx.Param))
    target = nnx.to_pure_dict(nnx.state(live, nnx.Param))
    jax.tree.map(lambda a, b, p: np.testing.assert_allclose(a, 0.9 * b + 0.1 * p, rtol=1e-6),
                 after, before, target)


# ----------------------------------------------------------------------------- optim


def test_schedule_warmup_cosine_and_end_value():
    cfg = common.optim_config("tiny")
    cfg.update(dict(lr=1e-3, end_lr=1e-5, warmup_steps=10))
    schedule = optim.learning_rate_schedule(cfg, total_steps=110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(60)), (1e-3 + 1e-5) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(110)), 1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(1000)), 1e-5, rtol=1e-5)
    cfg.warmup_steps = 0
    no_warmup = optim.learning_rate_schedule(cfg, total_steps=100)
    np.testing.assert_allclose([float(no_warmup(0)), float(no_warmup(100))], [1e-3, 1e-5],
                               rtol=1e-5)
    cfg.warmup_steps = 100
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.learning_rate_schedule(cfg, total_steps=100)


def test_adamw_megaportraits_defaults_clip_and_decay_mask():
    cfg = common.optim_config("full")
    assert (cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.lr, cfg.end_lr) == (
        0.5, 0.999, 1e-8, 1e-2, 2e-4, 1e-6)
    cfg.update(dict(lr=0.1, weight_decay=0.5, grad_clip=1.0))
    tx = optim.build_optimizer(cfg, total_steps=100)
    params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # Zero gradients: only weight decay moves anything, and only the kernel.
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((3, 3)), rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], np.zeros(3))
    # A huge gradient is clipped to norm 1 before Adam (first Adam step is ~lr * sign).
    cfg.weight_decay = 0.0
    clip_only = optax.chain(optax.clip_by_global_norm(1.0))
    huge = {"kernel": 1e6 * jnp.ones((3, 3)), "bias": jnp.zeros((3,))}
    clipped, _ = clip_only.update(huge, clip_only.init(params))
    np.testing.assert_allclose(optax.global_norm(clipped), 1.0, rtol=1e-5)
    updates, _ = optim.build_optimizer(cfg, 100).update(huge, tx.init(params), params)
    assert np.all(np.isfinite(updates["kernel"]))
    # Also through nnx.Optimizer (state leaves are nnx Variables at init).
    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optim.build_optimizer(cfg, 100), wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    opt.update(model, grads)
    assert int(opt.step[...]) == 1


def test_optim_and_train_config_validation():
    cfg = common.optim_config("tiny")
    common.validate_optim(cfg, 10)
    for field, value, match in (("warmup_steps", 10, "warmup_steps"), ("end_lr", 1.0, "end_lr"),
                                ("b1", 1.0, "b1"), ("grad_clip", -1.0, "grad_clip")):
        bad = common.optim_config("tiny")
        bad[field] = value
        with pytest.raises(common.ConfigError, match=match):
            common.validate_optim(bad, 10)
    t = common.train_config("tiny")
    t.ema_decay = 1.0
    with pytest.raises(common.ConfigError, match="ema_decay"):
        common.validate_train(t)


# ----------------------------------------------------------------------------- logger


def test_image_grid_progress_line_and_durations():
    rows = {"a": np.zeros((3, 4, 5, 3)), "bbbbbb": np.ones((3, 4, 5, 3))}
    grid = logger.image_grid(rows, pad=1, label_width=10)
    assert grid.shape == (2 * 5 + 1, 10 + 3 * 6 + 1, 3) and grid.dtype == np.uint8
    assert np.all(grid[1:5, 11:16] == 128) and np.all(grid[6:10, 11:16] == 255)
    with pytest.raises(ValueError, match="same shape|\\[N, H, W, 3\\]"):
        logger.image_grid({"a": np.zeros((3, 4, 5, 3)), "b": np.zeros((2, 4, 5, 3))})
    line = logger.progress_line(50, 200, {"loss/g": 0.1234, "psnr": 20.0}, step_seconds=0.5,
                                data_wait=0.25, eta_seconds=75)
    assert line == "step 50/200 | loss/g=0.1234 | 0.500 s/step | data wait 25% | ETA 1m 15s"
    assert [logger.format_duration(s) for s in (3.2, 3700, 90000)] == ["3.2s", "1h 01m",
                                                                      "1d 01h"]
