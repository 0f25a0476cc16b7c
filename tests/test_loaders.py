"""grain loaders (data_pipeline.loaders) and their per-sample ops (data_pipeline.transforms)."""

import grain
import numpy as np
import pytest

from configs.common import data_stage1, data_stage2
from data_pipeline import loaders, schema
from data_pipeline import transforms as T
from tests import testdata

W, K = 20, 5  # stage-2 window / context used here (clips are 50 frames)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("clips"))
    testdata.make_dataset(d, identities=4, clips_per_identity=2, seconds=2.0, size=32,
                          features={"motion": 6, "w2v": 5})
    return d


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory):
    """8 good clips + 3 bad records: garbage bytes, an undecodable frame, bad lengths."""
    d = str(tmp_path_factory.mktemp("corrupt"))
    donor = testdata.make_clip("donor", 0, num_frames=50, size=32)
    testdata.make_dataset(d, identities=4, clips_per_identity=2, size=32, extra_records=[
        testdata.GARBAGE_RECORD, testdata.bad_frame_record(donor),
        testdata.inconsistent_record(donor)])
    return d


def read_all(directory, split="train"):
    """Record index -> Clip (None for records that do not decode)."""
    src = grain.sources.ArrayRecordDataSource(schema.list_shards(directory, split))
    out = {}
    for i in range(len(src)):
        try:
            out[i] = schema.decode_clip(src[i])
        except schema.CorruptRecordError:
            out[i] = None
    return out


def stage1_cfg(path, **kw):
    cfg = data_stage1("tiny")
    cfg.path, cfg.image_size, cfg.batch_size, cfg.num_workers = path, 32, 4, 0
    for k in cfg.aug:
        cfg.aug[k] = 0.0
    cfg.update(kw)
    return cfg


def stage2_cfg(path, **kw):
    cfg = data_stage2("tiny")
    cfg.path, cfg.batch_size, cfg.num_workers, cfg.window, cfg.context = path, 4, 0, W, K
    cfg.update(kw)
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def flatten(tree, prefix=""):
    """Nested dict -> {"a/b": array}."""
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
    return out


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        fx, fy = flatten(x), flatten(y)
        assert sorted(fx) == sorted(fy)
        for key in fx:
            np.testing.assert_array_equal(fx[key], fy[key], err_msg=key)


# ----------------------------------------------------------------------------- stage 1


def test_stage1_batches_are_the_right_frames(data_dir):
    clips = read_all(data_dir)
    it = iter(loaders.stage1_dataset(stage1_cfg(data_dir), num_epochs=1))
    batches = list(it)
    assert len(batches) == 2  # 8 clips, batch 4
    seen = []
    for b in batches:
        assert b["source"].shape == b["driving"].shape == b["cross"].shape == (4, 32, 32, 3)
        assert b["source"].dtype == np.float32
        assert b["source"].min() >= -1.0 and b["source"].max() <= 1.0
        np.testing.assert_array_equal(b["num_skipped"], 0)
        for k in range(4):
            clip = clips[int(b["clip_index"][k])]
            other = clips[int(b["cross_clip_index"][k])]
            i, j, f = b["frame_index"][k]
            assert i != j
            assert b["identity"][k] == clip.identity_id
            assert b["cross_identity"][k] == other.identity_id != clip.identity_id
            for role, c, t in (("source", clip, i), ("driving", clip, j), ("cross", other, f)):
                # No augmentation and no resize: exactly the decoded frames and their labels.
                want = T.to_signed_float(c.decode_frames([t])[0])
                np.testing.assert_array_equal(b[role][k], want)
                assert sorted(b["labels"][role]) == sorted(c.labels)
                for name, value in b["labels"][role].items():
                    np.testing.assert_array_equal(value[k], c.labels[name][t])
            seen.append(int(b["clip_index"][k]))
        # No augmentation: every frame's jitter is the identity geometry.
        np.testing.assert_array_equal(b["jitter"], np.tile([1.0, 0.0, 0.0], (4, 3, 1)))
    assert sorted(seen) == list(range(8))  # one epoch = every clip once


