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
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from vasa_jax import cli

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_MODEL = os.path.join(ROOT, "assets", "demo_model")
DEMO_IMAGE = os.path.join(ROOT, "assets", "demo", "portrait.png")
DEMO_AUDIO = os.path.join(ROOT, "assets", "demo", "speech.wav")
DEMO_METER = os.path.join(DEMO_MODEL, "expression_meter")


def _pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected THETA,PHI degrees, got {text!r}") from None
    return a, b


def _guidance(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected NAME=SCALE[,NAME=SCALE], got {text!r}") from None
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
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
    g = p.add_argument_group("controls")
    g.add_argument("--gaze", type=_pair, default=None, help="THETA,PHI degrees")
    g.add_argument("--distance", type=float, default=None, help="head distance")
    g.add_argument("--emotion", default=None, help="neutral, happy, sad, surprise, fear, "
                   "disgust, anger or contempt")
    g.add_argument("--guidance", type=_guidance, default=None,
                   help="CFG scales, e.g. audio=0.5,gaze=1.0 (default: the model's)")
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--head", choices=("generated", "still"), default="generated")
    g.add_argument("--head_amplitude", type=float, default=1.0,
                   help="scale of the generated head motion (0.5 about halves it)")
    g.add_argument("--lip_only", action="store_true",
                   help="keep the portrait's pose and eyes; only the mouth follows the audio")
    g.add_argument("--pose_video", default="", help="take the head pose from this video")
    p.add_argument("--allow_silence", action="store_true", help="accept silent audio")
    p.add_argument("--expression_meter", default=None,
                   help="report the lip sync of the output with this meter (default: the "
                   "demo model's, when the demo model is used)")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


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


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np

    from vasa_jax import audio as audio_lib
    from vasa_jax import inference, video

    try:
        _check_output(args.out)
        controls = inference.Controls(
            gaze=args.gaze, distance=args.distance, emotion=args.emotion,
            guidance=args.guidance, steps=args.steps, seed=args.seed, head=args.head,
            head_amplitude=args.head_amplitude, lip_only=args.lip_only)
        image = inference.read_portrait(args.image)
        waveform = audio_lib.load_audio(args.audio, inference.SAMPLE_RATE,
                                        allow_silence=args.allow_silence)
        meter = args.expression_meter
        if (meter is None and not (args.model or args.face_workdir or args.motion_workdir)
                and os.path.isdir(DEMO_METER)):
            meter = DEMO_METER
        reader = MouthReader(meter) if meter else None  # before the (slow) model load
        t0 = time.perf_counter()
        if args.face_workdir or args.motion_workdir:
            if not (args.face_workdir and args.motion_workdir):
                raise ValueError("--face_workdir and --motion_workdir go together")
            if args.dtype:
                raise ValueError("--dtype applies to a model export (--model); export the "
                                 "runs with `python -m vasa_jax.inference export`")
            pipe = inference.Pipeline.from_workdirs(args.face_workdir, args.motion_workdir)
        else:
            model = args.model or DEMO_MODEL
            pipe = inference.Pipeline.load(model, dtype=args.dtype)
        try:  # the face found, levelled and cropped as the training faces are (--align)
            image, note = inference.crop_portrait(image, pipe.image_size, args.align,
                                                  name=args.image)
        except ValueError as e:
            from data_pipeline.face_analysis import NoFaceError

            if isinstance(e, NoFaceError):
                raise NoFaceError(f"{e} (--align none uses the image as it is)") from None
            raise
        print(f"portrait (--align {args.align}): {note}", file=sys.stderr)
        driving = None
        if args.pose_video:
            driving = pipe.encode_pose(video.read_video(args.pose_video)[0])
        print(f"model loaded in {time.perf_counter() - t0:.1f} s; {len(waveform) / 16000:.2f} s "
              f"of audio -> {pipe.num_frames(len(waveform))} frames at {pipe.fps:g} fps, "
              f"{pipe.image_size} px", file=sys.stderr)
        total = pipe.num_frames(len(waveform))
        mouths, timing = [], {"first": None}
        t0 = time.perf_counter()
        if args.mode == "offline":
            blocks = (w.frames for w in pipe.windows(image, waveform, controls,
                                                     driving_pose=driving))
        else:  # 40 ms chunks, as if the audio arrived live (as fast as frames are taken)
            chunk = inference.SAMPLE_RATE // 25
            chunks = (waveform[i:i + chunk] for i in range(0, len(waveform), chunk))
            blocks = (f.image[None] for f in pipe.stream(image, chunks, controls,
                                                         driving_pose=driving))
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="frame", desc=args.mode)
        else:
            bar = None

        def frames():  # to the encoder as they come: memory bounded for any length
            for block in blocks:
                if timing["first"] is None:
                    timing["first"] = time.perf_counter() - t0
                if reader is not None:
                    mouths.append(reader(block))
                if bar is not None:
                    bar.update(len(block))
                yield from block

        count = video.write_video(args.out, frames(), pipe.fps, waveform, inference.SAMPLE_RATE)
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        first = timing["first"]
        print(f"{args.mode}: {count} frames in {elapsed:.1f} s ({count / elapsed:.1f} fps with "
              f"compilation and encoding); first frame after {first:.2f} s", file=sys.stderr)
        print(f"wrote {args.out} ({count} frames, {count / pipe.fps:.2f} s)")
        if reader is not None:
            r, lag = lip_sync_r(np.concatenate(mouths), waveform)
            print(f"lip sync (expression meter's mouth vs speech envelope): r = {r:.3f} at lag "
                  f"{lag} frames")
    except (OSError, ValueError, audio_lib.AudioError) as e:
        print(f"sample.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
