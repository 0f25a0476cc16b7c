"""python -m vasa_jax.evaluate motion: metric plumbing with an oracle generator, CLI errors,
and (once the stage-2 trainer exists) an end-to-end run on a tiny trained model.

The oracle "generates" the ground-truth motion of the clip whose audio it is given, moved to
the requested gaze / distance when that control's guidance scale is > 0 (ignoring it at
scale 0), plus noise for seeds > 0. So its lip-sync r must equal the probe's own r on the
ground truth, its E_g must be near the probe floor with guidance and large without, and
its diversity must be > 0.
"""

import contextlib
import io
import json
import os
import re

import ml_collections
import numpy as np
import pytest

from data_pipeline import schema
from data_pipeline import transforms as T
from tests import testdata
from vasa_jax.evaluate import EVALUATORS, get_evaluator
from vasa_jax.evaluate import motion as ev
from vasa_jax.evaluate.__main__ import main as evaluate_main

FEATURE_DIM = 16
WINDOW = 25
LAST_LINE = re.compile(r"^lip-sync r: -?\d\.\d{3}$")


def _mixing(seed=0):
    """Fixed random linear map: 13 motion labels -> FEATURE_DIM 'stage-1 latents'."""
    return np.random.default_rng(seed).standard_normal(
        (T.MOTION_LABEL_DIM, FEATURE_DIM)).astype(np.float32)


def _write_dataset(directory, labels=True, train_per_id=3, test_per_id=2, identities=3):
    """Clips whose feature 'motion' [T, 16] = labels @ A + noise (a stand-in for stage-1
    latents that needs a non-trivial probe)."""
    a = _mixing()
    clips = []
    for split, per in (("train", train_per_id), ("test", test_per_id)):
        for ident in range(identities):
            for k in range(per):
                clip = testdata.make_clip(f"{split}-{ident}-{k}", ident, split=split,
                                          seed=len(clips), num_frames=60, size=16)
                rng = np.random.default_rng(len(clips))
                motion = T.motion_from_labels(clip.labels) @ a
                clip.features["motion"] = (motion + rng.normal(0, 0.05, motion.shape)
                                           ).astype(np.float32)
                if labels is not True:
                    clip.labels = {k2: v for k2, v in clip.labels.items() if k2 in labels}
                clips.append(clip)
    schema.write_clips(directory, clips, num_shards=2)
    schema.DatasetInfo(source="testdata", height=16, width=16, num_identities=identities,
                       clips={"train": identities * train_per_id, "test": identities * test_per_id},
                       labels=sorted(clips[0].labels),
                       features={"motion": [FEATURE_DIM]}).save(directory)
    return clips


def _config(data_dir):
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict({
        "path": data_dir, "window": WINDOW, "context": 5, "motion_source": "features:motion",
        "audio_source": "mel", "audio": {"n_mels": 80}})
    # As configs/motion_dit.py: gaze guided by default, distance not.
    c.guidance = ml_collections.ConfigDict({"audio": 0.5, "gaze": 1.0, "distance": 0.0})
    return c


class Oracle:
    """Returns the ground truth of the clip with this audio, following controls whose
    guidance scale is > 0 (see the module docstring)."""

    def __init__(self, data_dir, labels_by_clip):
        self.config = _config(data_dir)
        self.a = _mixing()
        clips, _ = ev.read_clips(data_dir, "test", self.config, max_clips=None, with_audio=True)
        # Records hold the audio as PCM16: key by the features the evaluator will pass.
        self.truth = {c.audio.tobytes(): (c.motion, labels_by_clip[c.clip_id]) for c in clips}
        self.calls = []

    def generate(self, audio, *, gaze, distance, emotion, seed=0, guidance=None,
                 num_sample_steps=None):
        self.calls.append({"gaze": gaze, "distance": distance, "seed": seed,
                           "guidance": guidance, "steps": num_sample_steps})
        motion, labels = self.truth[np.asarray(audio).tobytes()]
        scales = {**self.config.guidance.to_dict(), **(guidance or {})}
        target = labels.copy()
        if gaze is not None and scales["gaze"] > 0:
            target[:, 6:8] = gaze
        if distance is not None and scales["distance"] > 0:
            target[:, 5] = 10.0 * distance  # testdata: distance = tz / 10
        if seed:
            target[:, :3] += np.random.default_rng(seed).normal(0, 1.0, (len(target), 3))
        return motion + (target - labels) @ self.a


