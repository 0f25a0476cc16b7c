"""SynthTalk identities: what stays fixed for one synthetic person across all their clips.

An identity is head shape proportions, colours (skin, hair, iris, lips, clothes), hair style,
beard, accessories (glasses, earrings), background, lighting, and speaking habits (voice,
blink rate, how much the head moves). `sample_identity(seed, index)` draws one from
`np.random.SeedSequence([seed, index, _IDENTITY_STREAM])`, so identity i of a corpus never
depends on how many identities or clips are generated, nor on which worker draws it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

HAIR_STYLES = ("bald", "buzz", "short", "fringe", "bob", "long", "bun")
BEARDS = ("none", "stubble", "moustache", "full")
BACKGROUNDS = ("flat", "vgradient", "hgradient", "radial", "stripes", "checker", "dots")

# Skin tones (sRGB in [0, 1]) from light to dark; identities interpolate between neighbours.
_SKIN = np.array(
    [
        [0.97, 0.82, 0.72],
        [0.93, 0.74, 0.61],
        [0.84, 0.63, 0.48],
        [0.70, 0.50, 0.35],
        [0.55, 0.37, 0.25],
        [0.38, 0.25, 0.17],
    ],
    np.float32,
)
_HAIR = {
    "black": (0.07, 0.06, 0.06),
    "dark_brown": (0.20, 0.13, 0.08),
    "brown": (0.38, 0.24, 0.14),
    "auburn": (0.52, 0.23, 0.11),
    "blonde": (0.86, 0.72, 0.45),
    "grey": (0.62, 0.62, 0.62),
    "white": (0.90, 0.90, 0.88),
    "dyed_blue": (0.18, 0.30, 0.70),
    "dyed_pink": (0.85, 0.40, 0.60),
}
_HAIR_P = (0.30, 0.22, 0.15, 0.08, 0.10, 0.06, 0.03, 0.03, 0.03)
_IRIS = {
    "dark": (0.16, 0.09, 0.05),
    "brown": (0.36, 0.20, 0.09),
    "hazel": (0.50, 0.40, 0.18),
    "green": (0.30, 0.52, 0.28),
    "blue": (0.30, 0.50, 0.78),
    "grey": (0.52, 0.57, 0.62),
}
_IRIS_P = (0.30, 0.30, 0.12, 0.08, 0.14, 0.06)
_IDENTITY_STREAM = 0x1D  # separates identity draws from clip draws of the same (seed, index)

# espeak-ng voices: languages (the identity's mother tongue) and voice variants.
LANGUAGES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "de", "fr-fr", "es", "it", "nl")
_LANGUAGE_P = (0.30, 0.14, 0.06, 0.05, 0.10, 0.10, 0.10, 0.08, 0.07)
MALE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "klatt", "klatt3", "david", "max")
FEMALE_VARIANTS = ("f1", "f2", "f3", "f4", "f5", "Alicia", "Andrea", "Annie", "linda", "steph")


@dataclasses.dataclass
class Identity:
    """One synthetic person. Shape scales are ~1 (multipliers of the base head model)."""

    index: int
    female: bool
    # Shape proportions.
    head_width: float
    head_height: float
    face_length: float
    jaw_width: float
    chin: float
    cheek: float
    nose_length: float
    nose_width: float
    nose_depth: float
    eye_spacing: float
    eye_size: float
    eye_height: float
    ear_size: float
    mouth_width: float
    lip_fullness: float
    brow_thickness: float
    neck_width: float
    # Colours: sRGB in [0, 1].
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_name: str
    iris: tuple[float, float, float]
    iris_name: str
    lips: tuple[float, float, float]
    clothes: tuple[float, float, float]
    # Style and accessories.
    hair_style: str
    hair_volume: float
    hairline: float
    beard: str
    glasses: bool
    glasses_color: tuple[float, float, float]
    glasses_size: float
    earrings: bool
    earring_color: tuple[float, float, float]
    # Scene.
    background: str
    bg_colors: tuple[tuple[float, float, float], tuple[float, float, float]]
    bg_param: float
    light_dir: tuple[float, float, float]
    ambient: float
    # Habits (drive the motion generator).
    blink_interval: float  # mean seconds between blinks
    motion_scale: float  # head-motion amplitude multiplier
    expressiveness: float  # mouth amplitude multiplier
    language: str
    voice_variant: str
    voice_pitch: int  # espeak-ng -p (0..99)
    voice_rate: int  # espeak-ng -s (words per minute), varied per clip around this
    f0: float  # fundamental frequency (Hz) of the formant fallback voice

    def to_attrs(self) -> dict[str, Any]:
        """JSON-able description (stored in clip.attrs["identity"])."""
        out = {}
        for k, v in dataclasses.asdict(self).items():
            if isinstance(v, float):
                v = round(v, 4)
            elif isinstance(v, tuple):
                v = np.round(np.asarray(v, np.float64), 4).tolist()
            out[k] = v
        return out


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return (float(r), float(g), float(b))


def _col(x) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.clip(np.asarray(x, np.float64), 0.0, 1.0))


def sample_identity(seed: int, index: int) -> Identity:
    """Draws identity `index` of the corpus with seed `seed` (pure function of both)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, _IDENTITY_STREAM]))
    u = rng.uniform
    female = bool(rng.random() < 0.5)

    # Skin: a point on the tone scale plus a small warm/cool shift.
    pos = u(0, len(_SKIN) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(_SKIN) - 1)
    skin = _SKIN[lo] + (pos - lo) * (_SKIN[hi] - _SKIN[lo])
    skin = skin * u(0.95, 1.05) + np.array([u(-0.02, 0.03), u(-0.02, 0.02), u(-0.03, 0.02)])
    lips = skin * np.array([0.86, 0.58, 0.58]) + np.array([0.10, 0.02, 0.03])
    if female and rng.random() < 0.35:  # lipstick
        lips = np.array(_hsv(u(0.93, 1.02) % 1.0, u(0.5, 0.8), u(0.45, 0.8)))

    hair_name = str(rng.choice(list(_HAIR), p=_HAIR_P))
    hair = np.array(_HAIR[hair_name]) * u(0.85, 1.15)
    iris_name = str(rng.choice(list(_IRIS), p=_IRIS_P))
    iris = np.array(_IRIS[iris_name]) * u(0.85, 1.15)

    if female:
        style = str(rng.choice(HAIR_STYLES, p=(0.02, 0.02, 0.10, 0.14, 0.24, 0.36, 0.12)))
        beard = "none"
    else:
        style = str(rng.choice(HAIR_STYLES, p=(0.12, 0.16, 0.38, 0.14, 0.08, 0.08, 0.04)))
        beard = str(rng.choice(BEARDS, p=(0.55, 0.2, 0.1, 0.15)))
    if hair_name in ("grey", "white") and not female and rng.random() < 0.4:
        style = "bald"

    bg_kind = str(rng.choice(BACKGROUNDS, p=(0.15, 0.2, 0.12, 0.18, 0.12, 0.1, 0.13)))
    bg_a = _hsv(u(), u(0.05, 0.45), u(0.35, 0.95))
    bg_b = _hsv(u(), u(0.05, 0.45), u(0.25, 0.9))
    light = np.array([u(-0.8, 0.8), u(0.3, 0.9), -1.0])
    light /= np.linalg.norm(light)

    language = str(rng.choice(LANGUAGES, p=_LANGUAGE_P))
    variants = FEMALE_VARIANTS if female else MALE_VARIANTS
    return Identity(
        index=int(index),
        female=female,
        head_width=u(0.92, 1.06) * (0.97 if female else 1.0),
        head_height=u(0.94, 1.06),
        face_length=u(0.92, 1.1),
        jaw_width=u(0.82, 1.08) * (0.94 if female else 1.0),
        chin=u(0.85, 1.2),
        cheek=u(0.92, 1.08),
        nose_length=u(0.85, 1.15),
        nose_width=u(0.8, 1.25),
        nose_depth=u(0.85, 1.2),
        eye_spacing=u(0.93, 1.08),
        eye_size=u(0.9, 1.12),
        eye_height=u(-0.03, 0.03),
        ear_size=u(0.85, 1.15),
        mouth_width=u(0.88, 1.12),
        lip_fullness=u(0.75, 1.3) * (1.1 if female else 1.0),
        brow_thickness=u(0.7, 1.3) * (0.8 if female else 1.1),
        neck_width=u(0.85, 1.1) * (0.9 if female else 1.0),
        skin=_col(skin),
        hair=_col(hair),
        hair_name=hair_name,
        iris=_col(iris),
        iris_name=iris_name,
        lips=_col(lips),
        clothes=_hsv(u(), u(0.1, 0.8), u(0.15, 0.85)),
        hair_style=style,
        hair_volume=u(0.0, 1.0),
        hairline=u(-0.06, 0.08),
        beard=beard,
        glasses=bool(rng.random() < 0.28),
        glasses_color=_col(np.array(_hsv(u(), u(0.0, 0.7), u(0.05, 0.5)))),
        glasses_size=u(0.9, 1.15),
        earrings=bool(rng.random() < (0.45 if female else 0.08)),
        earring_color=(0.85, 0.7, 0.3) if rng.random() < 0.6 else (0.8, 0.8, 0.82),
        background=bg_kind,
        bg_colors=(bg_a, bg_b),
        bg_param=u(0.0, 1.0),
        light_dir=tuple(float(v) for v in light),  # unit vector towards the light, camera frame
        ambient=u(0.3, 0.45),
        blink_interval=u(2.0, 6.0),
        motion_scale=u(0.6, 1.3),
        expressiveness=u(0.85, 1.1),
        language=language,
        voice_variant=str(rng.choice(variants)),
        voice_pitch=int(rng.integers(25, 60) + (15 if female else 0)),
        voice_rate=int(rng.integers(135, 180)),
        f0=float(u(180, 250) if female else u(95, 145)),
    )
