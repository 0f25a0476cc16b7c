"""Face-ID embedder: a short CosFace run separates held-out identities; save/load round trip."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline import loaders
from tests import testdata
from vasa_jax.losses import cross_identity_loss
from vasa_jax.models import face_id

IDENTITIES = 4
IMAGE_SIZE = 32
ARGS = ["--image_size", str(IMAGE_SIZE), "--crop", "0.8", "--channels", "16,32",
        "--embed_dim", "32", "--batch_size", "8", "--lr", "3e-3", "--num_workers", "0",
        "--log_every", "50"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A face-ID model trained through the CLI on a tiny procedural dataset."""
    root = tmp_path_factory.mktemp("faceid")
    data, out = str(root / "data"), str(root / "model")
    testdata.make_dataset(data, identities=IDENTITIES, clips_per_identity=2, seconds=1.0,
                          size=IMAGE_SIZE, test_clips_per_identity=1)
    assert face_id.main(["train", "--data", data, "--out", out, "--steps", "60", *ARGS]) == 0
    return data, out


def test_short_training_separates_held_out_identities(trained):
    _, out = trained
    with open(os.path.join(out, face_id.CONFIG_FILE)) as f:
        meta = json.load(f)
    m = meta["metrics"]
    chance = 1.0 / IDENTITIES
    assert m["chance"] == chance and m["num_eval_frames"] == IDENTITIES * 10
    # Held-out clips (other head motion, blinks, mouth shapes) of the training identities.
    assert m["head_accuracy"] >= 0.75 > chance, m
    assert m["centroid_accuracy"] >= 0.75, m
    assert m["same_identity_cos"] > m["other_identity_cos"] + 0.3, m
    assert meta["model"]["num_classes"] == IDENTITIES
    assert meta["history"][-1]["loss"] < meta["history"][0]["loss"]


def test_save_load_round_trip_and_frozen_embedder(trained):
    data, out = trained
    model, config, meta = face_id.load_face_id_classifier(out)
    assert config.channels == (16, 32) and config.embed_dim == 32
    # The loaded parameters are the trained ones: re-evaluating reproduces the saved metrics.
    test = loaders.read_frames(data, "test", IMAGE_SIZE)
    train = loaders.read_frames(data, "train", IMAGE_SIZE)
    again = face_id.evaluate(model, test.images, test.identity, train.images, train.identity)
    x, y = test.images, test.identity
    for k in ("head_accuracy", "centroid_accuracy"):
        assert again[k] == meta["metrics"][k]
    assert again["same_identity_cos"] == pytest.approx(meta["metrics"]["same_identity_cos"],
                                                       abs=1e-5)

    embed = face_id.load_face_id(out)
    e1 = np.asarray(embed(jnp.asarray(x[:6])))
    e2 = np.asarray(face_id.load_face_id(out)(jnp.asarray(x[:6])))
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_allclose(e1, np.asarray(model.net(jnp.asarray(x[:6]))), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(e1, axis=-1), 1.0, atol=1e-5)
    # Any input size: the centre crop is resized to the model's size.
    assert embed(jnp.zeros((2, 64, 48, 3))).shape == (2, config.embed_dim)

    # As l_cross-id's embedder: same face -> ~0, other identity -> clearly more; gradients
    # reach the generated image, never the embedder's parameters.
    # (Batches of 6 throughout: one compilation of the embedder.) x holds 10 frames per
    # identity in order, so x[2:8] are other frames of x[:6]'s identity, x[10:16] another's.
    assert (y[:8] == y[0]).all() and (y[10:16] != y[0]).all()
    a, b, c = (jnp.asarray(x[s]) for s in (slice(0, 6), slice(2, 8), slice(10, 16)))
    same = float(cross_identity_loss(embed, b, a))
    diff = float(cross_identity_loss(embed, c, a))
    assert same < 0.2 < diff, (same, diff)

    def loss(params, decoded):
        return cross_identity_loss(lambda im: embed.apply(params, im), decoded, a)

    g_params, g_img = jax.jit(jax.grad(loss, argnums=(0, 1)))(embed.params, b)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_params))
    assert np.isfinite(np.asarray(g_img)).all() and float(jnp.abs(g_img).max()) > 0

    with pytest.raises(FileExistsError):  # exports are never overwritten
        face_id.train(data, out, image_size=IMAGE_SIZE,
                      settings=face_id.TrainSettings(steps=1, num_workers=0))


def test_config_and_cli_errors(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        face_id.FaceIDConfig(num_classes=1)
    with pytest.raises(ValueError, match="too small"):
        face_id.FaceIDConfig(num_classes=4, image_size=8, channels=(8, 8, 8, 8))
    with pytest.raises(FileNotFoundError, match="face_id.json"):
        face_id.load_face_id(str(tmp_path))
    assert face_id.main(["train", "--data", str(tmp_path / "none"), "--out",
                         str(tmp_path / "o")]) == 1
