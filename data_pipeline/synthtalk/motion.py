"""Per-frame ground truth for a SynthTalk clip, driven by its speech.

- Mouth: opening follows the per-frame RMS envelope (relative to speech.REFERENCE_RMS),
  width/roundness follow the spectral centroid of the voiced sound (low F2 "oo" -> round,
  high F2 "ee" -> wide); asymmetric smoothing (fast opening, slower closing) and the audio
  leads the mouth by MOUTH_LAG_FRAMES frames.
- Head: a slow, smoothed random walk (Ornstein-Uhlenbeck) per angle plus prosody (pitch
  contour and loudness nod the head), soft-bounded to about +-25 / 15 / 10 deg of
  yaw / pitch / roll; small translation drift; distance drifts slowly around a per-clip
  value.
- Blinks: Poisson process (identity's mean interval, 2-6 s), 150-250 ms each.
- Gaze: fixations (mostly at the camera) joined by 2-frame saccades, limited by how far
  eyes turn in the head; the label is the rendered direction after that limit.
- Emotion: one per clip (blended with neutral by an intensity), sometimes a transition to a
  second one; `emotion_probs` carry the blend, `emotion` its argmax.

Every label returned is exactly what the renderer receives.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.schema import EMOTIONS, FPS, SAMPLE_RATE
from data_pipeline.synthtalk.identity import Identity
from data_pipeline.synthtalk.render import (
    NOMINAL_DISTANCE,
    gaze_angles,
    gaze_vector,
    rotation_matrix,
)
from data_pipeline.synthtalk.speech import REFERENCE_RMS
from data_pipeline.synthtalk.sync import frame_rms

MOUTH_LAG_FRAMES = 1  # the mouth follows the audio by one frame (40 ms)
POSE_LIMITS = (25.0, 15.0, 10.0)  # soft bounds on |yaw|, |pitch|, |roll| in degrees
EYE_LIMITS = ((-25.0, 20.0), (-35.0, 35.0))  # eye-in-head (theta, phi) range, degrees
# Gaze fixations: this share look at the camera (the listener), the rest at a point drawn
# uniformly from GAZE_AVERTED (theta, phi) ranges in degrees. Corpora before 2026-12-06 used
# 0.55 and ((-12, 10), (-22, 22)): camera-frame gaze std 3.8 / 7.5 degrees, too little for a
# 64 px stage 1 to carry the iris direction (docs/experiments.md, "gaze").
GAZE_AT_CAMERA = 0.3
GAZE_AVERTED = ((-15.0, 12.0), (-25.0, 25.0))
# How often each emotion is a clip's main emotion.
EMOTION_WEIGHTS = {
    "neutral": 0.3,
    "happy": 0.2,
    "sad": 0.12,
    "surprise": 0.1,
    "fear": 0.06,
    "disgust": 0.06,
    "anger": 0.1,
    "contempt": 0.06,
}


# ----------------------------------------------------------------------------- helpers


def smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing along axis 0 (edges padded by repetition)."""
    if sigma <= 0:
        return x
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(x, [(r, r)] + [(0, 0)] * (x.ndim - 1), mode="edge")
    if x.ndim == 1:
        return np.convolve(pad, k, mode="valid")
    return np.stack([np.convolve(pad[:, j], k, mode="valid") for j in range(x.shape[1])], 1)


def follow(x: np.ndarray, attack: float, release: float) -> np.ndarray:
    """One-pole follower: moves a fraction `attack` towards rising, `release` falling input."""
    y = np.empty_like(x)
    prev = x[0]
    for t, v in enumerate(x):
        prev = prev + (v - prev) * (attack if v > prev else release)
        y[t] = prev
    return y


def delay(x: np.ndarray, frames: int) -> np.ndarray:
    """x shifted later by `frames` (the first values repeat x[0])."""
    if frames <= 0:
        return x
    return np.concatenate([np.repeat(x[:1], frames, 0), x[:-frames]], 0)


