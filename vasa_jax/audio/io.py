"""Audio loading and input checks: any file or array -> mono float32 at the model's rate.

Every audio path into vasa_jax goes through `prepare_audio`, so the features never see a
wrong rate, a second channel, raw integer PCM, NaNs, or an empty clip. All problems raise
`AudioError` with a message that names the input.

Decoding: soundfile (libsndfile: wav, flac, ogg, and mp3 on recent libsndfile) first; any
file it cannot read (m4a/aac, video containers, ...) goes through the `ffmpeg` binary, which
also downmixes and resamples. A file neither can decode is an `AudioError` naming the file.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np

# Below this RMS (-80 dBFS) a clip is digital silence or near-silent dither: no speech for
# the motion model to follow, which is almost always a mistake (wrong channel, muted file).
SILENCE_RMS = 1e-4
# A 2-D array is [N, C] or [C, N]; the channel axis is the short one, and no real recording
# has more channels than this.
MAX_CHANNELS = 32


class AudioError(ValueError):
    """Audio that cannot be used: undecodable, empty, silent, non-finite or malformed."""


def _to_float(audio: np.ndarray, name: str) -> np.ndarray:
    """Integer PCM -> float in [-1, 1); floats are kept (as float32)."""
    kind = audio.dtype.kind
    if kind == "f":
        return audio.astype(np.float32, copy=False)
    if kind == "i":
        scale = float(2 ** (8 * audio.dtype.itemsize - 1))
        return (audio.astype(np.float64) / scale).astype(np.float32)
    if kind == "u":  # unsigned PCM (8-bit wav) is offset binary: silence is the mid value
        half = float(2 ** (8 * audio.dtype.itemsize - 1))
        return ((audio.astype(np.float64) - half) / half).astype(np.float32)
    raise AudioError(f"{name}: audio must be integer PCM or float samples, not {audio.dtype}")


def _downmix(audio: np.ndarray, channel_axis: int | None, name: str) -> np.ndarray:
    """[N] | [N, C] | [C, N] -> [N], averaging the channels."""
    if audio.ndim == 1:
        return audio
    if audio.ndim != 2:
        raise AudioError(f"{name}: audio must be [N], [N, C] or [C, N]; got shape {audio.shape}")
    if channel_axis is None:
        channel_axis = int(np.argmin(audio.shape))
        if audio.shape[channel_axis] > MAX_CHANNELS:
            raise AudioError(
                f"{name}: cannot tell the channel axis of shape {audio.shape}; pass channel_axis"
            )
    return audio.mean(axis=channel_axis, dtype=np.float32)


def resample(audio: np.ndarray, rate: float, sample_rate: float) -> np.ndarray:
    """Band-limited resampling (soxr, high quality). audio: float32 [N] -> float32 [M]."""
    if rate == sample_rate:
        return audio
    import soxr  # a librosa dependency; imported here to keep `import vasa_jax.audio` light

    return np.asarray(soxr.resample(audio, rate, sample_rate, quality="HQ"), dtype=np.float32)


def check_waveform(audio: np.ndarray, name: str = "audio") -> np.ndarray:
    """Checks a model-ready waveform: 1-D, floating, non-empty, finite. Returns float32 [N]."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise AudioError(f"{name}: expected mono audio [N], got shape {audio.shape}")
    if audio.dtype.kind != "f":
        raise AudioError(
            f"{name}: expected float samples, got {audio.dtype}; convert with prepare_audio()"
        )
    if not np.all(np.isfinite(audio)):
        raise AudioError(f"{name}: audio contains NaN or inf samples")
    return audio.astype(np.float32, copy=False)


