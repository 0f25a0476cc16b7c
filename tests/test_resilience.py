"""Training-loop resilience (vasa_jax.trainers.loop): NaN/inf steps skipped and counted, a
streak of them stops the run with a checkpoint of the last good state; a run killed with
SIGKILL resumes bitwise like one that never stopped; the goodput summary.

The bad-step tests use the toy stage of test_trainer with poisoned batches (x = NaN, so the
loss and every gradient are NaN); the SIGKILL test trains stage 2 (tiny) in subprocesses.
"""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import configs
from configs import common
from tests import test_trainer as toy
from vasa_jax import checkpointing
from vasa_jax.trainers import logger, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = (("data", -1), ("fsdp", 1))


@pytest.fixture(autouse=True)
def fast_cpu_rng():
    with jax.threefry_partitionable(False):
        yield


class MakeBatch(grain.transforms.Map):
    """Batch number i (0-based; step i + 1 trains on it): x NaN when i is in `poisoned`."""

    def __init__(self, poisoned):
        self.poisoned = frozenset(poisoned)

    def map(self, index):
        rng = np.random.default_rng(int(index))
        x = rng.normal(size=(toy.BATCH, toy.DIM_IN)).astype(np.float32)
        if index in self.poisoned:
            x[0, 0] = np.nan
        image = np.zeros((toy.BATCH, 8, 8, 3), np.float32)
        return {"x": x, "image": image, "num_skipped": np.zeros(toy.BATCH, np.int32)}


def poisoned_stage(poisoned):
    def make_stage(config):
        # Single process: every batch is global.
        dataset = grain.MapDataset.range(10_000).map(MakeBatch(poisoned)).to_iter_dataset()
        return dataclasses.replace(toy.make_stage(config), make_dataset=lambda i, n: dataset)

    return make_stage


def train_state_tree(result):
    """Everything the step updates: params, EMA, optimizer state (host numpy)."""
    return jax.device_get(nnx.to_pure_dict(result.state))


# ----------------------------------------------------------------------------- bad steps


