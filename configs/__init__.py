"""Config files (`get_config(arg)` + `validate(config)` per stage) and a loader for code.

On the command line configs come through absl's config_flags (see train.py). From Python::

    config = configs.load("configs/face_latent.py:size=tiny", data__path="/tmp/d")
"""

from __future__ import annotations

import ast
import difflib
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
    if "evals" in config:
        from configs.common import validate_evals

        validate_evals(config.evals, int(config.train.eval_every))
    return config


def get_config(spec: str) -> ml_collections.ConfigDict:
    """'path.py[:arg]' -> the config file's `get_config(arg)`, not validated. A missing file
    or a bad variant argument is a ConfigError."""
    path, _, arg = spec.partition(":")
    return _module_for(path).get_config(arg or None)


def unknown_field(config: ml_collections.ConfigDict, field: str) -> str | None:
    """None if the dotted `field` ("optim.lr") names a field of `config`; else a one-line
    message naming it and the closest valid names."""
    parts = field.split(".")
    node = config
    for depth, part in enumerate(parts):
        if isinstance(node, ml_collections.ConfigDict) and part in node:
            node = node[part]
            continue
        section = ".".join(parts[:depth])
        prefix = section + "." if section else ""
        names = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if not names:
            return f"unknown config field {field!r}: {section!r} is a value, not a section"
        close = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
        if close:
            return (f'unknown config field {field!r}. Did you mean "{close[0]}"? Closest valid '
                    f"names: {', '.join(prefix + c for c in close)}")
        return (f"unknown config field {field!r}; {section or 'the config'} has "
                f"{', '.join(prefix + n for n in names)}")
    return None


def load(spec: str, **overrides) -> ml_collections.ConfigDict:
    """'path.py[:arg]' -> locked, validated ConfigDict.

    Overrides use '__' for nesting: `data__path="/x"` sets config.data.path.
    Unknown fields raise (the config is locked), as on the command line.
    """
    config = get_config(spec)
    config.lock()
    for key, value in overrides.items():
        field = key.replace("__", ".")
        message = unknown_field(config, field)
        if message:
            raise ConfigError(message)
        *parents, leaf = key.split("__")
        node = config
        for p in parents:
            node = node[p]
        setattr(node, leaf, value)
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
