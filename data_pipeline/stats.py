"""Per-dimension normalisation statistics of the stage-2 sequences (motion, audio, controls).

Stage 2 trains and samples in a normalised space: x = (raw - mean) / std per dimension,
with mean / std over all frames of the TRAIN split. The statistics live in DIR/stats.json
(written by `data_pipeline.extract_latents`, or by `write_stats`)::

    {source: {"mean": [D floats], "std": [D floats], "count": frames}}

keyed by the loader's source strings: "labels" (SynthTalk ground-truth motion), "mel",
"features:<name>" (e.g. features:motion, features:audio), plus "label:gaze" and
"label:distance", the per-frame control labels (the diffusion model's gaze / distance
conditions are normalised with them).

`source_stats` reads the file and, for a source it lacks, scans the split once (with a
progress bar; logged) without writing into the data folder. `compute_stats` +
`write_stats` make (and merge into) the file.

`Normalization` bundles what one stage-2 run uses (motion, audio, gaze and distance
statistics); the trainer keeps a copy in <workdir>/normalization.json, so a run resumes and
samples with exactly the statistics it trained with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Mapping

import numpy as np
from absl import logging

from data_pipeline import schema

STATS_FILE = "stats.json"
# Standard deviations are floored at this (a constant dimension maps to 0, not to inf).
STD_FLOOR = 1e-3
KINDS = ("motion", "audio", "control")
# Per-frame labels whose statistics normalise the model's control conditions.
CONTROL_LABELS = ("gaze", "distance")


def stats_path(directory: str) -> str:
    return os.path.join(directory, STATS_FILE)


def read_stats(directory: str) -> dict:
    """The contents of DIR/stats.json ({} if there is none)."""
    path = stats_path(directory)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        stats = json.load(f)
    if not isinstance(stats, dict):
        raise ValueError(f"{path}: expected a JSON object of sources, got {type(stats).__name__}")
    return stats


def write_stats(directory: str, stats: Mapping[str, Mapping]) -> str:
    """Merges `stats` ({source: {"mean", "std", "count"}}) into DIR/stats.json; returns its
    path. Entries for other sources already in the file are kept."""
    for source, entry in stats.items():
        _check_entry(source, entry, "stats to write")
    merged = {**read_stats(directory), **{k: _plain(v) for k, v in stats.items()}}
    path = stats_path(directory)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(merged, f, indent=1)
    os.replace(tmp, path)
    return path


def _plain(entry: Mapping) -> dict:
    return {"mean": [float(x) for x in np.asarray(entry["mean"]).reshape(-1)],
            "std": [float(x) for x in np.asarray(entry["std"]).reshape(-1)],
            "count": int(entry["count"])}


def _check_entry(source: str, entry, where: str) -> None:
    if not isinstance(entry, Mapping) or not {"mean", "std", "count"} <= set(entry):
        raise ValueError(f"{where}: entry {source!r} needs mean, std and count, got {entry!r}")
    if len(entry["mean"]) != len(entry["std"]) or len(entry["mean"]) == 0:
        raise ValueError(f"{where}: entry {source!r} has {len(entry['mean'])} means and "
                         f"{len(entry['std'])} stds")


def _check_kind(source: str, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "control":
        ok = source.startswith("label:") and source[len("label:"):] in CONTROL_LABELS
        allowed = [f"label:{n}" for n in CONTROL_LABELS]
    elif kind == "motion":
        ok = source == "labels" or (source.startswith("features:") and len(source) > 9)
        allowed = ["labels", "features:<name>"]
    else:
        ok = source == "mel" or (source.startswith("features:") and len(source) > 9)
        allowed = ["mel", "features:<name>"]
    if not ok:
        raise ValueError(f"{kind} source {source!r}: use one of {allowed}")


def _sequence(clip: schema.Clip, source: str, kind: str, n_mels: int) -> np.ndarray | None:
    """The clip's per-frame values of `source`: float [T, D] (None: a control label the clip
    lacks)."""
    from data_pipeline import loaders  # heavy (grain); only scans need it

    if kind == "control":
        name = source[len("label:"):]
        if name not in clip.labels:
            return None
        x = np.asarray(clip.labels[name], np.float64)
        return x.reshape(len(x), -1)
    if kind == "motion" and source == "labels":
        try:
            return loaders.T.motion_from_labels(clip.labels)
        except KeyError as e:
            raise schema.CorruptRecordError(f"{clip.clip_id}: {e}") from e
    if source == "mel":
        return loaders._log_mel(clip, n_mels, 0, clip.num_frames)
    # The same per-frame values loaders.clip_sequences gives the trainer.
    return loaders._feature(clip, source[len("features:"):], 0, clip.num_frames)


class _Moments:
    """Running per-dimension sum / sum of squares in float64."""

    def __init__(self):
        self.count, self.sum, self.sumsq = 0, None, None

    def add(self, x: np.ndarray, source: str) -> None:
        x = np.asarray(x, np.float64)
        if self.sum is None:
            self.sum, self.sumsq = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        elif x.shape[1] != len(self.sum):
            raise ValueError(f"{source}: clips disagree on the dimension ({x.shape[1]} vs "
                             f"{len(self.sum)})")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{source}: non-finite values")
        self.count += len(x)
        self.sum += x.sum(axis=0)
        self.sumsq += np.square(x).sum(axis=0)

    def entry(self) -> dict:
        mean = self.sum / self.count
        var = np.maximum(self.sumsq / self.count - np.square(mean), 0.0)
        return {"mean": mean.tolist(), "std": np.sqrt(var).tolist(), "count": int(self.count)}


def _scan(directory: str, wanted: Mapping[str, str], n_mels: int, split: str,
          progress: bool = True) -> dict:
    """{source: entry} for `wanted` ({source: kind}) in one pass over the split's clips."""
    from data_pipeline import loaders

    index = loaders.load_clip_index(directory, split)
    records = schema.read_records(index.paths)
    moments = {source: _Moments() for source in wanted}
    skipped = 0
    ids = range(len(index))
    if progress:
        from tqdm import tqdm

        ids = tqdm(ids, desc=f"stats of {sorted(wanted)} over {split}", file=sys.stderr,
                   leave=False, dynamic_ncols=True)
    for rid in ids:
        try:
            clip = schema.decode_clip(records[int(rid)])
            values = {s: _sequence(clip, s, k, n_mels) for s, k in wanted.items()}
        except schema.CorruptRecordError as e:
            logging.warning("stats: %s record %d unusable: %s", split, rid, e)
            skipped += 1
            continue
        for source, x in values.items():
            if x is not None and len(x):
                moments[source].add(x, source)
    out = {}
    for source, m in moments.items():
        if m.count == 0:
            if wanted[source] == "control":
                continue  # the dataset has no such label: its condition is always dropped
            raise ValueError(f"stats: no frame of {source!r} in {directory!r} split {split!r} "
                             f"({skipped} records unusable)")
        out[source] = m.entry()
    logging.info("computed normalisation statistics of %s over %d %s frames of %s (%d records "
                 "skipped)", sorted(out), max((m.count for m in moments.values()), default=0),
                 split, directory, skipped)
    return out