@pytest.fixture(scope="module")
def oracle_data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("motion_eval_data"))
    clips = _write_dataset(d)
    labels = {c.clip_id: T.motion_from_labels(c.labels).astype(np.float64) for c in clips}
    return d, labels


def test_registered():
    assert EVALUATORS["motion"] == "vasa_jax.evaluate.motion"
    module = get_evaluator("motion")
    assert module is ev and module.DESCRIPTION
    assert callable(module.add_arguments) and callable(module.run)


def test_oracle_metrics(oracle_data, tmp_path):
    data, labels = oracle_data
    oracle = Oracle(data, labels)
    settings = ev.Settings(seeds=2, num_sample_steps=7, control_clips=3, progress=False)
    out = str(tmp_path / "res.json")
    r = ev.evaluate("", data, settings, generator=oracle, json_path=out)

    assert r["num_clips"] == 6 and r["num_frames"] == 6 * 60
    assert r["probes"]["protocol"].startswith("fit on 9 train clips")
    # (distance varies little in testdata: the feature noise costs it more R^2)
    for name, least in (("mouth_open", 0.9), ("pose", 0.9), ("gaze", 0.9), ("distance", 0.7)):
        assert r["probes"]["r2"][name]["r2_mean"] > least, (name, r["probes"]["r2"][name])
    # Lip sync: the oracle's mouth is the ground truth's, so r is the probe's own r (up to
    # the probe's small weights on the gaze / distance directions the controls replaced).
    lip = r["lip_sync"]
    assert lip["r"] == pytest.approx(lip["ground_truth_probe_r"], abs=5e-3)
    assert 0.95 < lip["r"] < 1.0
    assert lip["best_lag"] == 0 and lip["num_frames"] == 360
    # dP: seed 0 keeps the true pose, so generated ~ ground truth through the probe.
    dp = r["pose_dp"]
    assert dp["generated"] == pytest.approx(dp["ground_truth_probe"], rel=0.05)
    assert dp["ground_truth"] == pytest.approx(
        ev.M.pose_jitter_dp([labels[k][:, :3] for k in labels if k.startswith("test")]))
    assert dp["ratio"] == pytest.approx(1.0, abs=0.15)
    # E_g: with guidance (default l_g = 1) the oracle looks where asked (error ~ the
    # probe's); at l_g = 0 it keeps its own gaze: (+15, 0) and (0, +10) are missed by 10+.
    g = r["gaze_control"]
    assert g["num_clips"] == 3
    assert g["default"]["scale"] == 1.0 and g["compared"]["scale"] == 0.0
    assert set(g["default"]["per_target"]) == {"own", "(+15, +0)", "(+0, +10)"}
    assert g["default"]["mean"] < 2.0
    assert g["compared"]["per_target"]["(+15, +0)"] > 5.0
    assert g["compared"]["mean"] > g["default"]["mean"] + 3.0
    assert g["probe_floor"] < 3.0
    # E_d: the default l_d = 0 is compared with l_d = 1, where the oracle follows requests.
    dd = r["distance_control"]
    assert dd["default"]["scale"] == 0.0 and dd["compared"]["scale"] == 1.0
    assert set(dd["default"]["per_target"]) == {"own", "q0.1", "q0.9"}
    assert set(dd["targets"]) == {"q0.1", "q0.9"}
    assert dd["compared"]["mean"] < 0.01 and dd["compared"]["mean"] < dd["default"]["mean"]
    # Diversity: only seed 1 moves (pose noise), so > 0 in both measures.
    assert r["diversity"]["motion"] > 0.01 and r["diversity"]["pose_deg"] > 0.2

    # Calls: 2 seeds per clip, then per control clip 2 settings x 3 targets for gaze and
    # for distance, less the 2 (own, default) already generated.
    assert len(oracle.calls) == 6 * 2 + 3 * (6 + 6 - 2)
    assert all(c["steps"] == 7 for c in oracle.calls)
    compared = [c for c in oracle.calls if c["guidance"] is not None]
    assert len(compared) == 3 * 6 and all(c["guidance"]["audio"] == 0.5 for c in compared)
    assert sum(c["guidance"]["gaze"] == 0.0 and c["guidance"]["distance"] == 0.0
               and c["gaze"] is not None for c in compared) == 9
    assert sum(c["guidance"]["gaze"] == 1.0 and c["guidance"]["distance"] == 1.0
               for c in compared) == 9

    saved = json.load(open(out))
    assert saved["lip_sync"]["r"] == pytest.approx(lip["r"])
    lines = ev.summary_lines(r)
    assert LAST_LINE.match(lines[-1]), lines[-1]
    text = "\n".join(lines)
    for key in ("probe mouth_open", "dP (deg/frame)", "E_g (deg)", "E_d", "diversity across 2",
                "l_g = 0: ", "l_d = 1: ", f"json: {out}"):
        assert key in text, (key, text)


