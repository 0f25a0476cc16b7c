"""Mouth-audio synchrony check: does ground-truth `mouth_open` follow the speech envelope?

Definition (shared with `python -m data_pipeline.inspect --check`): frame t's audio is
samples [t * spf, (t + 1) * spf) with spf = sample_rate / fps (640 at 16 kHz / 25 fps),
its envelope value is the RMS of those samples (zero-padded past the end). For each lag
L in [-max_lag, max_lag] the pairs (mouth_open[t], rms[t - L]) of all clips are pooled
and Pearson's r is computed; the result is the best r and its lag. L > 0 means the mouth
follows the audio by L frames.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from data_pipeline.schema import FPS, SAMPLE_RATE, Clip


def frame_rms(
    audio: np.ndarray, num_frames: int, fps: float = FPS, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """Per-video-frame RMS envelope: float32 [num_frames] of audio [N]."""
    spf = sample_rate / fps
    if abs(spf - round(spf)) > 1e-9:
        raise ValueError(f"sample_rate / fps = {spf} is not an integer")
    spf = int(round(spf))
    x = np.zeros(num_frames * spf, np.float64)
    m = min(len(audio), len(x))
    x[:m] = audio[:m]
    return np.sqrt(np.mean(x.reshape(num_frames, spf) ** 2, axis=1)).astype(np.float32)


def mouth_audio_correlation(
    mouths: Sequence[np.ndarray],
    audios: Sequence[np.ndarray],
    max_lag: int = 3,
    fps: float = FPS,
    sample_rate: int = SAMPLE_RATE,
) -> tuple[float, int]:
    """Pooled Pearson r between mouth_open [T_i] and frame RMS at the best lag.

    Returns (r, lag). Raises ValueError if there is nothing to correlate.
    """
    if len(mouths) != len(audios) or not mouths:
        raise ValueError(f"need matching, non-empty lists ({len(mouths)} vs {len(audios)})")
    envs = [frame_rms(a, len(m), fps, sample_rate) for m, a in zip(mouths, audios)]
    return correlation_from_envelopes(mouths, envs, max_lag)


def correlation_from_envelopes(
    mouths: Sequence[np.ndarray], envs: Sequence[np.ndarray], max_lag: int = 3
) -> tuple[float, int]:
    """`mouth_audio_correlation` given per-frame envelopes [T_i] instead of audio."""
    if len(mouths) != len(envs) or not mouths:
        raise ValueError(f"need matching, non-empty lists ({len(mouths)} vs {len(envs)})")
    acc = SyncAccumulator(max_lag)
    for m, e in zip(mouths, envs):
        acc.add(m, e)
    return acc.result()


class SyncAccumulator:
    """Streaming pooled Pearson r per lag (constant memory for any corpus size).

    Keeps n, sum x, sum y, sum xy, sum x^2, sum y^2 of the pairs (mouth[t], env[t - lag])
    for every lag in [-max_lag, max_lag].
    """

    def __init__(self, max_lag: int = 3):
        if max_lag < 0:
            raise ValueError(f"max_lag must be >= 0, got {max_lag}")
        self.lags = np.arange(-max_lag, max_lag + 1)
        self.sums = np.zeros((len(self.lags), 6))

    def add(self, mouth: np.ndarray, env: np.ndarray) -> None:
        """One clip: mouth_open [T] and its frame RMS envelope [T]."""
        t = len(mouth)
        if len(env) != t:
            raise ValueError(f"mouth has {t} frames but envelope {len(env)}")
        m = np.asarray(mouth, np.float64)
        e = np.asarray(env, np.float64)
        for i, lag in enumerate(self.lags):
            if abs(lag) >= t:
                continue
            x, y = (m[lag:], e[: t - lag]) if lag >= 0 else (m[: t + lag], e[-lag:])
            self.sums[i] += (len(x), x.sum(), y.sum(), x @ y, x @ x, y @ y)

    def result(self) -> tuple[float, int]:
        """(best r, its lag). Raises ValueError if r is undefined at every lag."""
        n, sx, sy, sxy, sxx, syy = self.sums.T
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = n * sxy - sx * sy
            var = (n * sxx - sx * sx) * (n * syy - sy * sy)
            r = np.where(var > 0, cov / np.sqrt(np.maximum(var, 0)), np.nan)
        if not np.any(np.isfinite(r)):
            raise ValueError("mouth_open or audio is constant: correlation undefined")
        best = int(np.nanargmax(r))
        return float(r[best]), int(self.lags[best])


def clips_mouth_audio_correlation(clips: Iterable[Clip], max_lag: int = 3) -> tuple[float, int]:
    """`mouth_audio_correlation` over clips that carry a mouth_open label."""
    mouths, audios, rates = [], [], set()
    for clip in clips:
        if "mouth_open" in clip.labels:
            mouths.append(clip.labels["mouth_open"])
            audios.append(clip.audio)
            rates.add((clip.fps, clip.sample_rate))
    if len(rates) > 1:
        raise ValueError(f"clips mix fps/sample rates: {sorted(rates)}")
    if not mouths:
        raise ValueError("no clip has a mouth_open label")
    fps, sr = rates.pop()
    return mouth_audio_correlation(mouths, audios, max_lag, fps, sr)
