"""TensorFlow Datasets builders for clip-record datasets: SynthTalk and preprocessed video.

Two TFDS dataset builders, registered when this module is imported, store clip records
(`data_pipeline.schema`) as TFDS datasets in the ArrayRecord file format, so that
`tfds.data_source(...)` (random access; no TensorFlow) reads them and the grain loaders
(`data_pipeline.loaders`) train on them:

- ``synthtalk``: SynthTalk. The configs ``tiny`` (8 identities x 3 clips x 2 s, 64 px, one
  test clip per identity) and ``64px`` (32 x 4 x 4 s, 64 px, one test clip per identity,
  the README's corpus) render the clips themselves (`data_pipeline.synthtalk`, cached in
  DATA_DIR/downloads/synthtalk_<config>); the config ``manual`` copies a folder made by
  ``python -m data_pipeline.synthtalk`` (``manual_dir``).
- ``voxceleb2``: the output of ``python -m data_pipeline.preprocess`` (VoxCeleb2 or your own
  videos), from ``manual_dir``.

Build (``python -m data_pipeline.tfds_builders --help``)::

    python -m data_pipeline.tfds_builders synthtalk/tiny --data_dir ~/tensorflow_datasets
    python -m data_pipeline.tfds_builders voxceleb2 --manual_dir data/real --data_dir D

or from Python, the usual TFDS way::

    import tensorflow_datasets as tfds
    from data_pipeline import tfds_builders  # registers the builders
    tfds.builder("synthtalk/tiny", data_dir=D).download_and_prepare()
    tfds.builder("voxceleb2", data_dir=D).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="data/real"))

Read::

    ds = tfds.data_source("synthtalk/tiny", split="train", data_dir=D)  # len(ds), ds[i]
    clip = schema.decode_clip(ds[i]["clip"])
    loaders.stage1_dataset(cfg, source=ds)  # any split / slice: split="train[:90%]"
    # or: --config.data.path=D/synthtalk/tiny/1.0.0 (a prepared TFDS dataset folder)

Example features: ``clip`` (the clip record's bytes, exactly as in the clip-record shards:
`schema.decode_clip` decodes it), ``clip_id`` (bytes), ``identity_id`` and ``num_frames``
(int64; -1 and 0 for a record whose header is unreadable). Records keep their order
(``disable_shuffling``): example i of a split is record i of the source's split, so
``ds[i]["clip"]`` equals ``schema.read_records(schema.list_shards(src, split))[i]``.
The source's dataset.json and each split's per-record identity / frame count (the
loaders' clip index, from the `.index.json` sidecars) are stored in the TFDS dataset's
metadata.json (`read_metadata`), so the loaders plan sampling without reading records.

What works without TensorFlow (tensorflow-datasets 4.9.10, tensorflow not installed):
writing (``GeneratorBasedBuilder`` with file_format=array_record; bytes, text and int64
scalar features are serialized as tf.train.Example protos by TFDS's numpy/protobuf path),
``tfds.data_source`` / ``builder.as_data_source`` / ``tfds.builder_from_directory``
reading, split slicing, pickling a data source to grain worker processes. What needs
TensorFlow: ``as_dataset`` (tf.data), and the ``tfds.features.Image`` / ``Video`` features
(``ModuleNotFoundError: No module named 'tensorflow'`` when they encode): that is why the
frames stay inside the clip record's bytes rather than becoming TFDS image features.

tensorflow-datasets 4.9.10 imports `importlib_resources` when it prepares a dataset but
declares it only for Python < 3.9 (tensorflow/datasets#11212: ``ModuleNotFoundError: No
module named 'importlib_resources'`` in `DatasetBuilder.code_path`): requirements.txt pins
it next to tensorflow-datasets.

Cost: a TFDS dataset is a copy of the records (TFDS owns its shard files and wraps each
record in a tf.train.Example), so it takes the source's disk space again; building is one
process, bounded by disk speed (`build` logs records/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import schema

VERSION = "1.0.0"  # of these builders; the record format is schema.FORMAT_VERSION
METADATA_DATASET = "clip_records"  # metadata.json key: the source's dataset.json
METADATA_INDEX = "index"  # metadata.json key: split -> {"identity_id": [...], "num_frames": [...]}
TFDS_INFO = "dataset_info.json"  # what marks a prepared TFDS dataset folder
_MAIN = __name__ == "__main__"  # run as a script: leave registration to the imported module

SYNTHTALK_CONFIGS = {
    "tiny": dict(num_identities=8, clips_per_identity=3, seconds=2.0, size=64,
                 test_clips_per_identity=1),
    "64px": dict(num_identities=32, clips_per_identity=4, seconds=4.0, size=64,
                 test_clips_per_identity=1),
}


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "clip": tfds.features.Scalar(dtype=np.object_, doc="clip record (schema.decode_clip)"),
        "clip_id": tfds.features.Text(),
        "identity_id": tfds.features.Scalar(dtype=np.int64, doc="-1: unreadable header"),
        "num_frames": tfds.features.Scalar(dtype=np.int64, doc="0: unreadable header"),
    })


def _source_splits(directory: str) -> list[str]:
    out = []
    for split in schema.SPLITS:
        try:
            schema.list_shards(directory, split)
            out.append(split)
        except FileNotFoundError:
            pass
    return out


class ClipRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Copies a clip-record folder (`_source_dir`) into a TFDS ArrayRecord dataset."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): f"clip records, schema.FORMAT_VERSION {schema.FORMAT_VERSION}"}
    DESCRIPTION = "Talking-face clip records (data_pipeline/schema.py)."
    SOURCES: tuple[str, ...] | None = None  # dataset.json "source" values accepted (None: any)

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=_features(),
            disable_shuffling=True,  # example i = record i: the stored index stays valid
            metadata=tfds.core.MetadataDict(),
            homepage="https://arxiv.org/abs/2404.10667",
        )

    def _source_dir(self, dl_manager) -> str:
        return os.fspath(dl_manager.manual_dir)

    def _split_generators(self, dl_manager):
        from data_pipeline import loaders  # the same sidecar reading as training

        src = self._source_dir(dl_manager)
        info = schema.DatasetInfo.load(src)
        if self.SOURCES is not None and info.source not in self.SOURCES:
            raise ValueError(f"{src!r} holds source={info.source!r} clips; the {self.name} "
                             f"builder takes {self.SOURCES}")
        splits = _source_splits(src)
        if not splits:
            raise FileNotFoundError(f"no shards in {src!r}")
        index = {s: loaders.load_clip_index(src, s) for s in splits}
        self.info.metadata[METADATA_DATASET] = dataclasses.asdict(info)
        self.info.metadata[METADATA_INDEX] = {
            s: {"identity_id": ix.identity_id.tolist(), "num_frames": ix.num_frames.tolist()}
            for s, ix in index.items()
        }
        self.info.metadata["source_dir"] = os.path.abspath(src)
        return {s: self._generate_examples(index[s]) for s in splits}

    def _generate_examples(self, index) -> Iterator[tuple[int, dict[str, Any]]]:
        source = schema.read_records(index.paths)
        if len(source) != len(index):
            raise RuntimeError(f"{len(source)} records but an index of {len(index)}")
        for i in range(len(source)):
            record = source[i]
            try:
                clip_id = schema.read_record_header(record)["clip_id"]
            except schema.CorruptRecordError:
                clip_id = ""  # copied anyway: the loaders skip and count it
            yield i, {"clip": record, "clip_id": clip_id,
                      "identity_id": int(index.identity_id[i]),
                      "num_frames": int(index.num_frames[i])}


@dataclasses.dataclass(eq=False)
class SynthTalkBuilderConfig(tfds.core.BuilderConfig):
    """`synthtalk`: keyword arguments of `SynthTalkConfig` to render (None: copy the
    SynthTalk folder in manual_dir)."""

    synthtalk: dict[str, Any] | None = None


class Synthtalk(ClipRecordBuilder, skip_registration=_MAIN):
    """SynthTalk: synthetic talking faces with per-frame ground truth."""

    DESCRIPTION = ("SynthTalk: procedural 3D talking heads driven by speech, with per-frame "
                   "ground truth (pose, gaze, blink, mouth, emotion, distance, boxes).")
    SOURCES = ("synthtalk",)
    BUILDER_CONFIGS = [
        *(SynthTalkBuilderConfig(name=k, description=f"rendered: {v}", synthtalk=v)
          for k, v in SYNTHTALK_CONFIGS.items()),
        SynthTalkBuilderConfig(name="manual", description="copied from manual_dir "
                               "(the output of python -m data_pipeline.synthtalk)"),
    ]
    DEFAULT_CONFIG_NAME = "tiny"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Config 'manual' only: generate a corpus with `python -m data_pipeline.synthtalk "
        "--out DIR ...` and pass DIR as manual_dir.")

    def _source_dir(self, dl_manager) -> str:
        kwargs = self.builder_config.synthtalk
        if kwargs is None:
            return super()._source_dir(dl_manager)
        from data_pipeline.synthtalk import generate

        cfg = generate.SynthTalkConfig(**kwargs)
        out = os.path.join(os.fspath(dl_manager.download_dir),
                           f"synthtalk_{self.builder_config.name}")
        try:  # rendered before with the same arguments: reuse (rendering is deterministic)
            done = schema.DatasetInfo.load(out).extra.get("args") == dataclasses.asdict(cfg)
        except FileNotFoundError:
            done = False
        if not done:
            # One process: worker pools are spawned, which re-runs an unguarded __main__.
            generate.generate_dataset(cfg, out, workers=1, overwrite=True, progress=True)
        return out


class Voxceleb2(ClipRecordBuilder, skip_registration=_MAIN):
    """Real talking-head clips made by `python -m data_pipeline.preprocess`."""

    DESCRIPTION = ("Real talking-head clips (VoxCeleb2 or your own videos) cropped and "
                   "labelled by data_pipeline.preprocess (pose, gaze, emotion, mouth / eye "
                   "openness, boxes).")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Run `python -m data_pipeline.preprocess --input VIDEOS --output DIR --size 512` "
        "(e.g. VoxCeleb2's dev/mp4 folder) and pass DIR as manual_dir.")

    def _split_generators(self, dl_manager):
        src = self._source_dir(dl_manager)
        info = schema.DatasetInfo.load(src)
        if info.extra.get("generator") != "data_pipeline.preprocess":
            raise ValueError(f"{src!r} was not made by data_pipeline.preprocess (its "
                             f"dataset.json says generator={info.extra.get('generator')!r})")
        return super()._split_generators(dl_manager)


# ----------------------------------------------------------------------------- reading


def read_metadata(data_source) -> tuple[schema.DatasetInfo, dict[str, dict[str, list[int]]]]:
    """(the source's DatasetInfo, split -> per-record index) of a TFDS data source."""
    meta = data_source.dataset_info.metadata
    if not meta or METADATA_DATASET not in meta:
        raise ValueError(f"{data_source!r} has no {METADATA_DATASET!r} metadata: not a "
                         "clip-record dataset built by data_pipeline.tfds_builders")
    d = dict(meta[METADATA_DATASET])
    known = {f.name for f in dataclasses.fields(schema.DatasetInfo)}
    return schema.DatasetInfo(**{k: v for k, v in d.items() if k in known}), meta[METADATA_INDEX]


def _split_index(data_source) -> dict[str, np.ndarray]:
    """identity_id / num_frames of the examples of a data source's split, in its order
    (any split expression: "train", "train[:10]", "train+test")."""
    from tensorflow_datasets.core.data_sources import base

    info = data_source.dataset_info
    _, stored = read_metadata(data_source)
    where = {}  # shard file name -> (split, offset of its first example in the split)
    for name, split_info in info.splits.items():
        offset = 0
        for fi in split_info.file_instructions:
            where[os.path.basename(fi.filename)] = (name, offset)
            offset += fi.examples_in_shard
    ids, frames = [], []
    for fi in base.file_instructions(info, data_source.split):
        name, offset = where[os.path.basename(fi.filename)]
        lo, hi = offset + fi.skip, offset + fi.skip + fi.take
        ids.append(np.asarray(stored[name]["identity_id"][lo:hi], np.int64))
        frames.append(np.asarray(stored[name]["num_frames"][lo:hi], np.int64))
    return {"identity_id": np.concatenate(ids) if ids else np.zeros(0, np.int64),
            "num_frames": np.concatenate(frames) if frames else np.zeros(0, np.int64)}


class ClipSource:
    """A TFDS data source of clip records as the loaders read it: `source[i]` -> record
    bytes, `info` (the DatasetInfo of dataset.json), `identity_id` / `num_frames` [len]
    (the clip index). Picklable (grain worker processes)."""

    def __init__(self, data_source):
        self.data_source = data_source
        self.info, _ = read_metadata(data_source)
        index = _split_index(data_source)
        if len(index["identity_id"]) != len(data_source):
            raise ValueError(f"{data_source!r}: index of {len(index['identity_id'])} records "
                             f"for {len(data_source)} examples")
        self.identity_id = index["identity_id"]
        self.num_frames = index["num_frames"]

    @property
    def split(self) -> str:
        return str(self.data_source.split)

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, i: int) -> bytes:
        return self.data_source[i]["clip"]

    def __repr__(self) -> str:
        return f"ClipSource({self.data_source!r}, {len(self)} records)"


