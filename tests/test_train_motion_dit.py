"""Stage 2 end to end on tiny data: normalisation statistics, the training step (overfits a
fixed batch), train_and_evaluate with checkpoints and resume, train.py, and the
MotionGenerator restored from the run folder."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from data_pipeline import loaders, schema
from data_pipeline import stats as stats_lib
from tests import testdata
from vasa_jax.motion_sampler import MotionGenerator
from vasa_jax.trainers import logger, loop, motion_dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, K, N_MELS = 10, 3, 16


@pytest.fixture(autouse=True)
def fast_cpu_rng():
    with jax.threefry_partitionable(False):
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("stage2"))
    testdata.make_dataset(path, identities=2, clips_per_identity=2, test_clips_per_identity=1,
                          seconds=1.2, size=16)
    return path


def tiny_config(data_dir, **overrides):
    base = dict(data__path=data_dir, data__window=W, data__context=K, data__batch_size=8,
                data__audio__n_mels=N_MELS, model__layers=2, model__width=32, model__heads=2,
                model__audio_encoder__hidden=16, diffusion__sample_steps=4,
                train__total_steps=4, train__log_every=2, train__checkpoint_every=2,
                optim__warmup_steps=1)
    return configs.load("configs/motion_dit.py:size=tiny", **{**base, **overrides})


# ----------------------------------------------------------------------------- statistics


def test_stats_are_computed_over_train_frames_and_read_back(data_dir, tmp_path):
    index = loaders.load_clip_index(data_dir, "train")
    source = schema.read_records(index.paths)
    seqs = [loaders.clip_sequences(schema.decode_clip(source[i]), "labels", "mel", N_MELS)
            for i in range(len(index))]
    motion = np.concatenate([m for m, _ in seqs])
    audio = np.concatenate([a for _, a in seqs])

    computed = stats_lib.compute_stats(data_dir, {"motion": "labels", "audio": "mel"}, N_MELS,
                                       progress=False)
    assert computed["labels"]["count"] == len(motion) == 4 * 30
    np.testing.assert_allclose(computed["labels"]["mean"], motion.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(computed["mel"]["std"], audio.std(0), rtol=1e-4, atol=1e-5)
    assert len(computed["label:gaze"]["mean"]) == 2 and len(computed["label:distance"]["mean"]) == 1

    # Without a stats.json: computed (and nothing written into the data folder).
    mean, std = stats_lib.source_stats(data_dir, "labels", "motion", N_MELS)
    assert mean.dtype == np.float32 and mean.shape == (13,)
    np.testing.assert_allclose(mean, motion.mean(0), rtol=1e-5, atol=1e-5)
    assert np.all(std >= stats_lib.STD_FLOOR)
    assert not os.path.exists(os.path.join(data_dir, stats_lib.STATS_FILE))

    # With one: read from it (a copy of the dataset folder with a marked entry), merged.
    copy = str(tmp_path / "copy")
    os.makedirs(copy)
    stats_lib.write_stats(copy, {"features:audio": {"mean": [1.0], "std": [2.0], "count": 3}})
    stats_lib.write_stats(copy, {"labels": {"mean": [5.0] * 13, "std": [0.0] * 13, "count": 7}})
    stored = stats_lib.read_stats(copy)
    assert set(stored) == {"features:audio", "labels"} and stored["labels"]["count"] == 7
    mean, std = stats_lib.source_stats(copy, "labels", "motion")
    np.testing.assert_array_equal(mean, 5.0)
    np.testing.assert_array_equal(std, np.float32(stats_lib.STD_FLOOR))  # floored
    with pytest.raises(ValueError, match="audio source"):
        stats_lib.source_stats(copy, "labels", "audio")


# ----------------------------------------------------------------------------- the step


def test_step_overfits_a_fixed_batch(data_dir):
    config = tiny_config(data_dir, optim__lr=3e-3, optim__warmup_steps=0, model__dropout=0.0,
                         train__total_steps=60, loss__velocity_weight=0.5)
    stage = motion_dit.make_stage(config)
    batch = next(iter(stage.make_dataset(0, 1)))
    batch = {k: jnp.asarray(batch[k]) for k in stage.batch_keys}
    assert batch["motion"].shape == (8, W, 13) and batch["audio"].shape == (8, W, 4 * N_MELS)
    assert batch["motion_pre"].shape == (8, K, 13)
    # A jitted init, as the loop's: distinct buffers for the model and its EMA copy.
    graphdef = nnx.graphdef(nnx.eval_shape(stage.create_state))
    state = jax.jit(lambda: nnx.state(stage.create_state()))()
    frozen = jax.tree.map(jnp.asarray, stage.frozen)
    step = jax.jit(loop.make_step_fn(graphdef, stage, config.seed), donate_argnums=0)
    step = step.lower(state, batch, np.int32(0), frozen).compile(loop.FAST_CPU_COMPILE)
    losses = []
    for i in range(60):
        state, metrics = step(state, batch, np.int32(i), frozen)
        losses.append(float(metrics["loss/x0"]))
    m = jax.device_get(metrics)
    for key in ("loss/total", "loss/x0", "loss/velocity", "loss/accel", "x0_err/low_noise",
                "x0_err/mean",
                "x0_err/mouth_open", "grad_norm", "update_norm", "lr", "kept/audio",
                "kept/pre"):
        assert np.isfinite(m[key]), key
    np.testing.assert_allclose(m["loss/total"], m["loss/x0"] + 0.5 * m["loss/velocity"],
                               rtol=1e-5)
    # Noise levels and condition drops are random every step: compare averages.
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last, losses)
    ts = nnx.merge(graphdef, state)
    assert int(ts.opt.step[...]) == 60


def test_training_conditions_drop_and_truncate():
    # Audio noise (on by default at tiny) has its own test below; off here so that the
    # truncation shows as exact zeros after exact ones.
    cfg = configs.load("configs/motion_dit.py:size=tiny", loss__audio_noise_std=0.0).loss
    b, w = 4000, 10
    batch = {"has_gaze": np.ones(b, bool), "has_distance": np.zeros(b, bool),
             "has_emotion": np.ones(b, bool), "has_pre": np.arange(b) % 2 == 0}
    inputs = {"audio": jnp.ones((b, w, 3)), "audio_pre": jnp.ones((b, 2, 3)),
              "motion_pre": jnp.ones((b, 2, 5)), "gaze": jnp.ones((b, 2)),
              "distance": jnp.ones((b, 1)), "emotion": jnp.ones((b, 8))}
    cond = motion_dit.training_conditions(batch, inputs, jax.random.key(0), cfg)
    kept = {k: np.asarray(v) for k, v in cond.items() if k.startswith("keep_")}
    assert abs(kept["keep_audio"].mean() - 0.9) < 0.02
    assert abs(kept["keep_gaze"].mean() - 0.9) < 0.02
    assert not kept["keep_distance"].any()  # no distance labels: always dropped
    assert not kept["keep_pre"][1::2].any()  # first windows: no context
    assert abs(kept["keep_pre"][::2].mean() - 0.5) < 0.04
    truncated = np.asarray(cond["audio"])[:, :, 0]
    cut = (truncated == 0).any(axis=1)
    assert abs(cut.mean() - cfg.audio_truncate_prob) < 0.02
    assert np.all(truncated[:, 0] == 1)  # the cut is in [1, W): frame 0 always stays
    rows = truncated[cut]  # zeros only after the cut: a suffix
    assert np.all(np.diff(rows, axis=1) <= 0)


def test_training_conditions_audio_noise():
    cfg = configs.load("configs/motion_dit.py:size=tiny", loss__audio_noise_std=0.5,
                       loss__audio_truncate_prob=0.0, loss__drop_prob=0.0).loss
    b, w, k = 500, 10, 2
    audio = np.ones((b, w, 3), np.float32)
    audio[:, 7:] = 0.0  # padded frames past the clip's end
    audio_pre = np.ones((b, k, 3), np.float32)
    audio_pre[::2] = 0.0  # first windows: no context
    batch = {"has_gaze": np.ones(b, bool), "has_distance": np.ones(b, bool),
             "has_emotion": np.ones(b, bool), "has_pre": np.arange(b) % 2 == 1}
    inputs = {"audio": jnp.asarray(audio), "audio_pre": jnp.asarray(audio_pre),
              "motion_pre": jnp.ones((b, k, 5)), "gaze": jnp.ones((b, 2)),
              "distance": jnp.ones((b, 1)), "emotion": jnp.ones((b, 8)),
              "valid": jnp.arange(w)[None].repeat(b, 0) < 7}
    cond = motion_dit.training_conditions(batch, inputs, jax.random.key(0), cfg)
    noise = np.asarray(cond["audio"]) - audio
    assert abs(noise[:, :7].std() - 0.5) < 0.01 and abs(noise[:, :7].mean()) < 0.01
    assert np.all(np.asarray(cond["audio"])[:, 7:] == 0)  # padding stays zero
    pre = np.asarray(cond["audio_pre"])
    assert np.all(pre[::2] == 0) and abs((pre[1::2] - 1).std() - 0.5) < 0.02
    clean = configs.load("configs/motion_dit.py:size=tiny", loss__audio_truncate_prob=0.0,
                         loss__audio_noise_std=0.0).loss
    same = motion_dit.training_conditions(batch, inputs, jax.random.key(0), clean)
    np.testing.assert_array_equal(np.asarray(same["audio"]), audio)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """4 steps, checkpoints at 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("motion_run") / "w")
    result = motion_dit.train_and_evaluate(tiny_config(data_dir), workdir,
                                           compiler_options=loop.FAST_CPU_COMPILE)
    return workdir, result


