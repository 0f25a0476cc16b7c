"""Metrics of generated motion sequences (VASA-1 sec 4, stage 2): lip sync, pose jitter,
control errors and diversity, measured through linear probes of the motion vectors.

The generated sequences are motion latents x = [z_pose, z_dyn] (or, with SynthTalk's
motion_source="labels", the 13 ground-truth labels themselves). What we compare with the
ground truth are the quantities they should carry: mouth opening, head pose angles, gaze
direction and head distance. `MotionProbes` reads them off motion vectors with closed-form
ridge regressions (`vasa_jax.metrics.probes`) fitted on ground-truth (motion, label) pairs
of training clips; the same probes decode the ground-truth motion of the evaluated clips
(how much the probe itself loses) and the generated motion.

    pearson_r            Pearson correlation of two sequences (the lip-sync proxy:
                         probe mouth opening of generated motion vs the true mouth opening)
    pose_jitter_dp       the paper's dP: mean |adjacent-frame difference| of head pose
                         angles (degrees), pooled over sequences
    gaze_vector          (theta, phi) degrees -> unit direction (SynthTalk's convention)
    angular_error_deg    angle (degrees) between gaze directions: the gaze-control error E_g
    distance_error       |difference| of normalised head distances: E_d
    diversity            spread across sampling seeds, relative to the ground truth's spread
    window_slices        the generation windows of a sequence (starts 0, W, 2W, ...)

Everything is numpy float64 (host-side, small).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from vasa_jax.metrics import probes

# ----------------------------------------------------------------------------- sequences


def pearson_r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally long sequences (flattened): float in [-1, 1].

    a, b: [N] (or any shape with N elements each). NaN if either is constant or N < 2.
    """
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"pearson_r: {a.size} vs {b.size} values")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("pearson_r: non-finite values")
    if a.size < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt(np.sum(a * a) * np.sum(b * b))
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-300)
    if denom <= (1e-12 * scale) ** 2 * a.size:
        return float("nan")
    return float(np.clip(np.sum(a * b) / denom, -1.0, 1.0))


