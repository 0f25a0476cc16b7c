"""Pre-trains stage 1's head-pose net on pose labels (vasa_jax.models.face_pose) in the
shared loop.

    python train.py --config configs/face_pose.py:size=tiny --workdir runs/pose \
        --config.data.path=data/synthtalk

A batch of B stage-1 examples (`data_pipeline.loaders.stage1_dataset`) is 3B labelled faces
(source, driving, cross). Their targets are made on the host (`PoseBatch`): the label pose,
the framing (warping.framing_from_labels with the loader's jitter, or the identity framing
without a camera) and the glimpse-box centres, all turned with the images by
data.aug.rotate_deg (face_pose.rotate_batch). One jitted step: the pose net, the L1 pose
loss (face_pose.pose_loss) plus the landmark L1 when the net locates the glimpses, AdamW.

At the end (single process) the held-out R^2 on the test and train splits' frames, and the
params-only export into the workdir: <workdir>/params + face_pose.json, what
`load_pose_params(<workdir>, model config)` and stage 1's
--config.model.motion.pretrained_pose=<workdir> read.

Logged: loss/total, loss/pose, loss/landmarks (with glimpses), grad_norm, lr.
"""

from __future__ import annotations

import functools
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
from vasa_jax.models import face_pose, warping
from vasa_jax.models.face_latent import motion_encoder
from vasa_jax.trainers import loop

BATCH_KEYS = ("images", "pose", "framing", "centres")
PROGRESS_KEYS = ("loss/total", "loss/pose", "loss/landmarks")


