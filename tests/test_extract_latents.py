"""python -m data_pipeline.extract_latents: stage-1 motion latents + audio features per clip.

The stage-1 checkpoint is laid out exactly as the trainer writes it (its TrainState, saved by
the loop's Checkpointer with the run config) with filled-in weights, so no train step is
compiled (as in test_evaluate_face_latent.py).
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import configs
from configs.common import data_stage2
from data_pipeline import extract_latents as X
from data_pipeline import loaders, schema
from data_pipeline import transforms as T
from tests import testdata
from vasa_jax import checkpointing
from vasa_jax.audio import log_mel_frames
from vasa_jax.inference import restore_face
from vasa_jax.parallel import sharding
from vasa_jax.parallel.mesh import create_mesh
from vasa_jax.trainers.loop import FAST_CPU_COMPILE

SIZE = 64  # the tiny stage-1 model's image size
SECONDS = (0.8, 0.48, 0.64)  # 20, 12, 16 frames: batches span clip boundaries
FLAGS = ["--batch_size", "8", "--clips_per_shard", "3", "--no_progress", "--fast_cpu_compile"]
NUM_CORRUPT = 3


def _make_workdir(workdir, data):
    from vasa_jax.trainers.face_latent import TrainState

    config = configs.load("configs/face_latent.py:size=tiny", data__path=data,
                          train__total_steps=2)
    mesh = create_mesh(config.mesh.axes, devices=jax.devices()[:1])  # fast orbax save
    graphdef, abstract, _ = sharding.abstract_state(lambda: TrainState(config), mesh,
                                                    config.mesh.rules)
    state = nnx.state(nnx.merge(graphdef, testdata.filled_state(abstract)))
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, checkpointing.CHECKPOINT_DIR))
    ckpt.save(2, state, config=config, force=True)
    ckpt.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, data dir, clips): 3 identities x (2 train + 1 test) clips of 12-20 frames
    plus 3 unusable train records, and a step-2 stage-1 checkpoint."""
    root = tmp_path_factory.mktemp("extract")
    data = str(root / "data")
    base = testdata.make_clip("x", 0, num_frames=10, size=SIZE)
    corrupt = [testdata.GARBAGE_RECORD, testdata.bad_frame_record(base),
               testdata.inconsistent_record(base)]
    clips = testdata.make_dataset(data, identities=3, clips_per_identity=2,
                                  test_clips_per_identity=1, seconds=SECONDS, size=SIZE,
                                  extra_records=corrupt)
    workdir = str(root / "run")
    _make_workdir(workdir, data)
    return workdir, data, clips


def _extract(run, out, *extra):
    workdir, data, _ = run
    return X.main(["--face_workdir", workdir, "--data", data, "--out", out, *FLAGS, *extra])


@pytest.fixture(scope="module")
def extracted(run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("extract_out") / "d2")
    assert _extract(run, out) == 0
    return out


@pytest.fixture(scope="module")
def restored(run):
    return restore_face(run[0])


def _read_split(directory, split):
    return [schema.decode_clip(r) for r in schema.read_records(schema.list_shards(directory,
                                                                                  split))]


def _input_clips(data, split):
    """The usable clips of an input split, in record order (shards concatenated)."""
    out = []
    for record in schema.read_records(schema.list_shards(data, split)):
        try:
            clip = schema.decode_clip(record)
            clip.decode_frames()
            out.append(clip)
        except schema.CorruptRecordError:
            pass
    return out


def _files(directory):
    """{relative path: bytes} of the dataset files (not the .extract_latents state)."""
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in sorted(os.listdir(directory))
            if os.path.isfile(os.path.join(directory, name))}


