"""Audio frontends: speech -> one feature vector per 25 fps video frame.

  audio = load_audio("speech.wav")                 # mono float32 [N] at 16 kHz, checked
  feats = log_mel_frames(audio, num_frames=T)      # float32 [T, 320]   (default frontend)
  w2v = Wav2Vec2Features("/path/to/hf_folder")     # local Hugging Face folder, no hub
  feats = w2v(audio, num_frames=T)                 # float32 [T, hidden_size]

`build_frontend(audio_config())` picks one from configs/common.py; `feature_dim(cfg)` sizes
model input layers without loading anything.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from vasa_jax.audio.io import (
    SILENCE_RMS,
    AudioError,
    check_waveform,
    load_audio,
    prepare_audio,
    resample,
)
from vasa_jax.audio.mel import (
    COLUMNS_PER_FRAME,
    feature_dim_mel,
    log_mel_frames,
    log_mel_frames_jax,
    num_video_frames,
)
from vasa_jax.audio.wav2vec2 import Wav2Vec2CheckpointError, Wav2Vec2Features, read_arch

FRONTENDS = ("mel", "wav2vec2")


def feature_dim(
    cfg=None, *, frontend: str = "mel", n_mels: int = 80, wav2vec2_path: str | os.PathLike = ""
) -> int:
    """Per-frame feature size D of a frontend.

    Pass an audio_config() section, or the fields as keywords. For wav2vec2 this reads only
    the folder's config.json (hidden_size).
    """
    if cfg is not None:
        frontend, n_mels, wav2vec2_path = cfg.frontend, cfg.n_mels, cfg.wav2vec2_path
    if frontend == "mel":
        return feature_dim_mel(n_mels)
    if frontend == "wav2vec2":
        return read_arch(wav2vec2_path).hidden_size
    raise ValueError(f"audio frontend {frontend!r} is not one of {FRONTENDS}")


@dataclasses.dataclass(frozen=True)
class MelFrontend:
    """`log_mel_frames` with fixed settings; picklable (usable inside grain workers)."""

    sample_rate: int = 16000
    fps: float = 25.0
    n_mels: int = 80

    @property
    def dim(self) -> int:
        return feature_dim_mel(self.n_mels)

    def __call__(self, audio: np.ndarray, num_frames: int | None = None) -> np.ndarray:
        return log_mel_frames(audio, self.sample_rate, self.fps, self.n_mels, num_frames)


def build_frontend(cfg) -> MelFrontend | Wav2Vec2Features:
    """audio_config() -> a callable `(audio [N], num_frames=None) -> [T, D]` with `.dim`."""
    if cfg.frontend == "mel":
        return MelFrontend(cfg.sample_rate, cfg.fps, cfg.n_mels)
    if cfg.frontend == "wav2vec2":
        return Wav2Vec2Features.from_config(cfg)
    raise ValueError(f"audio frontend {cfg.frontend!r} is not one of {FRONTENDS}")


__all__ = [
    "COLUMNS_PER_FRAME",
    "FRONTENDS",
    "SILENCE_RMS",
    "AudioError",
    "MelFrontend",
    "Wav2Vec2CheckpointError",
    "Wav2Vec2Features",
    "build_frontend",
    "check_waveform",
    "feature_dim",
    "load_audio",
    "log_mel_frames",
    "log_mel_frames_jax",
    "num_video_frames",
    "prepare_audio",
    "resample",
]