def ornstein_uhlenbeck(rng: np.random.Generator, n: int, tau: float, sigma: float) -> np.ndarray:
    """Mean-reverting random walk [n] with stationary std `sigma`, time constant `tau`."""
    x = np.empty(n)
    v = rng.normal(0.0, sigma)
    a = np.exp(-1.0 / tau)
    noise = rng.normal(0.0, sigma * np.sqrt(1 - a * a), n)
    for t in range(n):
        v = a * v + noise[t]
        x[t] = v
    return x


# ----------------------------------------------------------------------------- audio


def audio_features(
    audio: np.ndarray, num_frames: int, fps: float = FPS, sample_rate: int = SAMPLE_RATE
) -> dict[str, np.ndarray]:
    """Per-frame features of audio [N]: rms, voiced (bool), f0 (Hz, 0 if unvoiced),
    centroid (Hz, spectral centroid over 250-4000 Hz). All [num_frames]."""
    spf = int(round(sample_rate / fps))
    rms = frame_rms(audio, num_frames, fps, sample_rate)
    x = np.zeros(num_frames * spf, np.float64)
    m = min(len(audio), len(x))
    x[:m] = audio[:m]
    frames = x.reshape(num_frames, spf) * np.hanning(spf)
    spec = np.abs(np.fft.rfft(frames, n=2 * spf, axis=1)) ** 2
    freqs = np.fft.rfftfreq(2 * spf, 1.0 / sample_rate)
    band = (freqs >= 250) & (freqs <= 4000)
    centroid = (spec[:, band] @ freqs[band]) / np.maximum(spec[:, band].sum(1), 1e-12)
    # Autocorrelation pitch: the strongest peak between 70 and 400 Hz.
    ac = np.fft.irfft(spec, axis=1)[:, :spf]
    lo, hi = int(sample_rate / 400), int(sample_rate / 70)
    lag = lo + np.argmax(ac[:, lo:hi], axis=1)
    strength = ac[np.arange(num_frames), lag] / np.maximum(ac[:, 0], 1e-12)
    voiced = (strength > 0.35) & (rms > 0.1 * REFERENCE_RMS)
    f0 = np.where(voiced, sample_rate / lag, 0.0)
    return {"rms": rms, "voiced": voiced, "f0": f0, "centroid": np.where(rms > 0, centroid, 0)}


# ----------------------------------------------------------------------------- tracks


def emotion_track(rng: np.random.Generator, n: int, fps: float = FPS):
    """(probs float32 [n, len(EMOTIONS)], names of the emotions used)."""
    names = list(EMOTION_WEIGHTS)
    p = np.array(list(EMOTION_WEIGHTS.values()))
    p /= p.sum()

    def mix(name):
        v = np.zeros(len(EMOTIONS))
        intensity = 1.0 if name == "neutral" else rng.uniform(0.6, 1.0)  # > 0.5: stays argmax
        v[EMOTIONS.index(name)] += intensity
        v[EMOTIONS.index("neutral")] += 1.0 - intensity
        return v

    first = names[rng.choice(len(names), p=p)]
    probs = np.tile(mix(first), (n, 1))
    used = [first]
    if rng.random() < 0.3 and n > 2 * fps:
        second = names[rng.choice(len(names), p=p)]
        if second != first:
            start = int(rng.uniform(0.3, 0.7) * n)
            length = max(int(rng.uniform(0.4, 0.8) * fps), 1)
            w = np.clip((np.arange(n) - start) / length, 0.0, 1.0)[:, None]
            probs = (1 - w) * probs + w * mix(second)
            used.append(second)
    return probs.astype(np.float32), used


