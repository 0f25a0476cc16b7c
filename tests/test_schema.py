"""The clip-record format (data_pipeline.schema) and the test-data builder (tests.testdata)."""

import json
import os

import msgpack
import numpy as np
import pytest

from data_pipeline import schema
from tests import testdata


@pytest.fixture(scope="module")
def clip():
    return testdata.make_clip("c0", 3, num_frames=30, size=24, features={"motion": 4})


def test_round_trip(clip):
    back = schema.decode_clip(schema.encode_clip(clip))
    for field in ("clip_id", "identity_id", "source", "split", "fps", "sample_rate",
                  "frame_format", "height", "width", "frames", "attrs"):
        assert getattr(back, field) == getattr(clip, field), field
    # int16 PCM: within half a quantisation step.
    assert back.audio.dtype == np.float32 and back.audio.shape == clip.audio.shape
    np.testing.assert_allclose(back.audio, clip.audio, atol=0.5 / 32767 + 1e-7)
    for name in ("labels", "features"):
        a, b = getattr(clip, name), getattr(back, name)
        assert sorted(a) == sorted(b)
        for k in a:
            assert b[k].dtype == a[k].dtype
            np.testing.assert_array_equal(b[k], a[k])
    assert back.decode_frames([0, 29]).shape == (2, 24, 24, 3)
    assert back.num_frames == 30 and back.seconds == pytest.approx(1.2)


def test_frames_png_lossless_jpeg_close():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3), np.uint8)
    np.testing.assert_array_equal(schema.decode_frame(schema.encode_frame(img, "png")), img)
    smooth = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    jpeg = schema.decode_frame(schema.encode_frame(smooth, "jpeg"))
    assert np.abs(jpeg.astype(int) - smooth).max() <= 4  # RGB order preserved
    with pytest.raises(schema.CorruptRecordError):
        schema.decode_frame(b"not an image")
    with pytest.raises(ValueError):
        schema.encode_frame(img.astype(np.float32))
    with pytest.raises(ValueError):
        schema.encode_frame(img, "gif")


def _repack(record: bytes, **changes) -> bytes:
    rec = msgpack.unpackb(record, raw=False)
    for k, v in changes.items():
        if v is None:
            del rec[k]
        else:
            rec[k] = v
    return msgpack.packb(rec, use_bin_type=True)


def test_corrupt_bytes_raise_corrupt_record_error(clip):
    good = schema.encode_clip(clip)
    bad = {
        "garbage": testdata.GARBAGE_RECORD,
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "not a map": msgpack.packb([1, 2, 3]),
        "wrong version": _repack(good, version=99),
        "missing frames": _repack(good, frames=None),
        "bad array": _repack(good, audio={"dtype": "<i2", "shape": [7], "data": b"\x00"}),
        "string identity": _repack(good, identity_id="three"),
    }
    for name, data in bad.items():
        with pytest.raises(schema.CorruptRecordError):
            schema.decode_clip(data)
            pytest.fail(name)


def test_inconsistent_clips_are_rejected(clip):
    def variant(**changes):
        return schema.Clip(**{**clip.__dict__, **changes})

    cases = {
        "label length": variant(labels={**clip.labels, "blink": np.zeros(29, np.float32)}),
        "label shape": variant(labels={**clip.labels, "pose": np.zeros((30, 5), np.float32)}),
        "unknown label": variant(labels={"smile": np.zeros(30, np.float32)}),
        "non-finite label": variant(labels={"brow": np.full(30, np.nan, np.float32)}),
        "audio length": variant(audio=np.zeros(16000, np.float32)),
        "stereo audio": variant(audio=np.zeros((2, 19200), np.float32)),
        "feature length": variant(features={"motion": np.zeros((31, 4), np.float32)}),
        "no frames": variant(frames=[]),
        "empty frame": variant(frames=[b""] * 30),
        "split": variant(split="val"),
        "frame format": variant(frame_format="gif"),
        "size": variant(height=0),
    }
    for name, bad in cases.items():
        with pytest.raises(schema.CorruptRecordError):
            schema.encode_clip(bad)
            pytest.fail(name)
    # Inconsistent records written by other tools are caught when decoding.
    with pytest.raises(schema.CorruptRecordError, match="audio samples"):
        schema.decode_clip(testdata.inconsistent_record(clip))
    # Audio may be up to one frame off (rounding of N = T / fps * sr).
    schema.encode_clip(variant(audio=np.zeros(len(clip.audio) + 640, np.float32)))


