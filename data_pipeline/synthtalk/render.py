"""Analytic ray-cast renderer of a 3D head made of ellipsoids.

The head is ~25 ellipsoids (skull, face, jaw, muzzle, nose, eyeballs, brows, ears, hair shells,
glasses, earrings) in *head-local* coordinates, plus a neck and torso that only translate.
Every pixel shoots a pinhole-camera ray; each part is intersected in closed form (a ray hits
the ellipsoid {p : |M (p - c)| = 1} where M maps the part to the unit sphere), the nearest hit
wins (a z-buffer over parts, each part only tested inside its projected bounding box), and the
winner is shaded with wrapped Lambert + ambient (+ Blinn highlights on eyes, glasses, metal).
Fine detail is "decals": materials evaluated on the hit point in head-local coordinates
(eyeball = sclera/iris/pupil by the angle to the gaze, eyelids by the blink; mouth cavity,
teeth, lips and beard on the lower face; nostrils; ear concha). Because everything is real 3D
geometry seen through a perspective camera, yaw/pitch foreshorten the face, the nose and ears
move with parallax and the far side of the head is occluded, like a real head turn.

The camera's framing (`FRAMINGS`): "face" (default) frames the face like an aligned
talking-head crop (data_pipeline.schema.FACE_CROP_HEIGHT), "portrait" shows head and
shoulders (the original framing). `HeadRenderer.boxes` projects where the mouth and the eyes
are in the image (the per-frame labels schema.BOX_LABELS).

Coordinates (camera frame, as in data_pipeline/schema.py): +x image right, +y image up,
+z away from the camera; units are head radii. Head-local frame: same axes when the pose is
zero, the face looks towards -z (at the camera). Head pose R = Ry(yaw) Rx(pitch) Rz(roll)
maps head-local vectors to the camera frame; see `rotation_matrix`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import cv2
import numpy as np

from data_pipeline.schema import EMOTIONS
from data_pipeline.synthtalk.identity import Identity

NOMINAL_DISTANCE = 7.0  # head-to-camera distance (head radii) at label distance 1
HALF_EXTENT = 1.7  # half the image side (head radii) at the nominal distance: "portrait"
IRIS_ANGLE = 0.50  # radians from the gaze axis to the iris edge (iris ~ half the eyeball)
PUPIL_ANGLE = 0.19

# Facial expression components that emotions drive (besides brow / mouth labels).
EXPRESSION_COMPONENTS = (
    "corner",  # mouth corners up (+) / down (-)
    "asym",  # right mouth corner up only (contempt)
    "brow_inner",  # inner brow ends raised (sad, fear)
    "brow_furrow",  # brows lowered and pulled together (anger, disgust)
    "lid_upper",  # upper lids raised (+, wide eyes) / lowered (-)
    "lid_lower",  # lower lids raised (cheek raise / squint)
    "lip_raise",  # upper lip raised (disgust)
    "stretch",  # lips stretched sideways (fear)
)
_EXPRESSION = {
    "neutral": {},
    "happy": {"corner": 1.0, "lid_lower": 0.5},
    "sad": {"corner": -0.8, "brow_inner": 1.0, "lid_upper": -0.35},
    "surprise": {"brow_inner": 0.3, "lid_upper": 1.0},
    "fear": {"brow_inner": 0.9, "lid_upper": 0.8, "stretch": 0.7, "corner": -0.3},
    "disgust": {"lip_raise": 1.0, "corner": -0.5, "brow_furrow": 0.6, "lid_lower": 0.6},
    "anger": {"brow_furrow": 1.0, "lid_upper": 0.15, "lid_lower": 0.5, "corner": -0.45},
    "contempt": {"asym": 1.0},
}
# [len(EMOTIONS), len(EXPRESSION_COMPONENTS)]: expression = emotion_probs @ EXPRESSION_TABLE.
EXPRESSION_TABLE = np.array(
    [[_EXPRESSION[e].get(c, 0.0) for c in EXPRESSION_COMPONENTS] for e in EMOTIONS], np.float32
)

_SCLERA = np.array([0.94, 0.92, 0.89], np.float32)
_TEETH = np.array([0.93, 0.91, 0.84], np.float32)
_CAVITY = np.array([0.30, 0.07, 0.08], np.float32)
_TONGUE = np.array([0.72, 0.33, 0.33], np.float32)


# ----------------------------------------------------------------------------- geometry


def _rx(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float64)


def _ry(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]], np.float64)


def _rz(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], np.float64)


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head-local -> camera rotation [3, 3] from pose angles in degrees.

    R = Ry(yaw) Rx(pitch) Rz(roll): +yaw turns the face towards image right, +pitch tilts it
    up, +roll tilts the head counter-clockwise in the image. The face direction (0, 0, -1)
    maps to the gaze direction with theta = pitch, phi = yaw when roll = 0.
    """
    return _ry(np.radians(yaw)) @ _rx(np.radians(pitch)) @ _rz(np.radians(roll))


def matrix_to_pose(r: np.ndarray) -> tuple[float, float, float]:
    """Inverse of `rotation_matrix`: [3, 3] -> (yaw, pitch, roll) degrees."""
    pitch = np.arcsin(np.clip(-r[1, 2], -1.0, 1.0))
    roll = np.arctan2(r[1, 0], r[1, 1])
    yaw = np.arctan2(-r[0, 2], r[2, 2])
    return float(np.degrees(yaw)), float(np.degrees(pitch)), float(np.degrees(roll))