def test_missing_gaze_labels_skip_control(tmp_path):
    d = str(tmp_path / "data")
    keep = ("pose", "mouth_open", "emotion_probs")
    clips = _write_dataset(d, labels=keep, train_per_id=2, test_per_id=1, identities=2)
    labels = {c.clip_id: T.motion_from_labels(
        testdata.make_clip(c.clip_id, c.identity_id, split=c.split, seed=i, num_frames=60,
                           size=16).labels).astype(np.float64) for i, c in enumerate(clips)}
    r = ev.evaluate("", d, ev.Settings(seeds=1, progress=False), generator=Oracle(d, labels),
                    json_path="")
    assert "skipped" in r["gaze_control"] and "skipped" in r["distance_control"]
    assert r["diversity"]["motion"] is None and r["json"] is None
    lines = ev.summary_lines(r)
    assert any(line.startswith("E_g: skipped") for line in lines)
    assert LAST_LINE.match(lines[-1])


def test_bad_inputs(oracle_data, tmp_path):
    data, labels = oracle_data
    oracle = Oracle(data, labels)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.evaluate("", str(tmp_path / "nothing"), ev.Settings(progress=False),
                    generator=oracle, json_path="")
    with pytest.raises(FileNotFoundError, match="workdir"):
        ev.load_generator(str(tmp_path / "no_run"))
    os.makedirs(tmp_path / "empty_run")
    with pytest.raises(FileNotFoundError, match="checkpoints/"):
        ev.load_generator(str(tmp_path / "empty_run"))
    only_train = str(tmp_path / "only_train")
    testdata.make_dataset(only_train, identities=2, clips_per_identity=1, size=16)
    with pytest.raises(FileNotFoundError, match="'test'"):
        ev.evaluate("", only_train, ev.Settings(progress=False), generator=oracle,
                    json_path="")
    with pytest.raises(ValueError, match="seeds"):
        ev.Settings(seeds=0)
    with pytest.raises(ValueError, match="split"):
        ev.Settings(split="val")