def _sequences(x: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(x, np.ndarray):
        return [x]
    return [np.asarray(s) for s in x]


def pose_jitter_dp(pose_deg: np.ndarray | Sequence[np.ndarray]) -> float:
    """dP: mean absolute difference of head pose angles between adjacent frames (degrees).

    pose_deg: [T, >= 3] with yaw, pitch, roll (degrees) in the first three columns (e.g. the
    `pose` label [T, 6]; the translations are ignored), or a sequence of such arrays (one
    per clip). The mean runs over the three angles and over every adjacent pair of frames
    WITHIN a sequence, pooled (a clip with more frames weighs more). VASA-1 Table 1 reports
    it per frame at 25 fps (real VoxCeleb2 video: 0.505). NaN if no sequence has 2 frames.
    """
    total, count = 0.0, 0
    for p in _sequences(pose_deg):
        p = np.asarray(p, np.float64)
        if p.ndim != 2 or p.shape[1] < 3:
            raise ValueError(f"pose must be [T, >=3] (yaw, pitch, roll first), got {p.shape}")
        d = np.abs(np.diff(p[:, :3], axis=0))
        total += float(d.sum())
        count += d.size
    return total / count if count else float("nan")


def window_slices(num_frames: int, window: int) -> list[slice]:
    """Frames of each generation window: [0, W), [W, 2W), ..., the last possibly shorter."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return [slice(s, min(s + window, num_frames)) for s in range(0, num_frames, window)]


# ----------------------------------------------------------------------------- controls


def gaze_vector(gaze_deg: np.ndarray) -> np.ndarray:
    """Gaze angles [..., 2] (theta = up, phi = image right; degrees) -> unit vectors [..., 3].

    The convention of SynthTalk's renderer (`data_pipeline.synthtalk.render.gaze_vector`):
    (0, 0) looks into the camera, along -z.
    """
    g = np.radians(np.asarray(gaze_deg, np.float64))
    if g.shape[-1:] != (2,):
        raise ValueError(f"gaze must be [..., 2] (theta, phi), got {g.shape}")
    t, p = g[..., 0], g[..., 1]
    return np.stack([np.cos(t) * np.sin(p), np.sin(t), -np.cos(t) * np.cos(p)], -1)


def angular_error_deg(pred_gaze: np.ndarray, target_gaze: np.ndarray) -> np.ndarray:
    """Angle between gaze directions, degrees: [N, 2] x ([N, 2] or [2]) -> [N] (or scalar
    for [2] x [2]).

    The angle between the two unit direction vectors (`gaze_vector`), not the difference of
    the angles: it is the same for every direction (a 10-degree miss near the pole of the
    (theta, phi) chart is still 10 degrees) and never exceeds 180. Computed with atan2 of
    |u x v| and u . v (accurate for small angles).
    """
    u, v = gaze_vector(pred_gaze), gaze_vector(target_gaze)
    u, v = np.broadcast_arrays(u, v)
    cross = np.linalg.norm(np.cross(u, v), axis=-1)
    return np.degrees(np.arctan2(cross, np.sum(u * v, axis=-1)))


def distance_error(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """|pred - target| of head-to-camera distances (the dataset's normalised units).

    pred, target: broadcastable ([N] and [N] or a scalar) -> [N].
    """
    return np.abs(np.asarray(pred, np.float64) - np.asarray(target, np.float64))


def diversity(samples: np.ndarray, reference_std: np.ndarray | None = None) -> float:
    """How much sampled sequences of the same input differ across seeds.

    samples: [S >= 2, T, D], S sequences generated from the same audio and controls with
    different seeds. Per frame and dimension: the standard deviation over the S samples
    (ddof 0); divided by `reference_std` [D] (e.g. the per-dimension std of ground-truth
    motion over the evaluated frames) when given, so every dimension counts on the scale
    of its natural variation; then averaged over frames and dimensions. Dimensions whose
    reference std is ~0 are left out. 0 = every seed gives the same motion; ~1 = seeds
    differ about as much as unrelated ground-truth frames.
    """
    x = np.asarray(samples, np.float64)
    if x.ndim != 3 or x.shape[0] < 2:
        raise ValueError(f"samples must be [S >= 2, T, D], got {x.shape}")
    spread = x.std(axis=0)  # [T, D]
    if reference_std is None:
        return float(spread.mean())
    ref = np.asarray(reference_std, np.float64)
    if ref.shape != (x.shape[2],):
        raise ValueError(f"reference_std must be [D={x.shape[2]}], got {ref.shape}")
    keep = ref > 1e-8 * max(float(np.abs(ref).max(initial=0.0)), 1.0)
    if not keep.any():
        raise ValueError("reference_std is zero in every dimension")
    return float((spread[:, keep] / ref[keep]).mean())


# ----------------------------------------------------------------------------- probes

# Probe target -> (names of its columns). What each is read from in a clip's labels:
# mouth_open [T], pose[:, :3] (yaw, pitch, roll degrees), gaze [T, 2] degrees, distance [T].
PROBE_TARGETS: dict[str, tuple[str, ...]] = {
    "mouth_open": ("mouth_open",),
    "pose": ("yaw", "pitch", "roll"),
    "gaze": ("theta", "phi"),
    "distance": ("distance",),
}


def probe_targets(labels: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The `PROBE_TARGETS` a clip's labels provide: name -> float64 [T, k].

    labels: `schema.Clip.labels` (mouth_open [T], pose [T, 6], gaze [T, 2], distance [T]);
    absent labels are absent from the result.
    """
    out = {}
    for name, cols in PROBE_TARGETS.items():
        if name not in labels:
            continue
        y = np.asarray(labels[name], np.float64).reshape(len(labels[name]), -1)
        out[name] = y[:, : len(cols)]
    return out


@dataclasses.dataclass(frozen=True)
class MotionProbes:
    """Linear read-outs of labels from motion vectors: name -> ridge model [Dm] -> [k].

    models: the fitted probes (`probes.RidgeModel`); r2: their R^2 per target on held-out
    samples (`probes.ProbeResult.to_json()`: r2_mean, r2 per column, num_train, num_test,
    alpha), or from grouped k-fold cross-validation on the training samples when no
    held-out samples were given. motion_dim: Dm.
    """

    models: dict[str, probes.RidgeModel]
    r2: dict[str, dict]
    motion_dim: int

    @classmethod
    def fit(
        cls, motion: np.ndarray, targets: Mapping[str, np.ndarray], groups: np.ndarray, *,
        test_motion: np.ndarray | None = None,
        test_targets: Mapping[str, np.ndarray] | None = None,
        alphas: Sequence[float] = probes.DEFAULT_ALPHAS, folds: int = 5,
    ) -> "MotionProbes":
        """Fits one ridge probe per target.

        motion: [N, Dm] ground-truth motion vectors of training frames; targets: name ->
        [N, k] (`probe_targets`; names from `PROBE_TARGETS`); groups: [N] the clip of each
        frame (alpha is chosen by cross-validation over clips, and, without test data, R^2
        is the pooled out-of-fold R^2 over clip folds). test_motion [M, Dm] / test_targets
        name -> [M, k]: held-out frames for R^2 (targets missing there are cross-validated).
        """
        motion = np.asarray(motion, np.float64)
        if motion.ndim != 2:
            raise ValueError(f"motion must be [N, Dm], got {motion.shape}")
        groups = np.asarray(groups)
        if groups.shape != (len(motion),):
            raise ValueError(f"groups must be [N={len(motion)}], got {groups.shape}")
        unknown = sorted(set(targets) - set(PROBE_TARGETS))
        if unknown:
            raise ValueError(f"unknown probe targets {unknown}; known: {list(PROBE_TARGETS)}")
        if not targets:
            raise ValueError("no probe targets given")
        models, r2 = {}, {}
        for name, y in targets.items():
            y = np.asarray(y, np.float64).reshape(len(y), -1)
            if len(y) != len(motion):
                raise ValueError(f"target {name!r} has {len(y)} rows, motion {len(motion)}")
            names = PROBE_TARGETS[name][: y.shape[1]]
            models[name] = probes.fit_ridge(motion, y, alphas, groups=groups, folds=folds)
            if test_targets is not None and name in test_targets and test_motion is not None:
                yt = np.asarray(test_targets[name], np.float64).reshape(len(test_targets[name]),
                                                                         -1)
                score = probes.r2_score(yt, models[name].predict(test_motion))
                res = probes.ProbeResult(tuple(float(v) for v in score), names, len(y), len(yt),
                                         models[name].alpha)
            elif len(np.unique(groups)) >= 2:
                res = probes.kfold_probe(motion, y, groups, k=folds, names=names, alphas=alphas)
            else:
                res = None
            r2[name] = res.to_json() if res is not None else {"r2_mean": None, "r2": {},
                                                              "num_train": len(y), "num_test": 0,
                                                              "alpha": models[name].alpha}
        return cls(models, r2, int(motion.shape[1]))

    def predict(self, motion: np.ndarray, name: str) -> np.ndarray:
        """Probe `name` on motion vectors [T, Dm] -> [T, k] (float64)."""
        if name not in self.models:
            raise KeyError(f"no {name!r} probe; fitted: {sorted(self.models)}")
        motion = np.asarray(motion)
        if motion.ndim != 2 or motion.shape[1] != self.motion_dim:
            raise ValueError(f"motion must be [T, {self.motion_dim}], got {motion.shape}")
        return self.models[name].predict(motion)

    def decode(self, motion: np.ndarray) -> dict[str, np.ndarray]:
        """Every probe on motion [T, Dm]: name -> [T, k]."""
        return {name: self.predict(motion, name) for name in self.models}


__all__ = [
    "MotionProbes", "PROBE_TARGETS", "angular_error_deg", "distance_error", "diversity",
    "gaze_vector", "pearson_r", "pose_jitter_dp", "probe_targets", "window_slices",
]