def gaze_vector(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Gaze angles (degrees; theta + up, phi + image right) -> unit vectors [..., 3]."""
    t, p = np.radians(theta), np.radians(phi)
    return np.stack([np.cos(t) * np.sin(p), np.sin(t), -np.cos(t) * np.cos(p)], -1)


def gaze_angles(v: np.ndarray) -> np.ndarray:
    """Unit gaze vectors [..., 3] -> (theta, phi) degrees [..., 2]."""
    theta = np.degrees(np.arcsin(np.clip(v[..., 1], -1.0, 1.0)))
    phi = np.degrees(np.arctan2(v[..., 0], -v[..., 2]))
    return np.stack([theta, phi], -1)


@dataclasses.dataclass(frozen=True)
class Framing:
    """How the pinhole camera frames the head in the square image.

    half_extent: half the image side, in head radii, in the plane z = NOMINAL_DISTANCE.
    center_y: the camera-frame height (head radii, +y up) in that plane that the image
      centre looks at. Non-zero means an off-centre principal point, as when a square is
      cropped out of a wider view; horizontally the image is always centred on x = 0.
    """

    half_extent: float
    center_y: float = 0.0


# "portrait": head, hair and shoulders (the original framing; old corpora used it).
# "face": the aligned face crop of data_pipeline.schema (FACE_CROP_HEIGHT / _CENTER): at
#   `neutral_frame` the face from the top of the brows to the bottom of the chin spans
#   ~68% of the image height and its midpoint sits at the image centre. Measured with
#   `HeadRenderer.part_boxes` (brow_l/brow_r top, chin bottom) over identities 0-39 of
#   seed 0: brow-to-chin 0.682 of the height (0.639-0.734 by identity), midpoint at
#   0.501 (0.480-0.524) of the height, 0.500 of the width. A little under the schema's
#   "~70%" so that each of motion.py's largest excursions (|yaw| 25, |pitch| 15, |roll|
#   10 deg, |tx| 0.25, ty -0.01..0.28, with the mouth wide open) keeps brow-to-chin in
#   the frame at the nominal distance, and the eyes, nose and mouth stay in it with the
#   head at the nearest distance (0.8) too (tests/test_synthtalk.py).
FRAMINGS: dict[str, Framing] = {
    "portrait": Framing(HALF_EXTENT, 0.0),
    "face": Framing(1.12, -0.25),
}
DEFAULT_FRAMING = "face"


def get_framing(framing: "str | Framing" = DEFAULT_FRAMING) -> Framing:
    """A `Framing` from its name in FRAMINGS (or a Framing, returned as is)."""
    if isinstance(framing, Framing):
        return framing
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {tuple(FRAMINGS)}, got {framing!r}")
    return FRAMINGS[framing]


def focal_length(size: int, framing: "str | Framing" = DEFAULT_FRAMING) -> float:
    """Focal length in pixels for a `size`-pixel square image."""
    return size * NOMINAL_DISTANCE / (2.0 * get_framing(framing).half_extent)


def principal_point(size: int, framing: "str | Framing" = DEFAULT_FRAMING) -> tuple[float, float]:
    """Where the optical axis meets the image: (x right, y down) in pixels, pixel i
    spanning [i, i + 1). (size / 2, size / 2) unless the framing has a `center_y`."""
    fr = get_framing(framing)
    return size / 2.0, size / 2.0 + fr.center_y / NOMINAL_DISTANCE * focal_length(size, fr)


def project(
    points: np.ndarray, size: int, framing: "str | Framing" = DEFAULT_FRAMING
) -> np.ndarray:
    """Camera-frame points [..., 3] (+y up, +z away) -> image (x right, y down) [..., 2]
    in pixels of a `size`-pixel image (pixel i spans [i, i + 1)), as the renderer sees them."""
    p = np.asarray(points, np.float64)
    f = focal_length(size, framing)
    cx, cy = principal_point(size, framing)
    return np.stack([cx + f * p[..., 0] / p[..., 2], cy - f * p[..., 1] / p[..., 2]], -1)


def neutral_frame(**overrides) -> dict[str, np.ndarray]:
    """One frame's labels for a frontal, neutral, silent, open-eyed head; override any."""
    frame = {
        "pose": np.array([0.0, 0.0, 0.0, 0.0, 0.12, NOMINAL_DISTANCE], np.float32),
        "gaze": np.zeros(2, np.float32),
        "blink": np.float32(0.0),
        "brow": np.float32(0.12),
        "mouth_open": np.float32(0.0),
        "mouth_width": np.float32(0.35),
        "mouth_round": np.float32(0.0),
        "emotion": np.int32(0),
        "emotion_probs": np.eye(len(EMOTIONS), dtype=np.float32)[0],
        "distance": np.float32(1.0),
    }
    unknown = set(overrides) - set(frame)
    if unknown:
        raise KeyError(f"unknown frame labels {sorted(unknown)}; known: {sorted(frame)}")
    frame.update({k: np.asarray(v, frame[k].dtype) for k, v in overrides.items()})
    return frame


@dataclasses.dataclass
class Part:
    """An ellipsoid {p : |diag(1/radii) rot^T (p - center)| = 1} with a material.

    Head parts are in head-local coordinates; body parts (`body=True`) in coordinates that
    follow the head's translation but not its rotation. `planes` clip the surface in the
    same coordinates: keep points with n . p >= d for all planes (or any, `any_plane`).
    `ring` keeps only points with u_x^2 + u_y^2 >= ring^2 in unit-sphere coordinates (rims).
    """

    name: str
    material: str
    center: Sequence[float]
    radii: Sequence[float]
    rot: np.ndarray | None = None
    planes: tuple = ()
    any_plane: bool = False
    ring: float = 0.0
    body: bool = False


_EYE3 = np.eye(3)


def _axis_rot(direction: np.ndarray) -> np.ndarray:
    """A rotation whose z axis is `direction` (for long thin parts like glasses temples)."""
    z = direction / np.linalg.norm(direction)
    x = _cross(np.array([0.0, 1.0, 0.0]), z)
    x /= np.linalg.norm(x)
    return np.stack([x, _cross(z, x), z], 1)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cross product of two 3-vectors (np.cross costs ~50 us of overhead per call)."""
    return np.array(
        [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]],
        dtype=np.result_type(a, b),
    )


def _front_z(parts: Sequence[Part], x: float, y: float) -> float:
    """z of the frontmost (smallest z) surface among rotation-free `parts` at (x, y)."""
    best = np.inf
    for p in parts:
        c, r = np.asarray(p.center), np.asarray(p.radii)
        q = 1.0 - ((x - c[0]) / r[0]) ** 2 - ((y - c[1]) / r[1]) ** 2
        if q > 0:
            best = min(best, c[2] - r[2] * np.sqrt(q))
    return float(best)


def expression(emotion_probs: np.ndarray) -> dict[str, float]:
    """Emotion probabilities [len(EMOTIONS)] -> expression components (see table)."""
    e = np.asarray(emotion_probs, np.float32) @ EXPRESSION_TABLE
    return dict(zip(EXPRESSION_COMPONENTS, (float(v) for v in e)))


def build_parts(ident: Identity, frame: Mapping[str, np.ndarray]) -> list[Part]:
    """All of the head's parts for one frame: `static_parts` + `dynamic_parts`."""
    return static_parts(ident) + dynamic_parts(ident, frame)


def mouth_y(ident: Identity) -> float:
    """Head-local height of the closed lips' midline: below the nose tip (whose lowest
    point is ~0.23 nose lengths under its centre), a sixth of the face length lower."""
    nose_bottom = -0.2 - 0.05 * (ident.nose_length - 1) - 0.232 * ident.nose_length
    return nose_bottom - 0.16 * ident.face_length


def _base(ident: Identity) -> tuple[Part, Part]:
    hw, hh, fl = ident.head_width, ident.head_height, ident.face_length
    skull = Part("skull", "skin", (0, 0.12, 0.12), (0.86 * hw, 0.98 * hh, 1.0))
    face = Part("face", "skin", (0, -0.16, -0.16), (0.77 * hw * ident.cheek, 0.92 * fl, 0.84))
    return skull, face


def static_parts(ident: Identity) -> list[Part]:
    """Parts that do not move relative to the head (everything but jaw, lips, brows)."""
    skull, face = _base(ident)
    parts = [skull, face]
    hw = ident.head_width
    ey = 0.1 + ident.eye_height
    ex_ = 0.31 * ident.eye_spacing
    re = 0.135 * ident.eye_size
    # Features sit on the skin: their depth comes from the skull/face surface.
    z_eye = [_front_z(parts, s * ex_, ey) for s in (-1, 1)]
    z_nose = _front_z(parts, 0.0, -0.2)
    nl, nw, nd = ident.nose_length, ident.nose_width, ident.nose_depth
    parts += [
        Part(
            "nose",
            "skin",
            (0, -0.2 - 0.05 * (nl - 1), z_nose + 0.03 - 0.05 * (nd - 1)),
            (0.125 * nw, 0.25 * nl, 0.17 * nd),
            rot=_rx(np.radians(22)),  # tip forward, root back
        ),
        Part("nose_bridge", "skin", (0, 0.04, z_nose + 0.08), (0.09 * nw, 0.2, 0.1)),
        Part("ala_l", "skin", (-0.1 * nw, -0.34 * nl, z_nose + 0.08), (0.075 * nw, 0.065, 0.07)),
        Part("ala_r", "skin", (0.1 * nw, -0.34 * nl, z_nose + 0.08), (0.075 * nw, 0.065, 0.07)),
    ]
    for s, side in ((-1, "l"), (1, "r")):
        z = z_eye[(s + 1) // 2]
        parts.append(Part(f"eye_{side}", "eye", (s * ex_, ey, z + 0.5 * re), (re, re, re)))
        parts.append(
            Part(
                f"ear_{side}",
                "ear",
                (s * 0.84 * hw, ey - 0.1, 0.08),
                (0.065, 0.27 * ident.ear_size, 0.16 * ident.ear_size),
                rot=_ry(-s * np.radians(28)),
            )
        )
        if ident.earrings:
            parts.append(
                Part(
                    f"earring_{side}",
                    "metal",
                    (s * 0.87 * hw, ey - 0.38 * ident.ear_size, 0.06),
                    (0.045, 0.045, 0.045),
                )
            )
        if ident.glasses:
            gs = ident.glasses_size
            lx, ly, lz = s * ex_, ey - 0.01, z - 0.1
            parts.append(
                Part(
                    f"lens_{side}",
                    "glasses",
                    (lx, ly, lz),
                    (0.16 * gs, 0.12 * gs, 0.015),
                    ring=0.82,
                )
            )
            start = np.array([s * (ex_ + 0.16 * gs), ly + 0.03, lz])
            end = np.array([s * 0.86 * hw, ey + 0.02, 0.05])
            parts.append(
                Part(
                    f"temple_{side}",
                    "glasses",
                    (start + end) / 2,
                    (0.014, 0.014, np.linalg.norm(end - start) / 2),
                    rot=_axis_rot(end - start),
                )
            )
    if ident.glasses:
        parts.append(
            Part("bridge", "glasses", (0, ey + 0.03, min(z_eye) - 0.12), (0.07, 0.015, 0.015))
        )
    parts += _hair_parts(ident, skull)
    neck_w = 0.48 * ident.neck_width
    parts += [
        Part("neck", "neck", (0, -1.1, 0.22), (neck_w, 0.8, 0.45), body=True),
        Part("torso", "cloth", (0, -2.25, 0.5), (1.75, 0.85, 0.8), body=True),
    ]
    return parts


def dynamic_parts(ident: Identity, frame: Mapping[str, np.ndarray]) -> list[Part]:
    """Parts that move with the frame's labels: jaw, chin, lips area (mouth_open), brows."""
    ex = expression(frame["emotion_probs"])
    mo = float(frame["mouth_open"])
    brow = float(frame["brow"])
    hw, fl = ident.head_width, ident.face_length
    jaw_drop = 0.11 * mo
    parts = [
        Part(
            "jaw",
            "skin",
            (0, -0.6 * fl - jaw_drop, -0.1),
            (0.58 * ident.jaw_width * hw, 0.42 * fl, 0.74),
        ),
        Part(
            "chin",
            "skin",
            (0, -0.88 * fl - jaw_drop, -0.46 - 0.06 * (ident.chin - 1)),
            (0.28 * ident.jaw_width, 0.18, 0.22),
        ),
        Part(
            "muzzle",
            "skin",
            (0, mouth_y(ident) + 0.03 - 0.4 * jaw_drop, -0.56),
            (0.42 * ident.mouth_width, 0.24 + 0.4 * jaw_drop, 0.42),
        ),
    ]
    base = _base(ident)
    ey = 0.1 + ident.eye_height
    ex_ = 0.31 * ident.eye_spacing
    # Brows: inner ends raised by brow_inner, lowered and pulled in by brow_furrow.
    tilt = np.radians(14 * ex["brow_inner"] - 12 * ex["brow_furrow"])
    for s, side in ((-1, "l"), (1, "r")):
        bx = s * (ex_ + 0.02 - 0.03 * ex["brow_furrow"])
        by = ey + 0.19 + 0.1 * brow - 0.035 * ex["brow_furrow"]
        parts.append(
            Part(
                f"brow_{side}",
                "brow",
                (bx, by, _front_z(base, bx, by) + 0.01),
                (0.165, 0.032 * ident.brow_thickness, 0.05),
                rot=_ry(s * np.radians(22)) @ _rz(-s * tilt),
            )
        )
    return parts


MATERIALS = (
    "skin",
    "eye",
    "brow",
    "hair",
    "hair_sparse",
    "ear",
    "neck",
    "cloth",
    "glasses",
    "metal",
)
_NOSE_PARTS = ("nose", "ala_l", "ala_r")
_MOUTH_PARTS = ("face", "jaw", "chin", "muzzle")


@dataclasses.dataclass
class _PartArrays:
    """Parts as arrays (what the renderer loops over). K parts."""

    parts: list
    to_unit: np.ndarray  # [K, 3, 3] diag(1 / radii) rot^T: part coordinates -> unit sphere
    centers: np.ndarray  # [K, 3]
    rmax: np.ndarray  # [K] bounding-sphere radius
    body: np.ndarray  # [K] bool
    clips: list  # per part None or (planes [(a [3], b)] in unit coordinates, any, ring)
    material: np.ndarray  # [K] index into MATERIALS
    nose: np.ndarray  # [K] bool: nostril decal
    mouth: np.ndarray  # [K] bool: mouth decal

    @classmethod
    def build(cls, parts: Sequence[Part]) -> "_PartArrays":
        radii = np.array([p.radii for p in parts], np.float64).reshape(-1, 3)
        prot = (
            np.stack([_EYE3 if p.rot is None else p.rot for p in parts])
            if parts
            else (np.zeros((0, 3, 3)))
        )
        centers = np.array([p.center for p in parts], np.float64).reshape(-1, 3)
        clips = []
        for p, r, rt, c in zip(parts, radii, prot, centers):
            if not p.planes and p.ring <= 0:
                clips.append(None)
                continue
            planes = []
            for normal, offset in p.planes:
                normal = np.asarray(normal, np.float64)
                # n . q >= d with q = rot diag(r) u + c  <=>  (r * rot^T n) . u >= d - n . c
                planes.append(
                    ((r * (rt.T @ normal)).astype(np.float32), float(offset - normal @ c))
                )
            clips.append((planes, p.any_plane, p.ring))
        return cls(
            parts=list(parts),
            to_unit=np.swapaxes(prot, 1, 2) / radii[:, :, None],
            centers=centers,
            rmax=radii.max(1) if len(parts) else np.zeros(0),
            body=np.array([p.body for p in parts], bool),
            clips=clips,
            material=np.array([MATERIALS.index(p.material) for p in parts], np.intp),
            nose=np.array([p.name in _NOSE_PARTS for p in parts], bool),
            mouth=np.array([p.name in _MOUTH_PARTS for p in parts], bool),
        )

    def __add__(self, other: "_PartArrays") -> "_PartArrays":
        cat = np.concatenate
        return _PartArrays(
            parts=self.parts + other.parts,
            to_unit=cat([self.to_unit, other.to_unit]),
            centers=cat([self.centers, other.centers]),
            rmax=cat([self.rmax, other.rmax]),
            body=cat([self.body, other.body]),
            clips=self.clips + other.clips,
            material=cat([self.material, other.material]),
            nose=cat([self.nose, other.nose]),
            mouth=cat([self.mouth, other.mouth]),
        )


def _hair_parts(ident: Identity, skull: Part) -> list[Part]:
    style = ident.hair_style
    if style == "bald":
        return []
    sc, sr = np.asarray(skull.center), np.asarray(skull.radii)
    # Hairline: keep y + 0.5 z >= d (high at the forehead, low at the nape).
    hairline = ((0.0, 1.0, 0.5), 0.1 + ident.hairline)
    if style == "buzz":
        return [Part("hair", "hair_sparse", sc, sr * 1.012, planes=(hairline,))]
    grow = 1.035 + 0.05 * ident.hair_volume
    if style in ("short", "bun"):
        parts = [Part("hair", "hair", sc, sr * grow, planes=(hairline,))]
        if style == "bun":
            parts.append(Part("bun", "hair", (0, 0.78, 0.62), (0.3, 0.28, 0.3)))
        return parts
    if style == "fringe":
        return [Part("hair", "hair", sc, sr * grow, planes=(((0.0, 1.0, 0.45), -0.1),))]
    # bob / long: side curtains behind the cheeks frame the face.
    grow += 0.04
    shell = Part(
        "hair",
        "hair",
        sc,
        sr * grow * np.array([1.06, 1.0, 1.0]),
        planes=(hairline, ((0.0, 0.0, 1.0), -0.38)),
        any_plane=True,
    )
    if style == "bob":
        return [shell]
    back = Part(
        "hair_back",
        "hair",
        (0, -0.6, 0.3),
        (0.98 * ident.head_width * (1 + 0.1 * ident.hair_volume), 1.3, 0.62),
        planes=(((0.0, 0.0, 1.0), -0.2),),
    )
    return [shell, back]


# ----------------------------------------------------------------------------- rendering


def _background(ident: Identity, n: int) -> np.ndarray:
    """[n, n, 3] float32 background image."""
    a = np.asarray(ident.bg_colors[0], np.float32)
    b = np.asarray(ident.bg_colors[1], np.float32)
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / max(n - 1, 1)
    p = ident.bg_param
    kind = ident.background
    if kind == "flat":
        w = np.zeros_like(x)
    elif kind == "vgradient":
        w = y
    elif kind == "hgradient":
        w = x if p < 0.5 else 1 - x
    elif kind == "radial":
        w = np.clip(np.hypot(x - 0.3 - 0.4 * p, y - 0.35) / 0.9, 0, 1)
    elif kind == "stripes":
        period = 0.08 + 0.15 * p
        w = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (x + 0.3 * y) / period))
        w = 0.35 * w
    elif kind == "checker":
        k = 4 + int(8 * p)
        w = 0.3 * (((x * k).astype(int) + (y * k).astype(int)) % 2)
    elif kind == "dots":
        k = 5 + int(6 * p)
        fx, fy = (x * k) % 1.0 - 0.5, (y * k) % 1.0 - 0.5
        w = 0.6 * (np.hypot(fx, fy) < 0.22)
    else:
        raise ValueError(f"unknown background {kind!r}")
    return a + w[..., None] * (b - a)