def blink_track(rng: np.random.Generator, n: int, interval: float, fps: float = FPS):
    """Eyelid closure [n] in [0, 1]: Poisson blinks, fast close (35%), slower reopening."""
    out = np.zeros(n)
    seconds = n / fps
    t = rng.uniform(0.0, interval)
    times = np.arange(n) / fps
    while t < seconds:
        dur = rng.uniform(0.15, 0.25)
        amp = 1.0 if rng.random() < 0.85 else rng.uniform(0.6, 0.9)
        tc = 0.35 * dur
        phase = times - t
        closing = (phase >= 0) & (phase < tc)
        opening = (phase >= tc) & (phase < dur)
        b = np.zeros(n)
        b[closing] = np.sin(0.5 * np.pi * phase[closing] / tc)
        b[opening] = np.cos(0.5 * np.pi * (phase[opening] - tc) / (dur - tc))
        out = np.maximum(out, amp * b)
        t += dur + max(0.4, rng.exponential(interval))
    return out


def gaze_targets(rng: np.random.Generator, n: int, fps: float = FPS) -> np.ndarray:
    """Camera-frame gaze (theta, phi) degrees [n, 2]: fixations joined by saccades."""
    out = np.zeros((n, 2))
    t = 0
    prev = None
    while t < n:
        if rng.random() < GAZE_AT_CAMERA:
            target = rng.normal(0.0, 1.5, 2)
        else:
            target = np.array([rng.uniform(*GAZE_AVERTED[0]), rng.uniform(*GAZE_AVERTED[1])])
        fix = max(int(rng.uniform(0.3, 2.0) * fps), 2)
        out[t : t + fix] = target
        if prev is not None:  # 2-frame saccade from the previous fixation
            for k in range(min(2, n - t)):
                out[t + k] = prev + (target - prev) * (k + 1) / 3.0
        prev = target
        t += fix
    return out + rng.normal(0.0, 0.25, (n, 2))  # fixational jitter


def _limit_gaze(gaze_cam: np.ndarray, rots: np.ndarray) -> np.ndarray:
    """Clamps the eye-in-head angles; returns the rendered camera-frame angles [n, 2]."""
    v = gaze_vector(gaze_cam[:, 0], gaze_cam[:, 1])  # [n, 3]
    local = np.einsum("nji,nj->ni", rots, v)  # R^T v
    ang = gaze_angles(local)
    ang[:, 0] = np.clip(ang[:, 0], *EYE_LIMITS[0])
    ang[:, 1] = np.clip(ang[:, 1], *EYE_LIMITS[1])
    v = np.einsum("nij,nj->ni", rots, gaze_vector(ang[:, 0], ang[:, 1]))
    return gaze_angles(v)


