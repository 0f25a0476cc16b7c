"""Writes a portrait and a speech clip for sample.py from a SynthTalk identity no model saw.

    python scripts/make_demo_inputs.py --out assets/demo [--seed 1000] [--seconds 6]

OUT/portrait.png: the first frame of one clip (face framing, --size px) of identity 0 of
corpus seed SEED (the recipes train on seed 0, so seeds != 0 are unseen identities);
OUT/speech.wav: that clip's espeak-ng speech (16 kHz mono); OUT/mouth_open.npy: its
ground-truth mouth opening per 25 fps frame (for checking lip sync, not used by sample.py).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args(argv)
    import cv2
    import numpy as np

    from data_pipeline import schema
    from data_pipeline.synthtalk.generate import SynthTalkConfig, make_clip
    from vasa_jax.video import write_wav

    if args.seed == 0:
        p.error("seed 0 is the recipes' training corpus: pick another")
    cfg = SynthTalkConfig(num_identities=1, clips_per_identity=1, seconds=args.seconds,
                          size=args.size, seed=args.seed, frame_format="png")
    clip = make_clip(cfg, 0, 0)
    os.makedirs(args.out, exist_ok=True)
    portrait = schema.decode_frame(clip.frames[0])
    cv2.imwrite(os.path.join(args.out, "portrait.png"), portrait[..., ::-1])
    write_wav(os.path.join(args.out, "speech.wav"), clip.audio, clip.sample_rate)
    np.save(os.path.join(args.out, "mouth_open.npy"), clip.labels["mouth_open"].astype(np.float32))
    print(f"wrote {args.out}: portrait.png ({args.size} px), speech.wav "
          f"({len(clip.audio) / clip.sample_rate:.2f} s), mouth_open.npy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