def test_stage1_contrast_pairs_draw_driving_frames_whose_state_differs(data_dir):
    """data.contrast_pairs: driving frames where the label differs from the source's (a
    blink, ~8% of testdata's frames) come far more often than in uniform pairs."""
    clips = read_all(data_dir)

    def blink_changes(contrast, steps=20):
        cfg = stage1_cfg(data_dir, contrast_pairs=contrast, contrast_labels=("blink",))
        changed = []
        for b in take(iter(loaders.stage1_dataset(cfg)), steps):
            for k in range(4):
                i, j, _ = b["frame_index"][k]
                assert i != j
                blink = clips[int(b["clip_index"][k])].labels["blink"]
                changed.append(abs(float(blink[j]) - float(blink[i])) > 0.25)
        return np.mean(changed)

    uniform, contrast = blink_changes(0.0), blink_changes(1.0)
    assert uniform < 0.3
    assert contrast > 0.9
    # Off by default, and off is the uniform sampler exactly (same frames as before).
    assert data_stage1("tiny").contrast_pairs == 0.0
    cfg = stage1_cfg(data_dir)
    assert_batches_equal(take(iter(loaders.stage1_dataset(cfg)), 1),
                         take(iter(loaders.stage1_dataset(stage1_cfg(data_dir))), 1))
    with pytest.raises(ValueError, match="contrast_pairs"):
        loaders.stage1_dataset(stage1_cfg(data_dir, contrast_pairs=0.5,
                                          contrast_labels=("no_such_label",)))


def test_stage1_resize_augment_and_determinism(data_dir):
    aug = dict(scale=0.1, shift=0.05, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05)
    cfg = stage1_cfg(data_dir, image_size=16)
    cfg.aug.update(aug)
    b1 = take(iter(loaders.stage1_dataset(cfg)), 2)
    b2 = take(iter(loaders.stage1_dataset(cfg)), 2)
    assert b1[0]["source"].shape == (4, 16, 16, 3)
    assert np.abs(b1[0]["source"]).max() <= 1.0
    assert_batches_equal(b1, b2)  # same seed, same data
    cfg.seed = 1
    b3 = take(iter(loaders.stage1_dataset(cfg)), 1)
    assert not np.array_equal(b1[0]["source"], b3[0]["source"])
    # Augmented images differ from the plain resized frames.
    plain = take(iter(loaders.stage1_dataset(stage1_cfg(data_dir, image_size=16))), 1)[0]
    np.testing.assert_array_equal(plain["clip_index"], b1[0]["clip_index"])  # same order
    assert not np.allclose(plain["source"], b1[0]["source"], atol=0.05)
    # The geometry is reported per frame: source and driving share theirs, cross has its
    # own, all within the configured ranges.
    jit = b1[0]["jitter"]
    assert jit.shape == (4, 3, 3) and jit.dtype == np.float32
    np.testing.assert_array_equal(jit[:, 0], jit[:, 1])
    assert not np.allclose(jit[:, 0], jit[:, 2])
    assert np.all(np.abs(jit[..., 0] - 1) <= aug["scale"] + 1e-6)
    assert np.all(np.abs(jit[..., 1:]) <= aug["shift"] + 1e-6)


def test_stage1_source_and_driving_share_the_jitter(tmp_path):
    """Static clips (every frame identical): source == driving after augmentation."""
    rng = np.random.default_rng(0)
    clips = []
    for ident in range(3):
        img = rng.integers(0, 255, (24, 24, 3), np.uint8)
        frames = [schema.encode_frame(img, "png")] * 6
        clips.append(schema.Clip(f"static{ident}", ident, frames, np.zeros(3840, np.float32),
                                 frame_format="png", height=24, width=24))
    schema.write_clips(str(tmp_path), clips)
    schema.DatasetInfo("static", 24, 24, num_identities=3, clips={"train": 3}).save(str(tmp_path))
    cfg = stage1_cfg(str(tmp_path), image_size=24, batch_size=3)
    cfg.aug.update(scale=0.1, shift=0.1, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)
    b = next(iter(loaders.stage1_dataset(cfg)))
    np.testing.assert_array_equal(b["source"], b["driving"])
    assert b["labels"] == {"source": {}, "driving": {}, "cross": {}}
    for k in range(3):  # cross is jittered independently (and is another clip anyway)
        plain = T.to_signed_float(clips[int(b["identity"][k])].decode_frames([0])[0])
        assert not np.allclose(b["source"][k], plain, atol=0.02)


