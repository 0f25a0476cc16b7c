"""CLI: python -m data_pipeline.synthtalk --out DIR --num_identities N ... (see --help)."""

from __future__ import annotations

import argparse
import sys
import time

from data_pipeline.synthtalk import generate, render, speech


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.synthtalk",
        description="Generate a SynthTalk clip-record dataset (synthetic talking faces "
        "with per-frame ground truth).",
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--num_identities", type=int, required=True)
    p.add_argument("--clips_per_identity", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True, help="length of every clip")
    p.add_argument("--size", type=int, default=64, choices=generate.SIZES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"worker processes (default min(2, cpu_count) = {generate.default_workers()})",
    )
    p.add_argument("--preview", action="store_true", help="also write DIR/preview.mp4")
    p.add_argument(
        "--test_clips_per_identity",
        type=int,
        default=0,
        help="the last J clips of every identity go to the test split",
    )
    p.add_argument("--frame_format", default="jpeg", choices=("jpeg", "png"))
    p.add_argument("--num_shards", type=int, default=1, help="shards per split")
    p.add_argument(
        "--tts",
        default="auto",
        choices=speech.ENGINES,
        help="speech engine: espeak-ng if installed (auto), or the formant synth",
    )
    p.add_argument(
        "--supersample",
        type=int,
        default=0,
        help="anti-aliasing factor; 0 = 2 for sizes <= 128, else 1",
    )
    p.add_argument(
        "--framing",
        default=render.DEFAULT_FRAMING,
        choices=tuple(render.FRAMINGS),
        help="face: the face fills ~70%% of the height, centred, like aligned talking-head "
        "crops (data_pipeline/schema.py); portrait: head and shoulders (the original "
        f"framing). Default {render.DEFAULT_FRAMING}",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset already in --out (else that is an error)",
    )
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = generate.SynthTalkConfig(
            num_identities=args.num_identities,
            clips_per_identity=args.clips_per_identity,
            seconds=args.seconds,
            size=args.size,
            seed=args.seed,
            test_clips_per_identity=args.test_clips_per_identity,
            frame_format=args.frame_format,
            tts=args.tts,
            supersample=args.supersample,
            framing=args.framing,
        )
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        if args.num_shards < 1:
            raise ValueError(f"--num_shards must be >= 1, got {args.num_shards}")
        from vasa_jax.cli import check_output

        check_output(args.out, "--out folder")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        info = generate.generate_dataset(
            cfg,
            args.out,
            workers=args.workers,
            num_shards=args.num_shards,
            preview=args.preview,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {sum(info.clips.values())} clips {info.clips} of {info.num_identities} "
        f"identities to {args.out} in {time.perf_counter() - start:.1f}s "
        f"(tts={info.extra['tts']}, mouth-audio r={info.extra['mouth_audio_r']:.3f} "
        f"at lag {info.extra['mouth_audio_best_lag']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
