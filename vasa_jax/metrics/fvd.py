"""Frechet Video Distance (Unterthiner et al. 2018) as VASA-1 reports it: FVD25.

    clips     video_clips(frames)  every 25-frame clip (stride 25) of a 25 fps video, each
              frame resized to 224 x 224 (bilinear, aspect not kept, as the TF FVD does)
    features  I3DFeatures(model).features(clips): the Kinetics-400 I3D's 400 logits averaged
              over time (`vasa_jax.models.i3d`), frames scaled to [-1, 1]
    distance  fvd(real_features, generated_features): the Frechet distance of the two
              Gaussian fits, ||mu_r - mu_g||^2 + tr(S_r) + tr(S_g) - 2 tr((S_r S_g)^1/2)

The distance is computed in float64 without a general matrix square root: tr((S_r S_g)^1/2)
is the sum of the square roots of the eigenvalues of S_r^1/2 S_g S_r^1/2, a symmetric PSD
matrix with the same eigenvalues as S_r S_g, from two symmetric eigendecompositions (eigh).
Rounding can leave tiny negative eigenvalues: they are clipped to 0, and so is the distance.
Unlike scipy.linalg.sqrtm of S_r S_g this stays real and accurate when the covariances are
singular, which they are whenever a set has fewer clips than the 400 feature dimensions
(FVD of a few clips is a noisy, biased estimate: compare numbers over the same clip counts).
"""

from __future__ import annotations

import functools
from typing import Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

CLIP_FRAMES = 25
CLIP_SIZE = 224


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] (N >= 2) -> (mean [D], covariance [D, D]; unbiased, N - 1), float64."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"a Gaussian fit needs features [N >= 2, D], got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root [D, D] of a symmetric PSD matrix (negative eigenvalues from
    rounding count as 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance squared of N(mu1, sigma1) and N(mu2, sigma2).

    mu [D], sigma [D, D] symmetric PSD. Returns ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2)
    - 2 tr((sigma1 sigma2)^1/2), >= 0 (see the module docstring for how the trace is taken).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes {mu1.shape}, {s1.shape}, {mu2.shape}, "
                         f"{s2.shape} do not match ([D], [D, D] twice)")
    root1 = _psd_sqrt(s1)
    inner = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return max(d, 0.0)


def fvd(real_features: np.ndarray, generated_features: np.ndarray) -> float:
    """FVD of two sets of clip features [N_r, D], [N_g, D] (N >= 2 each)."""
    return frechet_distance(*gaussian_fit(real_features), *gaussian_fit(generated_features))


def video_clips(frames: np.ndarray, clip_frames: int = CLIP_FRAMES, stride: int = CLIP_FRAMES,
                size: int = CLIP_SIZE) -> np.ndarray:
    """All clips of a video: frames uint8 [T, H, W, 3] (RGB, at 25 fps for FVD25) -> uint8
    [N, clip_frames, size, size, 3], clip k = frames k*stride .. k*stride + clip_frames - 1,
    N = (T - clip_frames) // stride + 1 (0 if T < clip_frames; a shorter tail is dropped).
    Frames are resized to size x size (cv2 bilinear; the aspect ratio is not kept)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video_clips expects frames [T, H, W, 3], got {frames.shape}")
    count = max(0, (len(frames) - clip_frames) // stride + 1)
    used = frames[:(count - 1) * stride + clip_frames] if count else frames[:0]
    resized = np.stack([f if f.shape[:2] == (size, size) else
                        cv2.resize(f, (size, size), interpolation=cv2.INTER_LINEAR)
                        for f in used]) if len(used) else np.zeros((0, size, size, 3), np.uint8)
    return np.stack([resized[k * stride:k * stride + clip_frames] for k in range(count)]
                    ) if count else np.zeros((0, clip_frames, size, size, 3), np.uint8)


@functools.partial(jax.jit, static_argnums=0)
def _i3d_features(graphdef, state, clips: jax.Array) -> jax.Array:
    """clips uint8 [B, T, 224, 224, 3] -> the model's features [B, 400], frames in [-1, 1].
    Module-level and keyed on the (hashable) graphdef: loading the same weights again does
    not recompile."""
    from flax import nnx

    return nnx.merge(graphdef, state)(clips.astype(jnp.float32) / 127.5 - 1.0)


def default_batch() -> int:
    """Clips per I3D call: 1 on CPU (a padded last batch would be wasted work there), 8 on
    accelerators."""
    return 1 if jax.default_backend() == "cpu" else 8


class I3DFeatures:
    """FVD features of clips with an `i3d.InceptionI3d`, `batch` clips per compiled call.

    features(clips uint8 [N, T, 224, 224, 3]) -> float32 [N, 400]; frames are scaled to
    [-1, 1] (x / 127.5 - 1) on the device; the last batch is padded to the compiled shape.
    """

    def __init__(self, model, batch: int | None = None):
        from flax import nnx

        self.graphdef, self.state = nnx.split(model)
        self.batch = int(batch or default_batch())

    @classmethod
    def load(cls, path: str, batch: int | None = None) -> "I3DFeatures":
        from vasa_jax.models import i3d

        return cls(i3d.load_i3d(path), batch)

    def features(self, clips: np.ndarray) -> np.ndarray:
        clips = np.asarray(clips)
        if clips.ndim != 5 or clips.shape[2:] != (CLIP_SIZE, CLIP_SIZE, 3):
            raise ValueError(f"I3D features need clips [N, T, 224, 224, 3], got {clips.shape}")
        out = []
        for i in range(0, len(clips), self.batch):
            chunk = clips[i:i + self.batch]
            m = len(chunk)
            if m < self.batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - m, 0)])
            out.append(np.asarray(_i3d_features(self.graphdef, self.state, chunk))[:m])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def set_features(self, videos: Sequence[np.ndarray]) -> np.ndarray:
        """Features [sum N_k, 400] of every clip (`video_clips`) of videos [T_k, H, W, 3]."""
        feats = [self.features(c) for c in map(video_clips, videos) if len(c)]
        return np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