def test_stage1_errors(data_dir, tmp_path):
    with pytest.raises(ValueError, match="data.path is empty"):
        loaders.stage1_dataset(stage1_cfg(""))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loaders.stage1_dataset(stage1_cfg(str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        loaders.stage1_dataset(stage1_cfg(str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"no 'test' shards.*splits present: \['train'\]"):
        loaders.stage1_dataset(stage1_cfg(data_dir, split="test"))
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        loaders.stage1_dataset(stage1_cfg(data_dir), process_count=3)
    one = str(tmp_path / "one")
    testdata.make_dataset(one, identities=1, clips_per_identity=2, seconds=0.4, size=16)
    with pytest.raises(ValueError, match="at least 2 identities"):
        loaders.stage1_dataset(stage1_cfg(one))


# ----------------------------------------------------------------------------- both stages


def test_process_slices_are_disjoint_and_cover(data_dir):
    def clip_ids(cfg, index):
        ds = loaders.stage2_dataset(cfg, process_index=index, process_count=2, num_epochs=1)
        return [int(i) for b in ds for i in b["clip_index"]]

    cfg = stage2_cfg(data_dir, batch_size=2, audio_source="features:w2v")
    a, b = clip_ids(cfg, 0), clip_ids(cfg, 1)
    assert len(a) == len(b) == 4
    assert not set(a) & set(b)
    assert sorted(a + b) == list(range(8))


def test_iterator_state_resumes_exactly(data_dir):
    cfg = stage1_cfg(data_dir, image_size=16)
    cfg.aug.update(scale=0.05, brightness=0.1)
    it = iter(loaders.stage1_dataset(cfg))
    take(it, 3)  # crosses an epoch boundary (2 batches per epoch)
    state = it.get_state()
    expected = take(it, 3)
    fresh = iter(loaders.stage1_dataset(cfg))
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)


def test_iterator_state_resumes_exactly_with_workers(data_dir):
    cfg = stage1_cfg(data_dir, image_size=16, num_workers=2, batch_size=2)
    it = iter(loaders.stage1_dataset(cfg))
    take(it, 3)
    state = it.get_state()
    expected = take(it, 4)
    it.close()
    fresh = iter(loaders.stage1_dataset(cfg))
    fresh.set_state(state)
    got = take(fresh, 4)
    fresh.close()
    assert_batches_equal(got, expected)
    # Both workers contributed: all 8 clips show up within 4 batches of 2 after the resume.
    assert len({int(i) for b in got for i in b["clip_index"]}) >= 6


def test_clip_index_from_sidecars_or_scan(tmp_path):
    import os
    import shutil

    d = str(tmp_path / "d")
    clips = testdata.make_dataset(d, identities=3, clips_per_identity=2, seconds=[2.0, 0.4],
                                  size=16, num_shards=2, extra_records=[testdata.GARBAGE_RECORD])
    index = loaders.load_clip_index(d, "train")
    by_id = read_all(d)
    assert len(index) == 7 and len(index.paths) == 2
    for i, clip in by_id.items():
        if clip is None:
            assert (index.identity_id[i], index.num_frames[i]) == (-1, 0)
        else:
            assert index.identity_id[i] == clip.identity_id
            assert index.num_frames[i] == clip.num_frames
    # Without sidecars (datasets from other writers) the shards are scanned: same index.
    copy = str(tmp_path / "copy")
    shutil.copytree(d, copy)
    for p in schema.list_shards(copy, "train"):
        os.remove(schema.shard_index_path(p))
    scanned = loaders.load_clip_index(copy, "train")
    np.testing.assert_array_equal(scanned.identity_id, index.identity_id)
    np.testing.assert_array_equal(scanned.num_frames, index.num_frames)
    assert len(clips) == 6


# ----------------------------------------------------------------------------- corrupt data


def test_count_skipped_unit():
    ex = {"num_skipped": np.int32(0), "x": np.int32(1)}
    items = [ex, loaders.Skipped("a"), loaders.Skipped("b", 2), ex, ex, loaders.Skipped("c"), ex]
    ds = loaders._CountSkipped(grain.MapDataset.source(items).to_iter_dataset(), 100)
    assert [int(e["num_skipped"]) for e in ds] == [0, 3, 0, 1]
    ds = loaders._CountSkipped(grain.MapDataset.source([loaders.Skipped("x")] * 5 + [ex])
                               .to_iter_dataset(), 3)
    with pytest.raises(RuntimeError, match="4 unusable records in a row"):
        list(ds)


def test_corrupt_records_are_skipped_and_counted(corrupt_dir):
    clips = read_all(corrupt_dir)
    undecodable = {i for i, c in clips.items() if c is None}  # garbage, inconsistent
    bad_frame = {i for i, c in clips.items() if c is not None and c.clip_id.endswith("-badframe")}
    assert len(undecodable) == 2 and len(bad_frame) == 1 and len(clips) == 11

    it = iter(loaders.stage1_dataset(stage1_cfg(corrupt_dir, batch_size=1)))
    batches = take(it, 3 * 8)  # three epochs' worth of good clips
    used = {int(b["clip_index"][0]) for b in batches}
    assert not used & undecodable
    assert not {int(b["cross_clip_index"][0]) for b in batches} & undecodable
    assert used >= set(clips) - undecodable - bad_frame
    # Only the frames a sample needs are decoded: the bad-frame record (frame 1 broken) is
    # usable whenever frame 1 is not picked.
    for b in batches:
        i, j, f = b["frame_index"][0]
        if int(b["clip_index"][0]) in bad_frame:
            assert 1 not in (i, j)
        if int(b["cross_clip_index"][0]) in bad_frame:
            assert f != 1
    # All 3 bad records of the first two epochs come before the 3rd epoch's last good clip;
    # cross-identity picks that hit a bad record add to the count.
    assert sum(int(b["num_skipped"][0]) for b in batches) >= 2 * 3

    # Stage 2 reads no frames: the bad-frame record is usable there, the other two are not.
    batches = take(iter(loaders.stage2_dataset(stage2_cfg(corrupt_dir, batch_size=1))), 3 * 9)
    assert {int(b["clip_index"][0]) for b in batches} == set(clips) - undecodable
    assert 2 * 2 <= sum(int(b["num_skipped"][0]) for b in batches) <= 3 * 2


def test_consecutive_unusable_records_raise(tmp_path, monkeypatch):
    donor = testdata.make_clip("donor", 0, num_frames=50, size=16)
    with schema.ShardWriter(str(tmp_path), "train") as w:
        for _ in range(4):
            w.write(testdata.inconsistent_record(donor))
    schema.DatasetInfo("broken", 16, 16, labels=sorted(donor.labels)).save(str(tmp_path))
    monkeypatch.setattr(loaders, "MAX_CONSECUTIVE_SKIPS", 10)
    cfg = stage2_cfg(str(tmp_path), batch_size=1, motion_source="features:x",
                     audio_source="features:x")
    with pytest.raises(ValueError, match="dataset.json lists features"):
        loaders.stage2_dataset(cfg)
    with pytest.raises(RuntimeError, match="unusable records in a row"):
        next(iter(loaders.stage2_dataset(stage2_cfg(str(tmp_path), batch_size=1,
                                                    motion_source="labels"))))


# ----------------------------------------------------------------------------- stage 2


def test_stage2_windows_from_features(data_dir):
    clips = read_all(data_dir)
    cfg = stage2_cfg(data_dir, motion_source="features:motion", audio_source="features:w2v")
    batches = take(iter(loaders.stage2_dataset(cfg)), 6)
    b = batches[0]
    assert b["motion"].shape == (4, W, 6) and b["motion_pre"].shape == (4, K, 6)
    assert b["audio"].shape == (4, W, 5) and b["audio_pre"].shape == (4, K, 5)
    assert b["gaze"].shape == (4, 2) and b["distance"].shape == (4, 1)
    assert b["emotion"].shape == (4, len(schema.EMOTIONS))
    assert b["labels"]["mouth_open"].shape == (4, W)
    starts = np.concatenate([x["start"] for x in batches])
    assert set(starts) <= {0} | set(range(K, 50 - W + 1))
    assert len(set(starts)) > 3  # random starts
    for x in batches:
        for k in range(4):
            s, clip = int(x["start"][k]), clips[int(x["clip_index"][k])]
            # features[t, d] = t + 0.01 d: the rows are exactly frames [s, s + W).
            np.testing.assert_allclose(x["motion"][k], clip.features["motion"][s : s + W])
            np.testing.assert_allclose(x["audio"][k], clip.features["w2v"][s : s + W])
            assert bool(x["has_pre"][k]) == (s > 0)
            if s > 0:
                np.testing.assert_allclose(x["motion_pre"][k], clip.features["motion"][s - K : s])
                np.testing.assert_allclose(x["audio_pre"][k], clip.features["w2v"][s - K : s])
            else:
                assert not x["motion_pre"][k].any() and not x["audio_pre"][k].any()
            frames = slice(s, s + W)
            assert x["valid"][k].all()
            np.testing.assert_array_equal(x["labels"]["mouth_open"][k],
                                          clip.labels["mouth_open"][frames])
            np.testing.assert_allclose(x["gaze"][k], T.main_gaze(clip.labels["gaze"][frames]))
            np.testing.assert_allclose(x["distance"][k, 0], clip.labels["distance"][frames].mean(),
                                       rtol=1e-6)
            np.testing.assert_allclose(x["emotion"][k],
                                       clip.labels["emotion_probs"][frames].mean(0), rtol=1e-6)
            assert x["has_gaze"][k] and x["has_distance"][k] and x["has_emotion"][k]


def test_stage2_motion_labels_and_mel_audio(data_dir):
    from vasa_jax.audio import log_mel_frames

    clips = read_all(data_dir)
    cfg = stage2_cfg(data_dir)  # motion_source="labels", audio_source="mel"
    assert (cfg.motion_source, cfg.audio_source) == ("labels", "mel")
    batches = take(iter(loaders.stage2_dataset(cfg)), 3)
    assert batches[0]["motion"].shape == (4, W, loaders.MOTION_LABEL_DIM)
    assert loaders.MOTION_LABEL_DIM == len(loaders.MOTION_DIM_NAMES) == 13
    for x in batches:
        for k in range(4):
            s, clip = int(x["start"][k]), clips[int(x["clip_index"][k])]
            frames = slice(s, s + W)
            want = np.concatenate([clip.labels[n][frames].reshape(W, -1)
                                   for n in loaders.MOTION_LABELS], axis=1)
            np.testing.assert_array_equal(x["motion"][k], want)
            np.testing.assert_array_equal(x["motion"][k, :, 10], clip.labels["mouth_open"][frames])
            # Only the window's audio is analysed; it must equal the whole-clip features.
            full = log_mel_frames(clip.audio, clip.sample_rate, clip.fps, cfg.audio.n_mels,
                                  num_frames=clip.num_frames)
            np.testing.assert_allclose(x["audio"][k], full[frames], atol=1e-5)
            if s > 0:
                np.testing.assert_allclose(x["audio_pre"][k], full[s - K : s], atol=1e-5)


def test_stage2_short_clips_and_errors(tmp_path, data_dir):
    mixed = str(tmp_path / "mixed")
    testdata.make_dataset(mixed, identities=2, clips_per_identity=2, seconds=[2.0, 0.4], size=16)
    cfg = stage2_cfg(mixed, batch_size=1, audio_source="features:nope")
    with pytest.raises(ValueError, match="features"):
        loaders.stage2_dataset(cfg)
    cfg = stage2_cfg(mixed, batch_size=1)
    ids = {int(b["clip_index"][0]) for b in loaders.stage2_dataset(cfg, num_epochs=1)}
    long_ids = {i for i, c in read_all(mixed).items() if c.num_frames >= W}
    assert ids == long_ids and len(ids) == 2  # the 10-frame clips are left out
    with pytest.raises(ValueError, match="no clip .* has >= 60 frames"):
        loaders.stage2_dataset(stage2_cfg(mixed, window=60))
    with pytest.raises(ValueError, match="context .* must be <= data.window"):
        loaders.stage2_dataset(stage2_cfg(data_dir, window=4, context=8))
    unlabelled = str(tmp_path / "unlabelled")
    testdata.make_dataset(unlabelled, identities=2, clips_per_identity=1, size=16, labels=False,
                          features={"m": 3})
    with pytest.raises(ValueError, match="lacks .*pose"):
        loaders.stage2_dataset(stage2_cfg(unlabelled))
    # Without labels the controls are zero and flagged absent.
    b = next(iter(loaders.stage2_dataset(stage2_cfg(unlabelled, batch_size=2,
                                                    motion_source="features:m"))))
    assert not b["has_gaze"].any() and not b["has_distance"].any() and not b["has_emotion"].any()
    assert not b["gaze"].any() and not b["emotion"].any() and b["labels"] == {}


def test_iterate_windows_matches_inference_layout():
    clip = testdata.make_clip("c", 1, num_frames=47, size=16, features={"m": 2})
    windows = list(loaders.iterate_windows(clip, 20, 5, motion_source="features:m",
                                           audio_source="mel"))
    assert [int(w["start"]) for w in windows] == [0, 20, 40]
    assert [bool(w["has_pre"]) for w in windows] == [False, True, True]
    assert [int(w["valid"].sum()) for w in windows] == [20, 20, 7]
    for prev, cur in zip(windows, windows[1:]):
        np.testing.assert_array_equal(cur["motion_pre"], prev["motion"][-5:])
        np.testing.assert_array_equal(cur["audio_pre"], prev["audio"][-5:])
    last = windows[-1]
    np.testing.assert_array_equal(last["motion"][:7, 0], np.arange(40, 47))
    assert not last["motion"][7:].any() and not last["labels"]["pose"][7:].any()
    assert last["audio"].shape == (20, 320)
    with pytest.raises(ValueError, match="context <= window"):
        next(loaders.iterate_windows(clip, 4, 5, motion_source="features:m"))


# ----------------------------------------------------------------------------- transforms


def test_window_starts():
    np.testing.assert_array_equal(T.window_starts(30, 20, 5), [0, 5, 6, 7, 8, 9, 10])
    np.testing.assert_array_equal(T.window_starts(22, 20, 5), [0])
    np.testing.assert_array_equal(T.window_starts(19, 20, 5), [])
    np.testing.assert_array_equal(T.window_starts(22, 20, 0), [0, 1, 2])


def test_main_gaze_ignores_glances():
    rng = np.random.default_rng(0)
    gaze = np.tile([4.0, -7.0], (100, 1)) + rng.normal(0, 0.8, (100, 2))
    gaze[10:25] = [20.0, 15.0]  # a long glance: 15% of frames
    np.testing.assert_allclose(T.main_gaze(gaze), [4.0, -7.0], atol=0.5)
    assert np.abs(gaze.mean(0) - [4.0, -7.0]).max() > 2.0  # a plain mean would be off
    with pytest.raises(ValueError):
        T.main_gaze(np.zeros((0, 2)))


def test_motion_from_labels_order():
    labels = {n: np.full((3, *schema.LABELS[n]), float(i)) for i, n in enumerate(T.MOTION_LABELS)}
    m = T.motion_from_labels(labels)
    assert m.shape == (3, 13) and m.dtype == np.float32
    np.testing.assert_array_equal(m[0], [0] * 6 + [1] * 2 + [2, 3, 4, 5, 6])
    with pytest.raises(KeyError, match="blink"):
        T.motion_from_labels({k: v for k, v in labels.items() if k != "blink"})


def test_color_jitter_matches_step_by_step():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (8, 8, 3), np.uint8)
    b, c, s, h = 1.2, 0.8, 1.3, 0.1
    x = img.astype(np.float64) / 255
    luma = np.array([0.299, 0.587, 0.114])
    x = b * x
    x = c * x + (1 - c) * (x @ luma).mean()
    x = s * x + (1 - s) * (x @ luma)[..., None]
    yiq = x @ T._RGB_TO_YIQ.T
    a = 2 * np.pi * h
    i, q = yiq[..., 1].copy(), yiq[..., 2].copy()
    yiq[..., 1], yiq[..., 2] = np.cos(a) * i - np.sin(a) * q, np.sin(a) * i + np.cos(a) * q
    want = np.clip(yiq @ T._YIQ_TO_RGB.T, 0, 1) * 2 - 1
    # Applied on uint8: within half a quantisation step (1/255 on the [-1, 1] scale).
    np.testing.assert_allclose(T.jitter_color(img, b, c, s, h), want, atol=1.01 / 255)
    # Identity parameters: a plain conversion; grey stays grey under saturation and hue.
    np.testing.assert_allclose(T.jitter_color(img, 1, 1, 1, 0), T.to_signed_float(img))
    grey = np.full((2, 2, 3), 100, np.uint8)
    out = T.jitter_color(grey, 1.0, 1.0, 0.5, 0.3)
    np.testing.assert_allclose(out, T.to_signed_float(grey), atol=1.01 / 255)


def test_geometry_ops():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (20, 20, 3), np.uint8)
    assert T.jitter_geometry(img, 1.0, 0.0, 0.0) is img
    shifted = T.jitter_geometry(img, 1.0, 0.1, 0.0)  # 2 px right
    np.testing.assert_array_equal(shifted[:, 2:], img[:, :-2])
    assert T.resize_square(img, 20) is img
    assert T.resize_square(img, 8).shape == (8, 8, 3)
    wide = rng.integers(0, 256, (20, 30, 3), np.uint8)
    np.testing.assert_array_equal(T.resize_square(wide, 20), wide[:, 5:25])
    zoom, dx, dy = T.sample_geometry(rng, 0.1, 0.05)
    assert 0.9 <= zoom <= 1.1 and abs(dx) <= 0.05 and abs(dy) <= 0.05
    assert T.sample_geometry(rng, 0.0, 0.0) == (1.0, 0.0, 0.0)


