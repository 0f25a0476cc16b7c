"""Face-ID embedder: a short CosFace run of its stage in the shared loop separates held-out
identities; the export in the workdir loads and matches the checkpoint; save/load round
trip."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from configs.common import ConfigError
from data_pipeline import loaders
from tests import testdata
from vasa_jax import checkpointing
from vasa_jax.losses import cross_identity_loss
from vasa_jax.models import face_id
from vasa_jax.parallel import sharding
from vasa_jax.parallel.mesh import create_mesh
from vasa_jax.trainers import face_id as trainer
from vasa_jax.trainers import loop

IDENTITIES = 4
IMAGE_SIZE = 32
STEPS = 60
RECIPE = dict(model__image_size=IMAGE_SIZE, model__crop=0.8, model__channels=(16, 32),
              model__embed_dim=32, data__batch_size=8, optim__lr=3e-3,
              optim__warmup_steps=31, data__num_workers=0, train__log_every=50,
              train__total_steps=STEPS)


def load_config(data: str, **overrides):
    return configs.load("configs/face_id.py:size=tiny",
                        **{**RECIPE, "data__path": data, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A face-ID model trained through its stage on a tiny procedural dataset."""
    root = tmp_path_factory.mktemp("faceid")
    data, out = str(root / "data"), str(root / "model")
    testdata.make_dataset(data, identities=IDENTITIES, clips_per_identity=2, seconds=1.0,
                          size=IMAGE_SIZE, test_clips_per_identity=1)
    result = trainer.train_and_evaluate(load_config(data), out)
    assert result.step == STEPS
    return data, out, result


def test_short_training_separates_held_out_identities(trained):
    _, out, _ = trained
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
    assert [h["step"] for h in meta["history"]] == [50, 60]
    assert 0.0 <= meta["history"][-1]["train_accuracy"] <= 1.0
    # data.image_size 0 became the side the 0.8 crop needs (at most the stored 32 px), and
    # the run's config (checkpoint and export) records it.
    assert meta["train"]["load_size"] == IMAGE_SIZE == meta["train"]["config"]["data"][
        "image_size"]
    with checkpointing.Checkpointer(os.path.join(out, loop.CHECKPOINT_DIR)) as ckpt:
        assert ckpt.restore_config()["data"]["image_size"] == IMAGE_SIZE


def test_save_load_round_trip_and_frozen_embedder(trained):
    data, out, result = trained
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

    # The checkpoint's classifier is the exported one.
    ts = checkpointed_state(out, result.config, config.num_classes)
    for a, b in zip(jax.tree.leaves(nnx.state(ts.model)), jax.tree.leaves(nnx.state(model)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

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
        face_id.save_face_id(out, model, config)


def test_config_and_cli_errors(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        face_id.FaceIDConfig(num_classes=1)
    with pytest.raises(ValueError, match="too small"):
        face_id.FaceIDConfig(num_classes=4, image_size=8, channels=(8, 8, 8, 8))
    with pytest.raises(FileNotFoundError, match="face_id.json"):
        face_id.load_face_id(str(tmp_path))
    with pytest.raises(ConfigError, match="too small"):
        configs.load("configs/face_id.py:size=tiny", model__image_size=8,
                     model__channels=(8, 8, 8, 8))
    with pytest.raises(ConfigError, match="data.aug.flip"):
        configs.load("configs/face_id.py:size=tiny", data__aug__flip=1.5)


def test_an_export_made_elsewhere_is_not_a_workdir(trained, tmp_path):
    """A folder holding an export but no run is refused before anything trains."""
    data, out, _ = trained
    export = tmp_path / "export"
    export.mkdir()
    for name in (face_id.CONFIG_FILE, face_id.PARAMS_DIR):
        os.symlink(os.path.join(out, name), export / name)
    with pytest.raises(FileExistsError, match="no run"):
        trainer.train_and_evaluate(load_config(data), str(export))
    assert sorted(os.listdir(export)) == sorted([face_id.CONFIG_FILE, face_id.PARAMS_DIR])


def checkpointed_state(workdir: str, config, num_classes: int) -> trainer.TrainState:
    """The train state of the run's latest checkpoint, restored by hand."""
    mesh = create_mesh(config.mesh.axes)
    graphdef, abstract, _ = sharding.abstract_state(
        lambda: trainer.TrainState(config, num_classes), mesh, config.mesh.rules)
    with checkpointing.Checkpointer(os.path.join(workdir, loop.CHECKPOINT_DIR)) as ckpt:
        return nnx.merge(graphdef, ckpt.restore(abstract))
