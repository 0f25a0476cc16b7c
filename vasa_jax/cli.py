"""Shared plumbing of the command-line entry points: bad input is one line on stderr.

Every command answers bad input (a missing or wrong kind of path, a bad number, an
unwritable output) with ONE line, `error: ...` (`config error: ...` for a ConfigError), and a
non-zero exit status, never a traceback, and checks its outputs before it starts working, so
that it leaves nothing half-made. `run_guarded` is that rule for a command's body;
`check_output` checks an output path up front; `ArgumentParser` makes a usage error one line. Bugs (any other exception) keep their
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable

# What bad input raises: FileNotFoundError, NotADirectoryError, PermissionError (OSError);
# configs.ConfigError, schema.CorruptRecordError, argument checks (ValueError).
BAD_INPUT = (OSError, ValueError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a usage error as one line, `PROG: error: MESSAGE (see PROG --help)`,
    and exit status 2, instead of the whole usage text first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} "
                     f"(see {self.prog} --help)\n")


def int_list(text: str) -> tuple[int, ...]:
    """argparse type of a comma-separated list of positive integers ("32,64,128")."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}")
    return values


def error_line(error: BaseException | str) -> str:
    """`error: <message>` on one line (`config error: ` for a ConfigError)."""
    from configs.common import ConfigError

    message = " ".join(str(error).split()) or type(error).__name__
    return f"{'config error' if isinstance(error, ConfigError) else 'error'}: {message}"


def fail(error: BaseException | str, status: int = 1) -> int:
    """Prints `error_line(error)` to stderr; returns `status` (the exit status)."""
    print(error_line(error), file=sys.stderr, flush=True)
    return status


def _has_checkpoint(folder: str) -> bool:
    from vasa_jax.checkpointing import CHECKPOINT_DIR

    checkpoints = os.path.join(folder, CHECKPOINT_DIR)
    return os.path.isdir(checkpoints) and bool(os.listdir(checkpoints))


def run_guarded(body: Callable[[], int], *, status: int = 1, made: str | None = None) -> int:
    """Runs a command's `body` (-> its exit status); bad input (BAD_INPUT) is one line on
    stderr and `status`.

    made: the folder the command creates (a run's workdir). If the body fails on bad input,
    the folder did not exist before and it holds no checkpoint yet, it is removed: a failed
    start leaves nothing behind, and a rerun with the input fixed starts afresh.
    """
    existed = made is None or "://" in made or os.path.lexists(made)
    try:
        return body()
    except BAD_INPUT as e:
        if not existed and os.path.isdir(made) and not _has_checkpoint(made):
            shutil.rmtree(made, ignore_errors=True)
        return fail(e, status)


def check_output(path: str, what: str = "output folder", *, folder: bool = True) -> None:
    """Raises OSError / ValueError, before any work, if `path` cannot become the output:
    empty, a file where a folder is wanted (or a folder where a file is), or under a parent
    that is not a writable folder. Creates nothing. Remote paths (gs://...) are not checked.
    """
    if not path:
        raise ValueError(f"{what} is empty")
    if "://" in path:
        return
    if os.path.exists(path):
        if folder and not os.path.isdir(path):
            raise NotADirectoryError(f"{what} {path!r} is a file, not a folder")
        if not folder and os.path.isdir(path):
            raise IsADirectoryError(f"{what} {path!r} is a folder, not a file")
    parent = os.path.abspath(path if folder and os.path.isdir(path) else os.path.dirname(
        os.path.abspath(path)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"cannot create {what} {path!r}: {parent!r} is a file")
    try:  # os.access says yes to root on read-only file systems; a real write does not
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write {what} {path!r}: {parent!r} is not writable "
                              f"({e.strerror or e})") from None


def run_training(train: Callable[[], dict[str, Any]]) -> int:
    """Runs `train` (-> a summary with "metrics" and "train": {"seconds": ...}) for a CLI.

    Bad input is one line on stderr and exit status 1 (`run_guarded`); otherwise the
    metrics and the training time are printed as JSON and the status is 0.
    """
    def body() -> int:
        result = train()
        print(json.dumps({"metrics": result["metrics"],
                          "train_seconds": round(result["train"]["seconds"], 1)}, indent=2))
        return 0

    return run_guarded(body)


def run_main(main: Callable[[], int]) -> None:
    """`if __name__ == "__main__"` body: absl logging at INFO, exit with main()'s status."""
    from absl import flags, logging

    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags; argparse parses ours
    logging.set_verbosity(logging.INFO)
    sys.exit(main())


def convert_weights_main(argv, *, prog: str, name: str, description: str, weights_help: str,
                         flag: str, convert: Callable[[str, str], Any]) -> int:
    """`python -m PROG convert --weights FILE --out DIR` of a ported network (SyncNet, I3D):
    `convert(weights, out)` -> params; bad input is one line (run_guarded)."""
    import jax
    import numpy as np

    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help=f"{weights_help} (torch) -> our params format "
                          "(read without torch)")
    conv.add_argument("--weights", required=True, help=f"{weights_help} (a torch state dict)")
    conv.add_argument("--out", required=True, help=f"output folder (then {flag} OUT)")
    args = parser.parse_args(argv)

    def body() -> int:
        params = convert(args.weights, args.out)
        count = sum(int(np.size(x)) for x in jax.tree.leaves(params))
        print(f"wrote {name} ({count / 1e6:.1f} M values) to {args.out}")
        return 0

    return run_guarded(body)
