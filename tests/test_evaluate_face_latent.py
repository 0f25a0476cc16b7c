"""python -m vasa_jax.evaluate face_latent: restore, metrics, probes, figure, CLI errors.

The fast tests evaluate a checkpoint laid out exactly as the stage-1 trainer writes it (the
trainer's own TrainState, saved by the loop's Checkpointer with the run config) without
paying for a compiled train step; the `slow` test trains 1 real step with train.py first.
"""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import configs
from tests import testdata
from vasa_jax import checkpointing
from vasa_jax.evaluate import EVALUATORS, face_latent, get_evaluator
from vasa_jax.evaluate.__main__ import main as evaluate_main
from vasa_jax.inference import restore_face
from vasa_jax.metrics import image as image_metrics
from vasa_jax.parallel import sharding
from vasa_jax.parallel.mesh import create_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64  # the tiny model's image size
FRAMES_PER_CLIP = 4
EMA_MARK = 0.125  # written into one EMA parameter: tells the EMA from the live generator


def _config(data_dir):
    return configs.load("configs/face_latent.py:size=tiny", data__path=data_dir,
                        train__total_steps=2)


def _first_param(module):
    return jax.tree.leaves(nnx.state(module, nnx.Param))[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, data dir): 3 identities x (2 train + 1 test) clips, a step-2 checkpoint
    of the stage-1 trainer's TrainState whose EMA generator is marked (EMA_MARK)."""
    from vasa_jax.trainers.face_latent import TrainState

    root = tmp_path_factory.mktemp("eval_face_latent")
    data = str(root / "data")
    testdata.make_dataset(data, identities=3, clips_per_identity=2, test_clips_per_identity=1,
                          seconds=1.0, size=SIZE)
    workdir = str(root / "run")
    config = _config(data)
    # One device: orbax saves arrays replicated over 8 CPU devices slice by slice (~30 s).
    mesh = create_mesh(config.mesh.axes, devices=jax.devices()[:1])
    graphdef, abstract, _ = sharding.abstract_state(lambda: TrainState(config), mesh,
                                                    config.mesh.rules)
    train_state = nnx.merge(graphdef, testdata.filled_state(abstract))
    first = [True]

    def mark(x):
        if first[0]:
            first[0] = False
            return jnp.full(x.shape, EMA_MARK, x.dtype)
        return x

    nnx.update(train_state.ema, jax.tree.map(mark, nnx.state(train_state.ema, nnx.Param)))
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, checkpointing.CHECKPOINT_DIR))
    ckpt.save(2, nnx.state(train_state), config=config, weights=nnx.state(train_state.ema),
              force=True)
    ckpt.close()
    return workdir, data


@pytest.fixture(scope="module")
def meter(run, tmp_path_factory):
    """An expression meter trained on the fixture run's data (the recipe of
    tests/test_expression_meter.py: held-out mouth r ~0.8-0.95 at 32 px)."""
    from vasa_jax.trainers import expression_meter

    path = str(tmp_path_factory.mktemp("meter") / "meter")
    config = configs.load(
        "configs/expression_meter.py:size=tiny", data__path=run[1], train__total_steps=60,
        model__image_size=32, model__channels=(16, 32, 32, 32), model__hidden=32,
        data__batch_size=8, optim__lr=1e-2, optim__warmup_steps=10, data__num_workers=0,
        train__log_every=60)
    assert expression_meter.train_and_evaluate(config, path).step == 60
    return path


@pytest.fixture(scope="module")
def cli_result(run, meter, tmp_path_factory):
    """(stdout lines, JSON dict, out dir) of one CLI evaluation of the fixture run, with
    --expression_meter (one evaluation serves both: the paths without a meter are the
    BatchRunner tests' and test_summary_without_expression_meter's)."""
    workdir, data = run
    out = str(tmp_path_factory.mktemp("eval_out"))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = evaluate_main(["face_latent", "--workdir", workdir, "--data", data, "--out", out,
                              "--frames_per_clip", str(FRAMES_PER_CLIP), "--figure_columns",
                              "3", "--batch_size", "8", "--no_progress",
                              "--fast_cpu_compile", "--expression_meter", meter])
    assert code == 0
    lines = buf.getvalue().strip().splitlines()
    (json_path,) = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".json")]
    with open(json_path) as f:
        return lines, json.load(f), out


def test_registry():
    assert get_evaluator("face_latent") is face_latent
    assert "face_latent" in EVALUATORS
    with pytest.raises(KeyError, match="known"):
        get_evaluator("nope")
    assert evaluate_main(["nope"]) == 2


@pytest.fixture(scope="module")
def restored(run):
    return restore_face(run[0])