def test_cli_errors_exit_1(oracle_data, tmp_path):
    data, _ = oracle_data
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = evaluate_main(["motion", "--workdir", str(tmp_path / "missing"), "--data", data,
                              "--no_progress"])
    assert code == 1
    assert err.getvalue().startswith("error: workdir") and "does not exist" in err.getvalue()
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as e:
        evaluate_main(["motion", "--workdir", "w", "--gaze_targets", "1,2,3"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- real model


def _tiny_stage2_config(data_dir, **overrides):
    import configs

    return configs.load(
        "configs/motion_dit.py:size=tiny", data__path=data_dir, data__window=10,
        data__context=2, data__batch_size=8, model__layers=1, model__width=32,
        model__heads=2, model__audio_encoder__hidden=32, model__audio_encoder__layers=0,
        diffusion__sample_steps=3, **overrides)


@pytest.fixture(scope="module")
def stage2_data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("motion_eval_stage2"))
    testdata.make_dataset(d, identities=2, clips_per_identity=2, test_clips_per_identity=1,
                          seconds=1.2, size=16)
    return d


def test_untrained_motion_generator(stage2_data, tmp_path):
    """The real sampler (generate_batch path) with random weights: every number is there
    and finite; no training needed."""
    from flax import nnx

    from data_pipeline import stats as stats_lib
    from vasa_jax.models.motion_dit import MotionDiT
    from vasa_jax.motion_sampler import MotionGenerator

    config = _tiny_stage2_config(stage2_data)
    norm = stats_lib.Normalization.from_data(stage2_data, "labels", "mel")
    model = MotionDiT(config.model, norm.motion_dim, norm.audio_dim, rngs=nnx.Rngs(0))
    gen = MotionGenerator(config, model, norm, step=0)
    settings = ev.Settings(num_clips=1, seeds=2, control_clips=1, gaze_targets=((15.0, 0.0),),
                           distance_quantiles=(0.5,), progress=False)
    r = ev.evaluate("", None, settings, generator=gen, json_path=str(tmp_path / "r.json"))
    assert r["data"] == os.path.abspath(stage2_data)  # from the config's data.path
    assert r["num_clips"] == 1 and r["num_frames"] == 30 and r["step"] == 0
    assert r["guidance"]["gaze"] == 1.0 and r["guidance"]["distance"] == 0.0
    for value in (r["lip_sync"]["r"], r["pose_dp"]["generated"], r["pose_dp"]["ratio"],
                  r["gaze_control"]["default"]["mean"], r["gaze_control"]["compared"]["mean"],
                  r["distance_control"]["default"]["mean"],
                  r["distance_control"]["compared"]["mean"], r["diversity"]["motion"]):
        assert value is not None and np.isfinite(value)
    assert -1.0 <= r["lip_sync"]["r"] <= 1.0
    # Labels as motion: the probes are exact, so the probe floor is ~0.
    assert r["probes"]["r2"]["mouth_open"]["r2_mean"] > 0.999
    assert r["gaze_control"]["probe_floor"] < 1e-3
    assert r["diversity"]["motion"] > 0  # different seeds, different samples
    assert LAST_LINE.match(ev.summary_lines(r)[-1])


@pytest.mark.slow
def test_train_then_cli(stage2_data, tmp_path):
    """Trains a tiny stage-2 model for 2 steps, then `python -m vasa_jax.evaluate motion`."""
    from vasa_jax.trainers import loop, motion_dit

    work = str(tmp_path / "run")
    config = _tiny_stage2_config(stage2_data, train__total_steps=2, train__log_every=1,
                                 train__checkpoint_every=0, train__async_checkpoints=False,
                                 optim__warmup_steps=1)
    motion_dit.train_and_evaluate(config, work, compiler_options=loop.FAST_CPU_COMPILE)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = evaluate_main(["motion", "--workdir", work, "--num_clips", "1", "--seeds", "2",
                              "--control_clips", "1", "--gaze_targets", "15,0",
                              "--distance_quantiles", "0.5", "--no_progress"])
    assert code == 0
    lines = out.getvalue().strip().splitlines()
    assert LAST_LINE.match(lines[-1]), lines[-1]
    assert lines[0].startswith("motion eval: step 2, 1 test clips (30 frames)")
    for prefix in ("lip-sync (probe", "dP (deg/frame)", "E_g (deg): l_g = 1 (default)",
                   "E_d: l_d = 0 (default)", "diversity across 2 seeds", "json: "):
        assert any(line.startswith(prefix) for line in lines), (prefix, lines)
    path = os.path.join(work, "eval", "motion_test_step00000002.json")
    saved = json.load(open(path))
    assert saved["step"] == 2 and saved["data"] == os.path.abspath(stage2_data)
    assert f"{saved['lip_sync']['r']:.3f}" == lines[-1].split()[-1]
    assert np.isfinite(saved["pose_dp"]["generated"])
    assert np.isfinite(saved["gaze_control"]["compared"]["mean"])


# ----------------------------------------------------------------------------- end to end


FACE_SIZE = 64  # the tiny stage-1 model's image size
# A tiny expression meter (tests/test_expression_meter.py's recipe), trained a few steps:
# only the plumbing is checked, not how well it reads mouths.
METER_RECIPE = dict(model__image_size=32, model__channels=(8, 8, 8, 8), model__hidden=8,
                    data__batch_size=8, optim__lr=1e-2, optim__warmup_steps=1,
                    data__num_workers=0, train__log_every=3, train__total_steps=3)


@pytest.fixture(scope="module")
def latents_run(tmp_path_factory):
    """(latents dataset, stage-1 workdir, meter export, untrained stage-2 generator on the
    latents): a filled-in step-2 stage-1 checkpoint (as test_extract_latents.py), its
    `extract_latents` output (dataset.json records the run), a meter trained 3 steps."""
    from flax import nnx

    import configs
    from data_pipeline import extract_latents as X
    from data_pipeline import stats as stats_lib
    from tests.test_extract_latents import _make_workdir
    from vasa_jax.models.motion_dit import MotionDiT
    from vasa_jax.motion_sampler import MotionGenerator
    from vasa_jax.trainers import expression_meter as meter_trainer

    root = tmp_path_factory.mktemp("motion_e2e")
    data, face, latents, meter = (str(root / n) for n in ("data", "face", "latents", "meter"))
    testdata.make_dataset(data, identities=2, clips_per_identity=2, test_clips_per_identity=1,
                          seconds=0.8, size=FACE_SIZE)  # 20 frames a clip
    _make_workdir(face, data)
    X.extract(face, data, latents, X.Settings(batch_size=8, read_threads=1, progress=False,
                                              fast_cpu_compile=True))
    meter_config = configs.load("configs/expression_meter.py:size=tiny", data__path=data,
                                **METER_RECIPE)
    assert meter_trainer.train_and_evaluate(meter_config, meter).step == 3
    config = _tiny_stage2_config(latents, data__motion_source="features:motion",
                                 data__audio_source="features:audio")
    norm = stats_lib.Normalization.from_data(latents, "features:motion", "features:audio")
    model = MotionDiT(config.model, norm.motion_dim, norm.audio_dim, rngs=nnx.Rngs(0))
    return latents, face, meter, MotionGenerator(config, model, norm, step=0)


def test_end_to_end_lip_sync(latents_run, tmp_path):
    latents, face, meter, gen = latents_run
    base = dict(num_clips=2, seeds=1, control_clips=1, gaze_targets=(), distance_quantiles=(),
                progress=False)
    # No flags: nothing changes.
    plain = ev.evaluate("", latents, ev.Settings(**base), generator=gen, json_path="")
    assert not {"end_to_end_r", "end_to_end_r_real", "end_to_end"} & set(plain["lip_sync"])
    assert not any(line.startswith("end-to-end") for line in ev.summary_lines(plain))

    # --expression_meter alone: the stage-1 run is the one the latents dataset records.
    settings = ev.Settings(**base, expression_meter=meter, decode_batch_size=8,
                           fast_cpu_compile=True)
    out = str(tmp_path / "r.json")
    r = ev.evaluate("", latents, settings, generator=gen, json_path=out)
    lip = r["lip_sync"]
    e2e = lip["end_to_end"]
    assert e2e["face_workdir"] == os.path.abspath(face) and e2e["face_step"] == 2
    assert e2e["face_weights"] == "ema" and e2e["image_size"] == FACE_SIZE
    assert e2e["expression_meter"] == os.path.abspath(meter)
    assert e2e["num_frames"] == lip["num_frames"] == r["num_frames"] == 2 * 20
    for key in ("end_to_end_r", "end_to_end_r_real"):
        value = lip[key]
        if value is None:
            assert e2e["none_reason"][key], e2e
        else:
            assert np.isfinite(value) and -1.0 <= value <= 1.0, (key, value)
    assert e2e["per_clip_mean_r"] is None or -1.0 <= e2e["per_clip_mean_r"] <= 1.0
    saved = json.load(open(out))
    assert set(saved["lip_sync"]) >= {"end_to_end_r", "end_to_end_r_real", "end_to_end"}
    lines = ev.summary_lines(r)
    assert LAST_LINE.match(lines[-1]), lines[-1]
    assert any(line.startswith("end-to-end lip-sync (") for line in lines[:-1]), lines

    # Errors: one line, exit 1, before any restore (the stage-2 workdir does not exist).
    def cli(*flags):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = evaluate_main(["motion", "--workdir", str(tmp_path / "no_run"),
                                  "--no_progress", *flags])
        return code, err.getvalue()

    oracle_data = str(tmp_path / "plain")  # not made by extract_latents: records no run
    testdata.make_dataset(oracle_data, identities=1, clips_per_identity=1,
                          test_clips_per_identity=1, seconds=0.2, size=16)
    for flags, message in (
            (["--data", oracle_data, "--expression_meter", meter], "pass --face_workdir"),
            (["--data", latents, "--expression_meter", str(tmp_path / "no_meter")], "no_meter"),
            (["--data", latents, "--expression_meter", meter, "--face_workdir",
              str(tmp_path / "no_face")], "no_face")):
        code, err = cli(*flags)
        assert code == 1 and err.startswith("error: ") and message in err, (flags, err)
        assert len(err.strip().splitlines()) == 1, err
    with pytest.raises(ValueError, match="--expression_meter"):
        ev.Settings(face_workdir=face)