def test_every_clip_gets_motion_and_audio_features(run, extracted, restored, capsys):
    _, data, clips = run
    dyn_dim = restored.config.model.motion.dyn_dim
    info = schema.DatasetInfo.load(extracted)
    assert info.features == {"motion": [7 + dyn_dim], "audio": [320]}
    assert info.clips == {"train": 6, "test": 3} and info.labels == sorted(schema.LABELS)
    meta = info.extra["extract_latents"]
    assert meta["face_workdir"] == os.path.abspath(run[0]) and meta["step"] == 2
    assert meta["weights"] == "ema" and meta["audio"] == {"frontend": "mel", "n_mels": 80}
    assert meta["motion_dim_names"][:8] == ["yaw", "pitch", "roll", "tx", "ty", "tz", "scale",
                                            "dyn0"]
    assert len(meta["motion_dim_names"]) == 7 + dyn_dim
    assert meta["skipped_records"] == {"train": NUM_CORRUPT, "test": 0}
    # 9 train records in shards of 3, 3 test records in one.
    assert [os.path.basename(p) for p in schema.list_shards(extracted)] == [
        "test-00000-of-00001.array_record", "train-00000-of-00003.array_record",
        "train-00001-of-00003.array_record", "train-00002-of-00003.array_record"]

    for split in schema.SPLITS:
        want = _input_clips(data, split)
        assert sorted(c.clip_id for c in want) == sorted(c.clip_id for c in clips
                                                         if c.split == split)
        got = _read_split(extracted, split)
        assert [c.clip_id for c in got] == [c.clip_id for c in want]  # input order
        for g, w in zip(got, want):
            t = w.num_frames
            assert g.identity_id == w.identity_id and g.split == split
            assert g.frames == w.frames and g.attrs == w.attrs
            np.testing.assert_array_equal(g.audio, w.audio)
            assert g.labels.keys() == w.labels.keys()
            for k in w.labels:
                np.testing.assert_array_equal(g.labels[k], w.labels[k])
            assert g.features["motion"].shape == (t, 7 + dyn_dim)
            assert g.features["motion"].dtype == np.float32
            assert np.all(np.isfinite(g.features["motion"]))
            np.testing.assert_allclose(
                g.features["audio"], log_mel_frames(g.audio, g.sample_rate, g.fps, 80,
                                                    num_frames=t), atol=1e-5)
        # The sidecar index matches the records (the loaders read it).
        index = loaders.load_clip_index(extracted, split)
        assert index.num_frames.tolist() == [c.num_frames for c in want]
        assert index.identity_id.tolist() == [c.identity_id for c in want]


def test_motion_is_the_models_encode_motion(run, extracted, restored):
    """A clip whose frames were split over two device batches, recomputed in one call."""
    clip = _read_split(extracted, "train")[1]  # frames 20..31 of the first shard's stream
    graphdef, state = nnx.split(restored.model)
    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_motion(x),
                     compiler_options=FAST_CPU_COMPILE)
    z_pose, z_dyn = encode(state, T.to_signed_float(clip.decode_frames()))
    want = np.concatenate([np.asarray(z_pose), np.asarray(z_dyn)], axis=1)
    np.testing.assert_allclose(clip.features["motion"], want, atol=2e-5, rtol=1e-4)
    # Not a constant: the frames differ, so do the latents.
    assert np.std(want[:, 7:], axis=0).max() > 1e-4


