"""Expression meter: a short run reads the held-out mouth; save/load round trip; errors."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline import loaders
from tests import testdata
from vasa_jax.models import expression_meter as em

IMAGE_SIZE = 32
# testdata's mouth is a dark bar whose height follows mouth_open (2..8 px at 32 px): big
# enough to learn in a few dozen steps. Measured held-out mouth r of this recipe over seeds
# 0-9: 0.81..0.95 (0.95 for seed 0); at the default lr 2e-3 40 steps are not enough.
ARGS = ["--size", str(IMAGE_SIZE), "--channels", "16,32,32,32", "--hidden", "32",
        "--batch_size", "8", "--lr", "1e-2", "--warmup_steps", "10", "--num_workers", "0",
        "--log_every", "20"]
STEPS = 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A meter trained through the CLI on a tiny procedural dataset."""
    root = tmp_path_factory.mktemp("expression_meter")
    data, out = str(root / "data"), str(root / "meter")
    testdata.make_dataset(data, identities=3, clips_per_identity=2, seconds=1.0,
                          size=IMAGE_SIZE, test_clips_per_identity=1)
    assert em.main(["train", "--data", data, "--out", out, "--steps", str(STEPS), *ARGS]) == 0
    return data, out


def test_short_training_reads_the_held_out_mouth(trained):
    _, out = trained
    with open(os.path.join(out, em.CONFIG_FILE)) as f:
        meta = json.load(f)
    m = meta["metrics"]
    assert m["num_eval_frames"] == 3 * 10  # 3 test clips x 10 frames
    assert set(m["pearson_r"]) == set(m["mae"]) == set(em.OUTPUT_COLUMNS)
    assert all(r is None or -1.0 <= r <= 1.0 for r in m["pearson_r"].values())
    # Held-out clips (other mouth shapes, head motion) of the training identities.
    assert m["pearson_r"]["mouth_open"] > 0.6, m
    # (testdata draws no gaze: those targets are noise, so single-batch losses are noisy.)
    assert [h["step"] for h in meta["history"]] == [20, 40, 60]
    assert meta["model"]["image_size"] == IMAGE_SIZE and meta["train"]["steps"] == STEPS
    # Balanced loss: each column weighted by 1 / its variance in the first batches (mean 1).
    w = np.array([meta["train"]["column_weights"][k] for k in em.OUTPUT_COLUMNS])
    assert np.all(w > 0) and abs(w.mean() - 1.0) < 1e-4 and np.ptp(w) > 0.05, w


def test_save_load_round_trip_and_frozen_meter(trained):
    data, out = trained
    net, config, meta = em.load_expression_meter_net(out)
    assert config.channels == (16, 32, 32, 32) and config.hidden == 32
    test = loaders.read_frames(data, "test", IMAGE_SIZE)
    again = em.evaluate(net, config, test.images, test.labels)
    for k in em.OUTPUT_COLUMNS:
        want = meta["metrics"]["pearson_r"][k]
        if want is None:
            assert again["pearson_r"][k] is None
        else:
            assert again["pearson_r"][k] == pytest.approx(want, abs=1e-5)
        assert again["mae"][k] == pytest.approx(meta["metrics"]["mae"][k], rel=1e-4, abs=1e-6)

    meter = em.load_expression_meter(out)
    x = jnp.asarray(test.images[:6])
    r1 = meter(x)
    r2 = em.load_expression_meter(out)(x)
    assert set(r1) == {"mouth_open", "blink", "gaze"}
    assert r1["mouth_open"].shape == r1["blink"].shape == (6,) and r1["gaze"].shape == (6, 2)
    for k in r1:
        np.testing.assert_array_equal(np.asarray(r1[k]), np.asarray(r2[k]))
    # Readings are the net's scaled outputs in label units (gaze in degrees).
    raw = np.asarray(net(x))
    np.testing.assert_allclose(np.asarray(r1["mouth_open"]), raw[:, 0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(r1["gaze"]), raw[:, 2:] * config.gaze_scale,
                               atol=1e-4)
    # Any input size: resized to the meter's.
    assert meter(jnp.zeros((2, 64, 48, 3)))["gaze"].shape == (2, 2)

    with pytest.raises(FileExistsError):  # exports are never overwritten
        em.train(data, out, settings=em.TrainSettings(steps=1, num_workers=0))


def test_config_and_cli_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="multiple of 8"):
        em.ExpressionMeterConfig(image_size=36)
    with pytest.raises(ValueError, match="gaze_scale"):
        em.ExpressionMeterConfig(gaze_scale=0.0)
    missing = str(tmp_path / "no_meter")
    with pytest.raises(FileNotFoundError, match="no_meter"):
        em.load_expression_meter(missing)
    assert em.main(["train", "--data", str(tmp_path / "none"), "--out",
                    str(tmp_path / "o")]) == 1
    assert "none" in capsys.readouterr().err
    # A dataset without the expression labels.
    data = str(tmp_path / "pose_only")
    testdata.make_dataset(data, identities=2, clips_per_identity=1, seconds=0.2,
                          size=IMAGE_SIZE, labels=["pose"])
    assert em.main(["train", "--data", data, "--out", str(tmp_path / "o")]) == 1
    assert "lacks labels" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs labels"):
        em.targets_from_labels({"mouth_open": np.zeros(3)}, 20.0)
