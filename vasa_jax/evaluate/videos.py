"""Scores sets of talking-face videos: VASA-1's Table 1 and what its peers do not publish.

    python -m vasa_jax.evaluate videos --generated DIR --real DIR [--audio DIR] \
        [--capp RUN] [--face_id DIR] [--syncnet DIR] [--i3d DIR] --out report/

Every .mp4 (or .avi / .mov / .mkv) of each set is read with its audio track (or, with
--audio, DIR/<name>.wav), its face tracked by the real-video preprocessing
(`data_pipeline.preprocess.track`: BlazeFace, the 468-point mesh and irises; frames smaller
than --analysis_size px are upscaled first) and labelled the way preprocessing labels
clips (`preprocess.clip_labels`: solvePnP head pose, mouth and eye openness, gaze). Per
video, then averaged over each set:

  Sc, SD   SyncNet confidence and minimum mean audio-lip feature distance over +-15 frame
           offsets, as syncnet_python computes them (`--syncnet`: syncnet_v2.model converted
           by `python -m vasa_jax.models.syncnet convert`; 224 px crops around the tracked
           face mesh's box, frames at 25 fps; see vasa_jax/models/syncnet.py); the per-video
           CSV also has the AV offset (frames the lips lag the audio)
  CAPP     the contrastive audio-pose score of the re-extracted head pose with the audio
           (`--capp`: a run of `train.py --config configs/capp.py`; 3-second windows)
  dP       mean absolute frame-to-frame change of yaw, pitch, roll (degrees)
  lip r    mouth openness vs the speech envelope, Pearson r at the best lag in +-3 frames
           (the ground-truth-free lip-sync proxy the other evaluators use)
  jitter   mean landmark acceleration |x[t+1] - 2 x[t] + x[t-1]| over the mesh, in % of
           the inter-ocular distance per frame^2
  blinks   blinks per minute (eye-closure onsets, blink label > 0.5)
  id drift face-ID cosine of each frame to the first (`--face_id`: a face-ID embedder
           export), mean over the video and its change per minute
  mouth / eye fidelity  for generated and real videos of the same name (reenactment, or
           generation from the real clip's first frame and audio): Pearson r of the mouth
           and eye openness sequences
  faces    share of frames with a tracked face (frames without one are filled from their
           neighbours for the sequence metrics)

and per set, against the real set:

  FVD25    Frechet video distance of the generated set's clips to the real set's (`--i3d`:
           pytorch-i3d's rgb_imagenet.pt converted by `python -m vasa_jax.models.i3d
           convert`): every 25-frame clip (stride 25) of every video at 25 fps, whole frames
           resized to 224 x 224, the Kinetics-400 I3D's logits averaged over time, Frechet
           distance of the two Gaussian fits (`vasa_jax.metrics.fvd`). report.json gives the
           clip counts; a set with fewer than 2 clips gets no number.

Without --syncnet / --i3d the Sc, SD / FVD25 columns say which flag to pass ("n/a: ...")
instead of guessing. Writes <out>/table.md (Table-1 layout),
<out>/videos.csv (every video's numbers), <out>/report.json and <out>/metrics.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
from typing import Any, Sequence

import cv2
import numpy as np

DESCRIPTION = ("scores sets of mp4s (Table 1: CAPP, dP; lip sync, jitter, blinks, identity "
               "drift, expression fidelity)")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
SAMPLE_RATE = 16000
MIN_FACE_SHARE = 0.5  # a video with a face in fewer frames is an error, not a number
NO_SYNCNET = "n/a: pass --syncnet DIR"
NO_I3D = "n/a: pass --i3d DIR"
COLUMNS = ("CAPP", "dP", "lip r", "jitter", "blinks/min", "id drift", "mouth fidelity",
           "eye fidelity", "faces")
SYNC_COLUMNS = ("Sc", "SD")


@dataclasses.dataclass
class VideoLabels:
    """One video as the face analysis saw it (T frames at fps; audio at SAMPLE_RATE)."""

    name: str
    fps: float
    pose: np.ndarray  # float32 [T, 3] yaw, pitch, roll degrees
    mouth: np.ndarray  # float32 [T] 0..1
    blink: np.ndarray  # float32 [T] 0..1
    landmarks: np.ndarray  # float32 [T, 468, 2] pixels of the analysed frames
    inter_ocular: float  # median distance between the eye centres, pixels
    face_share: float
    audio: np.ndarray  # float32 [N]
    frames: np.ndarray | None = None  # uint8 [T, S, S, 3] face crops (identity drift)
    sync_crops: np.ndarray | None = None  # uint8 [T', 224, 224, 3] SyncNet crops at 25 fps
    fvd_clips: np.ndarray | None = None  # uint8 [N, 25, 224, 224, 3] FVD25 clips at 25 fps


def list_videos(directory: str) -> list[str]:
    """Sorted video paths of a folder; FileNotFoundError / ValueError when there are none."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"video folder {directory!r} does not exist")
    paths = sorted(os.path.join(directory, f) for f in os.listdir(directory)
                   if f.lower().endswith(VIDEO_EXTENSIONS))
    if not paths:
        raise ValueError(f"{directory!r} holds no videos ({', '.join(VIDEO_EXTENSIONS)})")
    return paths


