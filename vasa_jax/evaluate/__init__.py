"""Evaluators, looked up by name (big_vision style):

    python -m vasa_jax.evaluate NAME [flags]        e.g. NAME = face_latent
    python -m vasa_jax.evaluate --help              lists them

Each evaluator is a module of this package with:

    DESCRIPTION: str                                 one line for --help
    add_arguments(parser: argparse.ArgumentParser)   its flags
    run(args: argparse.Namespace) -> int             evaluates, prints, returns the exit code

Modules are imported only when asked for (each pulls in its models). A new evaluator is
one module plus one line in EVALUATORS.

During training (config.evals, every train.eval_every steps; vasa_jax.trainers.loop), an
evaluator that also has

    Settings (a dataclass with `step` and `progress` fields)
    evaluate(workdir, data, settings) -> dict    its results as JSON-like data

is run by `evaluate_during_training` on the checkpoint just saved, and its numbers
(`scalars`) are logged as eval/<name>/<path>.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from types import ModuleType
from typing import Any, Mapping

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


def training_settings(name: str, options: Mapping[str, Any], step: int) -> Any:
    """The Settings of evaluator `name` with `options` for checkpoint `step` (no progress
    bars). ValueError: the evaluator cannot run during training, or an unknown option."""
    module = get_evaluator(name)
    if not hasattr(module, "Settings") or not hasattr(module, "evaluate"):
        raise ValueError(f"evaluator {name!r} cannot run during training (no Settings / "
                         "evaluate)")
    fields = {f.name for f in dataclasses.fields(module.Settings)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} of evaluator {name!r}; it takes "
                         f"{sorted(fields - {'step', 'progress'})}")
    return module.Settings(**{**dict(options), "step": step, "progress": False})


def scalars(result: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested result dict, keyed by their path ("a/b/c")."""
    out: dict[str, float] = {}
    for key, value in result.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, path + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                out[path] = float(value)
    return out


def evaluate_during_training(name: str, workdir: str, data: str, options: Mapping[str, Any],
                             step: int) -> dict[str, float]:
    """Runs evaluator `name` (`options`: fields of its Settings) on checkpoint `step` of
    `workdir` with dataset `data`; returns `scalars` of its results."""
    settings = training_settings(name, options, step)
    return scalars(get_evaluator(name).evaluate(workdir, data, settings))


__all__ = ["EVALUATORS", "evaluate_during_training", "get_evaluator", "scalars",
           "training_settings"]