def _projected_bounds(m: np.ndarray, o: np.ndarray):
    """Image-plane extent (X = x / z, Y = y / z) of ellipsoids |m p + o| = 1, exactly.

    m: [K, 3, 3], o: [K, 3]. A plane through the camera, x - X z = 0, touches the quadric
    with 4x4 matrix C iff pi^T C^-1 pi = 0 for pi = (1, 0, -X, 0): a quadratic in X (the
    same in Y). Returns x_lo, x_hi, y_lo, y_hi [K]; (-inf, inf) where the camera is inside
    or the ellipsoid reaches behind it (then every pixel is tested).
    """
    k = len(m)
    c = np.zeros((k, 4, 4))
    c[:, :3, :3] = np.swapaxes(m, 1, 2) @ m
    c[:, :3, 3] = c[:, 3, :3] = np.einsum("kji,kj->ki", m, o)
    c[:, 3, 3] = np.einsum("ki,ki->k", o, o) - 1.0
    d = np.linalg.inv(c)

    def tangents(i, j):  # roots of D_ii - 2 v D_ij + v^2 D_jj = 0 (planes e_i - v e_j)
        a, b, cc = d[:, j, j], -2.0 * d[:, i, j], d[:, i, i]
        disc = b * b - 4 * a * cc
        ok = (disc > 0) & (np.abs(a) > 1e-12)
        root = np.sqrt(np.where(ok, disc, 0.0))
        a = np.where(ok, a, 1.0)
        return ok, (-b - np.sign(a) * root) / (2 * a), (-b + np.sign(a) * root) / (2 * a)

    # Depth range first: planes z = z0 are pi = (0, 0, 1, -z0).
    ok_z, z_lo, _ = tangents(2, 3)
    visible = ok_z & (z_lo > 1e-3)  # wholly in front of the camera (and camera outside)
    bounds = []
    for axis in (0, 1):
        ok, lo, hi = tangents(axis, 2)
        ok &= visible
        bounds += [np.where(ok, lo, -np.inf), np.where(ok, hi, np.inf)]
    return bounds


