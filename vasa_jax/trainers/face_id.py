"""Trains the face-ID embedder (vasa_jax.models.face_id, for l_cross-id) with CosFace in
the shared loop.

    python train.py --config configs/face_id.py:size=tiny --workdir runs/face_id \
        --config.data.path=data/synthtalk

A batch of B stage-1 examples (`data_pipeline.loaders.stage1_dataset`, with the config's
stronger geometric jitter) is 3B labelled faces: images [3B, S, S, 3] and identities [3B]
(`FaceBatch`, on the host). S = data.image_size, or with 0 the side the centre crop needs
(ceil(model.image_size / model.crop), at most the stored frames'): the run's config records
it. One jitted step: random flips and 2x blur (face_id.augment), the classifier, the
CosFace loss, AdamW.

At the end (single process) the held-out identification metrics (face_id.evaluate: test
split against a gallery of train-split frames) and the params-only export into the
workdir: <workdir>/params + face_id.json, what `load_face_id(<workdir>)` and stage 1's
--config.loss.face_id_path=<workdir> read.

Logged: loss/total, accuracy (of the cosine head on the augmented batch), grad_norm, lr.
"""

from __future__ import annotations

import functools
import math
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
from vasa_jax.models import face_id
from vasa_jax.trainers import loop

BATCH_KEYS = ("images", "identity")
PROGRESS_KEYS = ("loss/total", "accuracy")


def model_config(config: ml_collections.ConfigDict, num_classes: int) -> face_id.FaceIDConfig:
    """The architecture of config.model for `num_classes` identities."""
    m = config.model
    return face_id.FaceIDConfig(
        num_classes=num_classes, image_size=m.image_size, crop=m.crop,
        channels=tuple(m.channels), embed_dim=m.embed_dim, groups=m.groups, scale=m.scale,
        margin=m.margin)


def resolve(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, int]:
    """(the config as run: data.image_size resolved, the number of identity classes) for
    config.data.path."""
    path = config.data.path
    info = schema.DatasetInfo.load(path)
    index = loaders.load_clip_index(path, config.data.split)
    num_classes = max(int(info.num_identities), int(index.identity_id.max()) + 1)
    ran = config.copy_and_resolve_references()
    if not ran.data.image_size:  # the side the centre crop needs, at most the stored one
        m = config.model
        ran.data.image_size = min(max(info.height, 8), int(math.ceil(m.image_size / m.crop)))
    return ran, num_classes


class TrainState(nnx.Module):
    """The classifier (embedder + CosFace head) and its optimizer."""

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
        self.model = face_id.FaceIDClassifier(model_config(config, num_classes),
                                              rngs=nnx.Rngs(config.seed))
        self.opt = nnx.Optimizer(
            self.model, optim.build_optimizer(config.optim, config.train.total_steps),
            wrt=nnx.Param)


class FaceBatch(grain.transforms.Map):
    """A stage-1 batch of B examples -> images [3B, S, S, 3], identity [3B] int32."""

    def map(self, batch: dict) -> dict:
        return {"images": np.concatenate([batch["source"], batch["driving"], batch["cross"]]),
                "identity": np.concatenate([batch["identity"], batch["identity"],
                                            batch["cross_identity"]]),
                "num_skipped": batch["num_skipped"]}


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
    """The face-ID stage for the shared loop."""
    ran, num_classes = resolve(config)
    cfg = model_config(ran, num_classes)
    aug = config.data.aug
    lr_schedule = optim.learning_rate_schedule(config.optim, config.train.total_steps)
    logging.info("face-ID: %d classes, frames read at %d px", num_classes,
                 ran.data.image_size)

    def train_step(ts: TrainState, batch, rng, frozen):
        del frozen
        images = face_id.augment(batch["images"], rng, aug.flip, aug.blur)
        labels = batch["identity"]

        def loss_fn(model):
            _, cos = model(images)  # [3B, classes]
            loss = face_id.cosface_loss(cos, labels, cfg.scale, cfg.margin)
            return loss, {"accuracy": jnp.mean(jnp.argmax(cos, -1) == labels)}

        return loop.optimizer_step(ts.model, ts.opt, loss_fn, lr_schedule)

    return loop.Stage(
        create_state=lambda: TrainState(ran, num_classes),
        train_step=train_step,
        make_dataset=lambda index, n: loaders.stage1_dataset(
            ran.data, process_index=index, process_count=n).map(FaceBatch()),
        batch_keys=BATCH_KEYS,
        progress_keys=PROGRESS_KEYS,
        config=ran,
    )


def export(workdir: str, result: loop.TrainResult, seconds: float) -> None:
    """Evaluates the trained classifier on the held-out split and writes the export."""
    config = result.config
    model = nnx.merge(result.graphdef, result.state).model
    cfg = model_config(config, model.head.weight.shape[1])
    read = functools.partial(loaders.read_frames, config.data.path,
                             size=int(config.data.image_size),
                             frames_per_clip=config.final_eval.frames_per_clip,
                             max_clips=config.final_eval.max_clips)
    metrics: dict[str, Any] = {"chance": 1.0 / cfg.num_classes}
    try:
        held_out = read(split="test")
    except FileNotFoundError:
        logging.warning("face-ID: %s has no test split; no held-out evaluation",
                        config.data.path)
    else:
        gallery = read(split="train")
        metrics.update(face_id.evaluate(model, held_out.images, held_out.identity,
                                        gallery.images, gallery.identity))
        logging.info("face-ID held-out: %s", metrics)
    face_id.save_face_id(workdir, model, cfg, {
        "train": {"steps": result.step, "data": os.path.abspath(config.data.path),
                  "load_size": int(config.data.image_size), "seconds": seconds,
                  "config": loop.config_json(config)},
        "history": loop.logged_history(
            workdir, {"loss": "loss/total", "train_accuracy": "accuracy"}, result.step),
        "metrics": metrics,
    })


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       compiler_options=None) -> loop.TrainResult:
    """Trains the face-ID net in `workdir` (resuming from its latest checkpoint, if any); a
    finished run ends with its held-out metrics and export (loop.train_and_export)."""
    return loop.train_and_export(
        config, workdir, make_stage,
        meta_file=face_id.CONFIG_FILE, params_dir=face_id.PARAMS_DIR,
        export=lambda result, seconds: export(workdir, result, seconds),
        compiler_options=compiler_options)
