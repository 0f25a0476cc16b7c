"""Configs: variants, validation, locked fields, and the train.py command line."""

import os
import subprocess
import sys

import pytest

import configs
from configs import common
from configs.common import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("face_latent", "motion_dit", "face_pose", "face_id", "expression_meter")


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("size", common.SIZES)
def test_every_variant_validates(stage, size):
    config = configs.load(f"configs/{stage}.py:size={size}")
    assert config.stage == stage and config.size == size


def test_tiny_is_smaller_than_full():
    tiny = configs.load("configs/face_latent.py:size=tiny")
    full = configs.load("configs/face_latent.py")
    assert full.size == "full"
    assert tiny.data.image_size == 64 and full.data.image_size == 512


@pytest.mark.parametrize(
    "arg, match",
    [("size=tiyn", "not one of"), ("szie=tiny", "unknown config argument"), ("tiny", "key=value")],
)
def test_bad_variant_is_an_error(arg, match):
    with pytest.raises(ConfigError, match=match):
        configs.load(f"configs/face_latent.py:{arg}")


def test_misspelt_override_is_an_error():
    with pytest.raises(ConfigError, match="data.pth"):
        configs.load("configs/face_latent.py:size=tiny", data__pth="/x")


def test_override_applies():
    config = configs.load("configs/motion_dit.py:size=tiny", data__window=25, data__context=5)
    assert (config.data.window, config.data.context) == (25, 5)


@pytest.mark.parametrize(
    "stage, overrides, match",
    [
        ("face_latent", dict(data__batch_size=0), "batch_size"),
        ("face_latent", dict(data__image_size=100), "image_size"),
        ("face_latent", dict(data__split="val"), "data.split"),
        ("face_latent", dict(model__motion__dyn_groups=-1), "dyn_groups"),
        ("motion_dit", dict(data__window=0), "window"),
        ("motion_dit", dict(data__motion_source="latents"), "motion_source"),
        ("motion_dit", dict(data__audio__frontend="hubert"), "frontend"),
        ("face_pose", dict(data__aug__rotate_deg=-1.0), "rotate_deg"),
        ("face_pose", dict(model__motion__pool="max"), "model.motion.pool"),
        ("face_id", dict(model__crop=0.0), "crop"),
        ("expression_meter", dict(loss__balance_batches=-1), "balance_batches"),
        ("expression_meter", dict(optim__warmup_steps=5000), "warmup_steps"),
    ],
)
def test_out_of_range_values_are_errors(stage, overrides, match):
    with pytest.raises(ConfigError, match=match):
        configs.load(f"configs/{stage}.py:size=tiny", **overrides)


def test_parse_arg_converts_types():
    arg = common.parse_arg("n=3,x=0.5,flag=true,name=b", n=1, x=1.0, flag=False, name="a")
    assert (arg.n, arg.x, arg.flag, arg.name) == (3, 0.5, True, "b")


def _train(*args):
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_train_cli_rejects_misspelt_field(tmp_path):
    result = _train(
        "--config", "configs/face_latent.py:size=tiny", "--workdir", str(tmp_path),
        "--config.data.pth=/x",
    )
    assert result.returncode != 0
    assert 'Did you mean "path"' in result.stderr


def test_train_cli_reports_invalid_value(tmp_path):
    result = _train(
        "--config", "configs/face_latent.py:size=tiny", "--workdir", str(tmp_path),
        "--config.data.batch_size=-1",
    )
    assert result.returncode != 0
    assert "config error: data.batch_size must be > 0" in result.stderr