def _normalize(v: np.ndarray) -> np.ndarray:
    """Unit vectors along the last axis (zero vectors stay ~zero)."""
    return v / np.maximum(np.sqrt(np.einsum("...i,...i->...", v, v)), 1e-8)[..., None]


def _lip_shape(ident: Identity, ctx: Mapping, x: np.ndarray):
    """The mouth decal's shape at head-local x [P] (see HeadRenderer._mouth).

    Returns (w, wl, xn, yc, h_up, h_lo, t_up, t_lo): the opening's half width w and the
    lips' wl, x / w, and per x the mouth line's height yc, the opening above / below it
    (h_up, h_lo) and the upper / lower lip thickness beyond that (t_up, t_lo). The lips
    span yc - h_lo - t_lo < y < yc + h_up + t_up for |x| < wl.
    """
    ex = ctx["ex"]
    mo, mw, mr = ctx["mouth_open"], ctx["mouth_width"], ctx["mouth_round"]
    w = 0.2 * ident.mouth_width * (0.82 + 0.32 * mw - 0.3 * mr + 0.15 * ex["stretch"])
    ym = mouth_y(ident)
    xn = x / w
    s = np.sqrt(np.clip(1.0 - xn * xn, 0.0, 1.0))
    # Mouth line: corners lift with the expression, contempt lifts the right one.
    yc = ym + (0.06 * ex["corner"]) * xn**2 + 0.06 * ex["asym"] * np.maximum(xn, 0) ** 2
    s_round = s ** (0.6 + 0.8 * (1 - mr))  # rounder lips -> rounder opening
    h_up = (0.008 + 0.05 * mo + 0.035 * ex["lip_raise"]) * s_round
    h_lo = (0.008 + 0.15 * mo) * s_round
    lf = ident.lip_fullness
    wl = w * 1.08
    sl = np.sqrt(np.clip(1.0 - (x / wl) ** 2, 0.0, 1.0))
    bow = 1.0 - 0.3 * np.exp(-((x / 0.03) ** 2))  # cupid's bow dip
    t_up = 0.034 * lf * sl * bow + 0.006
    t_lo = 0.046 * lf * sl + 0.006
    return w, wl, xn, yc, h_up, h_lo, t_up, t_lo