def test_box_labels_round_trip_and_are_validated(clip):
    """mouth_box / eyes_box (schema.BOX_LABELS): [T, 4] (x0, y0, x1, y1) in [0, 1]."""
    assert set(schema.BOX_LABELS) == {"mouth_box", "eyes_box"}
    assert not set(schema.BOX_LABELS) & set(schema.LABELS)  # stage-2 label vectors unchanged
    t = clip.num_frames
    boxes = np.tile(np.array([0.3, 0.55, 0.7, 0.75], np.float32), (t, 1))
    eyes = np.tile(np.array([0.2, 0.2, 0.8, 0.35], np.float32), (t, 1))
    good = schema.Clip(**{**clip.__dict__,
                          "labels": {**clip.labels, "mouth_box": boxes, "eyes_box": eyes}})
    back = schema.decode_clip(schema.encode_clip(good))
    np.testing.assert_array_equal(back.labels["mouth_box"], boxes)
    np.testing.assert_array_equal(back.labels["eyes_box"], eyes)
    flipped = boxes.copy()
    flipped[3] = [0.7, 0.55, 0.3, 0.75]  # x0 > x1
    outside = boxes.copy()
    outside[0, 3] = 1.2
    for name, bad in {"shape": boxes[:, :3], "length": boxes[1:], "x0 > x1": flipped,
                      "outside": outside}.items():
        variant = schema.Clip(**{**clip.__dict__, "labels": {**clip.labels, "mouth_box": bad}})
        with pytest.raises(schema.CorruptRecordError, match="mouth_box"):
            schema.encode_clip(variant)
            pytest.fail(name)
    # The crop convention is stated as numbers that preprocessing can use.
    assert 0.6 <= schema.FACE_CROP_HEIGHT <= 0.8
    np.testing.assert_allclose(schema.FACE_CROP_CENTER, (0.5, 0.5))


def test_record_header(clip):
    header = schema.read_record_header(schema.encode_clip(clip))
    assert header == {"clip_id": "c0", "identity_id": 3, "num_frames": 30}
    # The header never touches the frame bytes.
    assert schema.read_record_header(testdata.bad_frame_record(clip))["num_frames"] == 30
    for data in (testdata.GARBAGE_RECORD, msgpack.packb({"clip_id": "x"}), b""):
        with pytest.raises(schema.CorruptRecordError):
            schema.read_record_header(data)


def test_dataset_info_save_load(tmp_path):
    info = schema.DatasetInfo("synthtalk", 64, 64, num_identities=5, clips={"train": 9},
                              labels=["pose"], features={"motion": [12]}, extra={"seed": 1})
    info.save(str(tmp_path))
    assert schema.DatasetInfo.load(str(tmp_path)) == info
    # Unknown keys (from a newer writer) are ignored.
    path = tmp_path / schema.DATASET_INFO
    d = json.loads(path.read_text())
    path.write_text(json.dumps({**d, "future_field": 1}))
    assert schema.DatasetInfo.load(str(tmp_path)) == info
    with pytest.raises(FileNotFoundError, match="not a clip-record dataset"):
        schema.DatasetInfo.load(str(tmp_path / "missing"))


