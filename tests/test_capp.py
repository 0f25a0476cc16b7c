"""CAPP (contrastive audio-pose model): the loss, learning audio-pose timing on synthetic
pairs, the config, training through the shared loop, restoring the EMA weights and the
frame-shift evaluator."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import configs
from configs.common import ConfigError
from tests import testdata
from vasa_jax.evaluate import capp as capp_eval
from vasa_jax.evaluate.__main__ import main as evaluate_main
from vasa_jax.models import capp


def small_model_config(window: int) -> ml_collections.ConfigDict:
    c = configs.load("configs/capp.py:size=tiny").model.to_dict()
    c.update(window=window, pose_layers=2, audio_layers=1, width=32, heads=2, embed_dim=16,
             dropout=0.0)
    c["audio_encoder"] = dict(kind="conv", hidden=16, layers=1, kernel_size=3)
    return ml_collections.ConfigDict(c)


def test_clip_loss_prefers_matching_pairs():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(8, 16))
    e = jnp.asarray(e / np.linalg.norm(e, axis=1, keepdims=True), jnp.float32)
    matched, m = capp.clip_loss(e, e, jnp.float32(20.0))
    rolled, r = capp.clip_loss(e, jnp.roll(e, 1, axis=0), jnp.float32(20.0))
    assert float(matched) < float(rolled)
    np.testing.assert_allclose(float(m["accuracy"]), 1.0)
    np.testing.assert_allclose(float(m["cos/positive"]), 1.0, atol=1e-5)
    assert float(r["accuracy"]) < 0.5
    np.testing.assert_allclose(np.asarray(capp.score(e, e)), 1.0, atol=1e-5)


def test_shifted_audio_is_a_hard_negative_for_its_own_pose():
    rng = np.random.default_rng(0)
    unit = lambda x: jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), jnp.float32)  # noqa: E731
    e = unit(rng.normal(size=(8, 16)))
    far = unit(rng.normal(size=(8, 2, 16)))  # shifted audio that looks unlike the pose
    near = unit(np.asarray(e)[:, None] + 0.05 * rng.normal(size=(8, 2, 16)))  # almost the same
    plain, _ = capp.clip_loss(e, e, jnp.float32(20.0))
    easy, m_easy = capp.clip_loss(e, e, jnp.float32(20.0), far)
    hard, m_hard = capp.clip_loss(e, e, jnp.float32(20.0), near)
    assert float(plain) <= float(easy) < float(hard)
    np.testing.assert_allclose(float(m_easy["shift/accuracy"]), 1.0)
    np.testing.assert_allclose(float(m_easy["accuracy"]), 1.0)
    assert float(m_hard["cos/shifted"]) > float(m_easy["cos/shifted"])
    # A shifted window beating the true one is a miss; in-batch retrieval is unaffected.
    better = unit(np.asarray(e)[:, None].repeat(2, 1))
    _, m_tie = capp.clip_loss(e, e * 0.9 + 0.1 * far[:, 0], jnp.float32(20.0), better)
    assert float(m_tie["shift/accuracy"]) < 0.5
    # The training windows: a centre and its offsets, s frames later each.
    x = jnp.arange(2 * 14, dtype=jnp.float32).reshape(2, 14, 1)
    centre, shifted = capp.shifted_windows(x, 10, (-2, 1))
    np.testing.assert_allclose(np.asarray(centre[0, :, 0]), np.arange(2, 12))
    np.testing.assert_allclose(np.asarray(shifted[1, 0, :, 0]), np.arange(14, 24))
    np.testing.assert_allclose(np.asarray(shifted[1, 1, :, 0]), np.arange(17, 27))
    assert capp.shifted_windows(x[:, :10], 10, ())[1] is None
    with pytest.raises(ValueError, match=r"10 \+ 2 \* 2 frames"):
        capp.shifted_windows(x[:, :12], 10, (2,))


def test_model_shapes_unit_embeddings_and_bad_input():
    model = capp.CAPP(small_model_config(20), 3, 5, rngs=nnx.Rngs(0))
    pe, ae = model(jnp.zeros((4, 20, 3)), jnp.ones((4, 20, 5)))
    assert pe.shape == ae.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(pe), axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match=r"pose must be \[B, 20, 3\]"):
        model.encode_pose(jnp.zeros((4, 19, 3)))
    feats = capp.pose_features(jnp.arange(6, dtype=jnp.float32).reshape(1, 3, 2))
    np.testing.assert_allclose(np.asarray(feats[0, :, :2]), [[-2, -2], [0, 0], [2, 2]])
    np.testing.assert_allclose(np.asarray(feats[0, :, 2:]), [[0, 0], [2, 2], [2, 2]])
    # A constant head offset does not change the embedding: CAPP reads motion.
    pose = jax.random.normal(jax.random.key(0), (2, 20, 3))
    np.testing.assert_allclose(np.asarray(model.encode_pose(pose)),
                               np.asarray(model.encode_pose(pose + 7.0)), atol=1e-5)


def _synthetic_pairs(rng, batch, window, lag=0):
    """Audio whose loudness drives the head's pitch one frame later (like SynthTalk's
    prosody): pose [B, W, 3] and audio features [B, W, 4] (loudness + noise)."""
    n = window + 8
    loud = np.clip(rng.normal(size=(batch, n)), 0, None)
    loud = np.stack([np.convolve(x, np.ones(2) / 2, mode="same") for x in loud])
    pose = np.zeros((batch, n, 3))
    pose[:, 1:, 1] = loud[:, :-1] * 3.0
    pose += 0.1 * rng.normal(size=pose.shape)
    audio = np.concatenate([loud[..., None], 0.1 * rng.normal(size=(batch, n, 3))], -1)
    a = 4
    return (pose[:, a + lag:a + lag + window].astype(np.float32),
            audio[:, a:a + window].astype(np.float32))


def test_capp_learns_timing_on_synthetic_pairs():
    window = 24
    model = capp.CAPP(small_model_config(window), 3, 4, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, pose, audio):
        def loss_fn(model):
            pe, ae = model(pose, audio)
            return capp.clip_loss(pe, ae, model.scale())[0]
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    losses = [float(step(model, opt, *_synthetic_pairs(rng, 32, window))) for _ in range(150)]
    assert np.mean(losses[-10:]) < 0.85 * np.log(32)  # chance is log(32)
    curve = {}
    for lag in (0, 1, 3):
        pe, ae = model(*_synthetic_pairs(np.random.default_rng(1), 64, window, lag))
        curve[lag] = float(jnp.mean(capp.score(pe, ae)))
    assert curve[0] > curve[1] > curve[3], curve


def test_config_validation():
    c = configs.load("configs/capp.py:size=tiny")
    assert c.model.window == 75 and c.model.pose_layers == 6
    assert c.data.window == 75 + 2 * max(abs(s) for s in c.loss.shift_negatives)
    with pytest.raises(ConfigError, match="data.window 75 must be model.window 75"):
        configs.load("configs/capp.py:size=tiny", data__window=75)
    assert configs.load("configs/capp.py:size=tiny", data__window=75,
                        loss__shift_negatives=()).data.window == 75
    with pytest.raises(ConfigError, match="non-zero"):
        configs.load("configs/capp.py:size=tiny", loss__shift_negatives=(0, 2))
    with pytest.raises(ConfigError, match="pose_dims"):
        configs.load("configs/capp.py:size=tiny", model__pose_dims=("yaw", "nod"))
    with pytest.raises(ConfigError, match="context must be 0"):
        configs.load("configs/capp.py:size=tiny", data__context=5)
    with pytest.raises(ValueError, match="not in the data's motion"):
        capp.pose_columns(("tx",), 16)  # latents carry only the angles


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from vasa_jax.trainers import capp as trainer
    from vasa_jax.trainers import loop

    root = tmp_path_factory.mktemp("capp")
    data = str(root / "data")
    testdata.make_dataset(data, identities=2, clips_per_identity=2, test_clips_per_identity=1,
                          seconds=3.4, size=16)
    workdir = str(root / "run")
    c = configs.load("configs/capp.py:size=tiny", data__path=data, data__batch_size=8,
                     data__audio__n_mels=16, train__total_steps=4, train__log_every=2,
                     train__checkpoint_every=2, optim__warmup_steps=1,
                     loss__shift_negatives=(-2, 2), data__window=79)
    with c.unlocked():
        c.model = small_model_config(75)
    result = trainer.train_and_evaluate(c, workdir, compiler_options=loop.FAST_CPU_COMPILE)
    return data, workdir, result


def test_training_through_the_loop_and_restoring_ema_weights(trained_run):
    data, workdir, result = trained_run
    assert result.step == 4
    logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rows = [r for r in logged if "loss/total" in r]
    assert rows and all(np.isfinite(r["loss/total"]) for r in rows)
    assert all(0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["shift/accuracy"] <= 1.0
               for r in rows)
    scorer = capp_eval.CappScorer.load(workdir)
    assert scorer.step == 4 and scorer.columns == (0, 1, 2) and scorer.window == 75
    rng = np.random.default_rng(0)
    pose, audio = rng.normal(size=(100, 3)), rng.normal(size=(100, scorer.norm.audio_dim))
    s = scorer.score(pose, audio, stride=10)
    assert -1.0 <= s <= 1.0
    with pytest.raises(ValueError, match="no 75-frame window"):
        scorer.score(pose[:50], audio[:50])


def test_evaluator_prints_the_shift_curve_and_writes_a_report(trained_run, tmp_path, capsys):
    data, workdir, _ = trained_run
    out = str(tmp_path / "report")
    assert evaluate_main(["capp", "--workdir", workdir, "--data", data, "--max_shift", "2",
                          "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "| shift (frames) | -2 | -1 | +0 | +1 | +2 |" in printed
    report = json.load(open(os.path.join(out, "capp.json")))
    assert sorted(report["shift"], key=int) == ["-2", "-1", "0", "1", "2"]
    assert all(-1.0 <= v <= 1.0 for v in report["shift"].values())
    assert -1.0 <= report["shuffled"] <= 1.0 and report["windows"] >= 2
    assert os.path.getsize(os.path.join(out, "capp_shift.png")) > 1000


def test_evaluator_bad_input(trained_run, tmp_path, capsys):
    data, workdir, _ = trained_run
    assert evaluate_main(["capp", "--workdir", str(tmp_path / "none"), "--data", data]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert evaluate_main(["capp", "--workdir", workdir, "--data", data,
                          "--max_shift", "-1"]) == 1
    assert "--max_shift" in capsys.readouterr().err