def compute_stats(directory: str, sources: Mapping[str, str], n_mels: int = 80,
                  split: str = "train", *, progress: bool = True) -> dict:
    """Statistics of `sources` ({kind: source}, kind "motion" / "audio" / "control") over
    all frames of the split, in one scan. Also computes the control labels
    (`CONTROL_LABELS`: "label:gaze", "label:distance") the clips have.

    Returns {source: {"mean": [D], "std": [D] (unfloored), "count": frames}}.
    """
    wanted = {}
    for kind, source in sources.items():
        _check_kind(source, kind)
        wanted[source] = kind
    for name in CONTROL_LABELS:
        wanted.setdefault(f"label:{name}", "control")
    return _scan(directory, wanted, n_mels, split, progress)


def load_or_compute(directory: str, sources: Mapping[str, str], n_mels: int = 80,
                    split: str = "train", *, progress: bool = True) -> dict[str, tuple]:
    """{source: (mean float32 [D], std float32 [D] floored at STD_FLOOR)} for `sources`
    ({source: kind}): read from DIR/stats.json where it has them (train split only), the
    rest computed in one scan (never written to the data folder). A control label no clip
    has is left out of the result."""
    for source, kind in sources.items():
        _check_kind(source, kind)
    stored = read_stats(directory) if split == "train" else {}
    missing = {s: k for s, k in sources.items() if s not in stored}
    if missing:
        logging.info("%s has no %s statistics for %s; computing them (not written to the data "
                     "folder; `data_pipeline.extract_latents` or stats.write_stats stores them)",
                     directory, split, sorted(missing))
        stored = {**stored, **_scan(directory, missing, n_mels, split, progress)}
    out = {}
    for source in sources:
        if source not in stored:
            continue
        _check_entry(source, stored[source], stats_path(directory))
        mean = np.asarray(stored[source]["mean"], np.float32)
        std = np.maximum(np.asarray(stored[source]["std"], np.float32), STD_FLOOR)
        out[source] = (mean, std)
    return out


