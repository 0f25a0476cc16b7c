"""Stage-1 training step: two real steps of the tiny face latent config on tiny data.

The step is the loop's own (`loop.make_step_fn`, jitted with the loop's shardings and
donation), data-parallel over 2 CPU devices with a global batch of 2: the smallest setting
that still reduces gradients across devices (8 devices x 8 examples run 4x longer on 2
cores). Every loss term is on (l_cross-id with a small random face-ID export) and the GAN
starts at step 1, so step 0 leaves the discriminator alone and step 1 updates it. XLA:CPU
compiles at -O0 (`loop.FAST_CPU_COMPILE`): the compile dominates. The shared loop itself
(resume, logs, images, checkpoints, 8 devices) is tested in test_trainer.py.
"""

import ast
import os
import shutil
import types

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import configs
from configs.common import ConfigError
from data_pipeline import schema
from data_pipeline.schema import DatasetInfo
from tests import testdata
from vasa_jax.models import face_id
from vasa_jax.parallel import create_mesh, sharding
from vasa_jax.trainers import face_latent, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("faces"))
    testdata.make_dataset(path, identities=3, clips_per_identity=1, seconds=1.0, size=32,
                          labels=list(schema.LABELS) + list(schema.BOX_LABELS))
    return path


@pytest.fixture(scope="module")
def face_id_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("face_id") / "export")
    cfg = face_id.FaceIDConfig(num_classes=3, image_size=32, channels=(8, 16), embed_dim=16,
                               groups=4)
    face_id.save_face_id(path, face_id.FaceIDClassifier(cfg, rngs=nnx.Rngs(0)), cfg)
    return path


def tiny_config(data_dir, **overrides):
    overrides = {"loss__perceptual_weight": 20.0, **overrides}  # tiny's default is 0
    return configs.load("configs/face_latent.py:size=tiny", data__path=data_dir,
                        loss__gan_start_step=1, **overrides)


def _host(state):
    return jax.tree.map(np.asarray, jax.device_get(state))


@pytest.fixture(scope="module")
def run(data_dir, face_id_dir):
    """Initial state, two steps: the states after each, their metrics."""
    # l1_region_weight: the driving frames' mouth / eye boxes weight the L1 in the step.
    config = tiny_config(data_dir, loss__face_id_path=face_id_dir, data__batch_size=2,
                         loss__l1_region_weight=4.0, loss__dyn_std_weight=0.5,
                         loss__dyn_pose_decorr_weight=0.5)
    # unsafe_rbg: initialisers compile several times faster on CPU than threefry.
    with jax.default_prng_impl("unsafe_rbg"), jax.threefry_partitionable(False):
        stage = face_latent.make_stage(config)
        mesh = create_mesh(config.mesh.axes, devices=jax.devices()[:2])
        rules = config.mesh.rules
        graphdef, _, shardings = sharding.abstract_state(stage.create_state, mesh, rules)
        state = loop.create_state(stage.create_state, shardings, mesh, rules,
                                  loop.FAST_CPU_COMPILE)
        replicated = NamedSharding(mesh, P())
        batch_sharding = sharding.data_sharding(mesh)
        frozen = jax.device_put(stage.frozen, replicated)
        it = iter(stage.make_dataset(0, 1))
        batches = [sharding.global_batch({k: b[k] for k in stage.batch_keys}, batch_sharding)
                   for b in (next(it), next(it))]
        step_fn = jax.jit(loop.make_step_fn(graphdef, stage, config.seed),
                          in_shardings=(shardings, batch_sharding, replicated, replicated),
                          out_shardings=(shardings, replicated), donate_argnums=0)
        with sharding.mesh_rules(mesh, rules):
            compiled = step_fn.lower(state, batches[0], np.int32(0), frozen).compile(
                loop.FAST_CPU_COMPILE)
        states, metrics = [_host(state)], []
        for i, batch in enumerate(batches):
            state, m = compiled(state, batch, np.int32(i), frozen)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
            states.append(_host(state))
    return types.SimpleNamespace(config=config, stage=stage, mesh=mesh, rules=rules,
                                 graphdef=graphdef, shardings=shardings, state=state,
                                 frozen=frozen, batch=batches[0], states=states,
                                 metrics=metrics)


def _leaves(graphdef, state, module, kind=nnx.Param):
    """Leaves of one module's `kind` variables in a (host) train state, in a fixed order."""
    return jax.tree.leaves(nnx.state(getattr(nnx.merge(graphdef, state), module), kind))