def _fill(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Frames without a face [T] (valid False) take linearly interpolated values."""
    t = np.arange(len(valid))
    flat = values.reshape(len(values), -1).astype(np.float64)
    out = np.stack([np.interp(t, t[valid], flat[valid, k]) for k in range(flat.shape[1])], 1)
    return out.reshape((len(valid),) + values.shape[1:]).astype(np.float32)


def track_faces(frames: np.ndarray, analyzer, analysis_size: int, name: str
                ) -> tuple[np.ndarray, list]:
    """(frames upscaled (bicubic) so their short side is at least analysis_size, the face
    track over them: `preprocess.track`'s observations, None where no face). ValueError
    naming `name` when fewer than MIN_FACE_SHARE of the frames show a face."""
    from data_pipeline import preprocess

    h, w = frames.shape[1:3]
    if min(h, w) < analysis_size:
        k = analysis_size / min(h, w)
        size = (int(round(w * k)), int(round(h * k)))
        frames = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_CUBIC) for f in frames])
    obs = preprocess.track(frames, analyzer)
    share = float(np.mean([o is not None for o in obs]))
    if share < MIN_FACE_SHARE:
        raise ValueError(f"{name!r}: a face in only {100 * share:.0f}% of its {len(obs)} frames")
    return frames, obs


def sync_face_crops(frames: np.ndarray, obs: Sequence, fps: float) -> np.ndarray:
    """SyncNet's input crops of a tracked video (`track_faces`' frames and observations):
    uint8 [T', 224, 224, 3] at 25 fps (`syncnet.syncnet_crops` around each frame's face-mesh
    box, which stands in for syncnet_python's S3FD box; frames without a face take
    interpolated boxes)."""
    from vasa_jax.models import syncnet

    valid = np.array([o is not None for o in obs])
    mesh = np.stack([o.landmarks.mesh[:, :2] for o in obs if o is not None])
    boxes = np.zeros((len(obs), 4), np.float32)
    boxes[valid] = np.concatenate([mesh.min(1), mesh.max(1)], axis=1)
    boxes = _fill(boxes, valid)
    keep = syncnet.frames_at_25fps(len(frames), fps)
    return syncnet.syncnet_crops(frames[keep], boxes[keep])


def analyze_video(path: str, analyzer, *, analysis_size: int = 256, audio_dir: str | None = None,
                  keep_crops: int = 0, sync_crops: bool = False,
                  fvd_clips: bool = False) -> VideoLabels:
    """Reads, tracks and labels one video. keep_crops > 0 keeps face crops of that size;
    sync_crops keeps SyncNet's (`syncnet.syncnet_crops` around each frame's face-mesh box,
    at 25 fps); fvd_clips keeps FVD25's (`fvd.video_clips` of the whole frames at 25 fps).
    ValueError when it cannot be read or shows a face in fewer than
    MIN_FACE_SHARE frames."""
    from data_pipeline import face_analysis as fa
    from data_pipeline import preprocess
    from vasa_jax import video as video_lib
    from vasa_jax.audio.io import load_audio

    name = os.path.splitext(os.path.basename(path))[0]
    frames, fps = video_lib.read_video(path)
    if audio_dir:
        wav = os.path.join(audio_dir, name + ".wav")
        if not os.path.exists(wav):
            raise FileNotFoundError(f"--audio {audio_dir!r} has no {name}.wav for {path!r}")
        audio = load_audio(wav, SAMPLE_RATE)
    else:
        audio = video_lib.read_audio(path, SAMPLE_RATE)
    clips = None
    if fvd_clips:
        from vasa_jax.metrics import fvd
        from vasa_jax.models import syncnet

        clips = fvd.video_clips(frames[syncnet.frames_at_25fps(len(frames), fps)])
    frames, obs = track_faces(frames, analyzer, analysis_size, path)
    valid = np.array([o is not None for o in obs])
    share = float(valid.mean())
    kept = [o for o in obs if o is not None]
    crop = preprocess.clip_crop(kept)
    labels, _ = preprocess.clip_labels(kept, crop, analysis_size)

    def full(x):
        out = np.zeros((len(obs),) + x.shape[1:], np.float32)
        out[valid] = x
        return _fill(out, valid)

    mesh = np.stack([o.landmarks.mesh[:, :2] for o in kept]).astype(np.float32)
    eyes = np.stack([fa._eye_corners(o.landmarks)[:, :, :2].mean(1)
                     for o in kept])  # [T', 2 eyes, (x, y)]: the corners' midpoints
    crops = None
    if keep_crops:
        crops = np.stack([fa.warp_crop(f, crop[:2], crop[2], 0.0, keep_crops)[0]
                          for f in frames])
    synced = sync_face_crops(frames, obs, fps) if sync_crops else None
    return VideoLabels(
        name=name, fps=float(fps), pose=full(labels["pose"][:, :3]),
        mouth=full(labels["mouth_open"]), blink=full(labels["blink"]), landmarks=full(mesh),
        inter_ocular=float(np.median(np.linalg.norm(eyes[:, 0] - eyes[:, 1], axis=-1))),
        face_share=share, audio=audio, frames=crops, sync_crops=synced, fvd_clips=clips)


# ----------------------------------------------------------------------------- metrics


def landmark_jitter(landmarks: np.ndarray, inter_ocular: float) -> float:
    """Mean |x[t+1] - 2 x[t] + x[t-1]| over frames and landmarks [T, L, 2], in % of the
    inter-ocular distance (NaN under 3 frames)."""
    if len(landmarks) < 3:
        return float("nan")
    acc = landmarks[2:] - 2 * landmarks[1:-1] + landmarks[:-2]
    return float(100.0 * np.mean(np.linalg.norm(acc, axis=-1)) / max(inter_ocular, 1e-6))


def blinks_per_minute(blink: np.ndarray, fps: float) -> float:
    """Onsets of blink > 0.5 per minute of video."""
    closed = np.asarray(blink) > 0.5
    onsets = int(np.sum(closed[1:] & ~closed[:-1]) + closed[0])
    return 60.0 * onsets * fps / max(len(blink), 1)


def lip_sync_r(mouth: np.ndarray, audio: np.ndarray, fps: float) -> float:
    """Pearson r of mouth openness with the speech envelope at the best lag in +-3 frames."""
    from data_pipeline.synthtalk.sync import correlation_from_envelopes, frame_rms

    r, _ = correlation_from_envelopes([mouth], [frame_rms(audio, len(mouth), fps, SAMPLE_RATE)])
    return float(r)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    a, b = np.asarray(a[:n], np.float64), np.asarray(b[:n], np.float64)
    if n < 3 or a.std() < 1e-9 or b.std() < 1e-9:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def identity_drift(embed, crops: np.ndarray, fps: float) -> tuple[float, float]:
    """(mean cosine of every frame's face-ID embedding to the first frame's, its change per
    minute: the slope of a line fitted over time)."""
    e = np.asarray(embed(crops), np.float64)
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-9)
    cos = e @ e[0]
    minutes = np.arange(len(cos)) / fps / 60.0
    slope = float(np.polyfit(minutes, cos, 1)[0]) if len(cos) > 2 else float("nan")
    return float(cos.mean()), slope


def video_metrics(v: VideoLabels, capp_scorer=None, id_embed=None,
                  sync_scorer=None) -> dict[str, float]:
    """Every per-video number of the report (NaN where it does not apply). sync_scorer: a
    `syncnet.SyncNetScorer` (needs v.sync_crops)."""
    out = {
        "dP": float(np.mean(np.abs(np.diff(v.pose, axis=0)))) if len(v.pose) > 1 else np.nan,
        "lip r": lip_sync_r(v.mouth, v.audio, v.fps),
        "jitter": landmark_jitter(v.landmarks, v.inter_ocular),
        "blinks/min": blinks_per_minute(v.blink, v.fps),
        "faces": v.face_share,
        "CAPP": float("nan"),
        "id drift": float("nan"),
        "id drift/min": float("nan"),
        "Sc": float("nan"),
        "SD": float("nan"),
        "AV offset": float("nan"),
    }
    if capp_scorer is not None and len(v.pose) >= capp_scorer.window:
        out["CAPP"] = capp_scorer.score(v.pose, capp_audio(capp_scorer, v.audio, len(v.pose)))
    if id_embed is not None and v.frames is not None:
        out["id drift"], out["id drift/min"] = identity_drift(id_embed, v.frames, v.fps)
    if sync_scorer is not None and v.sync_crops is not None:
        sync = sync_scorer.score(v.sync_crops, v.audio)
        out["Sc"], out["SD"], out["AV offset"] = sync["Sc"], sync["SD"], sync["offset"]
    return out


def capp_audio(scorer, audio: np.ndarray, num_frames: int) -> np.ndarray:
    """The CAPP run's audio features of a waveform, one row per video frame [T, Da]."""
    a = scorer.config.data.audio
    if scorer.config.data.audio_source != "mel":
        raise ValueError(f"--capp: the run reads {scorer.config.data.audio_source!r} audio "
                         "features; scoring videos needs a CAPP trained on mel (audio_source=mel)")
    from vasa_jax.audio.mel import log_mel_frames

    return log_mel_frames(audio, int(a.sample_rate), float(a.fps), int(a.n_mels), num_frames)


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _fmt(x: Any) -> str:
    if isinstance(x, str):
        return x
    return "-" if not np.isfinite(x) else f"{x:.3f}"


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generated", required=True, help="folder of generated videos")
    parser.add_argument("--real", default=None, help="folder of real videos (same names pair)")
    parser.add_argument("--audio", default=None,
                        help="folder of <name>.wav to score against (default: each video's "
                             "own audio track)")
    parser.add_argument("--capp", default=None, help="a CAPP training run (CAPP column)")
    parser.add_argument("--face_id", default=None,
                        help="a face-ID embedder export (the workdir of `python train.py "
                             "--config configs/face_id.py`; identity-drift column)")
    parser.add_argument("--syncnet", default=None,
                        help="SyncNet weights converted by `python -m vasa_jax.models.syncnet "
                             "convert --weights syncnet_v2.model --out DIR` (Sc, SD columns)")
    parser.add_argument("--i3d", default=None,
                        help="I3D weights converted by `python -m vasa_jax.models.i3d convert "
                             "--weights rgb_imagenet.pt --out DIR` (FVD25 column; needs --real)")
    parser.add_argument("--analysis_size", type=int, default=256,
                        help="frames smaller than this (px) are upscaled for face tracking")
    parser.add_argument("--out", required=True, help="report folder")


