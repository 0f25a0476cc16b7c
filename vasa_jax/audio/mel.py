"""Log-mel audio features aligned to video frames (the default audio frontend).

Alignment contract: video frame t (of a clip at `fps`) describes the audio samples
[t * sr / fps, (t + 1) * sr / fps). With sr = 16 kHz and 25 fps that is 640 samples.

Layout: each video frame is split into COLUMNS_PER_FRAME = 4 equal sub-steps (10 ms at
25 fps) and one mel column is computed per sub-step, with its analysis window centred on the
sub-step's centre. The 4 columns are concatenated, so a frame's feature is
D = 4 * n_mels (320 for 80 mels), ordered [column, mel]: feature[t, j * n_mels + m] is mel
bin m of column j (time-ordered) of frame t.

Why stack 10 ms columns instead of one mel column per 40 ms frame: lip closures and plosive
bursts last 10-30 ms; a single 40 ms window smears them and loses where inside the frame
they happen, and a wider window would blur phonemes across frames. 10 ms hop with a 25 ms
window is the standard speech analysis (Kaldi, HuBERT, Whisper); stacking keeps that
resolution while giving exactly one feature vector per video frame. The centres of frame
t's 4 windows are at t * 640 + {80, 240, 400, 560} samples: symmetric inside the frame.
The 25 ms windows themselves reach (400 - 160) / 2 = 120 samples (7.5 ms) into the
neighbouring frames, as any STFT does; a click in the middle 400 samples of a frame shows up
in that frame only.

Values: power spectrum (periodic Hann, 25 ms window zero-padded to 512 points), Slaney mel
filterbank from 0 Hz to sr / 2, then (log10(max(mel, 1e-8)) + 4) / 4: speech lies in about
[-1, 1.5] and digital silence is exactly -1. No per-clip normalisation, so the features of a
window do not depend on the rest of the clip (streaming gives the same numbers).

`log_mel_frames` is numpy (host, data loaders); `log_mel_frames_jax` is the same function in
jnp, jittable, with optional leading batch dimensions (device, streaming).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
import scipy.sparse

from vasa_jax.audio.io import AudioError, check_waveform

COLUMNS_PER_FRAME = 4
WINDOW_SECONDS = 0.025
MEL_FLOOR = 1e-8  # power floor before the log: -80 dB relative to 1.0


def feature_dim_mel(n_mels: int = 80) -> int:
    """Size D of one video frame's log-mel feature."""
    return COLUMNS_PER_FRAME * n_mels


def num_video_frames(num_samples: int, sample_rate: int = 16000, fps: float = 25.0) -> int:
    """Frames covered by `num_samples` of audio: round(N * fps / sr), halves rounded up."""
    return int(math.floor(num_samples * fps / sample_rate + 0.5))


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (3 mel / 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = 3.0 * hz / 200.0
    log = 15.0 + 27.0 * np.log(np.maximum(hz, 1e-10) / 1000.0) / np.log(6.4)
    return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = 200.0 * mel / 3.0
    log = 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0)
    return np.where(mel >= 15.0, log, linear)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-normalised triangular mel filters, 0 Hz to sr / 2: [n_fft // 2 + 1, n_mels]."""
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(sample_rate / 2.0), n_mels + 2))
    rising = (fft_hz[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    falling = (edges[None, 2:] - fft_hz[:, None]) / (edges[2:] - edges[1:-1])
    weights = np.maximum(0.0, np.minimum(rising, falling))
    # Equal-area triangles, so a broadband level reads the same in narrow and wide bands.
    return (weights * (2.0 / (edges[2:] - edges[:-2]))).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _analysis(sample_rate: int, n_mels: int):
    """(periodic Hann window [win], mel filters [n_fft // 2 + 1, n_mels], the same filters
    transposed as a sparse matrix, n_fft)."""
    win = int(round(WINDOW_SECONDS * sample_rate))
    n_fft = 1 << (win - 1).bit_length()  # 400 -> 512: finer bins for the narrow low mels
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(win) / win)).astype(np.float32)
    filters = mel_filterbank(sample_rate, n_fft, n_mels)
    # Each FFT bin feeds at most 2 mels: the sparse product is ~50x cheaper than dense BLAS,
    # which also spawns threads that fight data-loader workers for cores.
    return window, filters, scipy.sparse.csr_matrix(filters.T), n_fft


def _window_starts(num_frames: int, sample_rate: int, fps: float, win: int) -> np.ndarray:
    """First sample of every analysis window, [num_frames * COLUMNS_PER_FRAME] int64.

    Column c's window is centred on (c + 0.5) * hop with hop = sr / fps / COLUMNS_PER_FRAME,
    the centre of its sub-step, so frame t's columns lie inside [t, t + 1) * sr / fps.
    Positions are rounded to the nearest sample when sr / fps is not a multiple of 4.
    """
    hop = sample_rate / fps / COLUMNS_PER_FRAME
    centres = (np.arange(num_frames * COLUMNS_PER_FRAME) + 0.5) * hop
    return np.floor(centres - win / 2.0 + 0.5).astype(np.int64)