class TrainState(nnx.Module):
    """The pose net of the stage-1 model config's E_mtn and its optimizer."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.pose_net = motion_encoder(config.model, rngs=nnx.Rngs(config.seed)).pose_net
        self.opt = nnx.Optimizer(
            self.pose_net, optim.build_optimizer(config.optim, config.train.total_steps),
            wrt=nnx.Param)


def dataset_facts(config: ml_collections.ConfigDict) -> tuple[float | None, float]:
    """(camera half extent or None, the principal point's y in normalised image units) of
    config.data.path; raises when it lacks the labels the pose net learns from."""
    path = config.data.path
    info = schema.DatasetInfo.load(path)
    if "pose" not in info.labels:
        raise ValueError(f"{path!r} has no `pose` labels (it has {info.labels}): the pose net "
                         "learns from them")
    if config.model.motion.glimpse_widths:
        missing = [n for n in face_pose.GLIMPSE_BOXES if n not in info.labels]
        if missing:
            raise ValueError(f"model.motion.glimpse_widths: the pose net learns to locate the "
                             f"glimpse regions from {list(face_pose.GLIMPSE_BOXES)} labels, but "
                             f"{path!r} has {info.labels}")
    half_extent = face_pose.camera_half_extent(info)
    if half_extent is None:
        logging.warning("face-pose: %s records no camera half extent or `distance` labels: "
                        "translation and scale are trained to the identity framing", path)
        return None, 0.0
    # framing_from_labels measures tx, ty from the principal point, which SynthTalk's "face"
    # framing puts above the image centre (camera center_y < 0; rotate_batch's origin).
    return half_extent, float(info.extra.get("camera", {}).get("center_y", 0.0)) / half_extent


class PoseBatch(grain.transforms.RandomMap):
    """A stage-1 batch of B examples -> the 3B faces and their targets (R glimpse regions,
    0 without glimpses):

      images [3B, S, S, 3], pose [3B, 6] (label units: degrees, ...), framing [3B, 4]
      (tx, ty, tz, scale), centres [3B, R, 2] (box centres in [0, 1]), num_skipped.
    """

    def __init__(self, half_extent: float | None, principal_y: float, glimpses: bool,
                 rotate_deg: float):
        self.half_extent = half_extent
        self.principal_y = principal_y
        self.glimpses = glimpses
        self.rotate_deg = rotate_deg

    def random_map(self, batch: dict, rng: np.random.Generator) -> dict:
        parts = ("source", "driving", "cross")
        frame_labels = [batch["labels"][p] for p in parts]
        images = np.concatenate([batch[p] for p in parts])
        n = len(images)
        pose = np.concatenate([f["pose"] for f in frame_labels])
        jitter = np.concatenate([batch["jitter"][:, k] for k in range(3)])  # [3B, 3]
        centres = (np.concatenate([np.asarray(face_pose.box_centres(f)) for f in frame_labels])
                   if self.glimpses else np.zeros((n, 0, 2), np.float32))
        if self.half_extent is None:
            framing = np.asarray(warping.identity_pose(n)[:, 3:])
        else:
            framing = np.asarray(warping.framing_from_labels(
                pose, np.concatenate([f["distance"] for f in frame_labels]), self.half_extent,
                jitter))
        if self.rotate_deg > 0:
            images, pose, centres, rotated = face_pose.rotate_batch(
                images, pose, centres, None if self.half_extent is None else framing,
                rng.uniform(-self.rotate_deg, self.rotate_deg, n),
                jitter[:, :1] * np.asarray([0.0, self.principal_y]))
            framing = framing if rotated is None else rotated
        return {"images": images, "pose": pose.astype(np.float32),
                "framing": framing.astype(np.float32), "centres": centres.astype(np.float32),
                "num_skipped": batch["num_skipped"]}


def make_dataset(config: ml_collections.ConfigDict, process_index: int, process_count: int):
    half_extent, principal_y = dataset_facts(config)
    transform = PoseBatch(half_extent, principal_y, bool(config.model.motion.glimpse_widths),
                          float(config.data.aug.rotate_deg))
    return loaders.stage1_dataset(config.data, process_index=process_index,
                                  process_count=process_count).random_map(
        transform, seed=config.data.seed)


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
    """The head-pose pre-training stage for the shared loop."""
    dataset_facts(config)  # the data's labels are checked before anything is compiled
    # The bounds of the raw outputs (Python attributes of E_mtn: no arrays are made).
    bounds = nnx.eval_shape(lambda: motion_encoder(config.model, rngs=nnx.Rngs(0)))
    lr_schedule = optim.learning_rate_schedule(config.optim, config.train.total_steps)

    def train_step(ts: TrainState, batch, rng, frozen):
        del rng, frozen
        def loss_fn(pose_net):
            raw = pose_net(batch["images"])  # [3B, 7 + 2R]
            z_pose, centres = bounds.split_pose_output(raw)
            terms = {"loss/pose": face_pose.pose_loss(z_pose, batch["pose"], batch["framing"])}
            if centres is not None:
                terms["loss/landmarks"] = jnp.mean(jnp.abs(centres - batch["centres"]))
            return sum(terms.values()), terms

        return loop.optimizer_step(ts.pose_net, ts.opt, loss_fn, lr_schedule)

    return loop.Stage(
        create_state=lambda: TrainState(config),
        train_step=train_step,
        make_dataset=functools.partial(make_dataset, config),
        batch_keys=BATCH_KEYS,
        progress_keys=PROGRESS_KEYS,
    )


def export(config: ml_collections.ConfigDict, workdir: str, result: loop.TrainResult,
           seconds: float) -> None:
    """Evaluates the trained pose net on the test and train splits and writes the export."""
    half_extent, _ = dataset_facts(config)
    encoder = motion_encoder(config.model, rngs=nnx.Rngs(0))
    nnx.update(encoder.pose_net, nnx.state(nnx.merge(result.graphdef, result.state).pose_net))
    metrics: dict[str, Any] = {}
    for split in ("test", "train"):
        try:
            frames = loaders.read_frames(config.data.path, split, int(config.model.image_size),
                                         frames_per_clip=config.final_eval.frames_per_clip,
                                         max_clips=config.final_eval.max_clips)
        except FileNotFoundError:
            logging.warning("face-pose: %s has no %s split", config.data.path, split)
            continue
        found = face_pose.evaluate(encoder, frames.images, frames.labels, half_extent)
        metrics.update({f"{split}_{k}": v for k, v in found.items()})
    logging.info("face-pose R^2: %s", metrics)
    face_pose.save_pose_params(workdir, encoder.pose_net, config.model, {
        "train": {"steps": result.step, "data": os.path.abspath(config.data.path),
                  "seconds": seconds, "config": loop.config_json(result.config)},
        "history": loop.logged_history(workdir, {"loss": "loss/total"}, result.step),
        "metrics": metrics,
    })


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       compiler_options=None) -> loop.TrainResult:
    """Trains the pose net in `workdir` (resuming from its latest checkpoint, if any); a
    finished run ends with its held-out metrics and export (loop.train_and_export)."""
    return loop.train_and_export(
        config, workdir, make_stage,
        meta_file=face_pose.CONFIG_FILE, params_dir=face_pose.PARAMS_DIR,
        export=lambda result, seconds: export(config, workdir, result, seconds),
        compiler_options=compiler_options)
