"""scripts/probe_ceiling.py: the supervised ceiling of the z_dyn probes."""

import importlib.util
import json
import os

import numpy as np
import pytest
import testdata
from flax import nnx

import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location(
        "probe_ceiling", os.path.join(ROOT, "scripts", "probe_ceiling.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 identities x (3 train + 1 test) clips of 1 s at 64 px; the test data's mouth is a
    rectangle whose height follows mouth_open, large enough to learn in tens of steps."""
    d = str(tmp_path_factory.mktemp("ceiling") / "data")
    testdata.make_dataset(d, identities=3, clips_per_identity=3, test_clips_per_identity=1,
                          seconds=1.0, size=64, mouth="random")
    return d


def test_supervised_encoder_learns_the_mouth_and_probes_report_it(data, tmp_path):
    out = str(tmp_path / "ceiling.json")
    script = _script()
    # With GroupNorm (tiny's default is none) the untrained encoder's features do not read
    # the mouth (probe R^2 < 0), so the gain from training is visible.
    code = script.main(["--data", data, "--steps", "60", "--eval_every", "30",
                        "--batch_size", "8", "--frames_per_clip", "8", "--out", out,
                        "--set", "model.groups=4"])
    assert code == 0
    with open(out) as f:
        records = json.load(f)["records"]
    assert [r["step"] for r in records] == [0, 30, 60]
    assert records[0]["loss"] is None and records[2]["loss"] < records[1]["loss"]
    first, last = records[0], records[-1]
    # Trained on the labels, z_dyn reads the (large) test-data mouth; untrained it does not.
    assert last["mouth_open_from_z_dyn"] > 0.5, records
    assert last["mouth_open_from_z_dyn"] > first["mouth_open_from_z_dyn"] + 0.3, records


def test_targets_scale_gaze_and_name_missing_labels(data):
    from vasa_jax.evaluate import face_latent as evaluator

    script = _script()
    clips, _ = evaluator.read_clips(data, "test", 64, max_clips=2, frames_per_clip=3,
                                    include_first=False, progress=False)
    y = script.targets(clips)
    assert y.shape == (6, 4)
    np.testing.assert_allclose(y[:3, 0], clips[0].labels["mouth_open"])
    np.testing.assert_allclose(y[:3, 2:], clips[0].labels["gaze"] / script.GAZE_SCALE,
                               rtol=1e-6)
    np.testing.assert_array_equal(script.targets(clips, ("gaze", "mouth_open")),
                                  y[:, [2, 3, 0]])
    with pytest.raises(ValueError, match="subset"):
        script.targets(clips, ("mouth",))
    del clips[0].labels["blink"]
    with pytest.raises(ValueError, match="blink"):
        script.targets(clips)



def test_set_overrides_parse_literals_and_strings_and_reject_typos(data, capsys):
    script = _script()
    assert configs.parse_overrides(["model.motion.input_size=128", "model.motion.pool=mean"]) == {
        "model__motion__input_size": 128, "model__motion__pool": "mean"}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        configs.parse_overrides(["model.motion.input_size"])
    with pytest.raises(SystemExit):
        script.main(["--data", data, "--set", "model.motion.input_sise=128"])
    assert "input_sise" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--data", data, "--targets", "mouth"])
    assert "--targets" in capsys.readouterr().err


def test_glimpses_sit_at_the_label_boxes(data, tmp_path):
    """With glimpse widths the encoder reads eye and mouth glimpses at the label boxes'
    centres: the test data's mouth, zoomed, is read before any training."""
    from data_pipeline import schema
    from vasa_jax.evaluate import face_latent as evaluator

    script = _script()
    boxed = str(tmp_path / "boxed")
    testdata.make_dataset(boxed, identities=3, clips_per_identity=3, test_clips_per_identity=1,
                          seconds=1.0, size=64, mouth="random",
                          labels=[*schema.LABELS, *schema.BOX_LABELS])
    config = configs.load("configs/face_latent.py:size=tiny",
                          model__motion__glimpse_widths=(0.6, 0.4))
    records = script.run(config, boxed, steps=20, batch_size=8, lr=1e-3, eval_every=20,
                         train_clips=9, frames_per_clip=8, test_clips=None,
                         target_names=("mouth_open",))
    assert [r["step"] for r in records] == [0, 20]
    assert records[-1]["mouth_open_from_z_dyn"] > 0.5, records
    clips, _ = evaluator.read_clips(data, "train", 64, max_clips=2, frames_per_clip=4,
                                    include_first=False, progress=False)
    model = script.Supervised(config.model, 1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mouth_box"):
        script.glimpse_centres(model, clips)