def is_tfds_dir(path: str) -> bool:
    """Whether `path` is a prepared TFDS dataset folder (DATA_DIR/NAME/CONFIG/VERSION)."""
    return os.path.isfile(os.path.join(path, TFDS_INFO))


def clip_source(source, split: str = "train") -> ClipSource:
    """A `ClipSource` from a TFDS data source (tfds.data_source(name, split=...)), a prepared
    TFDS dataset folder (read at `split`), or a ClipSource."""
    if isinstance(source, ClipSource):
        return source
    if isinstance(source, (str, os.PathLike)):
        if not is_tfds_dir(os.fspath(source)):
            raise FileNotFoundError(f"{source!r} is not a prepared TFDS dataset folder "
                                    f"(no {TFDS_INFO})")
        source = tfds.builder_from_directory(os.fspath(source)).as_data_source(split)
    elif isinstance(source, dict):
        raise TypeError("pass one split: tfds.data_source(name, split=...), not the dict "
                        f"of splits {sorted(source)}")
    return ClipSource(source)


# ----------------------------------------------------------------------------- CLI


def build(name: str, data_dir: str | None = None, manual_dir: str | None = None,
          overwrite: bool = False) -> tfds.core.DatasetBuilder:
    """Prepares the TFDS dataset `name` ("synthtalk/tiny", "voxceleb2", ...)."""
    builder = tfds.builder(name, data_dir=data_dir)
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode)
    builder.download_and_prepare(download_config=config)
    return builder


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.tfds_builders",
        description="Prepare a clip-record dataset as a TFDS dataset (ArrayRecord files) "
        "readable with tfds.data_source.")
    p.add_argument("dataset", help="synthtalk/tiny, synthtalk/64px, synthtalk/manual or "
                   "voxceleb2")
    p.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's, "
                   "~/tensorflow_datasets)")
    p.add_argument("--manual_dir", default=None, help="the clip-record folder to copy "
                   "(synthtalk/manual: a data_pipeline.synthtalk output; voxceleb2: a "
                   "data_pipeline.preprocess output)")
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        builder = build(args.dataset, args.data_dir, args.manual_dir, args.overwrite)
    except (FileNotFoundError, ValueError, AssertionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    seconds = time.time() - start
    counts = {name: s.num_examples for name, s in builder.info.splits.items()}
    total = sum(counts.values())
    print(json.dumps({"data_dir": builder.data_dir, "examples": counts,
                      "seconds": round(seconds, 2),
                      "records_per_s": round(total / max(seconds, 1e-9), 1)}))
    return 0


if __name__ == "__main__":
    from data_pipeline import tfds_builders as _registered  # the builders, registered

    sys.exit(_registered.main())
