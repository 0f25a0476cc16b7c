"""Shared plumbing of the helper-network training commands (`python -m vasa_jax.models.face_id
train`, `python -m vasa_jax.models.face_pose train`)."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable


def run_training(train: Callable[[], dict[str, Any]]) -> int:
    """Runs `train` (-> a summary with "metrics" and "train": {"seconds": ...}) for a CLI.

    Bad input (OSError, ValueError) is one line on stderr and exit status 1; otherwise the
    metrics and the training time are printed as JSON and the status is 0.
    """
    try:
        result = train()
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"metrics": result["metrics"],
                      "train_seconds": round(result["train"]["seconds"], 1)}, indent=2))
    return 0


def run_main(main: Callable[[], int]) -> None:
    """`if __name__ == "__main__"` body: absl logging at INFO, exit with main()'s status."""
    from absl import flags, logging

    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags; argparse parses ours
    logging.set_verbosity(logging.INFO)
    sys.exit(main())