def test_shard_writer_index_and_list_shards(tmp_path, clip):
    d = str(tmp_path)
    clips = [testdata.make_clip(f"c{i}", i % 2, num_frames=10 + i, size=8) for i in range(5)]
    with schema.ShardWriter(d, "train", num_shards=2) as w:
        for c in clips[:3]:
            w.write(schema.encode_clip(c))
        w.write(testdata.GARBAGE_RECORD)  # written as is; indexed as unknown
        w.write(schema.encode_clip(clips[3]))
    assert w.count == 5
    shards = schema.list_shards(d, "train")
    assert [os.path.basename(p) for p in shards] == [
        "train-00000-of-00002.array_record", "train-00001-of-00002.array_record"]
    # Round robin: shard 0 holds records 0, 2, 4; shard 1 holds 1, 3.
    idx0, idx1 = (schema.read_shard_index(p) for p in shards)
    np.testing.assert_array_equal(idx0["identity_id"], [0, 0, 1])
    np.testing.assert_array_equal(idx0["num_frames"], [10, 12, 13])
    np.testing.assert_array_equal(idx1["identity_id"], [1, -1])
    np.testing.assert_array_equal(idx1["num_frames"], [11, 0])
    records = schema.read_records(shards)
    assert len(records) == 5
    assert schema.decode_clip(records[0]).clip_id == "c0"
    assert schema.decode_clip(records[3]).clip_id == "c1"  # shard 1 comes after shard 0

    with pytest.raises(FileNotFoundError, match="no test-split shards"):
        schema.list_shards(d, "test")
    assert schema.list_shards(d) == shards
    with pytest.raises(ValueError):
        schema.ShardWriter(d, "val")
    with pytest.raises(ValueError):
        schema.shard_index_path("x.json")
    # A missing or unreadable sidecar reads as None (loaders then scan the shard).
    open(schema.shard_index_path(shards[1]), "w").write("{broken")
    assert schema.read_shard_index(shards[1]) is None
    os.remove(schema.shard_index_path(shards[1]))
    assert schema.read_shard_index(shards[1]) is None


def test_write_clips_splits(tmp_path):
    clips = [testdata.make_clip(f"c{i}", i, num_frames=5, size=8,
                                split="test" if i == 2 else "train") for i in range(3)]
    assert schema.write_clips(str(tmp_path), clips, num_shards=4) == {"train": 2, "test": 1}
    assert len(schema.list_shards(str(tmp_path), "train")) == 2  # never more shards than clips
    assert len(schema.list_shards(str(tmp_path), "test")) == 1


def test_testdata_builder(tmp_path):
    clips = testdata.make_dataset(str(tmp_path), identities=3, clips_per_identity=2,
                                  test_clips_per_identity=1, seconds=[2.0, 1.0], size=16,
                                  features={"f": 2})
    assert [c.split for c in clips].count("test") == 3
    assert {c.num_frames for c in clips} == {50, 25}
    info = schema.DatasetInfo.load(str(tmp_path))
    assert info.clips == {"train": 6, "test": 3} and info.num_identities == 3
    assert info.labels == sorted(schema.LABELS) and info.features == {"f": [2]}
    c = clips[0]
    for name, shape in schema.LABELS.items():
        assert c.labels[name].shape == (c.num_frames, *shape)
    np.testing.assert_array_equal(c.features["f"][:, 0], np.arange(50))
    # Deterministic: the same arguments give the same clip.
    again = testdata.make_clip(c.clip_id, c.identity_id, num_frames=50, size=16, seed=0,
                               features={"f": 2})
    np.testing.assert_array_equal(again.audio, c.audio)
    assert again.frames == c.frames
    # The mouth opens with the audio envelope; random mouths do not.
    from data_pipeline.transforms import audio_frame_rms

    rms = audio_frame_rms(c.audio, c.sample_rate, c.fps, c.num_frames)
    assert np.corrcoef(rms, c.labels["mouth_open"])[0, 1] > 0.95
    rnd = testdata.make_clip("r", 0, num_frames=100, size=8, mouth="random")
    rms = audio_frame_rms(rnd.audio, rnd.sample_rate, rnd.fps, rnd.num_frames)
    assert abs(np.corrcoef(rms, rnd.labels["mouth_open"])[0, 1]) < 0.5
    # The background colour identifies the identity.
    corner = c.decode_frames([0])[0, :2, :2].reshape(-1, 3).mean(0)
    assert np.abs(corner - testdata.identity_color(c.identity_id)).max() < 30