def source_stats(directory: str, source: str, kind: str, n_mels: int = 80,
                 split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(mean float32 [D], std float32 [D], floored at STD_FLOOR) of one source.

    kind: "motion" (source "labels" / "features:<name>"), "audio" ("mel" / "features:<name>")
    or "control" ("label:gaze" / "label:distance"). Read from DIR/stats.json if it has the
    source (train split), else computed by scanning the split (logged, not written).
    Raises ValueError if the split has no frame of it.
    """
    out = load_or_compute(directory, {source: kind}, n_mels, split)
    if source not in out:
        raise ValueError(f"no {source!r} values in {directory!r} split {split!r}")
    return out[source]



# ----------------------------------------------------------------------------- stage 2


NORMALIZATION_FILE = "normalization.json"


@dataclasses.dataclass(frozen=True)
class Normalization:
    """The normalisation a stage-2 run trains and samples with (float32 arrays [D]).

    motion / audio: of the run's data.motion_source / data.audio_source; gaze [2] and
    distance [1]: of the per-frame control labels (mean 0, std 1 when the data has none).
    A run keeps its copy in <workdir>/normalization.json, so sampling needs no data folder
    and a resumed run normalises exactly as before.
    """

    motion_source: str
    audio_source: str
    motion_mean: np.ndarray
    motion_std: np.ndarray
    audio_mean: np.ndarray
    audio_std: np.ndarray
    gaze_mean: np.ndarray
    gaze_std: np.ndarray
    distance_mean: np.ndarray
    distance_std: np.ndarray

    @property
    def motion_dim(self) -> int:
        return int(self.motion_mean.shape[0])

    @property
    def audio_dim(self) -> int:
        return int(self.audio_mean.shape[0])

    @classmethod
    def from_data(cls, directory: str, motion_source: str, audio_source: str,
                  n_mels: int = 80, split: str = "train") -> "Normalization":
        """From DIR/stats.json, computing what it lacks (one scan of the split)."""
        wanted = {motion_source: "motion", audio_source: "audio",
                  **{f"label:{n}": "control" for n in CONTROL_LABELS}}
        got = load_or_compute(directory, wanted, n_mels, split)
        identity = {"gaze": (np.zeros(2, np.float32), np.ones(2, np.float32)),
                    "distance": (np.zeros(1, np.float32), np.ones(1, np.float32))}
        gaze = got.get("label:gaze", identity["gaze"])
        distance = got.get("label:distance", identity["distance"])
        return cls(motion_source, audio_source, *got[motion_source], *got[audio_source],
                   *gaze, *distance)

    def to_json(self) -> dict:
        out = {"motion_source": self.motion_source, "audio_source": self.audio_source}
        for f in dataclasses.fields(self):
            if f.name not in out:
                out[f.name] = [float(x) for x in getattr(self, f.name)]
        return out

    @classmethod
    def from_json(cls, d: Mapping) -> "Normalization":
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"normalisation record lacks {missing}")
        arrays = {n: np.asarray(d[n], np.float32) for n in names[2:]}
        for n in names[2:]:
            if arrays[n].ndim != 1 or (n.endswith("_std") and np.any(arrays[n] <= 0)):
                raise ValueError(f"normalisation record: bad {n} {d[n]!r}")
        return cls(str(d["motion_source"]), str(d["audio_source"]), **arrays)

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, NORMALIZATION_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str) -> "Normalization | None":
        """<directory>/normalization.json, or None if there is none."""
        path = os.path.join(directory, NORMALIZATION_FILE)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return cls.from_json(json.load(f))

    def arrays(self) -> dict[str, np.ndarray]:
        """{name: float32 [D]} of the means and stds (e.g. the trainer's frozen argument)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)[2:]}