def test_train_writes_checkpoints_metrics_and_normalization(run):
    workdir, result = run
    assert result.step == 4 and not result.stopped_early
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    records = logger.read_metrics(workdir)
    assert [r["step"] for r in records] == [2, 4]
    assert all(np.isfinite(r["loss/x0"]) and r["grad_norm"] > 0 for r in records)
    norm = json.load(open(os.path.join(workdir, stats_lib.NORMALIZATION_FILE)))
    assert norm["motion_source"] == "labels" and len(norm["audio_mean"]) == 4 * N_MELS
    ts = nnx.merge(result.graphdef, result.state)
    assert int(ts.opt.step[...]) == 4
    live = jax.tree.leaves(nnx.state(ts.model, nnx.Param))
    ema = jax.tree.leaves(nnx.state(ts.ema, nnx.Param))
    assert any(not np.array_equal(a, b) for a, b in zip(live, ema))


@pytest.mark.slow  # a second compile of the step (~20 s)
def test_resume_continues_from_the_checkpoint(run, data_dir, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(run[0], workdir)  # a copy: other tests read the 4-step run
    second = motion_dit.train_and_evaluate(tiny_config(data_dir, train__total_steps=6), workdir,
                                           compiler_options=loop.FAST_CPU_COMPILE)
    assert second.step == 6 and not second.stopped_early
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]
    assert [r["step"] for r in logger.read_metrics(workdir)] == [2, 4, 6]  # continued at 5
    ts = nnx.merge(second.graphdef, second.state)
    assert int(ts.opt.step[...]) == 6