def test_restore_face_gives_the_ema_generator(run, restored):
    from vasa_jax.models.face_latent import FaceLatentModel

    workdir, data = run
    config, model = restored.config, restored.model
    assert isinstance(model, FaceLatentModel)
    assert config.stage == "face_latent" and config.data.path == data
    assert config.model.image_size == SIZE and isinstance(config.model.app.channels, tuple)
    np.testing.assert_array_equal(np.asarray(_first_param(model)[...]), EMA_MARK)
    assert restored.step == 2 and restored.weights == "ema"
    assert restored.mesh.devices.size == jax.device_count()  # restored onto all 8 devices


def _copy_run_without(workdir, dest, item):
    """A copy of the fixture run whose step-2 checkpoint lacks `item`."""
    shutil.copytree(workdir, dest)
    shutil.rmtree(os.path.join(dest, checkpointing.CHECKPOINT_DIR, "2", item))
    return str(dest)


def test_restore_face_reads_only_the_weights_item(run, restored, tmp_path):
    """Without the train-state item (optimizer moments, discriminator) the generator still
    restores, identical: inference reads the weights item alone."""
    workdir = _copy_run_without(run[0], tmp_path / "run", checkpointing.STATE)
    again = restore_face(workdir)
    assert again.weights == "ema"
    for a, b in zip(jax.tree.leaves(nnx.state(again.model)),
                    jax.tree.leaves(nnx.state(restored.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_face_reads_the_ema_of_older_checkpoints(run, restored, tmp_path):
    """A checkpoint written before the weights item: the EMA comes out of the train state."""
    workdir = _copy_run_without(run[0], tmp_path / "run", checkpointing.WEIGHTS)
    again = restore_face(workdir)
    assert again.weights == "ema"
    np.testing.assert_array_equal(np.asarray(_first_param(again.model)[...]), EMA_MARK)
    for a, b in zip(jax.tree.leaves(nnx.state(again.model)),
                    jax.tree.leaves(nnx.state(restored.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_prints_summary_and_writes_json_and_figure(cli_result):
    lines, result, out = cli_result
    assert re.fullmatch(r"psnr: -?\d+\.\d\d", lines[-1]), lines[-1]
    assert float(lines[-1].split()[1]) == pytest.approx(result["self_reenactment"]["psnr"],
                                                        abs=0.006)
    text = "\n".join(lines)
    for needle in ("self-reenactment: PSNR", "cross-reenactment identity similarity",
                   "FALLBACK", "probe pose_from_z_pose: R^2", "probe pose_from_z_dyn: R^2",
                   "probe mouth_open_from_z_dyn", "probe blink_from_z_dyn",
                   "probe gaze_from_z_dyn", "probe emotion_from_z_dyn", "figure:", "json:"):
        assert needle in text, needle

    assert result["step"] == 2 and result["weights"] == "ema" and result["split"] == "test"
    assert result["num_clips"] == 3 and result["num_identities"] == 3
    sr = result["self_reenactment"]
    assert sr["num_pairs"] == 3 * FRAMES_PER_CLIP
    assert 0 < sr["psnr"] < 60 and -1 <= sr["ssim"] <= 1
    cp = sr["copy_source"]
    assert 0 < cp["psnr"] < 60 and -1 <= cp["ssim"] <= 1
    assert set(sr["region_psnr"]) == set(cp["region_psnr"]) == {"eyes", "mouth"}
    assert all(0 < v < 60 for v in [*sr["region_psnr"].values(), *cp["region_psnr"].values()])
    assert "self-reenactment PSNR in the face boxes (copying the source): eyes" in text
    cr = result["cross_reenactment"]
    assert cr["method"] == "z_id" and "FALLBACK" in cr["label"]
    assert cr["num_pairs"] == 3 * FRAMES_PER_CLIP
    for key in ("identity_similarity", "self_identity_similarity",
                "driver_identity_similarity"):
        assert -1.0 <= cr[key] <= 1.0 + 1e-6
    pr = result["probes"]
    # Probes score every frame of the 1-s test clips (25 < probe_eval_frames_per_clip).
    assert pr["protocol"] == ("fit on 96 train-split frames, scored on 75 frames of the "
                              "evaluated clips") and pr["skipped"] == {}
    assert set(pr["pose_from_z_pose"]["r2"]) == {"yaw", "pitch", "roll"}
    assert set(pr["gaze_from_z_dyn"]["r2"]) == {"theta", "phi"}
    assert pr["pose_from_z_dyn"]["num_test"] == 3 * 25
    assert pr["pose_from_z_dyn"]["num_train"] == 6 * 16  # 6 train clips x 16 frames
    assert "accuracy" in pr["emotion_from_z_dyn"]

    grid = np.asarray(Image.open(result["figure"]))
    assert os.path.dirname(result["figure"]) == out
    assert grid.shape[0] == 5 * (SIZE + 2) + 2  # source, driving, pose, dynamics, full
    assert grid.shape[1] > 3 * (SIZE + 2) + 2 and grid.shape[2] == 3


def test_cli_expression_transfer(cli_result, meter):
    lines, result, _ = cli_result
    ex = result["expr_transfer"]
    assert ex["meter"] == os.path.abspath(meter)
    assert ex["num_pairs"] == result["cross_reenactment"]["num_pairs"] == 3 * FRAMES_PER_CLIP
    keys = {f"{label}_r{variant}" for label in ("mouth", "blink", "gaze")
            for variant in ("", "_dyn_only", "_real")}
    assert keys <= set(ex) and "skipped" not in ex
    for k in keys:  # None only where the labels are constant over the 12 driver frames
        assert ex[k] is None or -1.0 <= ex[k] <= 1.0, (k, ex[k])
    for k in ("mouth_r", "mouth_r_dyn_only", "mouth_r_real"):
        assert ex[k] is not None and np.isfinite(ex[k]), (k, ex)
    # The meter on the real driver frames reads their mouths (rows and labels aligned); the
    # untrained generator's outputs carry no driver mouth, so no bound on mouth_r itself.
    assert ex["mouth_r_real"] > 0.5, ex
    (line,) = [ln for ln in lines if ln.startswith("expression transfer")]
    assert "mouth r" in line and "real driver frames" in line and "dynamics only" in line
    assert result["seconds"]["expression_transfer"] >= 0


def test_summary_without_expression_meter(cli_result):
    """Without --expression_meter the report has no expression-transfer line."""
    lines, result, _ = cli_result
    plain = face_latent.summary_lines({k: v for k, v in result.items()
                                       if k != "expr_transfer"})
    assert plain == [ln for ln in lines if not ln.startswith("expression transfer")]
    assert face_latent.Settings().expression_meter is None


def _pairs(runner, data):
    """Test-split frames (3 clips x [source + 2 driving]) and 5 (source, driving) pairs."""
    clips, skipped = face_latent.read_clips(data, "test", SIZE, max_clips=None,
                                            frames_per_clip=2, include_first=True,
                                            progress=False)
    assert skipped == 0 and len(clips) == 3
    assert all(c.frame_ids.tolist() == [0, 1, 24] for c in clips)  # 25-frame clips
    frames = np.concatenate([c.frames for c in clips])
    return frames, np.array([0, 0, 3, 6, 6]), np.array([1, 2, 4, 7, 8])


def test_reenactment_metrics_are_those_of_its_images(run, restored, cli_result):
    """Batched reenactment (5 pairs, padded to a batch of 8 on 8 devices): PSNR/SSIM are
    those of the returned images against the driving frames. Runs after the CLI test,
    whose compiled functions it reuses (same architecture: module-level jit cache)."""
    del cli_result
    runner = face_latent.BatchRunner(restored.model, restored.mesh,
                                     restored.config.mesh.rules, batch_size=3,
                                     compiler_options=face_latent.FAST_CPU_COMPILE)
    assert runner.batch_size == 8  # rounded up to the 8 batch-axis devices
    frames, src, drv = _pairs(runner, run[1])
    z_pose, z_dyn = runner.encode_motion(frames, progress=False)
    assert z_pose.shape == (9, 7) and z_dyn.shape[0] == 9
    res = runner.reenact(face_latent.Rows(frames, src), z_pose[drv], z_dyn[drv],
                         face_latent.Rows(frames, drv), return_images=True, progress=False)
    assert res["images"].shape == (5, SIZE, SIZE, 3) and res["embedding"].shape[0] == 5
    assert "expression" not in res  # no meter
    assert np.abs(res["images"]).max() <= 1.0
    np.testing.assert_allclose(np.linalg.norm(res["embedding"], axis=-1), 1.0, atol=1e-5)
    target = runner.images(frames[drv])
    np.testing.assert_allclose(res["psnr"], image_metrics.psnr(res["images"], target),
                               rtol=1e-4)
    np.testing.assert_allclose(res["ssim"], image_metrics.ssim(res["images"], target),
                               atol=1e-4)
    masks = face_latent.region_masks(SIZE)
    assert sorted(masks) == ["eyes", "mouth"] and all(m.sum() > 0 for m in masks.values())
    for name, mask in masks.items():
        np.testing.assert_allclose(
            res[f"psnr_{name}"], image_metrics.psnr(res["images"], target, mask=mask), rtol=1e-4)
    # The copy-the-source floor: the source frames themselves against the targets.
    source = runner.images(frames[src])
    np.testing.assert_allclose(res["copy_psnr"], image_metrics.psnr(source, target), rtol=1e-4)
    np.testing.assert_allclose(res["copy_psnr_mouth"],
                               image_metrics.psnr(source, target, mask=masks["mouth"]),
                               rtol=1e-4)
    # A pair's output does not depend on its place in the batch or on the padding rows.
    again = runner.reenact(face_latent.Rows(frames, src[::-1]), z_pose[drv[::-1]],
                           z_dyn[drv[::-1]], return_images=True, progress=False)
    np.testing.assert_allclose(again["images"][::-1], res["images"], atol=1e-5)


def test_reenactment_is_the_model_call(run, restored):
    """The evaluator's transfer = FaceLatentModel(source, driving) (a separate compile of
    the model's own __call__)."""
    runner = face_latent.BatchRunner(restored.model, restored.mesh,
                                     restored.config.mesh.rules, batch_size=8,
                                     compiler_options=face_latent.FAST_CPU_COMPILE)
    frames, src, drv = _pairs(runner, run[1])
    z_pose, z_dyn = runner.encode_motion(frames, progress=False)
    res = runner.reenact(face_latent.Rows(frames, src), z_pose[drv], z_dyn[drv],
                         return_images=True, progress=False)
    images = runner.images(frames)
    graphdef, state = nnx.split(restored.model)
    call = jax.jit(lambda state, s, d: nnx.merge(graphdef, state)(s, d),
                   compiler_options=face_latent.FAST_CPU_COMPILE)
    want = np.clip(np.asarray(call(state, images[src], images[drv])), -1, 1)
    np.testing.assert_allclose(res["images"], want, atol=2e-4)


def _clip(i, identity, n, labels):
    return face_latent.ClipFrames(f"c{i}", identity, np.zeros((n, SIZE, SIZE, 3), np.uint8),
                                  np.arange(n), labels)


def test_probes_fit_skip_and_cross_validate():
    rng = np.random.default_rng(0)

    def make(n_clips, names):
        clips, zp, zd = [], [], []
        for i in range(n_clips):
            pose = rng.normal(0, 10, (20, 6))
            mouth = rng.uniform(0, 1, 20)
            labels = {"pose": pose, "mouth_open": mouth, "emotion": np.full(20, i % 2)}
            clips.append(_clip(i, i % 3, 20, {k: labels[k] for k in names}))
            # z_pose is linear in the pose; z_dyn holds the mouth and noise, no pose.
            zp.append(np.concatenate([pose[:, :3] / 10, rng.normal(size=(20, 4))], 1))
            zd.append(np.stack([mouth, *rng.normal(size=(5, 20))], 1))
        return clips, {"z_pose": np.concatenate(zp), "z_dyn": np.concatenate(zd)}

    train, train_lat = make(8, ("pose", "mouth_open", "emotion"))
    test, test_lat = make(4, ("pose", "mouth_open", "emotion"))
    res = face_latent.run_probes(test, test_lat, train, train_lat, kfold=5)
    assert res["pose_from_z_pose"]["r2_mean"] > 0.95
    assert res["pose_from_z_dyn"]["r2_mean"] < 0.1  # disentangled: no pose in z_dyn
    assert res["mouth_open_from_z_dyn"]["r2_mean"] > 0.95
    assert set(res["skipped"]) == {"blink_from_z_dyn", "gaze_from_z_dyn"}
    assert "'blink' missing" in res["skipped"]["blink_from_z_dyn"]
    assert "accuracy" in res["emotion_from_z_dyn"]

    # No train split: k-fold over the evaluated clips, by clip.
    res = face_latent.run_probes(test, test_lat, None, None, kfold=5)
    assert res["protocol"].startswith("4-fold")  # k capped at the 4 clips
    assert res["pose_from_z_pose"]["r2_mean"] > 0.95 and res["pose_from_z_pose"]["num_test"] == 80

    # Labels missing from the train split only.
    train_no_mouth, _ = make(8, ("pose",))
    res = face_latent.run_probes(test, test_lat, train_no_mouth, train_lat, kfold=5)
    assert "train" in res["skipped"]["mouth_open_from_z_dyn"]


def test_identity_function_uses_the_face_id_export(tmp_path):
    from vasa_jax.models import face_id

    cfg = face_id.FaceIDConfig(num_classes=3, image_size=32, channels=(8, 16), embed_dim=16,
                               groups=4)
    path = str(tmp_path / "face_id")
    face_id.save_face_id(path, face_id.FaceIDClassifier(cfg, rngs=nnx.Rngs(0)), cfg)
    fn, params, method, label = face_latent.identity_function(path)
    assert method == "face_id" and path in label and "FALLBACK" not in label
    images = np.random.default_rng(0).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    emb = np.asarray(fn(None, params, images))  # the generator is not used
    np.testing.assert_allclose(emb, face_id.load_face_id(path)(images), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    fn, params, method, label = face_latent.identity_function("")
    assert fn is face_latent._z_id_embedding and method == "z_id" and "FALLBACK" in label
    with pytest.raises(FileNotFoundError, match="--face_id"):
        face_latent.identity_function(str(tmp_path / "missing"))


def test_clear_errors(run, tmp_path, capsys):
    workdir, data = run
    args = ["face_latent", "--data", data, "--no_progress"]
    assert evaluate_main(args + ["--workdir", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluate_main(args + ["--workdir", str(empty)]) == 1
    assert "no checkpoints/ folder" in capsys.readouterr().err
    (empty / "checkpoints").mkdir()
    assert evaluate_main(args + ["--workdir", str(empty)]) == 1
    assert "no finished checkpoint" in capsys.readouterr().err
    assert evaluate_main(["face_latent", "--workdir", workdir, "--data",
                          str(tmp_path / "nodata")]) == 1
    assert "dataset folder" in capsys.readouterr().err
    # A dataset whose test split has a single clip.
    small = str(tmp_path / "small")
    testdata.make_dataset(small, identities=1, clips_per_identity=1, test_clips_per_identity=1,
                          seconds=0.4, size=SIZE)
    assert evaluate_main(["face_latent", "--workdir", workdir, "--data", small,
                          "--no_progress"]) == 1
    assert "needs >= 2" in capsys.readouterr().err
    assert evaluate_main(args + ["--workdir", workdir, "--face_id", str(tmp_path / "no_id")]) == 1
    assert "face-ID model" in capsys.readouterr().err
    assert evaluate_main(args + ["--workdir", workdir, "--step", "7"]) == 1
    assert "no checkpoint for step 7" in capsys.readouterr().err
    assert evaluate_main(args + ["--workdir", workdir, "--expression_meter",
                                 str(tmp_path / "no_meter")]) == 1
    assert "no_meter" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_clips"):
        face_latent.Settings(max_clips=1)


@pytest.mark.slow
def test_real_trainer_checkpoint_end_to_end(tmp_path):
    """train.py for 1 step, then the evaluator's CLI on that run, both as subprocesses."""
    import train

    if "face_latent" not in train.TRAINERS:
        pytest.skip("train.py has no face_latent trainer registered yet")
    data = str(tmp_path / "data")
    testdata.make_dataset(data, identities=2, clips_per_identity=1, test_clips_per_identity=1,
                          seconds=0.6, size=SIZE)
    workdir = str(tmp_path / "run")
    # XLA:CPU at -O0 for both processes (loop.FAST_CPU_COMPILE as flags): ~3x faster compiles.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1",
           "XLA_FLAGS": "--xla_backend_optimization_level=0 "
                        "--xla_llvm_disable_expensive_passes=true"}
    train = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/face_latent.py:size=tiny",
         "--workdir", workdir, f"--config.data.path={data}", "--config.data.batch_size=2",
         "--config.train.total_steps=1", "--config.train.image_every=0",
         "--config.loss.perceptual_weight=0", "--config.loss.adv_weight=0",
         "--config.loss.fm_weight=0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, "-m", "vasa_jax.evaluate", "face_latent", "--workdir", workdir,
         "--data", data, "--frames_per_clip", "2", "--no_progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"psnr: -?\d+\.\d\d", last), proc.stdout
    with open(os.path.join(workdir, "eval", "face_latent_test_step00000001.json")) as f:
        result = json.load(f)
    assert result["step"] == 1 and result["weights"] == "ema"
    assert result["self_reenactment"]["num_pairs"] == 2 * 2


def test_restoring_for_inference_imports_no_trainer(run):
    """The inference layer restores a run's generator without the trainers (no VGG19, no
    losses, no discriminator): checked in a fresh interpreter."""
    code = ("import sys; from vasa_jax.inference import restore_face; "
            f"r = restore_face({run[0]!r}); assert r.weights == 'ema'; "
            "bad = sorted(m for m in sys.modules if m.startswith(('vasa_jax.trainers', "
            "'vasa_jax.evaluate', 'vasa_jax.losses'))); print(bad); assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