def _log_mel(xp, audio, sample_rate: int, fps: float, n_mels: int, num_frames: int):
    """Shared numpy / jnp body. audio: [..., N] -> [..., num_frames, 4 * n_mels]."""
    window, filters, sparse_filters_t, n_fft = _analysis(sample_rate, n_mels)
    win = window.shape[0]
    starts = _window_starts(num_frames, sample_rate, fps, win)
    end = int(starts[-1]) + win
    pad_left = max(0, -int(starts[0]))
    audio = audio[..., :end]
    # Zeros outside the clip: frames past its end (num_frames padding) read as silence.
    pad_right = max(0, end - audio.shape[-1])
    widths = [(0, 0)] * (audio.ndim - 1) + [(pad_left, pad_right)]
    padded = xp.pad(audio, widths)
    index = starts[:, None] + pad_left + np.arange(win)[None, :]  # [C, win]
    frames = padded[..., index] * window  # [..., C, win]
    if xp is np:  # host: 1-D audio, so frames is [C, win]
        spec = scipy.fft.rfft(frames, n=n_fft)  # float32 in, complex64 out (np.fft: 7x slower)
        power = spec.real**2 + spec.imag**2  # [C, n_fft // 2 + 1]
        mel = (sparse_filters_t @ power.T).T  # [C, n_mels]
    else:
        spec = xp.fft.rfft(frames, n=n_fft)
        power = spec.real**2 + spec.imag**2
        mel = power @ filters
    log_mel = (xp.log10(xp.maximum(mel, MEL_FLOOR)) + 4.0) / 4.0
    return log_mel.reshape(*audio.shape[:-1], num_frames, COLUMNS_PER_FRAME * n_mels)


def _check_args(sample_rate, fps, n_mels, num_frames):
    if sample_rate <= 0 or fps <= 0 or n_mels <= 0:
        raise AudioError(
            f"sample_rate, fps and n_mels must be positive, got {sample_rate}, {fps}, {n_mels}"
        )
    if num_frames is not None and (int(num_frames) != num_frames or num_frames < 0):
        raise AudioError(f"num_frames must be a non-negative integer, got {num_frames!r}")


def log_mel_frames(
    audio: np.ndarray,
    sample_rate: int = 16000,
    fps: float = 25.0,
    n_mels: int = 80,
    num_frames: int | None = None,
) -> np.ndarray:
    """Log-mel features, one row per video frame (numpy, host).

    Args:
      audio: float32 [N] mono samples at `sample_rate` (see `prepare_audio`).
      sample_rate: rate of `audio` in Hz.
      fps: video frame rate; frame t covers samples [t * sr / fps, (t + 1) * sr / fps).
      n_mels: mel bands per 10 ms column.
      num_frames: T; audio is zero-padded (silence) or trimmed to T frames. Default
        round(N * fps / sample_rate).
    Returns:
      float32 [T, 4 * n_mels]: 4 time-ordered mel columns per frame (module docstring).
    Raises:
      AudioError: audio not 1-D float, or has NaN/inf; bad arguments.
    """
    audio = check_waveform(audio)
    _check_args(sample_rate, fps, n_mels, num_frames)
    if num_frames is None:
        num_frames = num_video_frames(audio.shape[0], sample_rate, fps)
    num_frames = int(num_frames)
    if num_frames == 0:
        return np.zeros((0, feature_dim_mel(n_mels)), np.float32)
    out = _log_mel(np, audio, int(sample_rate), float(fps), int(n_mels), num_frames)
    return out.astype(np.float32, copy=False)


@functools.partial(jax.jit, static_argnames=("sample_rate", "fps", "n_mels", "num_frames"))
def log_mel_frames_jax(
    audio: jax.Array,
    sample_rate: int = 16000,
    fps: float = 25.0,
    n_mels: int = 80,
    num_frames: int | None = None,
) -> jax.Array:
    """`log_mel_frames` in jnp, jitted: audio [..., N] -> float32 [..., T, 4 * n_mels].

    The window positions depend only on static shapes, so this compiles once per
    (N, T) and runs on device; no value checks (NaNs propagate).
    """
    _check_args(sample_rate, fps, n_mels, num_frames)
    if num_frames is None:
        num_frames = num_video_frames(audio.shape[-1], sample_rate, fps)
    audio = jnp.asarray(audio, jnp.float32)
    if num_frames == 0:
        return jnp.zeros((*audio.shape[:-1], 0, feature_dim_mel(n_mels)), jnp.float32)
    return _log_mel(jnp, audio, int(sample_rate), float(fps), int(n_mels), int(num_frames))