def test_generator_from_workdir(run, data_dir):
    workdir = run[0]
    gen = MotionGenerator.from_workdir(workdir)
    assert (gen.window, gen.context, gen.motion_dim, gen.audio_dim) == (W, K, 13, 4 * N_MELS)
    assert gen.step == 4 and gen.guidance["audio"] == 0.5 and gen.guidance["gaze"] == 1.0
    length = int(2.3 * W)
    rng = np.random.default_rng(0)
    audio = (rng.normal(size=(length, gen.audio_dim)) * gen.audio_std + gen.audio_mean)
    a = gen.generate(audio, gaze=[5.0, -3.0], distance=1.0, emotion=None, seed=0)
    assert a.shape == (length, 13) and a.dtype == np.float32 and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, gen.generate(audio, gaze=[5.0, -3.0], distance=1.0, seed=0))
    b = gen.generate(audio, gaze=[5.0, -3.0], distance=1.0, seed=1)
    assert not np.allclose(a, b)
    # Raw units: de-normalised around the data's mean motion.
    assert np.all(np.abs(a.mean(0) - gen.motion_mean) < 10 * gen.motion_std)
    # Windows are causal: audio after the first window cannot change it.
    later = audio.copy()
    later[W:] += 3.0
    c = gen.generate(later, gaze=[5.0, -3.0], distance=1.0, seed=0)
    np.testing.assert_allclose(c[:W], a[:W], atol=1e-5)
    assert not np.allclose(c[W:], a[W:])
    # A batch: each row equals its own single generation.
    rows = gen.generate_batch(np.stack([audio, audio]), gaze=[5.0, -3.0],
                              distance=np.ones((2, 1)), seeds=[0, 1])
    np.testing.assert_allclose(rows[0], a, atol=1e-4)
    np.testing.assert_allclose(rows[1], b, atol=1e-4)
    with pytest.raises(ValueError, match="audio must be"):
        gen.generate(audio[:, :5])
    # Streaming: the same windows fed one at a time give the same motion; the sampler
    # compiled once per batch size (N = 1 and 2 above) for every window, the short last
    # one included.
    assert gen._sample._cache_size() == 2
    stream = gen.stream(1, gaze=[5.0, -3.0], distance=np.ones((1, 1)), seeds=0)
    streamed = [stream.next_window(audio[None, i:i + W]) for i in range(0, length, W)]
    np.testing.assert_allclose(np.concatenate(streamed, axis=1)[0], a, atol=1e-5)
    assert stream.index == 3 and gen._sample._cache_size() == 2
    with pytest.raises(ValueError, match="ended"):
        stream.next_window(audio[None, :W])


