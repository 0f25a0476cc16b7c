"""Video files: write H.264/AAC mp4 (the ffmpeg binary, OpenCV fallback), read frames, grids.

No OpenCV wheel can encode H.264 (no libx264/openh264 inside). `write_video` therefore
streams the raw RGB frames into the system `ffmpeg`, which encodes H.264 (yuv420p, plays
everywhere) and muxes the audio as AAC: one lossy generation, no temporary video file.
(Writing mp4v with cv2.VideoWriter first and re-encoding it would compress twice; a
lossless FFV1 intermediate instead is ~65x larger and 6x slower at 1536 px.) Without ffmpeg
the result is cv2.VideoWriter's own mp4v at `path`, with a warning (and no audio).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import warnings
import wave
from collections.abc import Iterable, Iterator

import cv2
import numpy as np


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("frames is empty (T = 0)")
    return frames


def _frame_iter(frames) -> tuple[tuple[int, int], Iterator[np.ndarray]]:
    """An array [T, H, W, 3] or an iterable of frames [H, W, 3] -> ((H, W), every frame
    checked and padded to even sizes (H.264 yuv420p needs them: odd H or W get one black
    row / column at the bottom / right))."""
    if isinstance(frames, np.ndarray):
        frames = iter(_check_frames(frames))
    else:
        frames = iter(frames)
    try:
        first = next(frames)
    except StopIteration:
        raise ValueError("frames is empty (T = 0)") from None
    first = np.asarray(first)
    if first.dtype != np.uint8 or first.ndim != 3 or first.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [H, W, 3] each, got {first.dtype} {first.shape}")
    shape = first.shape

    def padded():
        for frame in itertools.chain([first], frames):
            frame = np.asarray(frame)
            if frame.shape != shape or frame.dtype != np.uint8:
                raise ValueError(f"frame {frame.dtype} {frame.shape} differs from the first "
                                 f"({shape})")
            h, w = shape[:2]
            if h % 2 or w % 2:  # cv2 would silently crop odd sizes
                frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)))
            yield np.ascontiguousarray(frame)

    return (shape[0] + shape[0] % 2, shape[1] + shape[1] % 2), padded()


def _write_cv2(path: str, size: tuple[int, int], frames: Iterator[np.ndarray], fps: float,
               fourcc: str) -> None:
    h, w = size
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), float(fps), (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter could not open {path!r} with codec {fourcc}")
    try:
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # RGB -> BGR
    finally:
        writer.release()


def write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())


def write_video(
    path: str,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
) -> int:
    """Writes RGB frames (+ mono float32 audio [N] in [-1, 1]) to `path`; returns the frame count.

    frames: uint8 [T, H, W, 3], or any iterable of uint8 [H, W, 3] frames (a generator keeps
    memory bounded for any length: frames go to the encoder as they come). H.264 (yuv420p)
    needs even sizes: odd H or W get one black row/column at the bottom/right.
    """
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if audio is not None:
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio must be mono float [N], got shape {audio.shape}")
    (h, w), frames = _frame_iter(frames)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    count = 0

    def counted():
        nonlocal count
        for frame in frames:
            count += 1
            yield frame

    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        warnings.warn(
            "ffmpeg not found on PATH: wrote OpenCV's mp4v instead of H.264"
            + (" and dropped the audio" if audio is not None else "")
            + " (install ffmpeg, e.g. apt-get install ffmpeg)",
            RuntimeWarning,
            stacklevel=2,
        )
        _write_cv2(path, (h, w), counted(), fps, "mp4v")
        return count
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        out_tmp = os.path.join(tmp, "out.mp4")
        cmd = [ffmpeg, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24"]
        cmd += ["-s", f"{w}x{h}", "-r", f"{float(fps)!r}", "-i", "-"]
        if audio is not None:
            audio_tmp = os.path.join(tmp, "audio.wav")
            write_wav(audio_tmp, audio, sample_rate)
            cmd += ["-i", audio_tmp, "-map", "0:v", "-map", "1:a", "-c:a", "aac", "-b:a", "128k"]
            cmd += ["-shortest"]
        cmd += ["-c:v", "libx264", "-preset", "fast", "-crf", "18", "-pix_fmt", "yuv420p"]
        cmd += ["-movflags", "+faststart", out_tmp]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            for frame in counted():  # frame by frame: a whole 512 px video is GBs
                proc.stdin.write(frame.tobytes())
            proc.stdin.close()
        except BrokenPipeError:
            pass  # ffmpeg exited early; its error message is reported below
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise RuntimeError(f"ffmpeg failed ({proc.returncode}) writing {path!r}: {err[-2000:]}")
        os.replace(out_tmp, path)  # never leave a half-written file at `path`
    return count


def read_video(path: str) -> tuple[np.ndarray, float]:
    """Decodes a video file -> (RGB frames uint8 [T, H, W, 3], fps)."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise ValueError(f"cv2 cannot open {path!r} as a video")
    fps = float(cap.get(cv2.CAP_PROP_FPS))
    frames = []
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame[..., ::-1])
    finally:
        cap.release()
    if not frames:
        raise ValueError(f"{path!r} has no decodable video frames")
    return np.stack(frames), fps


def read_audio(path: str, sample_rate: int = 16000) -> np.ndarray:
    """The audio track of a media file as mono float32 [N] at `sample_rate` (via ffmpeg)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("reading audio from video needs the ffmpeg binary on PATH")
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    cmd = [
        ffmpeg,
        "-loglevel",
        "error",
        "-i",
        path,
        "-vn",
        "-ac",
        "1",
        "-ar",
        str(int(sample_rate)),
        "-f",
        "s16le",
        "-",
    ]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"ffmpeg could not read audio from {path!r}: {proc.stderr.decode()[-1000:]}"
        )
    if not proc.stdout:
        raise ValueError(f"{path!r} has no audio stream")
    return np.frombuffer(proc.stdout, "<i2").astype(np.float32) / 32768.0


def make_grid(videos: np.ndarray, cols: int) -> np.ndarray:
    """Tiles N videos [N, T, H, W, C] into one [T, rows * H, cols * W, C]; empty cells are 0."""
    videos = np.asarray(videos)
    if videos.ndim != 5:
        raise ValueError(f"videos must be [N, T, H, W, C], got shape {videos.shape}")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    n, t, h, w, c = videos.shape
    rows = -(-n // cols)
    grid = np.zeros((rows * cols, t, h, w, c), videos.dtype)
    grid[:n] = videos
    grid = grid.reshape(rows, cols, t, h, w, c).transpose(2, 0, 3, 1, 4, 5)
    return grid.reshape(t, rows * h, cols * w, c)
