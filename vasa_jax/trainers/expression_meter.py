"""Trains the expression meter (vasa_jax.models.expression_meter) in the shared loop.

    python train.py --config configs/expression_meter.py:size=tiny --workdir runs/meter \
        --config.data.path=data/synthtalk

A batch of B stage-1 examples (`data_pipeline.loaders.stage1_dataset`) is 3B labelled
faces: images [3B, S, S, 3] and their scaled targets [3B, 4] (OUTPUT_COLUMNS,
`targets_from_labels`), made on the host (`MeterBatch`). One jitted step: random 2x blur
(face_id.augment; no flips: gaze has a side), the net, the column-weighted MSE, AdamW.

The column weights (the loop's `frozen` argument): loss.column_weights when given, else
1 / the variance of each column over the first loss.balance_batches batches (normalised to
mean 1), so every column counts alike whatever its units (with a plain MSE SynthTalk's
gaze, std ~0.6 output units, outweighed the mouth, std 0.24, 6 to 1 and the mouth reading
fell from r 0.86 to 0.71: docs/experiments.md, "gaze"); balance_batches 0: a plain MSE.
The run's config records the weights used (Stage.config).

At the end (single process) the held-out metrics on the test split and the params-only
export into the workdir: <workdir>/params + expression_meter.json, what
`load_expression_meter(<workdir>)` reads.

Logged: loss/total, grad_norm, lr.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from data_pipeline import loaders, schema
from vasa_jax import optim
from vasa_jax.models import expression_meter as em
from vasa_jax.models import face_id
from vasa_jax.trainers import loop

BATCH_KEYS = ("images", "targets")


def model_config(config: ml_collections.ConfigDict) -> em.ExpressionMeterConfig:
    m = config.model
    return em.ExpressionMeterConfig(image_size=m.image_size, channels=tuple(m.channels),
                                    hidden=m.hidden, gaze_scale=m.gaze_scale, head=m.head)


class TrainState(nnx.Module):
    """The meter and its optimizer."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.net = em.ExpressionMeterNet(model_config(config), rngs=nnx.Rngs(config.seed))
        self.opt = nnx.Optimizer(
            self.net, optim.build_optimizer(config.optim, config.train.total_steps),
            wrt=nnx.Param)


class MeterBatch(grain.transforms.Map):
    """A stage-1 batch of B examples -> images [3B, S, S, 3], targets [3B, 4]."""

    def __init__(self, gaze_scale: float):
        self.gaze_scale = gaze_scale

    def map(self, batch: dict) -> dict:
        parts = ("source", "driving", "cross")
        return {"images": np.concatenate([batch[p] for p in parts]),
                "targets": np.concatenate([em.targets_from_labels(batch["labels"][p],
                                                                  self.gaze_scale)
                                           for p in parts]),
                "num_skipped": batch["num_skipped"]}


def make_dataset(data: ml_collections.ConfigDict, gaze_scale: float, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
    """MeterBatch batches of the stage-1 loader over `data` (a data_stage1 section)."""
    return loaders.stage1_dataset(data, process_index=process_index,
                                  process_count=process_count).map(MeterBatch(gaze_scale))


def column_weights(config: ml_collections.ConfigDict) -> np.ndarray:
    """The loss weight of each OUTPUT_COLUMNS column [4] (see the module docstring). The
    statistics batches are the run's first global batches (the same on every process)."""
    lc = config.loss
    if lc.column_weights:
        return np.asarray(lc.column_weights, np.float32)
    count = min(lc.balance_batches, config.train.total_steps)
    if not count:
        return np.ones(len(em.OUTPUT_COLUMNS), np.float32)
    data = config.data.copy_and_resolve_references()
    data.num_workers = 0
    batches = iter(make_dataset(data, config.model.gaze_scale))
    var = np.var(np.concatenate([next(batches)["targets"] for _ in range(count)]), axis=0)
    weights = 1.0 / np.maximum(var, 1e-4)
    return (weights / weights.mean()).astype(np.float32)


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
    """The expression-meter stage for the shared loop (the column weights computed here)."""
    path = config.data.path
    labels = schema.DatasetInfo.load(path).labels
    missing = [k for k in em.LABELS if k not in labels]
    if missing:
        raise ValueError(f"{path!r} lacks labels {missing} (it has {labels}): the "
                         "expression meter learns from them")
    weights = column_weights(config)
    logging.info("expression meter column weights %s",
                 dict(zip(em.OUTPUT_COLUMNS, np.round(weights, 3).tolist())))
    ran = config.copy_and_resolve_references()
    ran.loss.column_weights = tuple(float(w) for w in weights)
    blur = config.data.aug.blur
    lr_schedule = optim.learning_rate_schedule(config.optim, config.train.total_steps)

    def train_step(ts: TrainState, batch, rng, frozen):
        images = face_id.augment(batch["images"], rng, 0.0, blur)

        def loss_fn(net):
            pred = net(images)  # [3B, 4]
            return jnp.mean(jnp.square(pred - batch["targets"]) * frozen["column_weights"]), {}

        return loop.optimizer_step(ts.net, ts.opt, loss_fn, lr_schedule)

    return loop.Stage(
        create_state=lambda: TrainState(config),
        train_step=train_step,
        make_dataset=lambda index, n: make_dataset(config.data, config.model.gaze_scale,
                                                   index, n),
        batch_keys=BATCH_KEYS,
        frozen={"column_weights": weights},
        config=ran,
    )


def export(workdir: str, result: loop.TrainResult, seconds: float) -> None:
    """Evaluates the trained meter on the held-out split and writes the export."""
    config = result.config
    net = nnx.merge(result.graphdef, result.state).net
    cfg = model_config(config)
    metrics: dict[str, Any] = {}
    try:
        held_out = loaders.read_frames(config.data.path, "test", cfg.image_size,
                                       frames_per_clip=config.final_eval.frames_per_clip,
                                       max_clips=config.final_eval.max_clips)
    except FileNotFoundError:
        logging.warning("expression meter: %s has no test split; no held-out evaluation",
                        config.data.path)
    else:
        metrics.update(em.evaluate(net, cfg, held_out.images, held_out.labels))
        logging.info("expression meter held-out: %s", metrics)
    em.save_expression_meter(workdir, net, cfg, {
        "train": {"steps": result.step, "data": os.path.abspath(config.data.path),
                  "seconds": seconds, "config": loop.config_json(config)},
        "history": loop.logged_history(workdir, {"loss": "loss/total"}, result.step),
        "metrics": metrics,
        "output_columns": list(em.OUTPUT_COLUMNS),
    })


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       compiler_options=None) -> loop.TrainResult:
    """Trains the meter in `workdir` (resuming from its latest checkpoint, if any); a
    finished run ends with its held-out metrics and export (loop.train_and_export)."""
    return loop.train_and_export(
        config, workdir, make_stage,
        meta_file=em.CONFIG_FILE, params_dir=em.PARAMS_DIR,
        export=lambda result, seconds: export(workdir, result, seconds),
        compiler_options=compiler_options)
