"""Pre-training of E_mtn's head-pose net on pose labels (MegaPortraits pre-trains its pose
estimator), for the stage-1 model to start from.

Why: trained only through the 3-D warp, which end of the volume's learnt depth axis faces
the camera is arbitrary, and with it the signs of yaw and pitch; a pose loss on labels then
fights the reconstruction. Started from a net that already reads pose in the labels'
convention (vasa_jax.models.warping.angles_from_labels), the volume forms in that
convention. The net is the stage-1 config's own pose encoder (same architecture, so its
parameters drop into `motion_encoder.pose_net`):

    images [B, S, S, 3] -> MotionEncoder.pose -> z_pose [B, 7]
    loss = L1(yaw, pitch, roll; label angles in radians)
         + L1(tx, ty, tz, log scale; framing)    warping.framing_from_labels: where the
               head is and how large, from the translation and distance labels, moved with
               the loader's scale/shift jitter; 0 (the identity framing) when the dataset
               has no `distance` labels or camera (dataset.json extra.camera.half_extent)
         + L1(landmarks; eye / mouth box centres)     with model.motion.glimpse_widths

Frames come from the stage-1 loader (source, driving and cross frames: three labelled
faces per example, with its scale/shift/colour jitter), optionally turned in the image
plane (--rotate_deg, `rotate_batch`: the angle, framing and landmark targets turn with
them; without it, a corpus with few distinct roll trajectories has its roll learnt by
heart). Held-out evaluation: R^2 of each angle (and of tx, ty, scale with framing labels)
on the test split's frames (other clips of the training identities).

    python -m vasa_jax.models.face_pose train --config configs/face_latent.py:size=tiny \\
        --data DIR --out OUT [--steps N] [--batch_size B] [--lr LR] [--rotate_deg D]
        [--set FIELD=VALUE]

writes OUT/params (the pose net's parameters, `vasa_jax.checkpointing.export_params`) and
OUT/face_pose.json (the model config's motion section, settings, metrics). Stage 1 uses it
with --config.model.motion.pretrained_pose=OUT.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from vasa_jax import cli, optim
from vasa_jax.models import face_encoders, warping

PARAMS_DIR = "params"
CONFIG_FILE = "face_pose.json"
# The model config fields that fix the pose net's parameter shapes.
ARCH_FIELDS = ("input_size", "stem", "channels", "blocks", "pool")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int = 2000
    batch_size: int = 12  # stage-1 examples per step; each gives 3 labelled faces
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    seed: int = 0
    num_workers: int = 2  # grain worker processes (0: read in this process)
    log_every: int = 100
    eval_frames_per_clip: int = 16
    eval_max_clips: int = 2000
    # In-plane rotation augmentation: each training image turns by an angle drawn uniformly
    # in [-rotate_deg, rotate_deg] degrees (`rotate_batch`); 0 = off.
    rotate_deg: float = 0.0


def _arch(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    m = model_cfg.motion
    out = {k: m[k] for k in ARCH_FIELDS}
    out.update(channels=list(m.channels), blocks=list(m.blocks),
               image_size=int(model_cfg.image_size), groups=int(model_cfg.groups))
    if m.get("glimpse_widths"):  # the net also locates the glimpse regions
        out["landmarks"] = list(GLIMPSE_BOXES)
    return out


# The box labels (schema.BOX_LABELS) whose centres are the landmark targets, in the order
# of face_encoders.GLIMPSE_REGIONS.
GLIMPSE_BOXES = tuple(f"{region}_box" for region in face_encoders.GLIMPSE_REGIONS)


def box_centres(labels: Any) -> jax.Array:
    """{name: boxes [B, 4] (x0, y0, x1, y1)} -> centres [B, R, 2] of GLIMPSE_BOXES."""
    boxes = jnp.stack([jnp.asarray(labels[name]) for name in GLIMPSE_BOXES], axis=1)
    return 0.5 * (boxes[..., :2] + boxes[..., 2:])


def rotate_batch(images: np.ndarray, pose_labels: np.ndarray, centres: np.ndarray,
                 framing: np.ndarray | None, angles_deg: np.ndarray,
                 framing_origin: np.ndarray | None = None):
    """In-plane rotation augmentation: each image turned counter-clockwise (as seen) by its
    angle about the image centre, and the labels the pose net learns moved with it.

    Args:
      images: [B, S, S, C] float; bilinear, reflected borders (as the loader's jitter).
      pose_labels: [B, 6] (data_pipeline.schema: yaw, pitch, roll in degrees, tx, ty, tz).
      centres: [B, R, 2] box centres in [0, 1] image coordinates (x right, y down).
      framing: [B, 4] warping.framing_from_labels targets (tx, ty, tz, scale), or None.
      angles_deg: [B] turns in degrees; + is counter-clockwise in the image, which is + roll.
      framing_origin: [B, 2] where framing's (tx, ty) = (0, 0) is in the image, in its
        units (normalised [-1, 1], y down, from the image centre); None = the centre.
        framing_from_labels measures from the principal point, which the loader's zoom
        moves: zoom * (0, camera center_y / half_extent).

    Returns (images, pose_labels, centres, framing), the same shapes.

    A turn about the optical axis is exactly a rotation Rz(a) of the scene about the
    camera's z axis. The renderer applies roll first (R = Ry Rx Rz(roll), in the head
    frame), not last about the camera axis, so Rz(a) R is a pure roll change only at yaw =
    pitch = 0: the label angles are the exact Euler angles of Rz(a) R (at yaw 20, pitch 8,
    a 10 degree turn gives yaw 18.4, pitch 11.3, roll 9.6). The image turns about its
    centre, not the principal point (SynthTalk's "face" framing puts it ~7 px above the
    centre at 64 px): the difference is a shift of the image, like the loader's shift
    jitter (a camera pan of < 0.5 degrees for |a| <= 15), which moves the head: the framing
    targets follow it. The labels' tx, ty, tz are returned as they are (the translation the
    net learns is `framing`'s).
    """
    a = np.radians(np.asarray(angles_deg, np.float64))
    cos, sin = np.cos(a), np.sin(a)
    # Points in y-down image coordinates, (dx, dy) from the centre -> as seen turned by +a.
    turn = np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], -2)  # [B, 2, 2]
    size = images.shape[1]
    out = np.empty_like(images)
    for i, img in enumerate(images):
        m = cv2.getRotationMatrix2D(((size - 1) / 2.0, (size - 1) / 2.0), float(angles_deg[i]),
                                    1.0)  # + is counter-clockwise (y points down)
        out[i] = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REFLECT_101).reshape(img.shape)
    # The labels' Euler convention is SynthTalk's (dataset.json extra.camera.rotation).
    from data_pipeline.synthtalk.render import matrix_to_pose, rotation_matrix

    rz = np.zeros((len(a), 3, 3))
    rz[:, :2, :2] = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    rz[:, 2, 2] = 1.0  # Rz(a) on camera (x right, y up, z away): + turns counter-clockwise
    angles = [matrix_to_pose(r @ rotation_matrix(*map(float, p[:3])))
              for r, p in zip(rz, pose_labels)]
    pose = np.concatenate([angles, pose_labels[:, 3:]], -1).astype(pose_labels.dtype)
    centres = np.clip(0.5 + np.einsum("bij,brj->bri", turn, centres - 0.5), 0.0, 1.0)
    if framing is not None:
        framing = np.asarray(framing)
        origin = 0.0 if framing_origin is None else np.asarray(framing_origin, np.float64)
        t = np.einsum("bij,bj->bi", turn, framing[:, :2] + origin) - origin
        framing = np.concatenate([t, framing[:, 2:]], -1).astype(framing.dtype)
    return out, pose, centres.astype(np.float32), framing


def _r2(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-column coefficient of determination of [N, K] predictions -> [K]."""
    ss_res = np.sum((target - pred) ** 2, axis=0)
    ss_tot = np.sum((target - target.mean(axis=0)) ** 2, axis=0)
    return 1.0 - ss_res / np.maximum(ss_tot, 1e-12)