def _front_z_many(parts: Sequence[Part], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """`_front_z` at many points: x, y [P] -> z [P] (inf where no part is there)."""
    best = np.full(np.shape(x), np.inf)
    for p in parts:
        c, r = np.asarray(p.center), np.asarray(p.radii)
        q = 1.0 - ((x - c[0]) / r[0]) ** 2 - ((y - c[1]) / r[1]) ** 2
        z = c[2] - r[2] * np.sqrt(np.maximum(q, 0.0))
        best = np.where(q > 0, np.minimum(best, z), best)
    return best


def _unit_disk(k: int) -> np.ndarray:
    """Front-hemisphere unit vectors [k * k, 3] (z < 0, towards the camera) over a k x k
    grid of (x, y) in the unit disk, its rim included."""
    g = np.linspace(-1.0, 1.0, k)
    x, y = np.meshgrid(g, g)
    r = np.hypot(x, y)
    scale = np.where(r > 1.0, 1.0 / np.maximum(r, 1e-12), 1.0)  # outside: onto the rim
    x, y = (x * scale).ravel(), (y * scale).ravel()
    return np.stack([x, y, -np.sqrt(np.clip(1.0 - x * x - y * y, 0.0, 1.0))], 1)


_EYE_SAMPLES = _unit_disk(24)  # points per eyeball for the eyes box
_LIP_SAMPLES = 41  # x positions along the lips for the mouth box


class HeadRenderer:
    """Renders one identity at one size; `render(frame)` -> uint8 [size, size, 3].

    `frame` holds one frame's labels (schema.LABELS names, leading T dropped): pose [6],
    gaze [2], blink, brow, mouth_open, mouth_width, mouth_round, emotion_probs [8]. These are
    the only per-frame inputs, so the labels are exactly what is rendered. `supersample` k
    renders k*size pixels per side and box-filters down (anti-aliasing).
    """

    def __init__(
        self,
        ident: Identity,
        size: int,
        supersample: int = 1,
        framing: "str | Framing" = DEFAULT_FRAMING,
    ):
        if size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {size}")
        if supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample}")
        self.ident = ident
        self.size = size
        self.ss = supersample
        n = size * supersample
        self.n = n
        self.framing = get_framing(framing)
        self.f = focal_length(size, self.framing) * supersample  # in supersampled pixels
        # Y = y / z that the image centre looks at (0 = on the optical axis).
        self.yc = self.framing.center_y / NOMINAL_DISTANCE
        coords = (np.arange(n, dtype=np.float32) + 0.5 - n / 2) / self.f
        dirs = np.empty((n, n, 3), np.float32)
        dirs[..., 0] = coords[None, :]
        dirs[..., 1] = self.yc - coords[:, None]
        dirs[..., 2] = 1.0
        self.dirs = dirs  # ray directions with z = 1, so the ray parameter t is the depth
        self.xs, self.ys = dirs[0, :, 0].copy(), dirs[:, 0, 1].copy()  # [n] each
        self.xy = self.xs[None, :] * self.ys[:, None]  # [n, n]
        self.background = _background(ident, n).astype(np.float32)
        self.light = _normalize(np.asarray(ident.light_dir, np.float32))
        self.skin = np.asarray(ident.skin, np.float32)
        self.hair = np.asarray(ident.hair, np.float32)
        self.brow_color = (
            self.hair * 0.55 + 0.03
            if ident.hair_name in ("blonde", "grey", "white")
            else self.hair * 0.8
        )
        self.static = _PartArrays.build(static_parts(ident))
        # Strands are ~0.12 head radii apart; fade them out (like a mip-map) where that is
        # under ~3 output pixels, or they alias into moire.
        strand_px = 0.118 * size / (2 * self.framing.half_extent)
        self.strand_amp = 0.15 * float(np.clip((strand_px - 2.5) / 4.0, 0.0, 1.0))

    # --- per frame -------------------------------------------------------------------

    def render(self, frame: Mapping[str, np.ndarray]) -> np.ndarray:
        """uint8 [size, size, 3] RGB image of one frame."""
        pa, m_all, o_all, zbuf, idbuf, backbuf, rot, trans = self._raycast(frame)
        img = self.background.copy()
        pix = np.flatnonzero(idbuf.ravel() >= 0)
        if pix.size:
            ks = idbuf.ravel()[pix].astype(np.intp)
            d = self.dirs.reshape(-1, 3)[pix]  # [P, 3]
            t = zbuf.ravel()[pix][:, None]
            m = m_all[ks]
            u = o_all[ks] + t * np.einsum("pij,pj->pi", m, d)  # unit-sphere hit coordinates
            normal = _normalize(np.einsum("pji,pj->pi", m, u))  # gradient of |M p + o|^2
            normal[backbuf.ravel()[pix]] *= -1.0  # inside of a clipped shell faces the viewer
            ctx = self._frame_context(frame, rot, trans)
            img.reshape(-1, 3)[pix] = self._shade(pa, ks, u, t * d, normal, d, ctx)
        if self.ss > 1:
            img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def segment(self, frame: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """Which part each (supersampled) pixel sees: (int16 [n, n], -1 = background;
        part names) with n = size * supersample. Ground-truth face-part segmentation."""
        pa, _, _, _, idbuf, _, _, _ = self._raycast(frame)
        return idbuf, [p.name for p in pa.parts]

    def boxes(self, frame: Mapping[str, np.ndarray], clip: bool = True) -> dict[str, np.ndarray]:
        """Where the mouth and the eyes are in this frame's image, from the 3D geometry.

        {"mouth_box", "eyes_box"} (data_pipeline.schema.BOX_LABELS): float32 [4] =
        (x0, y0, x1, y1) in [0, 1] image coordinates (x right, y down; 0 and 1 are the
        image edges), clipped to the image unless `clip` is False. mouth_box bounds the
        lips and the opening between them (the mouth decal on the lower face); eyes_box
        bounds both eyes' visible eyeballs (their parts in front of the skin, lids
        included). Occlusion (by the nose of a turned head, glasses, hair) is ignored.
        """
        pose = np.asarray(frame["pose"], np.float64)
        rot = rotation_matrix(*pose[:3])
        trans = pose[3:6]
        ident = self.ident
        ctx = {
            "ex": expression(frame["emotion_probs"]),
            "mouth_open": float(frame["mouth_open"]),
            "mouth_width": float(frame["mouth_width"]),
            "mouth_round": float(frame["mouth_round"]),
        }
        # Lips: the mouth decal between its upper and lower edges, on the lower face.
        wl = _lip_shape(ident, ctx, np.zeros(1))[1]
        x = np.linspace(-wl, wl, _LIP_SAMPLES)
        _, _, _, yc, h_up, h_lo, t_up, t_lo = _lip_shape(ident, ctx, x)
        xs = np.concatenate([x, x])
        ys = np.concatenate([yc + h_up + t_up, yc - h_lo - t_lo])
        skin = list(_base(ident))  # skull, face
        lower_face = skin[1:] + [p for p in dynamic_parts(ident, frame) if p.name in _MOUTH_PARTS]
        lips = np.stack([xs, ys, _front_z_many(lower_face, xs, ys)], 1)
        # Eyes: eyeball points in front of the skin.
        eyes = []
        for p in self.static.parts:
            if p.name in ("eye_l", "eye_r"):
                pts = np.asarray(p.center) + _EYE_SAMPLES * np.asarray(p.radii)
                front = pts[:, 2] <= _front_z_many(skin, pts[:, 0], pts[:, 1])
                eyes.append(pts[front] if front.any() else pts)
        out = {}
        for name, pts in (("mouth_box", lips), ("eyes_box", np.concatenate(eyes))):
            pts = pts[np.isfinite(pts).all(1)]
            uv = project(pts @ rot.T + trans, self.size, self.framing) / self.size
            box = np.concatenate([uv.min(0), uv.max(0)])
            out[name] = (np.clip(box, 0.0, 1.0) if clip else box).astype(np.float32)
        return out

    def part_boxes(
        self, frame: Mapping[str, np.ndarray], names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Image-space extent of whole parts (their full ellipsoids, ignoring clipping and
        occlusion): name -> float64 [4] = (x0, y0, x1, y1) in [0, 1] image coordinates
        (x right, y down), not clipped; all parts (incl. neck, torso) unless `names`."""
        pose = np.asarray(frame["pose"], np.float64)
        rot = rotation_matrix(*pose[:3])
        pa = self.static + _PartArrays.build(dynamic_parts(self.ident, frame))
        body = pa.body[:, None, None]
        m = np.where(body, pa.to_unit, pa.to_unit @ rot.T)
        c_cam = pose[3:6] + np.where(body[:, 0], pa.centers, pa.centers @ rot.T)
        x_lo, x_hi, y_lo, y_hi = _projected_bounds(m, -np.einsum("kij,kj->ki", m, c_cam))
        f = focal_length(self.size, self.framing)
        cx, cy = principal_point(self.size, self.framing)
        box = np.stack([cx + f * x_lo, cy - f * y_hi, cx + f * x_hi, cy - f * y_lo], 1)
        return {
            p.name: box[k] / self.size
            for k, p in enumerate(pa.parts)
            if names is None or p.name in names
        }

    def _raycast(self, frame: Mapping[str, np.ndarray]):
        """Pass 1: the nearest part per pixel (z-buffer over parts)."""
        pose = np.asarray(frame["pose"], np.float64)
        rot = rotation_matrix(*pose[:3])
        trans = pose[3:6]
        pa = self.static + _PartArrays.build(dynamic_parts(self.ident, frame))
        m_all, o_all, bboxes, outside = self._compile(pa, rot, trans)
        n = self.n
        zbuf = np.full((n, n), np.inf, np.float32)
        idbuf = np.full((n, n), -1, np.int16)
        backbuf = np.zeros((n, n), bool)
        with np.errstate(invalid="ignore"):  # NaN marks missed rays (see _intersect)
            for k, (bbox, out) in enumerate(zip(bboxes, outside)):
                if bbox is not None:
                    self._intersect(
                        k, pa.clips[k], m_all[k], o_all[k], bbox, out, zbuf, idbuf, backbuf
                    )
        return pa, m_all, o_all, zbuf, idbuf, backbuf, rot, trans

    def _compile(self, pa: _PartArrays, rot: np.ndarray, trans: np.ndarray):
        """Parts -> camera-frame maps to the unit sphere, u = M p + o, and screen boxes.

        Returns m [K, 3, 3] float32, o [K, 3] float32, bboxes (y0, y1, x0, x1) or None, and
        whether the camera is outside (and in front of) each part.
        """
        body = pa.body[:, None, None]
        # Head parts: u = A R^T (p - t - R c); body parts ignore R.
        m = np.where(body, pa.to_unit, pa.to_unit @ rot.T)
        c_cam = trans + np.where(body[:, 0], pa.centers, pa.centers @ rot.T)
        o = -np.einsum("kij,kj->ki", m, c_cam)
        x_lo, x_hi, y_lo, y_hi = _projected_bounds(m, o)
        outside = np.isfinite(x_lo).tolist()  # camera outside and in front of the part
        n = self.n
        x0 = np.maximum(np.floor(x_lo * self.f + n / 2).astype(int) - 1, 0)
        x1 = np.minimum(np.ceil(x_hi * self.f + n / 2).astype(int) + 1, n)
        y0 = np.maximum(np.floor(n / 2 - (y_hi - self.yc) * self.f).astype(int) - 1, 0)
        y1 = np.minimum(np.ceil(n / 2 - (y_lo - self.yc) * self.f).astype(int) + 1, n)
        bboxes = [
            box if box[0] < box[1] and box[2] < box[3] else None
            for box in zip(y0.tolist(), y1.tolist(), x0.tolist(), x1.tolist())
        ]
        return m.astype(np.float32), o.astype(np.float32), bboxes, outside

    def _intersect(self, k, clip, m, o, bbox, outside, zbuf, idbuf, backbuf) -> None:
        """Nearest kept hit of part k inside `bbox`, merged into the z-buffer.

        Rays are p = t d with d = (X, Y, 1), so M p + o = t M d + o and the hit solves
        a t^2 + 2 b t + c = 0 with a = d^T (M^T M) d, b = (M^T o) . d, c = |o|^2 - 1:
        a quadratic and a linear form in (X, Y), evaluated with row/column broadcasts.
        """
        y0, y1, x0, x1 = bbox
        xs, ys = self.xs[x0:x1], self.ys[y0:y1]
        q = (m.T @ m).tolist()  # python floats keep the arrays float32
        w = (m.T @ o).tolist()
        c = float(o @ o) - 1.0
        a = (q[0][0] * xs + 2 * q[0][2]) * xs + ((q[1][1] * ys + 2 * q[1][2]) * ys + q[2][2])[
            :, None
        ]
        a += (2 * q[0][1]) * self.xy[y0:y1, x0:x1]
        b = (w[0] * xs) + (w[1] * ys + w[2])[:, None]
        # Rays that miss get NaN (sqrt of a negative), and NaN fails every comparison below,
        # which saves masking. Valid because the camera is outside every part (checked by
        # _projected_bounds; otherwise `outside` is False and negative depths are dropped).
        sq = np.sqrt(b * b - a * c)
        t = -(b + sq) / a
        if not outside:
            t = np.where(t > 0, t, np.nan)
        back = None
        if clip is not None:
            t2 = (sq - b) / a
            keep1 = self._keep(clip, m, o, xs, ys, t)
            keep2 = self._keep(clip, m, o, xs, ys, t2)
            back = keep2 & ~keep1  # the near side is clipped away: we see the inside
            t = np.where(keep1, t, np.where(keep2, t2, np.nan))
        zs = zbuf[y0:y1, x0:x1]
        closer = t < zs
        np.copyto(zs, t, where=closer)
        np.copyto(idbuf[y0:y1, x0:x1], k, where=closer, casting="unsafe")
        np.copyto(backbuf[y0:y1, x0:x1], False if back is None else back, where=closer)

    @staticmethod
    def _keep(clip, m, o, xs, ys, t) -> np.ndarray:
        """Which hits at depth t [h, w] survive the part's clip planes and ring."""

        def along(v):  # v . u at the hits, for a vector v in unit-sphere coordinates
            g = (m.T @ v).tolist()
            return float(v @ o) + t * ((g[0] * xs) + (g[1] * ys + g[2])[:, None])

        planes, any_plane, ring = clip
        keep = None
        for a, b in planes:
            k = along(a) >= b
            keep = k if keep is None else (keep | k if any_plane else keep & k)
        if ring > 0:
            ux = along(np.array([1.0, 0.0, 0.0], np.float32))
            uy = along(np.array([0.0, 1.0, 0.0], np.float32))
            k = ux * ux + uy * uy >= ring * ring
            keep = k if keep is None else keep & k
        return keep

    # --- shading -----------------------------------------------------------------------

    def _frame_context(self, frame, rot, trans) -> dict:
        ex = expression(frame["emotion_probs"])
        gaze_cam = gaze_vector(*np.asarray(frame["gaze"], np.float64))
        return {
            "rot": rot.astype(np.float32),
            "trans": trans.astype(np.float32),
            "ex": ex,
            "gaze_local": (rot.T @ gaze_cam).astype(np.float32),
            "blink": float(frame["blink"]),
            "mouth_open": float(frame["mouth_open"]),
            "mouth_width": float(frame["mouth_width"]),
            "mouth_round": float(frame["mouth_round"]),
        }

    def _shade(self, pa: _PartArrays, ks, u, p_cam, normal, d, ctx) -> np.ndarray:
        """Colours [P, 3] of the visible hit points; ks [P] says which part each one hit."""
        ident = self.ident
        p_loc = (p_cam - ctx["trans"]) @ ctx["rot"]  # head-local hit points (R^T p)
        n = len(ks)
        albedo = np.empty((n, 3), np.float32)
        spec = np.zeros(n, np.float32)
        shininess = np.ones(n, np.float32)
        pix_mat = pa.material[ks]
        for i in np.flatnonzero(np.bincount(pix_mat, minlength=len(MATERIALS))):
            mat = MATERIALS[i]
            sel = np.flatnonzero(pix_mat == i)
            us = u[sel]
            if mat == "skin":
                nose, mouth = pa.nose[ks[sel]], pa.mouth[ks[sel]]
                albedo[sel] = self._skin_decals(us, p_loc[sel], nose, mouth, ctx)
            elif mat == "eye":
                albedo[sel], open_eye = self._eye(us, ctx)
                spec[sel], shininess[sel] = 0.9 * open_eye, 120.0
            elif mat == "brow":
                albedo[sel] = self.brow_color
            elif mat in ("hair", "hair_sparse"):
                albedo[sel] = self._hair(us, mat == "hair_sparse")
                spec[sel], shininess[sel] = 0.08, 12.0
            elif mat == "ear":
                concha = (us[:, 1] ** 2 + us[:, 2] ** 2) < 0.3
                albedo[sel] = (
                    self.skin
                    * np.where(concha, 0.7, 0.97)[:, None]
                    * np.array([1.0, 0.93, 0.93], np.float32)
                )
            elif mat == "neck":
                albedo[sel] = self.skin * 0.86
            elif mat == "cloth":
                albedo[sel] = ident.clothes
            elif mat == "glasses":
                albedo[sel] = ident.glasses_color
                spec[sel], shininess[sel] = 0.5, 60.0
            elif mat == "metal":
                albedo[sel] = ident.earring_color
                spec[sel], shininess[sel] = 1.0, 40.0
            else:
                raise ValueError(f"unknown material {mat!r}")
        light = self.light
        ndl = normal @ light
        diffuse = np.clip((ndl + 0.3) / 1.3, 0.0, 1.0)  # wrapped Lambert: softer skin
        ambient = ident.ambient * (0.85 + 0.15 * normal[:, 1])  # brighter from the sky
        color = albedo * (ambient + (1.0 - ident.ambient) * diffuse)[:, None]
        shiny = np.flatnonzero(spec > 0)
        if shiny.size:
            half = _normalize(light - _normalize(d[shiny]))  # view direction is -d
            nh = np.clip(np.einsum("pc,pc->p", normal[shiny], half), 0.0, 1.0)
            color[shiny] += (spec[shiny] * nh ** shininess[shiny] * (ndl[shiny] > 0))[:, None]
        return color

    def _eye(self, u: np.ndarray, ctx: dict):
        """Eyeball + lids on the eye sphere. u: [P, 3] unit vectors from the eye centre."""
        ex = ctx["ex"]
        g = ctx["gaze_local"]
        cos_a = u @ g
        ang = np.arccos(np.clip(cos_a, -1.0, 1.0))
        iris_col = np.asarray(self.ident.iris, np.float32)
        # Iris: radial streaks (angle around the gaze axis) and a dark limbal ring.
        ref = _cross(g, np.array([0.0, 1.0, 0.0], np.float32))
        ref /= max(float(np.linalg.norm(ref)), 1e-6)
        ref2 = _cross(g, ref)
        around = np.arctan2(u @ ref2, u @ ref)
        streak = 0.85 + 0.2 * np.sin(17 * around) * np.sin(5 * around + 1.3)
        radial = ang / IRIS_ANGLE
        iris = iris_col * (streak * (1.15 - 0.45 * radial**4))[:, None]
        albedo = np.where((ang < IRIS_ANGLE)[:, None], iris, _SCLERA)
        albedo = np.where((ang < PUPIL_ANGLE)[:, None], np.float32(0.03), albedo)
        # Lids: visible where lower(x) < u_y < upper(x); blink lowers the upper lid.
        upper0 = 0.4 + 0.22 * ex["lid_upper"] + 0.35 * g[1]
        lower = -0.42 + 0.28 * ex["lid_lower"] + 0.1 * min(g[1], 0.0)
        upper = upper0 + (lower - 0.03 - upper0) * ctx["blink"]
        uy = u[:, 1]
        ux2 = u[:, 0] ** 2
        up_edge = upper - 0.35 * ux2
        lo_edge = lower + 0.3 * ux2
        lid_up = uy > up_edge
        lid_lo = uy < lo_edge
        lid = lid_up | lid_lo
        lid_col = self.skin * 0.9
        lash = lid_up & (uy < up_edge + 0.14)
        albedo = np.where(lid[:, None], lid_col, albedo)
        albedo = np.where(lash[:, None], self.hair * 0.3 + 0.02, albedo)
        albedo = np.where((lid_lo & (uy > lo_edge - 0.06))[:, None], self.skin * 0.7, albedo)
        return albedo, (~lid).astype(np.float32)

    def _hair(self, u: np.ndarray, sparse: bool) -> np.ndarray:
        """Hair albedo [P, 3]: locks (13 per turn) and strands (48 per turn, slightly wavy)."""
        around = np.arctan2(u[:, 0], u[:, 2] + 1e-6)
        strand = 0.9 + 0.07 * np.sin(13 * around + 1.0)
        strand += self.strand_amp * np.sin(48 * around + 3 * u[:, 1]) * np.sin(13 * around)
        col = self.hair * strand[:, None]
        if sparse:
            col = 0.55 * col + 0.45 * self.skin
        return col

    def _skin_decals(self, u, p_loc, nose: np.ndarray, mouth: np.ndarray, ctx) -> np.ndarray:
        """Skin colour with mouth, lips, beard, eye-socket shade, blush and nostrils.

        u, p_loc: [P, 3] unit-sphere / head-local hit points; nose, mouth: [P] bool, the
        points on the nose parts (nostrils) / the lower-face parts (mouth decal).
        """
        ident = self.ident
        x, y, z = p_loc[:, 0], p_loc[:, 1], p_loc[:, 2]
        albedo = np.broadcast_to(self.skin, p_loc.shape).copy()
        ax = np.abs(x)  # the face is symmetric: one formula serves both sides
        front = z < -0.3
        # Eye sockets and the upper lid crease sit in shadow; cheeks blush (more if smiling).
        ey = 0.1 + ident.eye_height
        r2 = (ax - 0.31 * ident.eye_spacing) ** 2 / 0.05 + (y - ey - 0.02) ** 2 / 0.022
        albedo *= (1.0 - 0.16 * np.exp(-r2) * front)[:, None]
        blush = 0.05 + 0.05 * max(ctx["ex"]["corner"], 0.0)
        r2 = ((ax - 0.38) ** 2 + (y + 0.2) ** 2) / 0.03
        albedo[:, 1:] *= (1.0 - blush * np.exp(-r2) * front)[:, None]
        if nose.any():
            r2 = ((ax - 0.055 * ident.nose_width) / 0.035) ** 2 + (
                (y + 0.37 * ident.nose_length) / 0.022
            ) ** 2
            albedo *= (1.0 - 0.75 * ((r2 < 1.0) & (u[:, 1] < 0) & nose))[:, None]
        if ident.beard != "none":
            albedo = self._beard(albedo, x, y, z)
        # The mouth decal only where it can be: a box around the mouth on the lower face.
        ym = mouth_y(ident)
        near = mouth & (ax < 0.32 * ident.mouth_width) & (y < ym + 0.2) & (y > ym - 0.3)
        near = np.flatnonzero(near & (z < -0.4))
        if near.size:
            albedo[near] = self._mouth(albedo[near], x[near], y[near], z[near], ctx)
        return albedo

    def _beard(self, albedo, x, y, z):
        """Beard / moustache / stubble mixed into the skin albedo [P, 3] (head-local x, y, z)."""
        ident = self.ident
        ym = mouth_y(ident)
        front = z < 0.1

        def ramp(v, width):  # soft edges, so the beard does not look pasted on
            return np.clip(v / width + 0.5, 0.0, 1.0)

        if ident.beard == "moustache":
            region = ramp(y - ym - 0.03, 0.02) * ramp(ym + 0.13 - y, 0.03)
            region *= ramp(0.2 - np.abs(x), 0.05)
            density = 0.85
        else:
            # The upper edge rises from the mouth corners to the sideburns.
            edge = ym + 0.12 + 0.55 * np.clip(np.abs(x) - 0.22, 0.0, 0.5)
            region = ramp(edge - y, 0.1)
            density = 0.9 if ident.beard == "full" else 0.3
        mix = density * region * front
        return albedo * (1 - mix)[:, None] + (self.hair * 0.9)[None] * mix[:, None]

    def _mouth(self, albedo, x, y, z, ctx):
        """Lips and the mouth opening (cavity, teeth, tongue), in head-local x/y."""
        ident = self.ident
        mo = ctx["mouth_open"]
        _, wl, xn, yc, h_up, h_lo, t_up, t_lo = _lip_shape(ident, ctx, x)
        inside_w = np.abs(xn) < 1.0
        front = z < -0.4
        dy = y - yc
        upper_lip = front & (np.abs(x) < wl) & (dy > h_up) & (dy < h_up + t_up)
        lower_lip = front & (np.abs(x) < wl) & (dy < -h_lo) & (dy > -h_lo - t_lo)
        opening = front & inside_w & (dy <= h_up) & (dy >= -h_lo)
        lips = np.asarray(ident.lips, np.float32)
        albedo = np.where(upper_lip[:, None], lips * 0.92, albedo)
        albedo = np.where(lower_lip[:, None], lips, albedo)
        if np.any(opening):
            top, bottom = yc + h_up, yc - h_lo
            depth = np.clip(np.minimum(top - y, y - bottom) / 0.05, 0.0, 1.0)
            cav = _CAVITY[None] * (1.0 - 0.5 * depth)[:, None]
            teeth_up = (top - y < 0.03) & (np.abs(xn) < 0.78)
            teeth_lo = (y - bottom < 0.018 * min(mo * 3, 1.0)) & (np.abs(xn) < 0.65)
            tongue = (y - bottom < 0.045) & (mo > 0.35) & ~teeth_lo
            col = np.where(tongue[:, None], _TONGUE * 0.6, cav)
            col = np.where((teeth_up | teeth_lo)[:, None], _TEETH * 0.85, col)
            albedo = np.where(opening[:, None], col, albedo)
        return albedo
