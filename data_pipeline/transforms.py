"""Per-sample numpy ops used by the loaders and the inspection tool.

Images: resizing, scale/shift jitter and colour jitter on uint8 [H, W, 3] RGB.
Sequences: the ground-truth motion vector, training window starts, per-window control
signals (main gaze, distance, emotion) and the audio RMS envelope per video frame.

Everything here is pure numpy/OpenCV (no grain, no jax) so it runs in grain workers and is
unit-testable on its own.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import cv2
import numpy as np

from data_pipeline import schema

# ----------------------------------------------------------------------------- motion labels

# The ground-truth motion vector of SynthTalk clips (stage-2 motion_source="labels"):
# these labels, concatenated in this order along the last axis.
MOTION_LABELS: tuple[str, ...] = (
    "pose", "gaze", "blink", "brow", "mouth_open", "mouth_width", "mouth_round"
)
# Name of each of its dimensions (yaw..tz in degrees / head radii, gaze in degrees, rest 0..1).
MOTION_DIM_NAMES: tuple[str, ...] = schema.POSE_NAMES + (
    "gaze_theta", "gaze_phi", "blink", "brow", "mouth_open", "mouth_width", "mouth_round"
)
MOTION_LABEL_DIM = len(MOTION_DIM_NAMES)  # 13


def motion_from_labels(labels: Mapping[str, np.ndarray]) -> np.ndarray:
    """Ground-truth motion vectors: float32 [T, MOTION_LABEL_DIM] in `MOTION_DIM_NAMES` order."""
    missing = [k for k in MOTION_LABELS if k not in labels]
    if missing:
        raise KeyError(f"motion labels missing: {missing}")
    parts = [np.asarray(labels[k], np.float32).reshape(len(labels[k]), -1) for k in MOTION_LABELS]
    return np.concatenate(parts, axis=-1)


# ----------------------------------------------------------------------------- windows


def window_starts(num_frames: int, window: int, context: int) -> np.ndarray:
    """Training window starts of a clip: int64 [S], possibly empty.

    A window covers frames [s, s + W). Its context is the K frames before it, so a start is
    either 0 (the first window: no context, `has_pre` False) or >= K (full context).
    Starts in (0, K) would need a partial context, which inference never produces (its
    windows start at 0, W, 2W, ... and W >= K), so they are not sampled.
    """
    if num_frames < window:
        return np.zeros((0,), np.int64)
    full = np.arange(max(context, 1), num_frames - window + 1, dtype=np.int64)
    return np.concatenate([np.zeros((1,), np.int64), full])


def main_gaze(gaze: np.ndarray, bin_degrees: float = 5.0) -> np.ndarray:
    """Main gaze direction (theta, phi) of a sequence: float32 [2].

    VASA-1 picks it by "a simple histogram-based clustering" of per-frame gaze. Here: bin
    the frames on a `bin_degrees` grid, take the most populated bin (the lowest bin index
    wins ties, so the result is deterministic) and average the frames in it and its 8
    neighbours. Short glances away do not move the result, unlike a plain mean.

    gaze: [T, 2] degrees, T >= 1.
    """
    gaze = np.asarray(gaze, np.float32)
    if gaze.ndim != 2 or gaze.shape[1] != 2 or len(gaze) == 0:
        raise ValueError(f"gaze must be [T>=1, 2], got {gaze.shape}")
    bins = np.floor(gaze / bin_degrees).astype(np.int64)
    uniq, counts = np.unique(bins, axis=0, return_counts=True)
    mode = uniq[np.argmax(counts)]
    near = np.all(np.abs(bins - mode) <= 1, axis=1)
    return gaze[near].mean(axis=0)


def emotion_average(labels: Mapping[str, np.ndarray], frames: slice) -> np.ndarray | None:
    """Averaged emotion probabilities over `frames`: float32 [len(EMOTIONS)], or None.

    Uses `emotion_probs` when present, else the one-hot of the `emotion` class index.
    """
    if "emotion_probs" in labels:
        return np.asarray(labels["emotion_probs"][frames], np.float32).mean(axis=0)
    if "emotion" in labels:
        classes = np.asarray(labels["emotion"][frames], np.int64)
        return np.eye(len(schema.EMOTIONS), dtype=np.float32)[classes].mean(axis=0)
    return None


# ----------------------------------------------------------------------------- audio


def audio_frame_rms(
    audio: np.ndarray, sample_rate: int, fps: float, num_frames: int
) -> np.ndarray:
    """RMS of the audio under each video frame: float32 [T].

    Frame t covers samples [round(t * sr / fps), round((t + 1) * sr / fps)). Frames with no
    samples (audio shorter than the video) are NaN.
    """
    bounds = np.round(np.arange(num_frames + 1) * (sample_rate / fps)).astype(np.int64)
    bounds = np.minimum(bounds, len(audio))
    sq = np.concatenate([[0.0], np.cumsum(np.asarray(audio, np.float64) ** 2)])
    count = bounds[1:] - bounds[:-1]
    energy = sq[bounds[1:]] - sq[bounds[:-1]]
    with np.errstate(invalid="ignore", divide="ignore"):
        rms = np.sqrt(np.maximum(energy, 0.0) / count)
    rms[count == 0] = np.nan
    return rms.astype(np.float32)


def lagged_correlation(
    xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], max_lag: int
) -> tuple[float, int, dict[int, float]]:
    """Pearson r between x[t] and y[t + lag], pooled over sequences, at the best lag.

    For each lag in [-max_lag, max_lag] the (x[t], y[t + lag]) pairs of all sequences are
    concatenated (NaN pairs dropped) and one r is computed; the lag with the highest r wins.
    Returns (best r, best lag, {lag: r}); r is NaN where undefined (constant input).
    """
    per_lag: dict[int, float] = {}
    for lag in range(-max_lag, max_lag + 1):
        px, py = [], []
        for x, y in zip(xs, ys):
            n = min(len(x), len(y))
            lo, hi = max(0, -lag), min(n, n - lag)
            if hi > lo:
                px.append(x[lo:hi])
                py.append(y[lo + lag : hi + lag])
        if not px:
            per_lag[lag] = math.nan
            continue
        a, b = np.concatenate(px).astype(np.float64), np.concatenate(py).astype(np.float64)
        ok = np.isfinite(a) & np.isfinite(b)
        a, b = a[ok], b[ok]
        if len(a) < 2 or a.std() == 0 or b.std() == 0:
            per_lag[lag] = math.nan
        else:
            per_lag[lag] = float(np.corrcoef(a, b)[0, 1])
    finite = {k: v for k, v in per_lag.items() if not math.isnan(v)}
    if not finite:
        return math.nan, 0, per_lag
    best = max(finite, key=lambda k: (finite[k], -abs(k)))
    return finite[best], best, per_lag


# ----------------------------------------------------------------------------- images


def to_signed_float(img: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1]: the one conversion of the project. A jax array
    stays one (inside jit the conversion runs on the device: a quarter of the host-to-device
    bytes of sending floats)."""
    return img.astype(np.float32) * (2.0 / 255.0) - 1.0


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop (if needed) resized to [size, size, 3]; uint8 in and out."""
    h, w = img.shape[:2]
    if h != w:
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        img = img[y0 : y0 + side, x0 : x0 + side]
    if img.shape[0] == size:
        return img
    # Area averaging when shrinking (no aliasing), bilinear when enlarging.
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def sample_geometry(
    rng: np.random.Generator, scale: float, shift: float
) -> tuple[float, float, float]:
    """(zoom, dx, dy): zoom in [1 - scale, 1 + scale], shifts in [-shift, shift] (fractions)."""
    zoom = 1.0 + rng.uniform(-scale, scale) if scale > 0 else 1.0
    dx, dy = rng.uniform(-shift, shift, 2) if shift > 0 else (0.0, 0.0)
    return float(zoom), float(dx), float(dy)


def jitter_geometry(img: np.ndarray, zoom: float, dx: float, dy: float) -> np.ndarray:
    """Zooms about the centre (zoom > 1 enlarges the face) and shifts by (dx, dy) * side.

    uint8 [S, S, 3] -> uint8 [S, S, 3]; uncovered borders are reflected.
    """
    if zoom == 1.0 and dx == 0.0 and dy == 0.0:
        return img
    size = img.shape[0]
    c = (size - 1) / 2.0
    m = np.array([[zoom, 0.0, (1 - zoom) * c + dx * size],
                  [0.0, zoom, (1 - zoom) * c + dy * size]], np.float64)
    return cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


def jitter_boxes(boxes: np.ndarray, zoom: float, dx: float, dy: float) -> np.ndarray:
    """The boxes of an image after `jitter_geometry(img, zoom, dx, dy)`.

    boxes: [..., 4] (x0, y0, x1, y1) in [0, 1] image coordinates -> the same, moved with the
    content (zoom about the centre, then the shift) and clipped to the frame.
    """
    b = np.asarray(boxes, np.float32)
    shift = np.array([dx, dy, dx, dy], np.float32)
    return np.clip(zoom * (b - 0.5) + 0.5 + shift, 0.0, 1.0).astype(np.float32)


# ITU-R BT.601 luma and the YIQ basis (hue rotation = rotating the I/Q chroma plane).
_LUMA = np.array([0.299, 0.587, 0.114], np.float64)
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], np.float64)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def sample_color(
    rng: np.random.Generator, brightness: float, contrast: float, saturation: float, hue: float
) -> tuple[float, float, float, float]:
    """(brightness, contrast, saturation) factors around 1 and a hue turn in [-hue, hue]."""
    def factor(amount: float) -> float:
        return 1.0 + rng.uniform(-amount, amount) if amount > 0 else 1.0

    turn = rng.uniform(-hue, hue) if hue > 0 else 0.0
    return factor(brightness), factor(contrast), factor(saturation), float(turn)


def color_matrix(b: float, c: float, s: float, hue_turn: float) -> np.ndarray:
    """The colour jitter as a 3x3 matrix M on RGB column vectors (see `jitter_color`)."""
    sat = s * np.eye(3) + (1.0 - s) * np.outer(np.ones(3), _LUMA)
    a = 2.0 * np.pi * hue_turn
    rot = np.array([[1.0, 0.0, 0.0],
                    [0.0, math.cos(a), -math.sin(a)],
                    [0.0, math.sin(a), math.cos(a)]])
    return c * b * (_YIQ_TO_RGB @ rot @ _RGB_TO_YIQ @ sat)


def jitter_color(img: np.ndarray, b: float, c: float, s: float, hue_turn: float) -> np.ndarray:
    """Brightness, contrast, saturation, then hue, as one affine map: uint8 -> float32 [-1, 1].

    With x in [0, 1]: brightness x <- b x; contrast x <- c x + (1 - c) mean(luma(x));
    saturation x <- s x + (1 - s) luma(x); hue rotates the YIQ chroma plane by hue_turn of a
    full turn. Grey stays grey under saturation and hue, so the composition is
    M x + (1 - c) b mean(luma(x0)) with M = `color_matrix`. It is applied on uint8 with
    saturation (cv2.transform: one pass, ~10x faster than float numpy), so the result is
    clipped to [0, 1] and quantised to 1/255 like the input.
    """
    if (b, c, s, hue_turn) == (1.0, 1.0, 1.0, 0.0):
        return to_signed_float(img)
    mean_luma = float(np.dot(cv2.mean(img)[:3], _LUMA))  # 0..255
    m = np.empty((3, 4), np.float64)
    m[:, :3] = color_matrix(b, c, s, hue_turn)
    m[:, 3] = (1.0 - c) * b * mean_luma
    return to_signed_float(cv2.transform(img, m))
