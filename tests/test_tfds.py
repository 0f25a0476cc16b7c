"""TFDS builders of clip-record datasets (data_pipeline.tfds_builders), without TensorFlow."""

import json
import os
import pickle
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from data_pipeline import loaders, schema, tfds_builders  # noqa: E402
from tests import testdata  # noqa: E402
from tests.test_loaders import assert_batches_equal, stage1_cfg, stage2_cfg, take  # noqa: E402


def _as_preprocess_output(directory: str) -> None:
    """Marks a testdata folder as data_pipeline.preprocess output (what voxceleb2 takes)."""
    info = schema.DatasetInfo.load(directory)
    info.source = "voxceleb2"
    info.extra = {"generator": "data_pipeline.preprocess"}
    info.save(directory)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A preprocess-like clip-record folder (8 train clips + 1 garbage record, 4 test
    clips) and its TFDS `voxceleb2` dataset."""
    src = str(tmp_path_factory.mktemp("real"))
    testdata.make_dataset(src, identities=4, clips_per_identity=2, test_clips_per_identity=1,
                          seconds=2.0, size=32, features={"motion": 6, "w2v": 5},
                          extra_records=[testdata.GARBAGE_RECORD])
    _as_preprocess_output(src)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    assert tfds_builders.main(["voxceleb2", "--data_dir", data_dir, "--manual_dir", src]) == 0
    return src, data_dir


def test_copy_is_record_for_record_and_needs_no_tensorflow(real):
    src, data_dir = real
    assert "tensorflow" not in sys.modules  # built and read without it
    sources = tfds.data_source("voxceleb2", data_dir=data_dir)
    assert sorted(sources) == ["test", "train"]
    for split, n in (("train", 9), ("test", 4)):
        ds = sources[split]
        shards = schema.list_shards(src, split)
        original = schema.read_records(shards)
        index = loaders.load_clip_index(src, split)
        assert len(ds) == len(original) == n
        for i in range(n):
            ex = ds[i]
            assert ex["clip"] == original[i]  # the same bytes, in the same order
            assert ex["identity_id"] == index.identity_id[i]
            assert ex["num_frames"] == index.num_frames[i]
            if index.identity_id[i] >= 0:
                clip = schema.decode_clip(ex["clip"])
                assert ex["clip_id"].decode() == clip.clip_id
    train = [sources["train"][i] for i in range(9)]
    bad = [ex for ex in train if ex["clip"] == testdata.GARBAGE_RECORD]
    assert len(bad) == 1
    bad = bad[0]  # the garbage record: copied, its header marked unreadable
    assert (bad["clip"], bad["clip_id"], bad["identity_id"], bad["num_frames"]) == (
        testdata.GARBAGE_RECORD, b"", -1, 0)
    # The files are ArrayRecord; dataset.json and the clip index are in metadata.json.
    version_dir = os.path.join(data_dir, "voxceleb2", "1.0.0")
    assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(version_dir))
    info, index = tfds_builders.read_metadata(sources["train"])
    assert info == schema.DatasetInfo.load(src)
    assert index["train"]["identity_id"].count(-1) == 1 and len(index["test"]["num_frames"]) == 4
    assert "tensorflow" not in sys.modules


def test_clip_source_slices_and_pickles(real):
    src, data_dir = real
    builder = tfds.builder_from_directory(os.path.join(data_dir, "voxceleb2", "1.0.0"))
    train = loaders.load_clip_index(src, "train")
    test = loaders.load_clip_index(src, "test")
    for split, ids in (("train[2:5]", train.identity_id[2:5]),
                       ("train[-3:]", train.identity_id[-3:]),
                       ("test+train[:2]", np.r_[test.identity_id, train.identity_id[:2]])):
        cs = tfds_builders.clip_source(builder.as_data_source(split))
        np.testing.assert_array_equal(cs.identity_id, ids, err_msg=split)
        assert len(cs) == len(ids)
        for i in range(len(cs)):
            if cs.identity_id[i] >= 0:
                assert schema.decode_clip(cs[i]).identity_id == cs.identity_id[i]
    cs = tfds_builders.clip_source(builder.data_dir, "test")  # a prepared folder + split
    again = pickle.loads(pickle.dumps(cs))  # grain workers get a pickled copy
    assert len(again) == 4 and again[3] == cs[3] == schema.read_records(
        schema.list_shards(src, "test"))[3]
    np.testing.assert_array_equal(again.num_frames, test.num_frames)


def test_loaders_give_the_same_batches_from_tfds(real):
    """Same records, same index, same seed: the grain pipelines over the TFDS data source
    (and over the prepared TFDS folder as data.path) yield exactly the shards' batches."""
    src, data_dir = real
    ds = tfds.data_source("voxceleb2", split="train", data_dir=data_dir)
    tfds_dir = os.path.join(data_dir, "voxceleb2", "1.0.0")

    want = list(loaders.stage1_dataset(stage1_cfg(src), num_epochs=1))
    got = list(loaders.stage1_dataset(stage1_cfg(""), num_epochs=1, source=ds))
    assert len(want) == 2  # 8 good clips (the garbage record is skipped and counted)
    assert sum(int(b["num_skipped"].sum()) for b in want) == 1
    assert_batches_equal(got, want)
    assert_batches_equal(list(loaders.stage1_dataset(stage1_cfg(tfds_dir), num_epochs=1)), want)

    kw = dict(motion_source="features:motion", audio_source="features:w2v")
    want = take(iter(loaders.stage2_dataset(stage2_cfg(src, **kw))), 3)
    got = take(iter(loaders.stage2_dataset(stage2_cfg("", **kw), source=ds)), 3)
    assert_batches_equal(got, want)
    test_ds = tfds.data_source("voxceleb2", data_dir=data_dir)["test"]
    got = take(iter(loaders.stage2_dataset(stage2_cfg("", **kw), source=test_ds)), 1)
    assert set(got[0]["identity"]) <= {0, 1, 2, 3}  # the source's split, not cfg.split


