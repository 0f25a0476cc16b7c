"""SyncNet trained here (configs/syncnet.py, vasa_jax.trainers.syncnet) on crops made by
`python -m data_pipeline.sync_crops`: training-mode batch norm and the statistics the export
stores, the loss, the window sampler, and the whole path on a small SynthTalk corpus: crops
as the scorer cuts them, a few steps through train.py, an export that `--syncnet` loads,
bad input as one line."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from data_pipeline import sync_crops
from vasa_jax.models import syncnet
from vasa_jax.trainers import syncnet as trainer

pytest.importorskip("ai_edge_litert")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_batch_norm_training_mode_normalises_with_the_batch():
    bn = syncnet.BatchNorm(3)
    x = jnp.asarray(np.random.default_rng(0).normal(5.0, 3.0, (4, 6, 6, 3)), jnp.float32)
    np.testing.assert_allclose(bn(x), x, atol=1e-3)  # stored mean 0, var 1: the identity
    bn.train()
    y = bn(x)
    np.testing.assert_allclose(np.asarray(y).mean((0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(y).std((0, 1, 2)), 1.0, atol=1e-3)


def test_population_statistics_are_those_of_each_layers_input():
    model = syncnet.SyncNet(embed_dim=8, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    batches = [(rng.uniform(0, 255, (2, 5, 224, 224, 3)).astype(np.float32),
                rng.normal(size=(3, 13, 20)).astype(np.float32)) for _ in range(2)]
    syncnet.population_statistics(model, batches)
    assert model.audio.conv1.bn.use_running_average  # back in inference mode
    # The audio stream's first batch norm sees conv1's output over both batches.
    conv = model.audio.conv1
    x = np.concatenate([b[1] for b in batches])[..., None]
    y = np.asarray(jax.lax.conv_general_dilated(
        x, conv.kernel[...], conv.stride, conv.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias[...])
    np.testing.assert_allclose(conv.bn.mean[...], y.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(conv.bn.var[...], y.var((0, 1, 2)), rtol=1e-3)
    # Deeper layers got statistics too (not the initial mean 0, var 1).
    assert float(jnp.abs(model.lip.conv6.bn.mean[...]).max()) > 1e-3
    with pytest.raises(ValueError, match="at least one batch"):
        syncnet.population_statistics(model, [])


def test_sync_loss_rewards_the_matching_audio():
    rng = np.random.default_rng(0)
    video = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
    audio = jnp.asarray(rng.normal(size=(4, 3, 16)), jnp.float32)
    matched = audio.at[:, 0].set(video + 0.01)  # own offset-0 audio next to the lips
    shifted = audio.at[:, 1].set(video + 0.01)  # a shifted window next to them instead
    good, m_good = trainer.sync_loss(video, matched, 1.0)
    bad, m_bad = trainer.sync_loss(video, shifted, 1.0)
    assert float(good) < float(bad)
    assert float(m_good["accuracy"]) == pytest.approx(1.0)
    assert float(m_bad["accuracy"]) == pytest.approx(0.0)
    assert float(m_good["dist/matched"]) < float(m_good["dist/shifted"])


def _fake_folder(root, windows=(30, 12)):
    """A sync_crops-like folder whose crops and MFCC windows carry their frame number."""
    folder = root / "train"
    folder.mkdir(parents=True)
    clips = []
    for k, n in enumerate(windows):
        crops = np.broadcast_to(np.arange(n + 4, dtype=np.uint8)[:, None, None, None],
                                (n + 4, 224, 224, 3))
        mfcc = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None] + 1000 * k,
                               (n, 13, 20))
        np.save(folder / f"{k:06d}.crops.npy", crops)
        np.save(folder / f"{k:06d}.mfcc.npy", mfcc)
        clips.append({"file": f"{k:06d}", "clip_id": f"c{k}", "identity_id": k, "windows": n})
    (folder / sync_crops.CLIPS_FILE).write_text(json.dumps(clips))
    (root / sync_crops.MANIFEST).write_text("{}")
    return clips


def test_windows_take_the_lips_at_t_and_audio_at_t_and_at_shifts_inside_the_clip(tmp_path):
    clips = _fake_folder(tmp_path)
    sample = trainer.SyncWindow(str(tmp_path), "train", clips, num_shifted=3, max_shift=5)
    rng = np.random.default_rng(0)
    for _ in range(50):
        k = int(rng.integers(2))
        ex = sample.random_map(k, rng)
        assert ex["lips"].shape == (5, 224, 224, 3) and ex["mfcc"].shape == (4, 13, 20)
        t = int(ex["mfcc"][0, 0, 0]) - 1000 * k
        np.testing.assert_array_equal(ex["lips"][:, 0, 0, 0], np.arange(t, t + 5))
        shifts = ex["mfcc"][1:, 0, 0] - 1000 * k - t
        assert np.all(shifts != 0) and np.all(np.abs(shifts) <= 5)
        assert np.all((t + shifts >= 0) & (t + shifts < clips[k]["windows"]))


def test_config_validation():
    with pytest.raises(configs.ConfigError, match="batch_size must be >= 2"):
        configs.load("configs/syncnet.py:size=tiny", data__batch_size=1)
    with pytest.raises(configs.ConfigError, match="max_shift"):
        configs.load("configs/syncnet.py:size=tiny", loss__max_shift=0)


@pytest.fixture(scope="module")
def crops_folder(tmp_path_factory):
    from data_pipeline.synthtalk.__main__ import main as synthtalk_main

    root = tmp_path_factory.mktemp("sync")
    data, out = str(root / "synthtalk"), str(root / "crops")
    assert synthtalk_main(["--out", data, "--num_identities", "2", "--clips_per_identity", "2",
                           "--test_clips_per_identity", "1", "--seconds", "2", "--size", "64",
                           "--no_progress"]) == 0
    assert sync_crops.main(["--data", data, "--out", out, "--no_progress"]) == 0
    return data, out


def test_crops_are_the_scorers_and_the_build_resumes(crops_folder, capsys):
    data, out = crops_folder
    with open(os.path.join(out, sync_crops.MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["splits"]["train"]["clips"] == 2 and manifest["splits"]["test"]["clips"] == 2
    clips = sync_crops.read_clips(out, "train")
    first = os.path.join(out, "train", clips[0]["file"] + ".crops.npy")
    crops = np.load(first)
    mfcc = np.load(os.path.join(out, "train", clips[0]["file"] + ".mfcc.npy"))
    n = clips[0]["windows"]
    assert crops.shape == (n + 4, 224, 224, 3) and crops.dtype == np.uint8
    assert mfcc.shape == (n, 13, 20) and n >= 40  # 2 s at 25 fps, minus 5
    # The face fills the middle of the crop (the grey (110) pad is what lies outside the
    # 64 px frame of these face-framed clips) and the mouth, mid-crop, moves with the speech.
    assert float(np.mean((crops[:, 24:176, 32:192] == 110).all(-1))) < 0.05
    assert float(crops[:, 100:160, 64:160].astype(np.float32).std(0).mean()) > 2.0
    before = os.path.getmtime(first)
    assert sync_crops.main(["--data", data, "--out", out, "--no_progress"]) == 0
    assert os.path.getmtime(first) == before  # kept, not redone
    assert "train: 2 clips" in capsys.readouterr().out


def test_training_through_train_py_exports_what_the_scorer_loads(crops_folder, tmp_path):
    _, out = crops_folder
    workdir = str(tmp_path / "run")
    # A process of its own on 2 devices: XLA:CPU holds ~1.5 GB a device for this step, too
    # much for the suite's 8.
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/syncnet.py:size=tiny", "--workdir",
         workdir, f"--config.data.path={out}", "--config.data.batch_size=4",
         "--config.loss.num_shifted=1", "--config.train.total_steps=3",
         "--config.optim.warmup_steps=1", "--config.export.bn_batches=2",
         "--config.final_eval.max_clips=2", "--config.model.embed_dim=32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, syncnet.CONFIG_FILE)) as f:
        meta = json.load(f)
    assert meta["train"]["steps"] == 3 and meta["embed_dim"] == 32
    assert meta["metrics"]["clips"] == 2
    for key in ("matched/Sc", "matched/SD", "other audio/Sc"):
        assert np.isfinite(meta["metrics"][key]), key
    scorer = syncnet.SyncNetScorer.load(workdir)
    model = nnx.merge(scorer.graphdef, scorer.state)
    assert model.lip.conv1.bn.use_running_average
    assert float(jnp.abs(model.lip.conv1.bn.mean[...]).max()) > 1e-3  # statistics stored
    clip = sync_crops.read_clips(out, "test")[0]
    crops = np.load(os.path.join(out, "test", clip["file"] + ".crops.npy"))
    mfcc = np.load(os.path.join(out, "test", clip["file"] + ".mfcc.npy"))
    lips, audio = scorer.window_features(crops, mfcc)
    assert lips.shape == audio.shape == (clip["windows"], 32)
    scores = syncnet.sync_scores(np.asarray(syncnet.offset_distances(lips, audio)))
    assert scores["Sc"] >= 0 and np.isfinite(scores["SD"])


def test_bad_input_is_one_line(crops_folder, tmp_path, capsys):
    import train

    data, out = crops_folder
    assert sync_crops.main(["--data", str(tmp_path / "none"), "--out",
                            str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert sync_crops.main(["--data", data, "--out", str(blocker), "--no_progress"]) == 1
    assert "is a file" in capsys.readouterr().err
    workdir = str(tmp_path / "run")
    config = configs.load("configs/syncnet.py:size=tiny", data__path=data)  # clips, not crops
    assert train.run(config, workdir) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "not a finished SyncNet crops folder" in err[-1] and "sync_crops" in err[-1]
    assert not os.path.exists(workdir)
