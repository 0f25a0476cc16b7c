"""Generates a talking-face video from one portrait and a speech clip.

    python sample.py --face_workdir runs/face --motion_workdir runs/motion \
        --image portrait.png --audio speech.wav --out out.mp4

Not built yet: the streaming sampler needs both trained stages (issues #3 and #4). Until
then `bash scripts/demo.sh` builds a SynthTalk corpus and writes its preview video.
"""

import sys


def main() -> int:
    print(
        "sample.py: generation is not built yet; it needs the stage-1 face latent model "
        "(issue #3) and the stage-2 motion generator (issue #4).",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