def test_boxes_move_with_the_geometry_jitter():
    """A white square's box, jittered, still bounds the jittered square's pixels."""
    size, box = 40, np.array([0.25, 0.5, 0.5, 0.75], np.float32)  # x0, y0, x1, y1
    img = np.zeros((size, size, 3), np.uint8)
    img[20:30, 10:20] = 255
    for zoom, dx, dy in [(1.0, 0.1, 0.0), (1.1, -0.05, 0.05), (0.9, 0.0, -0.1)]:
        moved = T.jitter_geometry(img, zoom, dx, dy)
        ys, xs = np.nonzero(moved[..., 0] > 127)
        x0, y0, x1, y1 = T.jitter_boxes(box, zoom, dx, dy) * size
        assert x0 - 1 <= xs.min() and xs.max() + 1 <= x1 + 1, (zoom, dx, dy)
        assert y0 - 1 <= ys.min() and ys.max() + 1 <= y1 + 1, (zoom, dx, dy)
        assert abs(xs.min() - x0) <= 1.5 and abs(ys.max() + 1 - y1) <= 1.5
    np.testing.assert_allclose(T.jitter_boxes(np.array([[0.0, 0.0, 1.0, 1.0]]), 1.2, 0.1, 0),
                               [[0.0, 0.0, 1.0, 1.0]])  # clipped to the frame
