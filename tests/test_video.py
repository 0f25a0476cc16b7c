"""vasa_jax.video: H.264/AAC writing via ffmpeg, reading back, grids."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from vasa_jax import video

needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
    reason="ffmpeg/ffprobe not on PATH",
)

COLORS = np.array([[200, 40, 40], [40, 180, 60], [50, 60, 210], [230, 230, 230]], np.uint8)


def _frames(t=25, h=48, w=64):
    """Quadrants of solid colours, shifted one step every 5 frames (a visible change)."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        c = np.roll(COLORS, i // 5, axis=0)
        frames[i, : h // 2, : w // 2] = c[0]
        frames[i, : h // 2, w // 2 :] = c[1]
        frames[i, h // 2 :, : w // 2] = c[2]
        frames[i, h // 2 :, w // 2 :] = c[3]
    return frames


def _streams(path):
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-of", "json", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {s["codec_type"]: s for s in json.loads(out)["streams"]}


@needs_ffmpeg
def test_write_read_roundtrip_with_audio(tmp_path):
    path = str(tmp_path / "clip.mp4")
    frames = _frames()
    sr = 16000
    t = np.arange(sr) / sr
    audio = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # 1 s = 25 frames
    video.write_video(path, frames, 25.0, audio=audio, sample_rate=sr)

    streams = _streams(path)
    assert streams["video"]["codec_name"] == "h264"
    assert streams["video"]["pix_fmt"] == "yuv420p"
    assert streams["audio"]["codec_name"] == "aac"

    back, fps = video.read_video(path)
    assert fps == pytest.approx(25.0)
    assert back.shape == frames.shape
    # Colours survive the lossy encode (quadrant centres, away from chroma edges).
    for i in (0, 7, 24):
        for (y, x), k in zip(((12, 16), (12, 48), (36, 16), (36, 48)), range(4)):
            expected = np.roll(COLORS, i // 5, axis=0)[k].astype(int)
            np.testing.assert_allclose(back[i, y, x].astype(int), expected, atol=12)

    sound = video.read_audio(path, sr)
    assert abs(len(sound) - sr) < 0.1 * sr
    spectrum = np.abs(np.fft.rfft(sound[2000:14000]))
    peak_hz = np.argmax(spectrum) * sr / 12000
    assert abs(peak_hz - 440) < 5
    assert 0.25 < np.sqrt(np.mean(sound[2000:14000] ** 2)) < 0.45  # 0.5 / sqrt(2) ~ 0.35


@needs_ffmpeg
def test_write_without_audio_and_odd_size(tmp_path):
    path = str(tmp_path / "nested" / "odd.mp4")
    frames = _frames(t=10, h=31, w=45)
    video.write_video(path, frames, 12.5)
    streams = _streams(path)
    assert "audio" not in streams
    back, fps = video.read_video(path)
    assert fps == pytest.approx(12.5)
    assert back.shape == (10, 32, 46, 3)  # padded to even sizes for yuv420p
    np.testing.assert_allclose(back[0, 8, 8].astype(int), COLORS[0].astype(int), atol=12)


@needs_ffmpeg
def test_write_from_a_generator_of_frames(tmp_path):
    """Frames can come one at a time (bounded memory): same file as from the array."""
    frames = _frames(t=9, h=31, w=45)
    path = str(tmp_path / "gen.mp4")
    assert video.write_video(path, (f for f in frames), 25.0) == 9
    back, _ = video.read_video(path)
    assert back.shape == (9, 32, 46, 3)
    np.testing.assert_allclose(back[0, 8, 8].astype(int), COLORS[0].astype(int), atol=12)
    with pytest.raises(ValueError, match="differs from the first"):
        video.write_video(str(tmp_path / "bad.mp4"), iter([frames[0], frames[0, :8]]), 25.0)
    with pytest.raises(ValueError, match="empty"):
        video.write_video(str(tmp_path / "none.mp4"), iter([]), 25.0)
    assert not os.path.exists(str(tmp_path / "bad.mp4"))


def test_without_ffmpeg_keeps_mp4v_and_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(video.shutil, "which", lambda name: None)
    path = str(tmp_path / "fallback.mp4")
    frames = _frames(t=10)
    with pytest.warns(RuntimeWarning, match="ffmpeg not found.*dropped the audio"):
        video.write_video(path, frames, 25.0, audio=np.zeros(6400, np.float32))
    back, _ = video.read_video(path)
    assert back.shape == frames.shape
    np.testing.assert_allclose(back[0, 12, 16].astype(int), COLORS[0].astype(int), atol=25)
    with pytest.raises(RuntimeError, match="ffmpeg"):
        video.read_audio(path)


def test_make_grid_layout():
    videos = np.stack([np.full((3, 4, 5, 3), i + 1, np.uint8) for i in range(5)])
    grid = video.make_grid(videos, cols=3)
    assert grid.shape == (3, 8, 15, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        assert np.all(grid[:, r * 4 : (r + 1) * 4, c * 5 : (c + 1) * 5] == i + 1)
    assert np.all(grid[:, 4:, 10:] == 0)  # the empty sixth cell
    assert video.make_grid(videos[:1], cols=4).shape == (3, 4, 20, 3)


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        video.write_video(str(tmp_path / "x.mp4"), np.zeros((2, 8, 8, 3), np.float32), 25)
    with pytest.raises(ValueError, match="mono"):
        video.write_video(str(tmp_path / "x.mp4"), _frames(2), 25, audio=np.zeros((2, 100)))
    with pytest.raises(ValueError, match="fps"):
        video.write_video(str(tmp_path / "x.mp4"), _frames(2), 0)
    with pytest.raises(FileNotFoundError):
        video.read_video(str(tmp_path / "missing.mp4"))
    with pytest.raises(ValueError, match="N, T, H, W"):
        video.make_grid(np.zeros((2, 8, 8, 3)), cols=2)