def generate_labels(
    seed: np.random.SeedSequence,
    ident: Identity,
    audio: np.ndarray,
    num_frames: int,
    fps: float = FPS,
    sample_rate: int = SAMPLE_RATE,
) -> tuple[dict[str, np.ndarray], dict]:
    """All schema.LABELS for one clip, and attrs (emotion names, lag)."""
    r_pose, r_blink, r_gaze, r_emo, r_misc = (np.random.default_rng(s) for s in seed.spawn(5))
    n = num_frames
    feats = audio_features(audio, n, fps, sample_rate)
    probs, emotions = emotion_track(r_emo, n, fps)
    pe = {name: probs[:, EMOTIONS.index(name)] for name in EMOTIONS}

    # Mouth from the envelope (shared reference level: see speech.normalize_level).
    level = feats["rms"] / REFERENCE_RMS
    opening = delay(follow(np.clip(level, 0.0, 1.1), 0.85, 0.6), MOUTH_LAG_FRAMES)
    cn = np.clip((feats["centroid"] - 800.0) / 1400.0, 0.0, 1.0)
    voice = np.clip(level * 2.0, 0.0, 1.0)
    round_raw = delay(follow(voice * np.clip(1.0 - 2.0 * cn, 0, 1), 0.6, 0.5), MOUTH_LAG_FRAMES)
    wide_raw = delay(follow(voice * cn, 0.6, 0.5), MOUTH_LAG_FRAMES)
    mouth_open = np.clip(
        ident.expressiveness * 0.9 * opening * (1 - 0.25 * pe["anger"]) + 0.1 * pe["surprise"],
        0.0,
        1.0,
    )
    mouth_round = np.clip(0.8 * round_raw, 0.0, 1.0)
    mouth_width = np.clip(
        0.35
        + 0.5 * wide_raw
        - 0.2 * round_raw
        + 0.35 * pe["happy"]
        + 0.2 * pe["fear"]
        + 0.1 * pe["contempt"],
        0.0,
        1.0,
    )

    # Prosody: smoothed loudness and a z-scored log-pitch contour (held over unvoiced).
    loud = smooth(level, 3.0)
    f0z = np.zeros(n)
    if feats["voiced"].sum() >= 3:
        idx = np.flatnonzero(feats["voiced"])
        logf = np.log(feats["f0"][idx])
        z = (logf - logf.mean()) / max(logf.std(), 1e-3)
        f0z = np.interp(np.arange(n), idx, z)
    f0z = smooth(f0z, 4.0)

    ms = ident.motion_scale
    signs = r_pose.choice([-1.0, 1.0], 2)
    yaw = r_pose.uniform(-10, 10) + smooth(ornstein_uhlenbeck(r_pose, n, 45, 7.0 * ms), 3)
    pitch = r_pose.uniform(-5, 5) + smooth(ornstein_uhlenbeck(r_pose, n, 35, 4.0 * ms), 3)
    roll = r_pose.uniform(-4, 4) + smooth(ornstein_uhlenbeck(r_pose, n, 50, 3.0 * ms), 3)
    yaw += ms * signs[0] * 2.5 * f0z
    pitch += ms * (1.5 * f0z + 4.0 * (loud - loud.mean()))
    roll += ms * signs[1] * 1.2 * f0z
    angles = np.stack([yaw, pitch, roll], 1)
    limits = np.array(POSE_LIMITS)
    angles = limits * np.tanh(angles / limits)
    tx = smooth(ornstein_uhlenbeck(r_pose, n, 60, 0.07), 3) + 0.004 * angles[:, 0]
    ty = 0.12 + smooth(ornstein_uhlenbeck(r_pose, n, 60, 0.04), 3) + 0.003 * angles[:, 1]
    distance = r_pose.uniform(0.88, 1.15) + smooth(ornstein_uhlenbeck(r_pose, n, 100, 0.03), 5)
    pose = np.concatenate([angles, np.stack([tx, ty, distance * NOMINAL_DISTANCE], 1)], 1)
    pose = pose.astype(np.float32)
    distance = pose[:, 5] / np.float32(NOMINAL_DISTANCE)

    rots = np.stack([rotation_matrix(*a) for a in pose[:, :3].astype(np.float64)])
    gaze = _limit_gaze(gaze_targets(r_gaze, n, fps), rots)
    blink = blink_track(r_blink, n, ident.blink_interval, fps)

    # Brow raises: pitch accents, occasional emphasis raises, emotion.
    raises = np.zeros(n)
    t = r_misc.uniform(0, 3.0)
    while t < n / fps:
        start, length = int(t * fps), int(r_misc.uniform(0.4, 0.9) * fps)
        raises[start : start + length] = r_misc.uniform(0.2, 0.4)
        t += r_misc.exponential(3.0) + 0.5
    brow = np.clip(
        0.12
        + ms * 0.2 * np.clip(f0z, 0.0, 2.0)
        + smooth(raises, 2.0)
        + 0.55 * pe["surprise"]
        + 0.35 * pe["fear"]
        + 0.1 * pe["sad"]
        - 0.12 * pe["anger"],
        0.0,
        1.0,
    )

    labels = {
        "pose": pose,
        "gaze": gaze,
        "blink": blink,
        "brow": brow,
        "mouth_open": mouth_open,
        "mouth_width": mouth_width,
        "mouth_round": mouth_round,
        "emotion": np.argmax(probs, axis=1).astype(np.int32),
        "emotion_probs": probs,
        "distance": distance,
    }
    labels = {k: (v if v.dtype == np.int32 else v.astype(np.float32)) for k, v in labels.items()}
    attrs = {"emotions": emotions, "mouth_lag_frames": MOUTH_LAG_FRAMES}
    return labels, attrs