def test_synthtalk_renders_its_config(tmp_path):
    config = tfds_builders.SynthTalkBuilderConfig(
        name="test2x2", synthtalk=dict(num_identities=2, clips_per_identity=2, seconds=0.4,
                                       size=64, test_clips_per_identity=1))
    builder = tfds.builder("synthtalk", config=config, data_dir=str(tmp_path))
    builder.download_and_prepare()
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 2,
                                                                            "test": 2}
    train = builder.as_data_source("train")
    clips = [schema.decode_clip(train[i]["clip"]) for i in range(len(train))]
    assert [c.identity_id for c in clips] == [0, 1]
    assert all(c.source == "synthtalk" and c.num_frames == 10 and c.height == 64
               for c in clips)
    assert sorted(clips[0].labels) == sorted([*schema.LABELS, *schema.BOX_LABELS])
    info, _ = tfds_builders.read_metadata(train)
    assert info.extra["args"]["num_identities"] == 2
    # The rendered folder is cached under downloads/ and reused by a rebuild.
    cache = os.path.join(str(tmp_path), "downloads", "synthtalk_test2x2")
    assert schema.DatasetInfo.load(cache).clips == {"train": 2, "test": 2}
    assert {"tiny", "64px", "manual"} <= {c.name for c in tfds_builders.Synthtalk.BUILDER_CONFIGS}
    assert "tensorflow" not in sys.modules


def test_wrong_sources_are_clear_errors(real, tmp_path, capsys):
    src, _ = real
    # synthtalk/manual takes SynthTalk folders only; voxceleb2 preprocess output only.
    with pytest.raises(ValueError, match="source='voxceleb2'"):
        tfds_builders.build("synthtalk/manual", str(tmp_path / "a"), manual_dir=src)
    other = str(tmp_path / "synth")
    testdata.make_dataset(other, identities=2, clips_per_identity=1, seconds=0.4, size=32)
    assert tfds_builders.main(["voxceleb2", "--data_dir", str(tmp_path / "b"),
                               "--manual_dir", other]) == 1
    assert "not made by data_pipeline.preprocess" in capsys.readouterr().err
    assert tfds_builders.main(["voxceleb2", "--data_dir", str(tmp_path / "c"),
                               "--manual_dir", str(tmp_path / "missing")]) == 1
    with pytest.raises(TypeError, match="one split"):
        tfds_builders.clip_source({"train": None})
    with pytest.raises(FileNotFoundError, match="not a prepared TFDS"):
        tfds_builders.clip_source(src)


def test_cli_prints_counts(real, tmp_path, capsys):
    src, data_dir = real
    assert tfds_builders.main(["voxceleb2", "--data_dir", data_dir]) == 0  # already there
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["examples"] == {"train": 9, "test": 4}
    assert out["data_dir"].endswith(os.path.join("voxceleb2", "1.0.0"))