def test_nan_steps_are_discarded_counted_and_logged(tmp_path):
    clean = loop.train(toy.toy_config(MESH, total_steps=2), str(tmp_path / "clean"),
                       poisoned_stage(()))
    # Steps 3 and 4 see NaN batches: their updates are discarded, the state stays at step 2.
    config = toy.toy_config(MESH, total_steps=4, max_bad_steps=3)
    workdir = str(tmp_path / "nan")
    bad = loop.train(config, workdir, poisoned_stage({2, 3}))
    assert bad.step == 4 and not bad.stopped_early and bad.stop_reason == ""
    assert bad.skipped_steps == 2
    toy.assert_trees_equal(train_state_tree(bad), train_state_tree(clean))
    records = toy.by_step(workdir)
    assert [records[s]["train/skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 2]
    assert np.isnan(records[3]["loss"]) and np.isfinite(records[2]["loss"])

    # Resumed with clean batches after the bad ones: training goes on, the run-long count
    # continues from the log, the optimizer counted only the 2 + 2 good steps.
    config.train.total_steps = 6
    more = loop.train(config, workdir, poisoned_stage({2, 3}))
    assert more.step == 6 and more.skipped_steps == 2
    records = toy.by_step(workdir)
    assert [records[s]["train/skipped_steps"] for s in (5, 6)] == [2, 2]
    assert np.isfinite(records[6]["loss"])
    assert int(nnx.merge(more.graphdef, more.state).opt.step[...]) == 4


def finite_loss_nan_gradient_step(ts, batch, rng, frozen):
    """The toy step, but a NaN input gives a finite loss (nan_to_num) and NaN gradients."""
    del rng
    x = batch["x"]
    y = jnp.nan_to_num(x) @ frozen["teacher"]
    loss, grads = nnx.value_and_grad(
        lambda model: jnp.mean(jnp.square(jnp.nan_to_num(model(x)) - y)))(ts.model)
    ts.opt.update(ts.model, grads)
    return {"loss": loss, "grad_norm": optax.global_norm(grads)}


def test_nan_gradients_with_a_finite_loss_are_caught_by_the_gradient_norm(tmp_path):
    def make_stage(poisoned):
        return lambda config: dataclasses.replace(
            poisoned_stage(poisoned)(config), train_step=finite_loss_nan_gradient_step)

    clean = loop.train(toy.toy_config(MESH, total_steps=2), str(tmp_path / "clean"),
                       make_stage(()))
    workdir = str(tmp_path / "nan")
    bad = loop.train(toy.toy_config(MESH, total_steps=3), workdir, make_stage({2}))
    records = toy.by_step(workdir)
    assert np.isfinite(records[3]["loss"]) and np.isnan(records[3]["grad_norm"])
    assert bad.skipped_steps == 1 and records[3]["train/skipped_steps"] == 1
    toy.assert_trees_equal(train_state_tree(bad), train_state_tree(clean))


def test_a_streak_of_bad_steps_stops_the_run_with_the_last_good_state(tmp_path, caplog):
    clean = loop.train(toy.toy_config(MESH, total_steps=2), str(tmp_path / "clean"),
                       poisoned_stage(()))
    workdir = str(tmp_path / "diverged")
    config = toy.toy_config(MESH, total_steps=20, max_bad_steps=3, checkpoint_every=0)
    with caplog.at_level(logging.ERROR):
        result = loop.train(config, workdir, poisoned_stage(range(2, 10_000)))
    assert result.stopped_early and result.step == 5  # steps 3, 4, 5 bad
    assert result.skipped_steps == 3
    assert "3 steps in a row" in result.stop_reason
    assert "train.max_bad_steps=3" in result.stop_reason
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and "stopped at step 5" in errors[0]
    toy.assert_trees_equal(train_state_tree(result), train_state_tree(clean))
    # The stop-time checkpoint holds the last good state.
    with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [5]
        restored = ckpt.restore(result.state, 5)
    toy.assert_trees_equal(jax.device_get(nnx.to_pure_dict(restored)),
                           train_state_tree(clean))

    # With log_every=2 the streak is seen at the next log step (no per-step host sync).
    config = toy.toy_config(MESH, total_steps=20, max_bad_steps=3, log_every=2)
    later = loop.train(config, str(tmp_path / "later"), poisoned_stage(range(2, 10_000)))
    assert later.stopped_early and later.step == 6 and later.skipped_steps == 4


def test_max_bad_steps_is_validated():
    t = common.train_config("tiny")
    assert t.max_bad_steps == 10
    t.max_bad_steps = 0  # never stop
    common.validate_train(t)
    t.max_bad_steps = -1
    with pytest.raises(common.ConfigError, match="max_bad_steps"):
        common.validate_train(t)


# ----------------------------------------------------------------------------- goodput


def test_goodput_fields_and_summary(tmp_path):
    workdir = str(tmp_path / "run")
    config = toy.toy_config(MESH, total_steps=6, log_every=2, checkpoint_every=2)
    result = loop.train(config, workdir, poisoned_stage(()))
    records = logger.read_metrics(workdir)
    for r in records:
        assert r["perf/checkpoint_seconds"] >= 0 and r["perf/compile_seconds"] >= 0
    np.testing.assert_allclose(records[0]["perf/compile_seconds"], result.compile_seconds)
    assert records[1]["perf/checkpoint_seconds"] > 0  # the save at step 2
    g = result.goodput
    shares = [g[k] for k in ("goodput", "compile_share", "data_wait_share", "checkpoint_share")]
    assert all(0 <= s <= 1 for s in shares) and g["goodput"] > 0 and g["compile_share"] > 0
    assert sum(shares) <= 1 + 1e-9
    np.testing.assert_allclose(sum(shares) + g["other_share"], 1.0, rtol=1e-9)
    summaries = logger.read_summaries(workdir)
    assert len(summaries) == 1 and summaries[0]["step"] == 6
    assert summaries[0]["start_step"] == 0 and summaries[0]["skipped_steps"] == 0
    np.testing.assert_allclose(summaries[0]["goodput"], g["goodput"])
    line = logger.goodput_line(g, 0, 6)
    assert line.startswith("goodput ") and "compile" in line and "\n" not in line
    # The inference weights read back without a target (as the SIGKILL test below does).
    with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        weights = jax.device_get(ckpt.restore_weights(None, 6))
    toy.assert_trees_equal(weights, toy.params(result, "ema"))


def test_metrics_survive_a_line_cut_by_a_kill(tmp_path):
    workdir = str(tmp_path)
    with open(os.path.join(workdir, logger.METRICS_FILE), "w") as f:
        f.write(json.dumps({"step": 1, "loss": 1.0}) + "\n" + '{"step": 2, "lo')
    writer = logger.MetricWriter(workdir)
    writer.write_scalars(2, {"loss": 0.5})
    writer.close()
    assert logger.read_metrics(workdir) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


# ----------------------------------------------------------------------------- SIGKILL


# Stage 2 at its smallest; each subprocess runs train_and_evaluate on 1 CPU device.
DRIVER = """
import json, sys
from absl import flags, logging
flags.FLAGS.mark_as_parsed()
logging.set_verbosity(logging.INFO)
import configs
from vasa_jax.trainers import loop, motion_dit
config = configs.load("configs/motion_dit.py:size=tiny", **json.loads(sys.argv[2]))
motion_dit.train_and_evaluate(config, sys.argv[1], compiler_options=loop.FAST_CPU_COMPILE)
"""
TOTAL_STEPS = 30


def _stage2_run(workdir, data_dir, cache_dir):
    overrides = dict(
        data__path=data_dir, data__window=10, data__context=3, data__batch_size=8,
        data__audio__n_mels=16, model__layers=1, model__width=16, model__heads=2,
        model__audio_encoder__hidden=8, diffusion__sample_steps=2, optim__warmup_steps=0,
        train__total_steps=TOTAL_STEPS, train__log_every=1, train__checkpoint_every=3)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1",
           # The 2nd and 3rd process load the step compiled by the 1st (~30 s on 2 cores).
           "JAX_COMPILATION_CACHE_DIR": cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, workdir, json.dumps(overrides)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _finished(process, timeout=300):
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]


def _finished_checkpoints(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(
        folder) else []


@pytest.mark.slow  # 3 processes, one XLA compile (~60 s on 2 idle cores)
def test_a_run_killed_with_sigkill_resumes_bitwise(tmp_path):
    """Uninterrupted run vs one SIGKILLed right after its first checkpoint and resumed:
    every logged value of every step (losses, grad norms, kept-condition shares, ...) and
    the final EMA weights are bitwise equal (same machine, same executable)."""
    from tests import testdata

    data_dir, cache_dir = str(tmp_path / "data"), str(tmp_path / "xla_cache")
    testdata.make_dataset(data_dir, identities=2, clips_per_identity=2,
                          test_clips_per_identity=1, seconds=1.2, size=16)
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    _finished(_stage2_run(straight, data_dir, cache_dir))

    process = _stage2_run(killed, data_dir, cache_dir)
    deadline = time.monotonic() + 240
    while not _finished_checkpoints(killed):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    resumed_from = _finished_checkpoints(killed)[-1]
    assert 0 < resumed_from < TOTAL_STEPS

    _finished(_stage2_run(killed, data_dir, cache_dir))
    summaries = logger.read_summaries(killed)
    assert len(summaries) == 1 and summaries[0]["start_step"] == resumed_from
    expected, got = toy.by_step(straight), toy.by_step(killed)  # the last record of a step
    steps = list(range(1, TOTAL_STEPS + 1))
    assert sorted(expected) == sorted(got) == steps
    keys = sorted(k for k in expected[1] if not k.startswith("perf/"))
    assert "loss/total" in keys and "grad_norm" in keys
    for key in keys:
        np.testing.assert_array_equal(np.array([got[s][key] for s in steps]),
                                      np.array([expected[s][key] for s in steps]), err_msg=key)
    weights = []
    for workdir in (straight, killed):
        with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
            weights.append(jax.device_get(ckpt.restore_weights(None, TOTAL_STEPS)))
    toy.assert_trees_equal(*weights)


def _stopped_trainer(config, workdir):
    """Stands in for a stage trainer whose run hit train.max_bad_steps."""
    return loop.TrainResult(5, None, None, {}, None, {}, True, stop_reason="3 steps in a row")


def test_train_py_exits_non_zero_after_a_bad_step_streak(tmp_path, monkeypatch, capsys):
    import train as train_cli  # one import per process: train.py defines absl flags

    monkeypatch.setitem(train_cli.TRAINERS, "motion_dit",
                        "tests.test_resilience:_stopped_trainer")
    config = configs.load("configs/motion_dit.py:size=tiny")
    assert train_cli.train(config, str(tmp_path / "run")) == 3
    assert "error: 3 steps in a row" in capsys.readouterr().err
