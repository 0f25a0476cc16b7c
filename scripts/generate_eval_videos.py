"""Writes matching real and generated mp4s for the video evaluation harness.

    python scripts/generate_eval_videos.py --model DIR --data SYNTHTALK --out OUT [--clips 8]
    python -m vasa_jax.evaluate videos --generated OUT/generated --real OUT/real --out report/

For held-out clips of a SynthTalk corpus: OUT/real/<clip>.mp4 is the clip itself (its frames
and speech), OUT/generated/<clip>.mp4 what the model export (`sample.py --model`, e.g.
assets/demo_model) makes of the clip's first frame and the same speech with default
controls, at the model's resolution. Same names pair the two sets (expression fidelity).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model export (vasa_jax.inference)")
    p.add_argument("--data", required=True, help="a SynthTalk corpus with a test split")
    p.add_argument("--out", required=True)
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import numpy as np

    from data_pipeline import schema
    from data_pipeline.loaders import load_clip_index
    from data_pipeline.transforms import resize_square
    from vasa_jax.inference import Controls, Pipeline
    from vasa_jax.video import write_video

    pipe = Pipeline.load(args.model)
    index = load_clip_index(args.data, "test")
    source = schema.read_records(index.paths)
    ids = np.unique(np.linspace(0, len(index) - 1, args.clips).round().astype(int))
    for sub in ("real", "generated"):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    for i in ids:
        clip = schema.decode_clip(source[int(i)])
        frames = np.stack([resize_square(f, pipe.image_size) for f in clip.decode_frames()])
        name = f"{clip.clip_id}.mp4".replace("/", "_")
        write_video(os.path.join(args.out, "real", name), frames, pipe.fps, clip.audio,
                    schema.SAMPLE_RATE)
        video = pipe.generate(frames[0], clip.audio, Controls(seed=args.seed))
        write_video(os.path.join(args.out, "generated", name), video.frames, video.fps,
                    clip.audio, schema.SAMPLE_RATE)
        print(f"{name}: {len(frames)} real frames, {len(video.frames)} generated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