def run(args: argparse.Namespace) -> int:
    from data_pipeline import face_analysis as fa

    if args.analysis_size < 64:
        raise ValueError(f"--analysis_size must be >= 64, got {args.analysis_size}")
    if args.i3d:
        from vasa_jax.models import i3d

        if not os.path.isdir(args.i3d):
            raise FileNotFoundError(f"--i3d {args.i3d!r} does not exist; convert "
                                    f"rgb_imagenet.pt with `{i3d.CONVERT_COMMAND}`")
        if not args.real:
            raise ValueError("--i3d needs --real: FVD25 compares the generated clips with the "
                             "real ones")
    sets = {"generated": list_videos(args.generated)}
    if args.real:
        sets["real"] = list_videos(args.real)
    scorer = None
    if args.capp:
        from vasa_jax.evaluate.capp import CappScorer

        scorer = CappScorer.load(args.capp)
    id_embed, crop_size = None, 0
    if args.face_id:
        id_embed, crop_size = _face_id(args.face_id)
    sync_scorer = None
    if args.syncnet:
        from vasa_jax.models import syncnet

        if not os.path.isdir(args.syncnet):
            raise FileNotFoundError(f"--syncnet {args.syncnet!r} does not exist; convert "
                                    f"syncnet_v2.model with `{syncnet.CONVERT_COMMAND}`")
        sync_scorer = syncnet.SyncNetScorer.load(args.syncnet)
    i3d_features = None
    if args.i3d:
        from vasa_jax.metrics import fvd

        i3d_features = fvd.I3DFeatures.load(args.i3d)
    analyzer = fa.FaceAnalyzer(backend="tflite")
    rows, labels = [], {}
    clip_features = {s: [] for s in sets}  # FVD25: [N_k, 400] per video
    for set_name, paths in sets.items():
        for path in paths:
            v = analyze_video(path, analyzer, analysis_size=args.analysis_size,
                              audio_dir=args.audio, keep_crops=crop_size,
                              sync_crops=sync_scorer is not None,
                              fvd_clips=i3d_features is not None)
            rows.append({"set": set_name, "video": v.name, "frames": len(v.pose),
                         **video_metrics(v, scorer, id_embed, sync_scorer)})
            if i3d_features is not None and len(v.fvd_clips):
                clip_features[set_name].append(i3d_features.features(v.fvd_clips))
            v.sync_crops = v.fvd_clips = None  # 150 KB a frame: not kept past scoring
            labels[(set_name, v.name)] = v
            print(f"{set_name}/{v.name}: " + ", ".join(
                f"{k} {_fmt(rows[-1][k])}" for k in ("Sc", "SD", "dP", "lip r", "jitter", "CAPP")))
    for row in rows:  # expression fidelity against the real video of the same name
        real = labels.get(("real", row["video"]))
        gen = labels[(row["set"], row["video"])]
        ok = real is not None and row["set"] != "real"
        row["mouth fidelity"] = _pearson(gen.mouth, real.mouth) if ok else float("nan")
        row["eye fidelity"] = _pearson(1 - gen.blink, 1 - real.blink) if ok else float("nan")
    table = {s: {c: _mean([r[c] for r in rows if r["set"] == s])
                 for c in COLUMNS + ("id drift/min",) + SYNC_COLUMNS} for s in sets}
    fvd_report = None
    if i3d_features is not None:
        fvd_report = set_fvd({s: np.concatenate(f) if f else np.zeros((0, 0))
                              for s, f in clip_features.items()})
        for s in sets:
            table[s]["FVD25"] = fvd_report["FVD25"].get(s, float("nan"))
    os.makedirs(args.out, exist_ok=True)
    md = _markdown(table, {s: len(p) for s, p in sets.items()}, scorer is not None,
                   id_embed is not None, sync_scorer is not None, fvd_report)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "videos.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        not_computed = {**({} if sync_scorer else dict.fromkeys(SYNC_COLUMNS, NO_SYNCNET)),
                        **({} if fvd_report else {"FVD25": NO_I3D})}
        json.dump({"sets": table, "videos": rows, "not_built": not_computed,
                   **({"fvd": {"clips": fvd_report["clips"]}} if fvd_report else {})}, f,
                  indent=2, default=lambda x: None if not np.isfinite(x) else x)
    _plot(rows, list(sets), os.path.join(args.out, "metrics.png"), sync_scorer is not None)
    print(md)
    return 0