def test_stats_are_those_of_the_train_frames(extracted):
    with open(os.path.join(extracted, X.STATS_FILE)) as f:
        stats = json.load(f)
    assert set(stats) == {"features:motion", "features:audio", "labels", "label:gaze",
                          "label:distance"}
    train = _read_split(extracted, "train")
    rows = {"features:motion": np.concatenate([c.features["motion"] for c in train]),
            "features:audio": np.concatenate([c.features["audio"] for c in train]),
            "labels": np.concatenate([T.motion_from_labels(c.labels) for c in train]),
            "label:gaze": np.concatenate([c.labels["gaze"] for c in train]),
            "label:distance": np.concatenate([c.labels["distance"] for c in train])[:, None]}
    assert rows["labels"].shape[1] == T.MOTION_LABEL_DIM
    for key, x in rows.items():
        x = x.astype(np.float64)
        assert set(stats[key]) == {"mean", "std", "count"}
        assert stats[key]["count"] == len(x) == sum(c.num_frames for c in train)
        np.testing.assert_allclose(stats[key]["mean"], x.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(stats[key]["std"], x.std(0), rtol=1e-9, atol=1e-12)


def test_stats_module_reads_them_without_scanning(extracted, monkeypatch):
    stats = pytest.importorskip("data_pipeline.stats")
    with open(os.path.join(extracted, X.STATS_FILE)) as f:
        stored = json.load(f)

    def no_scan(*args, **kwargs):
        raise AssertionError("stats.json should have had every source")

    monkeypatch.setattr(stats, "_scan", no_scan)
    got = stats.load_or_compute(extracted, {"features:motion": "motion",
                                            "features:audio": "audio", "labels": "motion",
                                            "label:gaze": "control",
                                            "label:distance": "control"})
    for source, (mean, std) in got.items():
        np.testing.assert_allclose(mean, stored[source]["mean"], rtol=1e-6)
        np.testing.assert_allclose(std, np.maximum(stored[source]["std"], stats.STD_FLOOR),
                                   rtol=1e-6)


def test_running_stats_merge_matches_numpy():
    rng = np.random.default_rng(0)
    parts = [rng.normal(5.0, 3.0, (n, 4)) for n in (1, 7, 0, 30)]
    acc = X.RunningStats()
    for p in parts:
        acc.add(p)
    other = X.RunningStats.from_json(json.loads(json.dumps(acc.to_json())))
    x = np.concatenate(parts)
    for s in (acc, other):
        res = s.result()
        assert res["count"] == 38
        np.testing.assert_allclose(res["mean"], x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(res["std"], x.std(0), rtol=1e-12)
    assert X.RunningStats.from_json(None).count == 0


class _FakeEncoder:
    """Rows = the first pixel of each frame, so the stream's bookkeeping can be checked."""

    batch_size = 4

    def __init__(self):
        self.calls = []

    def __call__(self, frames):
        self.calls.append(len(frames))
        return frames[:, 0, 0, :1].astype(np.float32)


def test_row_stream_keeps_clip_order_across_batches():
    enc = _FakeEncoder()
    stream = X._RowStream(enc)
    lengths = [3, 6, 1, 2, 5]
    out = []
    start = 0
    for i, t in enumerate(lengths):
        frames = np.zeros((t, 2, 2, 3), np.uint8)
        frames[:, 0, 0, 0] = np.arange(start, start + t)
        start += t
        out += stream.add(i, frames)
    out += stream.finish()
    assert [i for i, _ in out] == list(range(len(lengths)))
    bounds = np.cumsum([0] + lengths)
    for i, rows in out:
        np.testing.assert_array_equal(rows[:, 0], np.arange(bounds[i], bounds[i + 1]))
    assert enc.calls == [8, 4, 4, 1]  # whole batches as soon as they fill, then the rest


def test_stage2_loader_reads_the_output(extracted):
    cfg = data_stage2("tiny")
    cfg.path = extracted
    cfg.batch_size = 4
    cfg.window = 10
    cfg.context = 2
    cfg.motion_source = "features:motion"
    cfg.audio_source = "features:audio"
    batch = next(iter(loaders.stage2_dataset(cfg, num_epochs=1)))
    dm = schema.DatasetInfo.load(extracted).features["motion"][0]
    assert batch["motion"].shape == (4, 10, dm) and batch["audio"].shape == (4, 10, 320)
    assert batch["motion_pre"].shape == (4, 2, dm) and batch["gaze"].shape == (4, 2)
    assert batch["has_gaze"].all() and batch["has_distance"].all() and batch["has_emotion"].all()
    assert int(batch["num_skipped"].sum()) == 0
    # The stored audio features are what the loader computes itself with audio_source="mel".
    clip = _read_split(extracted, "test")[0]
    stored = list(loaders.iterate_windows(clip, 10, 2, motion_source="features:motion",
                                          audio_source="features:audio"))
    mel = list(loaders.iterate_windows(clip, 10, 2, motion_source="features:motion",
                                       audio_source="mel"))
    for a, b in zip(stored, mel):
        np.testing.assert_allclose(a["audio"], b["audio"], atol=1e-5)
        np.testing.assert_array_equal(a["motion"][a["valid"]],
                                      clip.features["motion"][a["start"]:a["start"] + 10])


class _Interrupt(Exception):
    pass


def test_resume_after_interruptions_gives_identical_output(run, extracted, restored, tmp_path,
                                                           monkeypatch):
    workdir, data, _ = run
    out = str(tmp_path / "d2")
    settings = X.Settings(batch_size=8, clips_per_shard=3, progress=False,
                          fast_cpu_compile=True)

    # 1: killed after the first finished shard.
    def stop(split, k):
        raise _Interrupt(f"{split} {k}")

    with pytest.raises(_Interrupt, match="train 0"):
        X.extract(workdir, data, out, settings, restored=restored, on_shard_done=stop)
    assert not os.path.exists(os.path.join(out, schema.DATASET_INFO))  # not done yet

    # 2: killed in the middle of a shard (its first record written to tmp/): input records
    # (round-robin over 2 input shards) 3-5 are garbage, inconsistent, usable; 6-8 usable,
    # usable, bad frame. So the 3rd clip written is the 2nd of output shard 2.
    records = schema.read_records(schema.list_shards(data, "train"))
    usable = []
    for i in range(len(records)):
        try:
            schema.decode_clip(records[i]).decode_frames()
            usable.append(i)
        except schema.CorruptRecordError:
            pass
    assert usable == [0, 1, 2, 5, 6, 7]
    real_encode = schema.encode_clip
    calls = []

    def failing_encode(clip):
        calls.append(clip.clip_id)
        if len(calls) == 3:
            raise _Interrupt("mid-shard")
        return real_encode(clip)

    monkeypatch.setattr(schema, "encode_clip", failing_encode)
    with pytest.raises(_Interrupt, match="mid-shard"):
        X.extract(workdir, data, out, settings, restored=restored)
    monkeypatch.setattr(schema, "encode_clip", real_encode)
    assert os.listdir(os.path.join(out, X.STATE_DIR, "tmp"))  # the partial shard
    # The second run skipped the done shard 0 (records 0-2).
    assert calls[0] == schema.decode_clip(records[5]).clip_id

    # 3: the same command finishes the job.
    summary = X.extract(workdir, data, out, settings, restored=restored)
    assert summary["splits"]["train"]["resumed_shards"] == 2
    assert summary["splits"]["test"]["resumed_shards"] == 0
    assert summary["splits"]["train"]["skipped"] == NUM_CORRUPT
    assert not os.path.exists(os.path.join(out, X.STATE_DIR, "tmp"))
    assert _files(out) == _files(extracted)  # byte-identical shards, sidecars, json

    # 4: re-running a finished extraction redoes nothing and changes nothing.
    summary = X.extract(workdir, data, out, settings, restored=restored)
    assert summary["splits"]["train"]["resumed_shards"] == 3
    assert "3 shards (3 already done)" in "\n".join(X.summary_lines(summary))
    assert _files(out) == _files(extracted)


def test_mismatched_output_is_an_error_unless_overwrite(run, restored, tmp_path):
    workdir, _, _ = run
    data = str(tmp_path / "small")
    testdata.make_dataset(data, identities=2, clips_per_identity=1, seconds=0.4, size=SIZE,
                          labels=["gaze"])
    out = str(tmp_path / "out")
    settings = X.Settings(batch_size=8, progress=False, fast_cpu_compile=True)
    X.extract(workdir, data, out, settings, restored=restored)
    with open(os.path.join(out, X.STATS_FILE)) as f:  # only the labels the clips have
        assert set(json.load(f)) == {"features:motion", "features:audio", "label:gaze"}
    other = dataclasses.replace(settings, n_mels=40)
    with pytest.raises(ValueError, match=r"other settings \(audio: .*n_mels.*--overwrite"):
        X.extract(workdir, data, out, other, restored=restored)
    assert schema.DatasetInfo.load(out).features["audio"] == [320]  # untouched
    X.extract(workdir, data, out, dataclasses.replace(other, overwrite=True), restored=restored)
    assert schema.DatasetInfo.load(out).features["audio"] == [160]
    assert _read_split(out, "train")[0].features["audio"].shape == (10, 160)
    with open(os.path.join(out, X.STATS_FILE)) as f:
        assert len(json.load(f)["features:audio"]["mean"]) == 160
    # A folder holding some other dataset is not overwritten by accident.
    with pytest.raises(ValueError, match="did not make"):
        X.extract(workdir, data, run[1], settings, restored=restored)


def test_clear_errors(run, tmp_path, capsys):
    workdir, data, _ = run
    out = str(tmp_path / "out")

    def error(*args):
        code = X.main(FLAGS + list(args))
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        return code, err

    code, err = error("--face_workdir", str(tmp_path / "nope"), "--data", data, "--out", out)
    assert code == 1 and "does not exist" in err
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    code, err = error("--face_workdir", str(empty), "--data", data, "--out", out)
    assert code == 1 and "no finished checkpoint" in err
    code, err = error("--face_workdir", workdir, "--data", str(tmp_path / "nodata"),
                      "--out", out)
    assert code == 1 and "dataset folder" in err
    code, err = error("--face_workdir", workdir, "--data", data, "--out", data)
    assert code == 1 and "must differ" in err
    small = str(tmp_path / "small32")
    testdata.make_dataset(small, identities=2, clips_per_identity=1, seconds=0.4, size=32)
    code, err = error("--face_workdir", workdir, "--data", small, "--out", out)
    assert code == 1 and "smaller than the stage-1 model's 64x64" in err
    code, err = error("--face_workdir", workdir, "--data", data, "--out", out, "--audio",
                      "wav2vec2")
    assert code == 2 and "--wav2vec2_path" in err
    code, err = error("--face_workdir", workdir, "--data", data, "--out", out, "--batch_size",
                      "0")
    assert code == 2 and "batch_size" in err
    code, err = error("--face_workdir", workdir, "--data", data, "--out", out, "--audio",
                      "wav2vec2", "--wav2vec2_path", str(tmp_path / "no_w2v"))
    assert code == 1 and "Wav2Vec2 folder not found" in err
    assert X.main(["--data", data]) == 2  # argparse: missing required flags
    assert "required" in capsys.readouterr().err
    assert not os.path.exists(out) or not os.listdir(out)


@pytest.mark.slow  # ~20 s: torch, a tiny Wav2Vec2 and its compiles
def test_wav2vec2_audio_features(run, restored, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from vasa_jax.audio import Wav2Vec2Features

    torch.manual_seed(0)
    w2v_dir = str(tmp_path / "w2v")
    transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    )).eval().save_pretrained(w2v_dir)
    data = str(tmp_path / "data")
    testdata.make_dataset(data, identities=2, clips_per_identity=1, test_clips_per_identity=1,
                          seconds=0.4, size=SIZE)
    out = str(tmp_path / "out")
    settings = X.Settings(audio="wav2vec2", wav2vec2_path=w2v_dir, batch_size=8,
                          progress=False, fast_cpu_compile=True)
    summary = X.extract(run[0], data, out, settings, restored=restored)
    assert summary["audio"] == "wav2vec2" and summary["audio_dim"] == 32
    info = schema.DatasetInfo.load(out)
    assert info.features["audio"] == [32]
    assert info.extra["extract_latents"]["audio"] == {
        "frontend": "wav2vec2", "wav2vec2_path": w2v_dir, "wav2vec2_layer": 2}
    reference = Wav2Vec2Features(w2v_dir)
    for split in schema.SPLITS:
        for clip in _read_split(out, split):
            np.testing.assert_allclose(clip.features["audio"],
                                       reference(clip.audio, num_frames=clip.num_frames),
                                       atol=1e-5)
    with open(os.path.join(out, X.STATS_FILE)) as f:
        assert len(json.load(f)["features:audio"]["std"]) == 32
