"""Training logs: metrics.jsonl, TensorBoard scalars and images, PNG grids, a progress line.

Everything is written by the main process only (`MetricWriter(..., enabled=False)` on the
others is a no-op), into the run's workdir:

    <workdir>/metrics.jsonl        one JSON object per logged step: {"step": s, name: value}
    <workdir>/tensorboard/         tensorboardX event files (no TensorFlow needed)
    <workdir>/images/<name>_<step>.png   labelled image grids
    <workdir>/summary.jsonl        one JSON object per training call (a run resumed twice
                                   has three): {"step": last step, "start_step": s0,
                                   "skipped_steps": n, **goodput_summary(...)}

metrics.jsonl is appended to, so a resumed run continues the same file (steps logged twice
around a resume point are possible when a run died between a log and a checkpoint; readers
keep the last entry of a step; a line cut short by a killed process is skipped).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import cv2
import numpy as np
from absl import logging
from PIL import Image

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.jsonl"
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


def goodput_summary(*, wall: float, productive: float, compile: float, data_wait: float,
                    checkpoint: float) -> dict[str, float]:
    """Where a training call's wall time went, as shares of `wall` (seconds).

    productive: seconds of train steps whose update was kept; compile: compiling the step
    and the image summary; data_wait: blocked on the loader; checkpoint: blocked in saves
    (and waiting for the last asynchronous one). The four are disjoint parts of `wall`;
    other_share is the rest (start-up and restore, images, logging, skipped steps).
    """
    parts = {"goodput": productive, "compile_share": compile,
             "data_wait_share": data_wait, "checkpoint_share": checkpoint}
    shares = {k: (v / wall if wall > 0 else 0.0) for k, v in parts.items()}
    return {"wall_seconds": float(wall), **shares,
            "other_share": max(0.0, 1.0 - sum(shares.values()))}


def goodput_line(summary: Mapping[str, float], start_step: int, step: int) -> str:
    """One line: 'goodput 81.0% of 2m 03s wall (steps 0-200): compile 9.0%, ...'."""
    pct = {k: f"{100 * summary[k]:.1f}%" for k in summary if k != "wall_seconds"}
    return (f"goodput {pct['goodput']} of {format_duration(summary['wall_seconds'])} wall "
            f"(steps {start_step}-{step}): compile {pct['compile_share']}, data wait "
            f"{pct['data_wait_share']}, checkpointing {pct['checkpoint_share']}, other "
            f"{pct['other_share']} (start-up, images, logging, skipped steps)")


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

        path = os.path.join(workdir, METRICS_FILE)
        torn = os.path.exists(path) and os.path.getsize(path) and not _ends_with_newline(path)
        self._jsonl = open(path, "a", buffering=1)
        if torn:  # a killed run's last line: keep it apart from the next record
            self._jsonl.write("\n")
        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One metrics.jsonl line and one TensorBoard scalar per entry."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, float(value), int(step))

    def write_summary(self, step: int, record: Mapping[str, float]) -> None:
        """One summary.jsonl line {"step": step, **record}; TensorBoard scalars summary/*."""
        if not self.enabled:
            return
        values = {k: int(v) if isinstance(v, (int, np.integer)) else float(v)
                  for k, v in record.items()}
        with open(os.path.join(self.workdir, SUMMARY_FILE), "a") as f:
            f.write(json.dumps({"step": int(step), **values}) + "\n")
        for name, value in record.items():
            self._tb.add_scalar(f"summary/{name}", float(value), int(step))

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


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _read_jsonl(path: str) -> list[dict]:
    """The JSON lines of `path` in order ([] if there is none); a line cut short by a killed
    writer is skipped with a warning."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logging.warning("%s line %d is not JSON (a killed run?): skipped", path, number)
    return records


def read_metrics(workdir: str) -> list[dict]:
    """The records of <workdir>/metrics.jsonl, in file order ([] if there is none)."""
    return _read_jsonl(os.path.join(workdir, METRICS_FILE))


def read_summaries(workdir: str) -> list[dict]:
    """The records of <workdir>/summary.jsonl (one per training call), in file order."""
    return _read_jsonl(os.path.join(workdir, SUMMARY_FILE))


def last_logged(workdir: str, key: str, step: int) -> float:
    """`key` of the last metrics.jsonl record at or before `step` that has it (0 if none):
    a resumed run continues a run-long counter from it."""
    values = [r[key] for r in read_metrics(workdir) if r.get("step", 0) <= step and key in r]
    return values[-1] if values else 0
