"""Training logs: metrics.jsonl, TensorBoard scalars and images, PNG grids, a progress line.

Everything is written by the main process only (`MetricWriter(..., enabled=False)` on the
others is a no-op), into the run's workdir:

    <workdir>/metrics.jsonl        one JSON object per logged step: {"step": s, name: value}
    <workdir>/tensorboard/         tensorboardX event files (no TensorFlow needed)
    <workdir>/images/<name>_<step>.png   labelled image grids

metrics.jsonl is appended to, so a resumed run continues the same file (steps logged twice
around a resume point are possible when a run died between a log and a checkpoint; readers
keep the last entry of a step).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import cv2
import numpy as np
from PIL import Image

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
IMAGES_DIR = "images"


def format_duration(seconds: float) -> str:
    """Seconds -> '1d 02h', '3h 04m', '5m 06s' or '7.0s' (two units at most)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {s:02d}s"


def progress_line(
    step: int, total_steps: int, metrics: Mapping[str, float], *, step_seconds: float,
    data_wait: float, eta_seconds: float, keys: tuple[str, ...] | None = None,
) -> str:
    """One human-readable line: step, chosen metrics, step time, data-wait share, ETA.

    keys: the metrics to show (default: every metric whose name starts with "loss").
    """
    keys = tuple(k for k in metrics if k.startswith("loss")) if keys is None else keys
    values = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
    return (
        f"step {step}/{total_steps} | {values} | {step_seconds:.3f} s/step | "
        f"data wait {100 * data_wait:.0f}% | ETA {format_duration(eta_seconds)}"
    )


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] (any float dtype) -> uint8 [0, 255]; values outside are clipped."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def image_grid(rows: Mapping[str, np.ndarray], *, pad: int = 2, label_width: int | None = None
               ) -> np.ndarray:
    """Labelled grid: one row per entry (in order), one column per batch element.

    rows: name -> images [N, H, W, 3] in [-1, 1], every entry the same shape.
    Returns uint8 [R * (H + pad) + pad, label_width + N * (W + pad) + pad, 3]: white
    padding, each row's name written in its left margin.
    """
    if not rows:
        raise ValueError("image_grid needs at least one row")
    shapes = {name: np.shape(x) for name, x in rows.items()}
    first = next(iter(shapes.values()))
    if len(first) != 4 or first[-1] != 3 or any(s != first for s in shapes.values()):
        raise ValueError(f"image_grid rows must all be [N, H, W, 3], got {shapes}")
    n, h, w, _ = first
    scale = max(0.3, h / 160)  # readable label text from 64 px to 512 px rows
    if label_width is None:
        label_width = max(cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0]
                          for name in rows) + 2 * pad
    grid = np.full((len(rows) * (h + pad) + pad, label_width + n * (w + pad) + pad, 3), 255,
                   np.uint8)
    for r, (name, images) in enumerate(rows.items()):
        top = pad + r * (h + pad)
        label = np.full((h, label_width, 3), 255, np.uint8)  # text stays inside its row
        cv2.putText(label, name, (pad, h // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
        grid[top:top + h, :label_width] = label
        for c, image in enumerate(to_uint8(images)):
            left = label_width + pad + c * (w + pad)
            grid[top:top + h, left:left + w] = image
    return grid


class MetricWriter:
    """Writes scalars and images of one run (main process only).

    Args:
      workdir: the run folder (created if missing).
      enabled: False on non-main processes: every method is then a no-op.
    """

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.workdir = workdir
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(os.path.join(workdir, IMAGES_DIR), exist_ok=True)
        from tensorboardX import SummaryWriter  # only the main process needs it

        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", buffering=1)
        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One metrics.jsonl line and one TensorBoard scalar per entry."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, float(value), int(step))

    def write_images(self, step: int, grids: Mapping[str, np.ndarray]) -> list[str]:
        """Saves uint8 [H, W, 3] grids as images/<name>_<step>.png and to TensorBoard.

        Returns the PNG paths written (empty when disabled).
        """
        if not self.enabled:
            return []
        paths = []
        for name, grid in grids.items():
            path = os.path.join(self.workdir, IMAGES_DIR, f"{name}_{int(step):08d}.png")
            Image.fromarray(np.asarray(grid, np.uint8)).save(path)
            self._tb.add_image(name, np.asarray(grid, np.uint8), int(step), dataformats="HWC")
            paths.append(path)
        return paths

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            self.enabled = False


def read_metrics(workdir: str) -> list[dict]:
    """The records of <workdir>/metrics.jsonl, in file order ([] if there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
