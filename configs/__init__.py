"""Config files (`get_config(arg)` + `validate(config)` per stage) and a loader for code.

On the command line configs come through absl's config_flags (see train.py). From Python::

    config = configs.load("configs/face_latent.py:size=tiny", data__path="/tmp/d")
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os

import ml_collections

from configs.common import ConfigError

_HERE = os.path.dirname(os.path.abspath(__file__))


def _module_for(path: str):
    """The config module for a file path ("configs/face_latent.py") or a bare stage name."""
    name = os.path.splitext(os.path.basename(path))[0]
    if os.path.dirname(os.path.abspath(path)) == _HERE or not os.path.exists(path):
        if not os.path.exists(os.path.join(_HERE, name + ".py")):
            raise ConfigError(f"no config file {path!r} (looked in {_HERE})")
        return importlib.import_module(f"configs.{name}")
    spec = importlib.util.spec_from_file_location(f"_vasa_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Runs the stage's `validate` (configs/<config.stage>.py). Returns the config."""
    module = _module_for(config.stage)
    module.validate(config)
    return config


def load(spec: str, **overrides) -> ml_collections.ConfigDict:
    """'path.py[:arg]' -> locked, validated ConfigDict.

    Overrides use '__' for nesting: `data__path="/x"` sets config.data.path.
    Unknown fields raise (the config is locked), as on the command line.
    """
    path, _, arg = spec.partition(":")
    config = _module_for(path).get_config(arg or None)
    config.lock()
    for key, value in overrides.items():
        *parents, leaf = key.split("__")
        node = config
        for p in parents:
            node = node[p]
        try:
            setattr(node, leaf, value)
        except AttributeError as e:
            raise ConfigError(f"unknown config field {key.replace('__', '.')!r}") from e
    return validate(config)


def parse_overrides(items) -> dict:
    """["model.motion.input_size=128", ...] -> {"model__motion__input_size": 128} for
    configs.load. Values are Python literals, or strings when they do not parse as one."""
    overrides = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--set needs FIELD=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a plain string
        overrides[field.replace(".", "__")] = value
    return overrides