def _face_id(path: str):
    """(embed(crops uint8 [T, S, S, 3]) -> [T, D], crop size S) of a face-ID export."""
    import jax

    from data_pipeline.transforms import to_signed_float
    from vasa_jax.models import face_id

    embedder = face_id.load_face_id(path)
    size = int(embedder.config.image_size)
    fn = jax.jit(lambda params, x: embedder.apply(params, to_signed_float(x)))
    return (lambda crops: np.concatenate([np.asarray(fn(embedder.params, crops[i:i + 64]))
                                          for i in range(0, len(crops), 64)])), size


def set_fvd(features: dict[str, np.ndarray]) -> dict:
    """FVD25 of every set's clip features [N_s, 400] against the "real" set's:
    {"FVD25": {set: value}, "clips": {set: N_s}}; a set (or a real set) with fewer than 2
    clips gets no value. The real set itself gets none either (it is the reference)."""
    from vasa_jax.metrics import fvd

    clips = {s: int(len(f)) for s, f in features.items()}
    out = {}
    for s, f in features.items():
        if s != "real" and clips[s] >= 2 and clips.get("real", 0) >= 2:
            out[s] = fvd.fvd(features["real"], f)
    return {"FVD25": out, "clips": clips}


def _markdown(table: dict, counts: dict, has_capp: bool, has_id: bool,
              has_sync: bool = False, fvd_report: dict | None = None) -> str:
    head = ["set", "videos", "Sc", "SD", *COLUMNS[:1], "dP", "FVD25", *COLUMNS[2:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s, m in table.items():
        sync = [_fmt(m[c]) if has_sync else NO_SYNCNET for c in SYNC_COLUMNS]
        fvd = _fmt(m["FVD25"]) if fvd_report else NO_I3D
        cells = [s, str(counts[s]), *sync, _fmt(m["CAPP"]), _fmt(m["dP"]), fvd,
                 *(_fmt(m[c]) for c in COLUMNS[2:])]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if not has_sync:
        notes.append("Sc/SD: pass --syncnet DIR (syncnet_v2.model converted with `python -m "
                     "vasa_jax.models.syncnet convert --weights syncnet_v2.model --out DIR`).")
    if fvd_report is None:
        notes.append("FVD25: pass --i3d DIR (pytorch-i3d's rgb_imagenet.pt converted with "
                     "`python -m vasa_jax.models.i3d convert --weights rgb_imagenet.pt --out "
                     "DIR`) and --real.")
    else:
        notes.append("FVD25: against the real set, over 25-frame clips (" + ", ".join(
            f"{s} {n}" for s, n in fvd_report["clips"].items()) + "); fewer than 2 in a set: "
            "no value.")
    if not has_capp:
        notes.append("CAPP: pass --capp RUN (a configs/capp.py training run).")
    if not has_id:
        notes.append("id drift: pass --face_id DIR (a face-ID embedder export).")
    return "\n".join(lines) + "\n" + "".join(f"\n{n}" for n in notes) + "\n"


def _plot(rows: list[dict], sets: list[str], path: str, has_sync: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = (SYNC_COLUMNS if has_sync else ()) + ("dP", "lip r", "jitter", "blinks/min", "CAPP",
                                                  "mouth fidelity")
    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown), 2.8))
    for ax, col in zip(axes, shown):
        data = [[r[col] for r in rows if r["set"] == s and np.isfinite(r[col])] for s in sets]
        for k, d in enumerate(data):
            ax.scatter(np.full(len(d), k) + np.linspace(-0.1, 0.1, len(d)), d, s=12)
            if d:
                ax.hlines(np.mean(d), k - 0.25, k + 0.25, color="k")
        ax.set_xticks(range(len(sets)), sets, fontsize=8)
        ax.set_title(col, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
