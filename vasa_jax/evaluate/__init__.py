"""Evaluators, looked up by name (big_vision style):

    python -m vasa_jax.evaluate NAME [flags]        e.g. NAME = face_latent
    python -m vasa_jax.evaluate --help              lists them

Each evaluator is a module of this package with:

    DESCRIPTION: str                                 one line for --help
    add_arguments(parser: argparse.ArgumentParser)   its flags
    run(args: argparse.Namespace) -> int             evaluates, prints, returns the exit code

Modules are imported only when asked for (each pulls in its models). A new evaluator is
one module plus one line in EVALUATORS.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> module (relative to this package).
EVALUATORS = {
    "face_latent": "vasa_jax.evaluate.face_latent",  # stage 1 (VASA-1 sec 3.1)
    "motion": "vasa_jax.evaluate.motion",  # stage 2 (VASA-1 sec 3.2)
    "capp": "vasa_jax.evaluate.capp",  # the contrastive audio-pose model (sec 4.2)
    "videos": "vasa_jax.evaluate.videos",  # sets of mp4s: Table 1 and more (sec 4.2)
}


def get_evaluator(name: str) -> ModuleType:
    """The evaluator module registered as `name`. KeyError lists the known names."""
    if name not in EVALUATORS:
        raise KeyError(f"unknown evaluator {name!r}; known: {sorted(EVALUATORS)}")
    return importlib.import_module(EVALUATORS[name])


__all__ = ["EVALUATORS", "get_evaluator"]