def prepare_audio(
    audio: np.ndarray,
    rate: float,
    sample_rate: int = 16000,
    *,
    allow_silence: bool = False,
    channel_axis: int | None = None,
    name: str = "audio",
) -> np.ndarray:
    """In-memory samples at `rate` -> mono float32 [N'] at `sample_rate`.

    Args:
      audio: [N], [N, C] or [C, N]; float, or integer PCM (scaled to [-1, 1)).
      rate: the rate `audio` was recorded at (Hz).
      sample_rate: the rate to return; resampled with soxr when it differs.
      allow_silence: accept an all-silent clip (RMS below SILENCE_RMS, -80 dBFS), e.g. to
        generate an idle talking head. By default silence is an error.
      channel_axis: which axis holds channels for 2-D input; default: the shorter one.
      name: how error messages refer to the input (a file name).
    Returns:
      float32 [N'] with N' = round(N * sample_rate / rate).
    Raises:
      AudioError: empty, non-finite, silent (unless allowed), or malformed input.
    """
    audio = np.asarray(audio)
    if not rate or rate <= 0:
        raise AudioError(f"{name}: sample rate must be positive, got {rate}")
    if audio.size == 0:
        raise AudioError(f"{name}: audio is empty (shape {audio.shape})")
    audio = _to_float(audio, name)
    if not np.all(np.isfinite(audio)):
        raise AudioError(f"{name}: audio contains NaN or inf samples")
    audio = resample(_downmix(audio, channel_axis, name), rate, sample_rate)
    if audio.size == 0:
        raise AudioError(f"{name}: audio is empty after resampling {rate} -> {sample_rate} Hz")
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    if rms < SILENCE_RMS and not allow_silence:
        raise AudioError(
            f"{name}: audio is silent (RMS {rms:.2e} < {SILENCE_RMS:.0e}, i.e. below -80 dBFS); "
            "pass allow_silence=True to generate from silence on purpose"
        )
    return np.ascontiguousarray(audio, dtype=np.float32)


def _decode_ffmpeg(path: str, sample_rate: int) -> np.ndarray:
    """Any container ffmpeg reads -> mono float32 [N] at sample_rate."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(f"{path}: soundfile cannot decode it and no ffmpeg binary is on PATH")
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-i", path, "-vn", "-ac", "1", "-ar",
           str(sample_rate), "-f", "f32le", "-"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip().splitlines()
        raise AudioError(f"{path}: ffmpeg could not decode it: {' | '.join(message[-3:])}")
    return np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)


def load_audio(
    source: str | os.PathLike | np.ndarray,
    sample_rate: int = 16000,
    *,
    source_rate: float | None = None,
    allow_silence: bool = False,
    channel_axis: int | None = None,
) -> np.ndarray:
    """Audio file (or array) -> mono float32 [N] at `sample_rate`, checked.

    Args:
      source: a path (wav/flac/ogg/mp3 via soundfile; m4a, aac, mp4, mkv, ... via ffmpeg) or
        an array of samples, which then needs `source_rate`.
      sample_rate: output rate (16 kHz for the audio features).
      source_rate: rate of an array `source`; ignored (read from the file) for paths.
      allow_silence: see `prepare_audio`.
      channel_axis: see `prepare_audio` (arrays only; files are [N, C]).
    Raises:
      AudioError: missing or undecodable file (the message names it), or bad samples.
    """
    if not isinstance(source, (str, os.PathLike)):
        if source_rate is None:
            raise AudioError("load_audio(array) needs source_rate= (the array's sample rate)")
        return prepare_audio(source, source_rate, sample_rate, allow_silence=allow_silence,
                             channel_axis=channel_axis)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise AudioError(f"{path}: no such audio file")
    import soundfile

    try:
        audio, rate = soundfile.read(path, dtype="float32", always_2d=True)  # [N, C]
        axis = 1
    except (RuntimeError, TypeError, ValueError) as sf_error:  # LibsndfileError is a RuntimeError
        try:
            audio, rate, axis = _decode_ffmpeg(path, sample_rate), sample_rate, None
        except AudioError as ff_error:
            raise AudioError(f"{ff_error}; soundfile: {sf_error}") from None
    return prepare_audio(audio, rate, sample_rate, allow_silence=allow_silence,
                         channel_axis=axis, name=path)
