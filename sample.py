"""Generates a talking-face video from one portrait and a speech clip.

    python sample.py                                   # the built-in demo: assets/demo/
    python sample.py --image portrait.png --audio speech.wav --out out.mp4 \
        [--model DIR | --face_workdir W1 --motion_workdir W2] [controls] [--mode stream]

With no model flags it uses the built-in demo model (assets/demo_model: both stages trained
by `bash scripts/recipe_cpu.sh`, on synthetic SynthTalk faces at 64 px), and with no
--image / --audio the built-in portrait (an identity the demo model never saw) and speech.
--image takes a photo of any size: --align auto (the default) finds the largest face
(several: a warning), levels the eyes and crops it the way the training faces are framed,
except that an image already at the model's size whose face is framed so (a face crop, like
the built-in portrait) is used as it is; --align face always crops the face; --align none
takes the image as a face crop (centre-cropped to a square). With auto or face, an image
without a face is an error (exit 2), except under auto at the model's size (a warning).
Writes H.264 video with the AAC audio muxed in (ffmpeg), one frame per 40 ms of audio.
--mode stream feeds the audio in 40 ms chunks as if it arrived live and reports the
first-frame latency and the sustained frame rate. --expression_meter M reads the mouth
off the output frames and prints its correlation with the speech envelope (SynthTalk
models only: the meter is trained on SynthTalk's labels).

Batch mode renders many (portrait, speech) pairs with one model load and one compilation:

    python sample.py --batch jobs.csv --out_dir videos/ [model flags] [default controls]

jobs.csv has a header row; `image` and `audio` are required columns; `out` (a file name
under --out_dir; default NNNN_IMAGE_AUDIO.mp4) and any of JOB_COLUMNS are optional, with the
names and values of the flags (`gaze` as "15,0", `lip_only` as true/false); an empty cell
takes the command line's value. Relative paths are read from the CSV's folder. The whole
file is checked before the model loads (a bad file: exit 2); a job that fails (no face,
silent audio, ...) is reported and the batch goes on (exit 1 at the end); outputs that
already exist are skipped, so a rerun finishes an interrupted batch (--overwrite redoes
them). --out_dir/batch_report.csv lists every job: ok, skipped or failed, and why.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

from vasa_jax import cli

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_MODEL = os.path.join(ROOT, "assets", "demo_model")  # = inference.DEMO_MODEL
DEMO_IMAGE = os.path.join(ROOT, "assets", "demo", "portrait.png")
DEMO_AUDIO = os.path.join(ROOT, "assets", "demo", "speech.wav")
DEMO_METER = os.path.join(DEMO_MODEL, "expression_meter")


def _argtype(name: str):
    """An argparse type of vasa_jax.inference's parser `name` (imported when used: --help
    stays fast)."""
    def convert(text: str):
        from vasa_jax import inference

        try:
            return getattr(inference, name)(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


# The columns of a batch file: per-job values of these flags.
JOB_COLUMNS = ("image", "audio", "out", "align", "gaze", "distance", "emotion", "guidance",
               "steps", "seed", "head", "head_amplitude", "lip_only", "pose_video",
               "allow_silence")
_PATH_COLUMNS = ("image", "audio", "pose_video")
_FLAG_COLUMNS = ("lip_only", "allow_silence")


def build_parser(parser_class=cli.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=DEMO_IMAGE, help="portrait: a photo with a face (any "
                   "size) or a face crop")
    p.add_argument("--align", choices=("auto", "face", "none"), default="auto",
                   help="face: find the largest face, level the eyes, crop it as the "
                   "training faces are framed (no face: error); none: use the image as a "
                   "face crop (centre-cropped to a square); auto (default): face, but an "
                   "image at the model's size that is already a face crop, or has no face "
                   "found (a warning), is used as it is")
    p.add_argument("--audio", default=DEMO_AUDIO, help="speech (wav/flac/mp3/m4a/...)")
    p.add_argument("--out", default="out.mp4", help="the mp4 to write")
    p.add_argument("--model", default="", help="a model export (python -m vasa_jax.inference "
                   "export); default: the built-in demo model unless --face_workdir is given")
    p.add_argument("--face_workdir", default="", help="a stage-1 training run")
    p.add_argument("--motion_workdir", default="", help="a stage-2 training run")
    p.add_argument("--mode", choices=("offline", "stream"), default="offline")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="the face model's compute dtype (exports only; default: as trained)")
    g = p.add_argument_group("controls (a negative value as --gaze=-10,5)")
    g.add_argument("--gaze", type=_argtype("parse_gaze"), default=None,
                   help="THETA,PHI degrees")
    g.add_argument("--distance", type=float, default=None, help="head distance")
    g.add_argument("--emotion", default=None, help="neutral, happy, sad, surprise, fear, "
                   "disgust, anger or contempt")
    g.add_argument("--guidance", type=_argtype("parse_guidance"), default=None,
                   help="CFG scales, e.g. audio=0.5,gaze=1.0 (default: the model's)")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--head", choices=("generated", "still"), default="generated")
    g.add_argument("--head_amplitude", type=float, default=1.0,
                   help="scale of the generated head motion (0.5 about halves it)")
    g.add_argument("--lip_only", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the portrait's pose and eyes; only the mouth follows the audio")
    g.add_argument("--pose_video", default="", help="take the head pose from this video")
    p.add_argument("--allow_silence", action=argparse.BooleanOptionalAction, default=False,
                   help="accept silent audio")
    p.add_argument("--expression_meter", default=None,
                   help="report the lip sync of the output with this meter (default: the "
                   "demo model's, when the demo model is used)")
    p.add_argument("--no_progress", action="store_true")
    b = p.add_argument_group("batch mode")
    b.add_argument("--batch", default="", help="a CSV of jobs (columns: image, audio and any "
                   "of " + ", ".join(JOB_COLUMNS[2:]) + "): one video each")
    b.add_argument("--out_dir", default="", help="where the batch's videos go")
    b.add_argument("--overwrite", action="store_true",
                   help="redo the batch's videos that exist (default: skip them)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


class _JobParser(cli.ArgumentParser):
    """The flags of one batch job: an error is a ValueError naming the job, not an exit."""

    def error(self, message: str):
        raise ValueError(" ".join(message.split()))


def read_jobs(path: str, argv: list[str]) -> list[tuple[int, argparse.Namespace]]:
    """A batch CSV -> [(its line number, the job's arguments)]: `argv` (the command line)
    with the row's cells as later flags. Raises ValueError naming the line of a bad row."""
    from vasa_jax import inference

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--batch: no such file {path!r}")
    base = os.path.dirname(os.path.abspath(path))
    parser = build_parser(_JobParser)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"--batch {path!r} is not a CSV file ({e})") from None
    unknown = sorted(set(columns) - set(JOB_COLUMNS))
    if unknown:
        raise ValueError(f"--batch {path!r}: unknown column(s) {', '.join(unknown)} (known: "
                         f"{', '.join(JOB_COLUMNS)})")
    missing = [c for c in ("image", "audio") if c not in columns]
    if missing:
        raise ValueError(f"--batch {path!r} needs a header row with the column(s) "
                         f"{', '.join(missing)}")
    jobs, outs = [], {}
    for index, (line, row) in enumerate(rows):
        cells = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if None in row:
            raise ValueError(f"--batch {path!r} line {line}: more cells than columns")
        if not any(cells.values()):
            continue  # a blank line
        tokens = []
        for column, value in cells.items():
            if not value:
                continue
            if column in _FLAG_COLUMNS:
                try:
                    on = inference.parse_bool(value)
                except ValueError as e:
                    raise ValueError(f"--batch {path!r} line {line}: {column}: {e}") from None
                tokens.append(f"--{'' if on else 'no-'}{column}")
                continue
            if column in _PATH_COLUMNS:
                value = os.path.join(base, os.path.expanduser(value))
            tokens.append(f"--{column}={value}")
        if not cells.get("image") or not cells.get("audio"):
            raise ValueError(f"--batch {path!r} line {line}: image and audio are required")
        try:
            args = parser.parse_args(argv + tokens)
            controls(args)  # a bad emotion, amplitude, ... fails now, not hours later
        except ValueError as e:
            raise ValueError(f"--batch {path!r} line {line}: {e}") from None
        stem = lambda p: os.path.splitext(os.path.basename(p))[0]  # noqa: E731
        name = cells.get("out") or f"{index:04d}_{stem(args.image)}_{stem(args.audio)}.mp4"
        if os.path.isabs(name) or os.path.dirname(os.path.normpath(name)):
            raise ValueError(f"--batch {path!r} line {line}: out must be a file name under "
                             f"--out_dir, got {name!r}")
        if name in outs:
            raise ValueError(f"--batch {path!r} lines {outs[name]} and {line} both write "
                             f"{name!r}")
        outs[name] = line
        args.out = os.path.join(args.out_dir, name)
        jobs.append((line, args))
    if not jobs:
        raise ValueError(f"--batch {path!r} has no jobs")
    return jobs


def controls(args: argparse.Namespace):
    """The inference.Controls of parsed arguments (ValueError on a bad value)."""
    from vasa_jax import inference

    return inference.Controls(
        gaze=args.gaze, distance=args.distance, emotion=args.emotion, guidance=args.guidance,
        steps=args.steps, seed=args.seed, head=args.head, head_amplitude=args.head_amplitude,
        lip_only=args.lip_only)


def _check_output(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise ValueError(f"--out {path!r} is a folder")
    if not os.path.isdir(parent):
        raise ValueError(f"--out: folder {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out: folder {parent!r} is not writable")


class MouthReader:
    """The expression meter's mouth_open of uint8 frames [N, S, S, 3] -> [N] (jitted)."""

    def __init__(self, meter_path: str):
        import jax

        from data_pipeline.transforms import to_signed_float
        from vasa_jax.evaluate.face_latent import load_meter

        meter = load_meter(meter_path)
        self._params = meter.params
        self._fn = jax.jit(lambda p, x: meter.apply(p, to_signed_float(x))["mouth_open"])

    def __call__(self, frames):
        import numpy as np

        return np.asarray(self._fn(self._params, frames))


def lip_sync_r(mouth, audio) -> tuple[float, int]:
    """Mouth readings [T] against the speech's frame RMS envelope: (Pearson r at the best
    lag within +-3 frames, that lag)."""
    from data_pipeline.synthtalk.sync import correlation_from_envelopes, frame_rms

    return correlation_from_envelopes([mouth], [frame_rms(audio, len(mouth))])


def lip_sync(frames, audio, meter_path: str) -> tuple[float, int]:
    """`lip_sync_r` of the meter's reading of frames [T, S, S, 3]."""
    import numpy as np

    reader = MouthReader(meter_path)
    return lip_sync_r(np.concatenate([reader(frames[i:i + 64]) for i in range(0, len(frames), 64)]),
                      audio)


def load_inputs(args: argparse.Namespace):
    """(portrait image uint8 [H, W, 3] as read, mono float32 speech [N] at 16 kHz)."""
    from vasa_jax import audio as audio_lib
    from vasa_jax import inference

    image = inference.read_portrait(args.image)
    waveform = audio_lib.load_audio(args.audio, inference.SAMPLE_RATE,
                                    allow_silence=args.allow_silence)
    return image, waveform


def load_pipeline(args: argparse.Namespace):
    """The model of --model / --face_workdir + --motion_workdir (default: the demo model)."""
    from vasa_jax import inference

    return inference.Pipeline.open(args.model, args.face_workdir, args.motion_workdir,
                                   dtype=args.dtype)


def render(pipe, args: argparse.Namespace, image, waveform, reader=None, *,
           progress: bool = True) -> dict:
    """One video: the portrait `image` [H, W, 3] (cropped here per --align) speaking
    `waveform` [N] -> args.out, with args' controls and --mode.

    Returns {"frames", "seconds", "first_frame_s", "portrait" (how it was cropped), and with
    a MouthReader "lip_sync_r", "lag"}. Frames go to the encoder as they come (memory bounded
    for any length).
    """
    import numpy as np

    from vasa_jax import inference, video

    try:  # the face found, levelled and cropped as the training faces are (--align)
        image, note = inference.crop_portrait(image, pipe.image_size, args.align,
                                              name=args.image)
    except ValueError as e:
        from data_pipeline.face_analysis import NoFaceError

        if isinstance(e, NoFaceError):
            raise NoFaceError(f"{e} (--align none uses the image as it is)") from None
        raise
    driving = pipe.encode_pose(video.read_video(args.pose_video)[0]) if args.pose_video else None
    job = controls(args)
    mouths, first = [], None
    t0 = time.perf_counter()
    if args.mode == "offline":
        blocks = (w.frames for w in pipe.windows(image, waveform, job, driving_pose=driving))
    else:  # 40 ms chunks, as if the audio arrived live (as fast as frames are taken)
        chunk = inference.SAMPLE_RATE // 25
        chunks = (waveform[i:i + chunk] for i in range(0, len(waveform), chunk))
        blocks = (f.image[None] for f in pipe.stream(image, chunks, job, driving_pose=driving))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=pipe.num_frames(len(waveform)), unit="frame", desc=args.mode)

    def frames():
        nonlocal first
        for block in blocks:
            if first is None:
                first = time.perf_counter() - t0
            if reader is not None:
                mouths.append(reader(block))
            if bar is not None:
                bar.update(len(block))
            yield from block

    try:
        count = video.write_video(args.out, frames(), pipe.fps, waveform, inference.SAMPLE_RATE)
    finally:
        if bar is not None:
            bar.close()
    result = {"frames": count, "seconds": time.perf_counter() - t0, "first_frame_s": first,
              "portrait": note}
    if reader is not None:
        result["lip_sync_r"], result["lag"] = lip_sync_r(np.concatenate(mouths), waveform)
    return result


def _meter(args: argparse.Namespace):
    """A MouthReader of --expression_meter (default: the demo model's, with the demo model)."""
    meter = args.expression_meter
    if (meter is None and not (args.model or args.face_workdir or args.motion_workdir)
            and os.path.isdir(DEMO_METER)):
        meter = DEMO_METER
    return MouthReader(meter) if meter else None


def _error(e: BaseException) -> int:
    """Bad input: one line on stderr, exit status 2."""
    print(f"sample.py: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from vasa_jax import audio as audio_lib

    if args.batch or args.out_dir:
        return run_batch(args, argv)
    try:
        _check_output(args.out)
        controls(args)
        image, waveform = load_inputs(args)
        reader = _meter(args)  # before the (slow) model load
        t0 = time.perf_counter()
        pipe = load_pipeline(args)
        print(f"model loaded in {time.perf_counter() - t0:.1f} s; {len(waveform) / 16000:.2f} s "
              f"of audio -> {pipe.num_frames(len(waveform))} frames at {pipe.fps:g} fps, "
              f"{pipe.image_size} px", file=sys.stderr)
        result = render(pipe, args, image, waveform, reader, progress=not args.no_progress)
    except (OSError, ValueError, audio_lib.AudioError) as e:
        return _error(e)
    count, elapsed = result["frames"], result["seconds"]
    print(f"portrait (--align {args.align}): {result['portrait']}", file=sys.stderr)
    print(f"{args.mode}: {count} frames in {elapsed:.1f} s ({count / elapsed:.1f} fps with "
          f"compilation and encoding); first frame after {result['first_frame_s']:.2f} s",
          file=sys.stderr)
    print(f"wrote {args.out} ({count} frames, {count / pipe.fps:.2f} s)")
    if reader is not None:
        print(f"lip sync (expression meter's mouth vs speech envelope): r = "
              f"{result['lip_sync_r']:.3f} at lag {result['lag']} frames")
    return 0


REPORT_COLUMNS = ("line", "image", "audio", "out", "status", "frames", "seconds",
                  "lip_sync_r", "message")


def _write_report(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, REPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)  # complete after every job: an interrupted batch keeps its record


def run_batch(args: argparse.Namespace, argv: list[str]) -> int:
    """--batch: every job of the CSV with one model (one load, one compilation).

    Exit status: 2 for a bad batch file, model or output folder (before any work), 1 when
    some job failed (the others are written), 0 otherwise.
    """
    from vasa_jax import audio as audio_lib

    failures = (OSError, ValueError, RuntimeError, audio_lib.AudioError)
    try:
        if not (args.batch and args.out_dir):
            raise ValueError("--batch and --out_dir go together")
        cli.check_output(args.out_dir, "--out_dir")
        jobs = read_jobs(args.batch, argv)
        absent = [f"line {line} {name} {getattr(job, name)!r}" for line, job in jobs
                  for name in _PATH_COLUMNS if getattr(job, name)
                  and not os.path.exists(getattr(job, name))]
        if absent:  # reported now; those jobs fail at their turn, the rest are made
            print(f"sample.py: warning: {len(absent)} missing file(s): " + "; ".join(absent[:5])
                  + (" ..." if len(absent) > 5 else ""), file=sys.stderr)
        reader = _meter(args)
        t0 = time.perf_counter()
        pipe = load_pipeline(args)
        os.makedirs(args.out_dir, exist_ok=True)  # once the model loaded: nothing half-made
    except failures as e:
        return _error(e)
    todo = sum(args.overwrite or not os.path.exists(job.out) for _, job in jobs)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s; {len(jobs)} jobs, {todo} to "
          f"render, {len(jobs) - todo} done before -> {args.out_dir}", file=sys.stderr)
    report_path = os.path.join(args.out_dir, "batch_report.csv")
    rows, bar = [], None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="video", desc="batch")
    t0 = time.perf_counter()
    for line, job in jobs:
        row = {"line": line, "image": job.image, "audio": job.audio, "out": job.out}
        if os.path.exists(job.out) and not args.overwrite:
            row.update(status="skipped", message="exists (--overwrite redoes it)")
        else:
            try:
                image, waveform = load_inputs(job)
                result = render(pipe, job, image, waveform, reader, progress=False)
            except failures as e:
                message = " ".join(str(e).split()) or type(e).__name__
                print(f"sample.py: line {line}: error: {message}", file=sys.stderr)
                row.update(status="failed", message=message)
            else:
                row.update(status="ok", frames=result["frames"],
                           seconds=round(result["seconds"], 2), message=result["portrait"])
                if "lip_sync_r" in result:
                    row["lip_sync_r"] = round(result["lip_sync_r"], 4)
        rows.append(row)
        _write_report(report_path, rows)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    print(f"batch: {counts['ok']} written, {counts['skipped']} skipped (existed), "
          f"{counts['failed']} failed in {time.perf_counter() - t0:.1f} s; report: {report_path}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
