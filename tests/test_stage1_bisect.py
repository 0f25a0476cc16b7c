"""benchmarks/stage1_bisect.py: stage 1's self-reconstruction against a plain autoencoder."""

import json

import numpy as np
import pytest
import testdata

from benchmarks import stage1_bisect


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """2 identities x (2 train + 1 test) clips of 1 s at 64 px (the tiny model's size)."""
    d = str(tmp_path_factory.mktemp("bisect") / "data")
    testdata.make_dataset(d, identities=2, clips_per_identity=2, test_clips_per_identity=1,
                          seconds=1.0, size=64, mouth="random")
    return d


def _run(data, tmp_path, *flags):
    out = str(tmp_path / "bisect.jsonl")
    args = ["--data", data, "--steps", "40", "--eval_every", "20", "--batch_size", "4",
            "--frames_per_clip", "8", "--lr", "3e-3", "--out", out, *flags]
    assert stage1_bisect.main(args) == 0
    with open(out) as f:
        return [json.loads(line) for line in f][-1]


def test_autoencoder_learns_to_reconstruct(data, tmp_path):
    run = _run(data, tmp_path, "--net", "ae", "--ae_width", "32")
    records = run["records"]
    assert [r["step"] for r in records] == [20, 40]
    assert records[1]["loss"] < records[0]["loss"]
    for r in records:
        assert all(np.isfinite(r[f"psnr/{k}"]) for k in ("frame", "eyes", "mouth"))
    assert records[1]["psnr/frame"] > 12.0, records  # well above a random tanh output


@pytest.mark.slow
def test_stage1_path_with_every_part_trains(data, tmp_path):
    run = _run(data, tmp_path, "--net", "stage1", "--parts", "blocks3d,warp_sc,g3d,warp_cd",
               "--config", "configs/face_latent.py:size=tiny", "--set", "model.volume.depth=4",
               "--set", "model.decoder.dyn_modulation=True", "--optim", "config",
               "--ema", "0.9")
    records = run["records"]
    assert records[1]["loss"] < records[0]["loss"]
    assert np.isfinite(records[1]["psnr/frame"])


def test_reenactment_baseline_trains_on_cross_pairs(data, tmp_path):
    run = _run(data, tmp_path, "--net", "ae_motion", "--ae_width", "32", "--pairs", "cross")
    records = run["records"]
    assert records[1]["loss"] < records[0]["loss"]
    assert records[1]["psnr/frame"] > 12.0, records
    # The floor: each held-out clip's first frame copied onto its other frames (not onto
    # itself, which would be exact).
    assert 5.0 < run["copy"]["frame"] < 60.0, run["copy"]


def test_bad_parts_are_a_clear_error(data, capsys):
    with pytest.raises(SystemExit):
        stage1_bisect.main(["--data", data, "--parts", "warp,g3d"])
    assert "unknown ['warp']" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the plain autoencoder sees no driving frame
        stage1_bisect.main(["--data", data, "--net", "ae", "--pairs", "cross"])
    assert "does not do --pairs cross" in capsys.readouterr().err
