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

Training (vasa_jax.trainers.face_pose, a stage of the shared loop): frames come from the
stage-1 loader (source, driving and cross frames: three labelled faces per example, with
its scale/shift/colour jitter), optionally turned in the image plane
(data.aug.rotate_deg, `rotate_batch`: the angle, framing and landmark targets turn with
them; without it, a corpus with few distinct roll trajectories has its roll learnt by
heart). Held-out evaluation: R^2 of each angle (and of tx, ty, scale with framing labels)
on the test split's frames (other clips of the training identities).

    python train.py --config configs/face_pose.py:size=tiny --workdir OUT \\
        --config.data.path=DIR [--config.data.aug.rotate_deg=D] \\
        [--config.model.motion.glimpse_widths="(0.65,0.4)"]

ends by writing OUT/params (the pose net's parameters, `vasa_jax.checkpointing
.export_params`) and OUT/face_pose.json (the model config's pose-net fields, the run's
config, metrics; `save_pose_params`) next to its checkpoints. Stage 1 uses it with
--config.model.motion.pretrained_pose=OUT.
"""

from __future__ import annotations

import json
import os
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from vasa_jax.models import face_encoders, warping

PARAMS_DIR = "params"
CONFIG_FILE = "face_pose.json"
# The model config fields that fix the pose net's parameter shapes.
ARCH_FIELDS = ("input_size", "stem", "channels", "blocks", "pool")


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


def evaluate(encoder, images: np.ndarray, labels: dict[str, np.ndarray],
             half_extent: float | None) -> dict[str, Any]:
    """Metrics of the pose net of `encoder` (a MotionEncoder) on frames [N, S, S, 3] with
    their labels {pose [N, 6], distance [N], *_box [N, 4]}: {"r2": angle_r2,
    "framing_r2": framing_r2 (only with a camera half extent), "landmark_px":
    landmark_error (only when the net locates the glimpse regions)}."""
    target = np.asarray(warping.angles_from_labels(jnp.asarray(labels["pose"])))
    out = predict(encoder, images)
    metrics: dict[str, Any] = {"r2": angle_r2(out[:, :3], target)}
    if half_extent is not None:
        metrics["framing_r2"] = framing_r2(out, np.asarray(warping.framing_from_labels(
            jnp.asarray(labels["pose"]), labels["distance"], half_extent)))
    if encoder.glimpse_widths:
        pred = out[:, warping.POSE_DIM:].reshape(len(out), -1, 2)
        metrics["landmark_px"] = landmark_error(pred, np.asarray(box_centres(labels)),
                                                images.shape[1])
    return metrics


def save_pose_params(path: str, pose_net: nnx.Module, model_cfg: ml_collections.ConfigDict,
                     extra: dict | None = None) -> None:
    """Writes PATH/params (the pose net's nnx.Params, export_params) and PATH/face_pose.json
    ({"arch": the model config's pose-net fields, ...extra}): what `load_pose_params` reads."""
    from vasa_jax.checkpointing import export_module  # orbax stays out of plain imports

    export_module(path, pose_net, PARAMS_DIR, CONFIG_FILE,
                  {"arch": _arch(model_cfg), **(extra or {})})


def load_pose_params(path: str, model_cfg: ml_collections.ConfigDict) -> nnx.State:
    """The pose-net parameters of a `train` export, as host (numpy) arrays, checked against
    the model config they are loaded into (an architecture mismatch is a clear error)."""
    from vasa_jax.checkpointing import load_params
    from vasa_jax.models.face_latent import motion_encoder

    meta_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"{meta_path} not found: pre-train the pose net with `python train.py --config "
            "configs/face_pose.py:size=tiny --workdir PATH --config.data.path=DIR`")
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
