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
import numpy as np
import pytest
from flax import nnx

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
    assert records[0]["perf/compile_seconds"] == result.compile_seconds  # logged as measured
    assert records[1]["perf/checkpoint_seconds"] > 0  # the save at step 2
    g = result.goodput
    shares = [g[k] for k in ("goodput", "compile_share", "data_wait_share", "checkpoint_share")]
    assert all(0 <= s <= 1 for s in shares) and g["goodput"] > 0 and g["compile_share"] > 0
    assert sum(shares) <= 1 + 1e-9
    np.testing.assert_allclose(sum(shares) + g["other_share"], 1.0, rtol=1e-9)
    summaries = logger.read_summaries(workdir)
    assert len(summaries) == 1 and summaries[0]["step"] == 6
    assert summaries[0]["start_step"] == 0 and summaries[0]["skipped_steps"] == 0
    assert summaries[0]["goodput"] == g["goodput"]
    line = logger.goodput_line(g, 0, 6)
    assert line.startswith("goodput ") and "compile" in line and "\n" not in line


def test_metrics_survive_a_line_cut_by_a_kill(tmp_path):
    workdir = str(tmp_path)
    with open(os.path.join(workdir, logger.METRICS_FILE), "w") as f:
        f.write(json.dumps({"step": 1, "loss": 1.0}) + "\n" + '{"step": 2, "lo')
    writer = logger.MetricWriter(workdir)
    writer.write_scalars(2, {"loss": 0.5})
    writer.close()
    assert logger.read_metrics(workdir) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