def _changed(a, b):
    return [not np.array_equal(x, y) for x, y in zip(a, b)]


def test_two_steps_update_generator_discriminator_and_ema(run):
    def _params(state, module):
        return _leaves(run.graphdef, state, module)

    assert run.batch["source"].addressable_shards[0].data.shape[0] == 1  # split over 2 devices
    m0, m1 = run.metrics
    for m in (m0, m1):
        assert all(np.isfinite(v) for v in m.values()), m
        for key in ("loss/g_total", "loss/l1", "loss/perceptual", "loss/adv", "loss/fm",
                    "loss/consist", "loss/cross_id", "loss/pose", "loss/dyn_std",
                    "loss/dyn_pose_decorr", "loss/d",
                    "d/acc_real", "d/acc_fake",
                    "psnr/recon", "z_dyn/std", "grad_norm/g", "grad_norm/d", "update_norm/g",
                    "update_norm/d", "lr/g", "lr/d"):
            assert key in m, key
        assert m["loss/l1"] > 0 and m["loss/perceptual"] > 0 and m["loss/consist"] > 0
        assert 0 < m["loss/pose"] < 1  # radians: untrained z_pose vs labels of a few degrees
        assert 0 <= m["loss/cross_id"] <= 2 and 0 < m["psnr/recon"] < 60
        assert m["update_norm/g"] > 0
        assert 0 <= m["loss/dyn_pose_decorr"] <= 1  # a mean squared correlation
    # GAN off at step 0 (gan_start_step=1): no adversarial terms, no D update.
    assert m0["gan/on"] == 0 and m0["loss/adv"] == 0 and m0["loss/d"] == 0
    assert m0["update_norm/d"] == 0
    assert m1["gan/on"] == 1 and m1["loss/d"] > 0 and m1["update_norm/d"] > 0
    assert 0 <= m1["d/acc_real"] <= 1 and 0 <= m1["d/acc_fake"] <= 1
    # The total is the configured weighted sum.
    w = face_latent.effective_weights(run.config.loss)
    expected = sum(w[k] * m1[f"loss/{k}"] for k in w)
    np.testing.assert_allclose(m1["loss/g_total"], expected, rtol=1e-4)

    s0, s1, s2 = run.states
    assert all(_changed(_params(s0, "generator"), _params(s1, "generator")))
    assert any(_changed(_params(s1, "generator"), _params(s2, "generator")))
    assert not any(_changed(_params(s0, "discriminator"), _params(s1, "discriminator")))
    # Every D kernel moves. (The logit biases may not: with as many real as fake patches
    # inside the hinge margins, their gradients cancel exactly.)
    d1, d2 = _params(s1, "discriminator"), _params(s2, "discriminator")
    assert all(_changed([x for x in d1 if x.ndim > 1], [x for x in d2 if x.ndim > 1]))
    # Spectral-norm power iteration vectors (BatchStats) move with the D step only.
    u0, u1, u2 = (_leaves(run.graphdef, s, "discriminator", nnx.BatchStat) for s in run.states)
    assert not any(_changed(u0, u1)) and all(_changed(u1, u2))
    ts = nnx.merge(run.graphdef, s2)
    assert int(ts.g_opt.step[...]) == 2 and int(ts.d_opt.step[...]) == 1

    # EMA: starts as the generator, then ema <- d * ema + (1 - d) * generator every step.
    d = run.config.train.ema_decay
    assert not any(_changed(_params(s0, "ema"), _params(s0, "generator")))
    for e1, e2, g2 in zip(_params(s1, "ema"), _params(s2, "ema"), _params(s2, "generator")):
        np.testing.assert_allclose(e2, d * e1 + (1 - d) * g2, rtol=1e-5, atol=1e-7)
    assert any(_changed(_params(s2, "ema"), _params(s2, "generator")))


def test_image_summary_rows(run):
    n = 2
    image_fn = loop.ImageFn(run.graphdef, run.stage, n)
    with sharding.mesh_rules(run.mesh, run.rules):
        compiled = jax.jit(image_fn).lower(run.state, run.batch, run.frozen).compile(
            loop.FAST_CPU_COMPILE)
    rows = dict(zip(image_fn.row_names,
                    jax.device_get(compiled(run.state, run.batch, run.frozen))))
    assert list(rows) == ["source", "driving", "reconstruction", "reconstruction_ema",
                          "cross_driver", "cross_reenactment", "cross_reenactment_ema"]
    size = run.config.data.image_size
    for name, images in rows.items():
        assert images.shape == (n, size, size, 3), name
        assert np.all(np.isfinite(images)) and np.abs(images).max() <= 1.0, name
    np.testing.assert_array_equal(rows["source"], np.asarray(run.batch["source"])[:n])
    assert not np.allclose(rows["reconstruction"], rows["cross_reenactment"])