def angle_r2(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Per-angle coefficient of determination: [N, 3] x 2 -> {yaw, pitch, roll, mean}."""
    r2 = _r2(pred, target)
    out = {name: float(v) for name, v in zip(warping.POSE_FIELDS[:3], r2)}
    out["mean"] = float(np.mean(r2))
    return out


def framing_r2(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """R^2 of tx, ty and log scale: z_pose [N, 7] x framing targets [N, 4] -> dict."""
    p = np.concatenate([pred[:, 3:5], np.log(pred[:, 6:7])], axis=1)
    t = np.concatenate([target[:, :2], np.log(target[:, 3:4])], axis=1)
    return {name: float(v) for name, v in zip(("tx", "ty", "scale"), _r2(p, t))}


def camera_half_extent(info: Any) -> float | None:
    """A dataset's frame half-side in head radii at its nominal distance (what
    warping.framing_from_labels needs), if its dataset.json records the camera and its
    labels hold `pose` and `distance`; else None."""
    half = info.extra.get("camera", {}).get("half_extent")
    return float(half) if half and {"pose", "distance"} <= set(info.labels) else None


def pose_loss(z_pose: jax.Array, pose_labels: jax.Array,
              framing: jax.Array | None = None) -> jax.Array:
    """z_pose [B, 7], label pose [B, >=3] (degrees), framing targets [B, 4] (tx, ty, tz,
    scale; None = the identity framing) -> scalar (see the module docstring)."""
    angles = jnp.mean(jnp.abs(z_pose[:, :3] - warping.angles_from_labels(pose_labels)))
    if framing is None:
        framing = warping.identity_pose(z_pose.shape[0])[:, 3:]
    shift = jnp.mean(jnp.abs(z_pose[:, 3:6] - framing[:, :3]))
    scale = jnp.mean(jnp.abs(jnp.log(z_pose[:, 6]) - jnp.log(framing[:, 3])))
    return angles + shift + scale


def predict(encoder, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """The pose net's bounded outputs [N, 7 + 2R] (z_pose, then the landmarks flattened) of
    images [N, S, S, 3], in fixed-size batches."""
    graphdef, state = nnx.split(encoder)

    def outputs(s, x):
        enc = nnx.merge(graphdef, s)
        z_pose, centres = enc.split_pose_output(enc.pose_net(x))
        return z_pose if centres is None else jnp.concatenate(
            [z_pose, centres.reshape(len(x), -1)], axis=1)

    fn = jax.jit(outputs)
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        pad = np.zeros((batch - len(x),) + x.shape[1:], x.dtype)
        out.append(np.asarray(fn(state, np.concatenate([x, pad])))[:len(x)])
    return np.concatenate(out)


def landmark_error(pred: np.ndarray, target: np.ndarray, size: int) -> dict[str, float]:
    """Mean distance in pixels of predicted to label landmarks: [N, R, 2] x 2 -> per region."""
    dist = np.linalg.norm((pred - target) * size, axis=-1).mean(axis=0)
    return {name: float(d) for name, d in zip(face_encoders.GLIMPSE_REGIONS, dist)}


def train(config: ml_collections.ConfigDict, data_dir: str, out_dir: str, *,
          settings: TrainSettings = TrainSettings()) -> dict[str, Any]:
    """Trains the pose net of `config.model` (a configs/face_latent.py config) on the pose
    labels of `data_dir`'s train split, evaluates it on the test split (if any) and saves
    it to `out_dir`. Returns the contents of face_pose.json."""
    from data_pipeline import loaders, schema
    from vasa_jax.checkpointing import export_params
    from vasa_jax.models.face_latent import motion_encoder

    if settings.steps < 1 or settings.batch_size < 1:
        raise ValueError(f"need steps >= 1 and batch_size >= 1, got steps={settings.steps}, "
                         f"batch_size={settings.batch_size}")
    if os.path.exists(os.path.join(out_dir, PARAMS_DIR)):
        raise FileExistsError(f"{out_dir} already holds a face-pose export")
    info = schema.DatasetInfo.load(data_dir)
    labels = info.labels
    half_extent = camera_half_extent(info)
    if half_extent is None:
        logging.warning("face-pose: %s records no camera half extent or `distance` labels: "
                        "translation and scale are trained to the identity framing", data_dir)
    if "pose" not in labels:
        raise ValueError(f"{data_dir!r} has no `pose` labels (it has {labels}): the pose net "
                         "learns from them")
    glimpses = bool(config.model.motion.get("glimpse_widths"))
    if glimpses and any(n not in labels for n in GLIMPSE_BOXES):
        raise ValueError(f"model.motion.glimpse_widths: the pose net learns to locate the "
                         f"glimpse regions from {GLIMPSE_BOXES} labels, but {data_dir!r} has "
                         f"{labels}")
    data_cfg = config.data.copy_and_resolve_references()
    data_cfg.unlock()
    data_cfg.update(path=data_dir, split="train", batch_size=settings.batch_size,
                    num_workers=settings.num_workers, seed=settings.seed)

    encoder = motion_encoder(config.model, rngs=nnx.Rngs(settings.seed))
    graphdef, params, rest = nnx.split(encoder.pose_net, nnx.Param, ...)
    schedule = optim.short_run_schedule(settings.lr, settings.warmup_steps, settings.steps)
    optimizer = optax.adamw(schedule, weight_decay=settings.weight_decay)
    opt_state = optimizer.init(params)

    def loss_fn(params, images, pose_labels, framing, centres):
        net = nnx.merge(graphdef, params, rest)
        z_pose, pred = encoder.split_pose_output(net(images))
        loss = pose_loss(z_pose, pose_labels, framing)
        return loss if pred is None else loss + jnp.mean(jnp.abs(pred - centres))

    @jax.jit
    def train_step(params, opt_state, images, pose_labels, framing, centres):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, pose_labels, framing,
                                                  centres)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    ds = loaders.stage1_dataset(data_cfg)
    rng = np.random.default_rng(settings.seed)  # the rotation augmentation's angles
    # framing_from_labels measures tx, ty from the principal point, which SynthTalk's
    # "face" framing puts above the image centre (camera center_y < 0; rotate_batch's
    # framing_origin).
    principal_y = (float(info.extra.get("camera", {}).get("center_y", 0.0)) / half_extent
                   if half_extent is not None else 0.0)
    start, history = time.perf_counter(), []
    for step, batch in zip(range(1, settings.steps + 1), iter(ds)):
        images = np.concatenate([batch["source"], batch["driving"], batch["cross"]])
        frame_labels = [batch["labels"][k] for k in ("source", "driving", "cross")]
        poses = np.concatenate([f["pose"] for f in frame_labels])
        centres = (np.concatenate([box_centres(f) for f in frame_labels]) if glimpses
                   else np.zeros((len(images), 0, 2), np.float32))
        framing = None
        if half_extent is not None:
            framing = warping.framing_from_labels(
                poses, np.concatenate([f["distance"] for f in frame_labels]), half_extent,
                np.concatenate([batch["jitter"][:, k] for k in range(3)]))
        if settings.rotate_deg > 0:
            zoom = np.concatenate([batch["jitter"][:, k, 0] for k in range(3)])
            images, poses, centres, framing = rotate_batch(
                images, poses, centres, framing,
                rng.uniform(-settings.rotate_deg, settings.rotate_deg, len(images)),
                zoom[:, None] * np.asarray([0.0, principal_y]))
        params, opt_state, loss = train_step(params, opt_state, images, poses, framing,
                                             centres)
        if step % settings.log_every == 0 or step == settings.steps:
            history.append({"step": step, "loss": float(loss)})
            logging.info("face-pose step %d/%d: loss %.4f (%.1f steps/s)", step, settings.steps,
                         float(loss), step / (time.perf_counter() - start))
    train_seconds = time.perf_counter() - start
    nnx.update(encoder.pose_net, params)

    metrics: dict[str, Any] = {}
    for split in ("test", "train"):
        try:
            frames = loaders.read_frames(data_dir, split, int(config.model.image_size),
                                         frames_per_clip=settings.eval_frames_per_clip,
                                         max_clips=settings.eval_max_clips)
        except FileNotFoundError:
            logging.warning("face-pose: %s has no %s split", data_dir, split)
            continue
        target = np.asarray(warping.angles_from_labels(jnp.asarray(frames.labels["pose"])))
        out = predict(encoder, frames.images)
        metrics[f"{split}_r2"] = angle_r2(out[:, :3], target)
        if half_extent is not None:
            metrics[f"{split}_framing_r2"] = framing_r2(out, np.asarray(
                warping.framing_from_labels(jnp.asarray(frames.labels["pose"]),
                                            frames.labels["distance"], half_extent)))
        if glimpses:
            pred = out[:, warping.POSE_DIM:].reshape(len(out), -1, 2)
            metrics[f"{split}_landmark_px"] = landmark_error(
                pred, np.asarray(box_centres(frames.labels)), int(config.model.image_size))
    logging.info("face-pose R^2: %s", metrics)
    meta = {
        "arch": _arch(config.model),
        "train": {**dataclasses.asdict(settings), "data": os.path.abspath(data_dir),
                  "seconds": train_seconds},
        "history": history,
        "metrics": metrics,
    }
    os.makedirs(out_dir, exist_ok=True)
    export_params(os.path.join(out_dir, PARAMS_DIR), nnx.state(encoder.pose_net, nnx.Param))
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return meta


def load_pose_params(path: str, model_cfg: ml_collections.ConfigDict) -> nnx.State:
    """The pose-net parameters of a `train` export, as host (numpy) arrays, checked against
    the model config they are loaded into (an architecture mismatch is a clear error)."""
    from vasa_jax.checkpointing import load_params
    from vasa_jax.models.face_latent import motion_encoder

    meta_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"{meta_path} not found: pre-train the pose net with `python -m "
            "vasa_jax.models.face_pose train --config CONFIG --data DIR --out PATH`")
    with open(meta_path) as f:
        meta = json.load(f)
    want = _arch(model_cfg)
    if meta["arch"] != want:
        diff = {k: (meta["arch"].get(k), v) for k, v in want.items() if meta["arch"].get(k) != v}
        raise ValueError(f"pose net export {path} does not fit model.motion: (export, config) "
                         f"differ in {diff}")
    abstract = nnx.eval_shape(lambda: motion_encoder(model_cfg, rngs=nnx.Rngs(0)))
    target = nnx.state(abstract.pose_net, nnx.Param)
    params = load_params(os.path.join(path, PARAMS_DIR), target=target)
    logging.info("pose net from %s (held-out R^2 %s)", path,
                 meta.get("metrics", {}).get("test_r2"))
    return jax.tree.map(np.asarray, params)


def main(argv: Sequence[str] | None = None) -> int:
    import configs

    parser = cli.ArgumentParser(prog="python -m vasa_jax.models.face_pose",
                                description="Pre-train stage 1's head-pose net on labels.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train on a clip-record dataset's pose labels")
    p.add_argument("--config", default="configs/face_latent.py:size=tiny",
                   help="the stage-1 config whose pose net is trained")
    p.add_argument("--data", required=True, help="clip-record dataset folder")
    p.add_argument("--out", required=True, help="output folder (params + face_pose.json)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. model.motion.glimpse_widths=(0.65,0.4)")
    names = ("steps", "batch_size", "lr", "seed", "num_workers", "log_every", "rotate_deg")
    for name in names:
        default = getattr(TrainSettings, name)
        p.add_argument(f"--{name}", type=type(default), default=default)
    args = parser.parse_args(argv)

    def run() -> dict[str, Any]:
        cli.check_output(args.out, "--out folder")  # before training, not after
        config = configs.load(args.config, **configs.parse_overrides(args.set))
        settings = TrainSettings(**{k: getattr(args, k) for k in names})
        return train(config, args.data, args.out, settings=settings)

    return cli.run_training(run)


if __name__ == "__main__":
    cli.run_main(main)