def test_sampler_conditions_are_the_trainers(run):
    """Training and sampling build a window's conditions in one place: the stream's first two
    windows equal `sample_window` on the conditions the train step builds (no drops, no
    augmentation) from the same raw audio, controls and previous-window context."""
    from vasa_jax.models.motion_dit import denormalize_motion, normalize_inputs
    from vasa_jax.motion_sampler import sample_window

    gen = MotionGenerator.from_workdir(run[0])
    cfg = configs.load("configs/motion_dit.py:size=tiny", loss__drop_prob=0.0,
                       loss__pre_drop_prob=0.0, loss__audio_truncate_prob=0.0,
                       loss__audio_noise_std=0.0).loss
    rng = np.random.default_rng(3)
    audio = (rng.normal(size=(2 * W, gen.audio_dim)) * gen.audio_std
             + gen.audio_mean).astype(np.float32)
    gaze, distance = np.float32([[4.0, -2.0]]), np.float32([[1.1]])
    emotion = np.eye(8, dtype=np.float32)[None, 2]
    stream = gen.stream(1, gaze=gaze, distance=distance, emotion=emotion, seeds=7)
    stats = gen.normalization.arrays()
    motion_pre = np.zeros((1, K, gen.motion_dim), np.float32)
    audio_pre = np.zeros((1, K, gen.audio_dim), np.float32)
    for i in range(2):
        window = audio[None, i * W:(i + 1) * W]
        batch = {"motion": np.zeros((1, W, gen.motion_dim), np.float32),
                 "motion_pre": motion_pre, "audio": window, "audio_pre": audio_pre,
                 "has_pre": np.array([i > 0]), "valid": np.ones((1, W), bool), "gaze": gaze,
                 "distance": distance, "emotion": emotion,
                 **{f"has_{c}": np.ones(1, bool) for c in ("gaze", "distance", "emotion")}}
        cond = motion_dit.training_conditions(batch, normalize_inputs(batch, stats),
                                              jax.random.key(0), cfg)
        keys = jax.random.fold_in(jax.random.key(7), i)[None]
        x = sample_window(gen.model, cond, keys, schedule=gen.schedule,
                          num_sample_steps=gen.num_sample_steps, guidance=gen.guidance,
                          eta=gen.eta)
        expected = np.asarray(denormalize_motion(x, stats))
        got = stream.next_window(window)
        np.testing.assert_allclose(got, expected, atol=2e-4)
        motion_pre, audio_pre = got[:, W - K:], window[:, W - K:]


@pytest.mark.slow  # a fresh process: imports + compiles (~25 s)
def test_train_cli_no_context_and_velocity_ablation(data_dir, tmp_path):
    """`python train.py` with the K=0 and velocity-loss ablation flags, then generation."""
    workdir = str(tmp_path / "cli")
    args = ["--config", "configs/motion_dit.py:size=tiny", "--workdir", workdir,
            f"--config.data.path={data_dir}", "--config.data.context=0",
            "--config.loss.velocity_weight=1", "--config.loss.drop_prob=0",
            "--config.loss.pre_drop_prob=0"]
    for key, value in (("data.window", W), ("data.batch_size", 8), ("data.audio.n_mels", N_MELS),
                       ("model.layers", 1), ("model.width", 16), ("model.heads", 2),
                       ("model.audio_encoder.hidden", 8), ("model.audio_encoder.layers", 0),
                       ("train.total_steps", 2), ("train.log_every", 1),
                       ("optim.warmup_steps", 0), ("diffusion.sample_steps", 2)):
        args.append(f"--config.{key}={value}")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = logger.read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2] and records[-1]["loss/velocity"] > 0
    assert records[-1]["kept/audio"] == 1.0  # drop_prob=0: nothing dropped
    gen = MotionGenerator.from_workdir(workdir)
    assert gen.context == 0
    out = gen.generate(np.zeros((25, gen.audio_dim), np.float32) + gen.audio_mean, seed=3)
    assert out.shape == (25, 13) and np.all(np.isfinite(out))