def _traced_metrics(run, config):
    """Metric shapes of the step for `config` (traced, not compiled)."""
    with jax.default_prng_impl("unsafe_rbg"):
        stage = face_latent.make_stage(config)
        step = loop.make_step_fn(run.graphdef, stage, config.seed)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.state)
        with sharding.mesh_rules(run.mesh, run.rules):
            _, metrics = jax.eval_shape(step, abstract, run.batch, np.int32(0), stage.frozen)
    return metrics


def test_ablations_remove_their_terms(run, data_dir):
    """consist_weight=0 (VASA-1's ablation) and no face-ID model: the terms leave the step."""
    config = tiny_config(data_dir, loss__consist_weight=0.0)
    assert config.loss.cross_id_weight > 0 and not config.loss.face_id_path
    assert face_latent.effective_weights(config.loss)["cross_id"] == 0  # forced off (warned)
    metrics = _traced_metrics(run, config)
    assert "loss/consist" not in metrics and "loss/cross_id" not in metrics
    assert {"loss/l1", "loss/perceptual", "loss/adv", "loss/d"} <= set(metrics)
    no_gan = _traced_metrics(run, tiny_config(data_dir, loss__adv_weight=0.0,
                                              loss__fm_weight=0.0, loss__perceptual_weight=0.0))
    assert not {"loss/adv", "loss/fm", "loss/d", "loss/perceptual"} & set(no_gan)
    assert "loss/pose" not in _traced_metrics(run, tiny_config(data_dir, loss__pose_weight=0.0))
    off = _traced_metrics(run, tiny_config(data_dir))
    assert "loss/dyn_std" not in off and "loss/dyn_pose_decorr" not in off  # off by default
    no_pose = tiny_config(data_dir, loss__pose_weight=0.0, loss__perceptual_weight=0.0)
    assert "labels" not in face_latent.make_stage(no_pose).batch_keys


def test_consist_fraction_uses_the_first_pairs_only(run, data_dir):
    """loss.consist_fraction=0.5 on a batch of 2 computes l_consist on pair 0 alone: the
    same value as the full term on a batch holding pair 0 twice; L1 is untouched."""
    def compiled_step(fraction):
        config = tiny_config(data_dir, loss__perceptual_weight=0.0, loss__adv_weight=0.0,
                             loss__fm_weight=0.0, loss__consist_fraction=fraction)
        stage = face_latent.make_stage(config)
        step = jax.jit(loop.make_step_fn(run.graphdef, stage, config.seed))
        with sharding.mesh_rules(run.mesh, run.rules):
            compiled = step.lower(run.states[0], run.batch, np.int32(0), stage.frozen).compile(
                loop.FAST_CPU_COMPILE)
        return lambda batch: {k: float(v) for k, v in jax.device_get(
            compiled(run.states[0], batch, np.int32(0), stage.frozen)[1]).items()}

    pairs = run.batch
    sharded = jax.tree.map(lambda x: x.sharding, pairs)
    twice = jax.device_put(jax.tree.map(lambda x: np.stack([x[0], x[0]]),
                                        jax.device_get(pairs)), sharded)
    full_step = compiled_step(1.0)
    half, full = compiled_step(0.5)(pairs), full_step(pairs)
    np.testing.assert_allclose(half["loss/consist"], full_step(twice)["loss/consist"],
                               rtol=1e-4)
    np.testing.assert_allclose(half["loss/l1"], full["loss/l1"], rtol=1e-5)
    assert not np.isclose(half["loss/consist"], full["loss/consist"], rtol=1e-3)
    assert face_latent.consist_pairs(8, 0.5) == 4 and face_latent.consist_pairs(8, 0.01) == 1
    with pytest.raises(ConfigError, match="consist_fraction"):
        tiny_config(data_dir, loss__consist_fraction=0.0)


def test_the_saved_config_records_the_loss_weights_that_run(data_dir):
    """Without a face-ID model l_cross-id is off: the config the checkpoints save says 0."""
    config = tiny_config(data_dir, loss__perceptual_weight=0.0)
    assert config.loss.cross_id_weight > 0 and not config.loss.face_id_path
    stage = face_latent.make_stage(config)
    assert abs(stage.config.loss.cross_id_weight) < 1e-12
    assert abs(stage.config.loss.pose_weight - config.loss.pose_weight) < 1e-12
    assert config.loss.cross_id_weight > 0  # the given config is left as it was


