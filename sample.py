"""Generates a talking-face video from one portrait and a speech clip.

    python sample.py --face_workdir runs/face --motion_workdir runs/motion \
        --image portrait.png --audio speech.wav --out out.mp4

Not built yet: the streaming sampler needs both trained stages (issues #3 and #4). Until
then `bash scripts/demo.sh` builds a SynthTalk corpus and writes its preview video.
"""

import sys


def main() -> int:
    print(
        "sample.py: streaming video generation is not built yet. Motion from audio works: "
        "vasa_jax.motion_sampler.MotionGenerator (see README, Stage 2).",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
