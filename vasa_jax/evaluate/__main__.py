"""python -m vasa_jax.evaluate NAME [flags]: runs the evaluator registered as NAME.

Exit status: the evaluator's (0 on success); 1 with a one-line `error: ...` on stderr for a
bad input (missing workdir, checkpoint, dataset split, too few clips); 2 for bad flags.
"""

from __future__ import annotations

import sys
from typing import Sequence

from vasa_jax import cli
from vasa_jax.evaluate import EVALUATORS, get_evaluator


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = ", ".join(sorted(EVALUATORS))
    if not argv or argv[0].startswith("-"):
        parser = cli.ArgumentParser(
            prog="python -m vasa_jax.evaluate",
            description=f"Runs an evaluator by name. Evaluators: {names}. "
                        "`python -m vasa_jax.evaluate NAME --help` shows its flags.")
        parser.add_argument("name", help="evaluator")
        parser.parse_args(argv)  # prints help / the usage error and exits
        return 2
    name, rest = argv[0], argv[1:]
    try:
        module = get_evaluator(name)
    except KeyError:
        print(f"error: unknown evaluator {name!r}; known: {names}", file=sys.stderr)
        return 2
    parser = cli.ArgumentParser(prog=f"python -m vasa_jax.evaluate {name}",
                                description=module.DESCRIPTION)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return cli.run_guarded(lambda: module.run(args))


if __name__ == "__main__":
    sys.exit(main())