def test_pose_loss_needs_pose_labels(data_dir, tmp_path):
    unlabelled = tmp_path / "no_pose"
    shutil.copytree(data_dir, unlabelled)
    info = DatasetInfo.load(str(unlabelled))
    info.labels = [k for k in info.labels if k != "pose"]
    info.save(str(unlabelled))
    with pytest.raises(ValueError, match="pose_weight=0"):
        face_latent.make_stage(tiny_config(str(unlabelled), loss__perceptual_weight=0.0))
    stage = face_latent.make_stage(tiny_config(data_dir, loss__perceptual_weight=0.0))
    assert "labels" in stage.batch_keys


def test_loss_config_validation(data_dir):
    with pytest.raises(ConfigError, match="perceptual_scales"):
        tiny_config(data_dir, loss__perceptual_scales=4)  # 64 px -> 8 px < 16 px
    with pytest.raises(ConfigError, match="consist_weight"):
        tiny_config(data_dir, loss__consist_weight=-1.0)
    with pytest.raises(ConfigError, match="warmup_steps"):
        tiny_config(data_dir, optim__warmup_steps=200)


def test_train_py_runs_this_trainer():
    with open(os.path.join(ROOT, "train.py")) as f:
        tree = ast.parse(f.read())
    trainers = next(ast.literal_eval(node.value) for node in tree.body
                    if isinstance(node, ast.Assign) and node.targets[0].id == "TRAINERS")
    module, fn = trainers["face_latent"].split(":")
    assert module == face_latent.__name__ and fn == "train_and_evaluate"


def test_region_weights_come_from_the_frames_boxes(data_dir, tmp_path):
    """With box labels the step reads them (labels in the batch even without the pose
    loss); without them, or with no region weight, it uses fixed boxes or none."""
    no_pose = dict(loss__pose_weight=0.0, loss__perceptual_weight=0.0)
    stage = face_latent.make_stage(tiny_config(data_dir, loss__l1_region_weight=4.0, **no_pose))
    assert "labels" in stage.batch_keys
    plain = face_latent.make_stage(tiny_config(data_dir, **no_pose))
    assert "labels" not in plain.batch_keys
    batch = next(iter(stage.make_dataset(0, 1)))
    for role in ("source", "driving"):
        boxes = np.asarray(batch["labels"][role]["mouth_box"])
        assert boxes.shape == (8, 4) and np.all(boxes[:, 2] > boxes[:, 0])


def test_l1_regions_weigh_the_eyes_on_their_own():
    from vasa_jax.trainers.face_latent import l1_regions

    lc = configs.load("configs/face_latent.py:size=tiny", loss__l1_region_weight=10.0).loss
    labels = ["pose", "mouth_box", "eyes_box"]
    boxes, weight, fixed = l1_regions(lc, labels, 64)
    assert dict(zip(boxes, weight)) == {"mouth_box": 10.0, "eyes_box": 10.0} and fixed is None
    lc = configs.load("configs/face_latent.py:size=tiny", loss__l1_region_weight=10.0,
                      loss__l1_eyes_weight=40.0).loss
    boxes, weight, _ = l1_regions(lc, labels, 64)
    assert dict(zip(boxes, weight)) == {"mouth_box": 10.0, "eyes_box": 40.0}
    # No box labels: the fixed face-crop boxes, the eyes' weight in the eyes' box.
    boxes, _, fixed = l1_regions(lc, ["pose"], 64)
    assert boxes == () and fixed.shape == (64, 64, 1)
    assert np.isclose(fixed.max(), 41.0) and np.isclose(fixed[45, 32, 0], 11.0)  # eyes, mouth
    # Only the eyes weighted still turns the regions on; none weighted, none.
    lc = configs.load("configs/face_latent.py:size=tiny", loss__l1_eyes_weight=5.0).loss
    assert dict(zip(*l1_regions(lc, labels, 64)[:2])) == {"mouth_box": 0.0, "eyes_box": 5.0}
    lc = configs.load("configs/face_latent.py:size=tiny").loss
    assert l1_regions(lc, labels, 64) == ((), (), None)
    with pytest.raises(Exception, match="l1_eyes_weight"):
        configs.load("configs/face_latent.py:size=tiny", loss__l1_eyes_weight=-1.0)
