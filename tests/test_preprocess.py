"""python -m data_pipeline.preprocess on videos built here from a real face photo.

skimage's astronaut.png, moved over 5 s at 30 fps with a known in-plane rotation, scale and
translation and muxed with espeak-ng speech, must come out as one 125-frame 25 fps clip with
the face centred in the crop, roll following the rotation and distance the scale. A video
of six shots (good, blurred, dark, two faces, a small face, too short), a silent one, one
without a face, one without an audio stream, a truncated mp4 and a 2 KB stub are recorded
in the manifest with their reasons; a phone video stored sideways is turned upright. The output reads through data_pipeline.inspect and the
stage-1 loader, and an interrupted run resumed ends with the records of a parallel run.
"""

import json
import math
import os
import subprocess

import cv2
import grain
import numpy as np
import pytest

from configs.common import data_stage1
from data_pipeline import face_analysis as fa
from data_pipeline import inspect as inspect_tool
from data_pipeline import loaders, schema
from data_pipeline import preprocess as pp
from data_pipeline import transforms as T
from data_pipeline.synthtalk import speech

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("ai_edge_litert")
if not speech.espeak_available():
    pytest.skip("espeak-ng is not installed", allow_module_level=True)

SIZE = 128  # output crops (the CLI default is 512; 128 keeps the test fast)
FPS_IN = 30  # the talking video's frame rate: resampled to 25
SECONDS = 5.0
CANVAS = (640, 480)  # talking video (w, h)
SHOT = (480, 360)  # the other videos
BASE_SIDE = 150.0  # the talking face's crop side at scale 1 (source pixels)
FLAGS = ["--size", str(SIZE), "--identity", "file", "--min_seconds", "1", "--min_crop_px",
         "100", "--inputs_per_shard", "3", "--no_progress"]


def motion(t):
    """The talking video's applied motion at time t (s): rotation (degrees, counter-clockwise
    on screen), scale, translation (pixels)."""
    angle = 12.0 * np.sin(2 * np.pi * t / 2.5)
    scale = 1.0 + 0.15 * np.sin(2 * np.pi * t / 5.0 + 0.5)
    dx, dy = 30.0 * np.sin(2 * np.pi * t / 3.3), 15.0 * np.cos(2 * np.pi * t / 4.1)
    return angle, scale, dx, dy


def place(photo, face, side, at, size, angle=0.0):
    """The photo scaled so its face crop (cx, cy, side0) has `side` pixels, turned `angle`
    degrees about the crop centre, which lands at `at` of a grey canvas of `size` (w, h)."""
    m = cv2.getRotationMatrix2D(face[:2], angle, side / face[2])
    m[:, 2] += np.asarray(at) - np.asarray(face[:2])
    return cv2.warpAffine(photo, m, size, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(128, 128, 128))


@pytest.fixture(scope="module")
def analyzer():
    return fa.FaceAnalyzer()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, analyzer):
    """The input folder: {name}.mp4 for the videos in the module docstring; and the speech."""
    from vasa_jax.video import write_video

    folder = tmp_path_factory.mktemp("videos")
    photo = skimage_data.astronaut()
    det = analyzer.detect(photo)[0]
    face = np.asarray(fa.crop_box(analyzer.landmarks(photo, det)))  # (cx, cy, side0)
    audio = speech.espeak_speech(["The quick brown fox jumps over the lazy dog, then rests "
                                  "by the river."], "en-us", 150, 50, [])
    n = int(SECONDS * schema.SAMPLE_RATE)
    audio = np.pad(audio, (0, max(0, n - len(audio))))[:n]

    def talk():
        for i in range(int(SECONDS * FPS_IN)):
            a, s, dx, dy = motion(i / FPS_IN)
            yield place(photo, face, BASE_SIDE * s, (CANVAS[0] / 2 + dx, CANVAS[1] / 2 + dy),
                        CANVAS, a)

    def shot(side, x):
        return place(photo, face, side, (x, SHOT[1] / 2), SHOT)

    def shots():
        yield from (shot(160, 150) for _ in range(50))  # good: 2 s
        yield from (cv2.GaussianBlur(shot(160, 330), (0, 0), 5) for _ in range(30))
        yield from ((shot(160, 150) * 0.2).astype(np.uint8) for _ in range(30))  # dark
        for _ in range(30):  # two people
            a, b = shot(110, 120), shot(110, 360)
            a[:, SHOT[0] // 2:] = b[:, SHOT[0] // 2:]
            yield a
        yield from (shot(80, 330) for _ in range(30))  # small face
        yield from (shot(160, 150) for _ in range(15))  # 0.6 s: too short
        yield from (np.full((SHOT[1], SHOT[0], 3), 128, np.uint8) for _ in range(10))

    write_video(str(folder / "talk.mp4"), talk(), FPS_IN, audio, schema.SAMPLE_RATE)
    write_video(str(folder / "shots.mp4"), shots(), 25, np.tile(audio, 2)[:195 * 640])
    write_video(str(folder / "mute.mp4"), (shot(160, 240) for _ in range(30)), 25,
                np.zeros(30 * 640, np.float32))
    rng = np.random.default_rng(0)
    noise = (cv2.GaussianBlur(rng.integers(0, 255, (SHOT[1], SHOT[0], 3), np.uint8), (0, 0), 3)
             for _ in range(25))
    write_video(str(folder / "noface.mp4"), noise, 25, audio[:25 * 640])
    write_video(str(folder / "nosound.mp4"), (shot(160, 240) for _ in range(25)), 25)
    # a phone video: stored sideways with rotation metadata that turns it upright
    raw = str(tmp_path_factory.mktemp("raw") / "sideways.mp4")
    sideways = (np.ascontiguousarray(np.rot90(shot(160, 240), -1)) for _ in range(30))
    write_video(raw, sideways, 25, audio[:30 * 640])
    subprocess.run(["ffmpeg", "-v", "error", "-i", raw, "-c", "copy", "-metadata:s:v:0",
                    "rotate=90", str(folder / "phone.mp4")], check=True)
    data = (folder / "talk.mp4").read_bytes()  # faststart: the index is at the front
    (folder / "cut.mp4").write_bytes(data[:len(data) // 2])
    (folder / "stub.mp4").write_bytes(data[:2048])
    return {"dir": str(folder), "audio": audio}


@pytest.fixture(scope="module")
def out(inputs, tmp_path_factory):
    """The CLI's output folder, made by 2 worker processes."""
    out = str(tmp_path_factory.mktemp("out") / "data")
    assert pp.main(["--input", inputs["dir"], "--output", out, "--workers", "2", *FLAGS]) == 0
    return out


def read_clips(directory):
    return [schema.decode_clip(src[i]) for p in schema.list_shards(directory)
            for src in [grain.sources.ArrayRecordDataSource([p])] for i in range(len(src))]


def read_records(directory):
    return [src[i] for p in schema.list_shards(directory)
            for src in [grain.sources.ArrayRecordDataSource([p])] for i in range(len(src))]


def manifest(directory):
    with open(os.path.join(directory, pp.MANIFEST)) as f:
        return json.load(f)


def entries(directory):
    """The manifest's per-input entries without their timings."""
    return [{k: v for k, v in e.items() if k != "seconds"} for e in manifest(directory)["inputs"]]


@pytest.fixture(scope="module")
def talk(out):
    (clip,) = [c for c in read_clips(out) if c.attrs["input"] == "talk.mp4"]
    return clip


@pytest.fixture(scope="module")
def talk_applied(talk):
    """The applied motion at the output frames' times: (angle, scale, dx, dy) each [T]."""
    return motion(np.arange(talk.num_frames) / schema.FPS)


# ----------------------------------------------------------------------------- the clip


def test_talking_video_is_one_clip_of_125_frames_at_25_fps(talk, inputs):
    assert talk.num_frames == 125 and talk.fps == schema.FPS and talk.frame_format == "jpeg"
    assert (talk.height, talk.width) == (SIZE, SIZE)
    assert talk.decode_frames([0, 124]).shape == (2, SIZE, SIZE, 3)
    assert talk.sample_rate == schema.SAMPLE_RATE and len(talk.audio) == 125 * 640
    # the speech survives AAC and resampling, aligned with the frames
    env_out = T.audio_frame_rms(talk.audio, schema.SAMPLE_RATE, schema.FPS, 125)
    env_in = T.audio_frame_rms(inputs["audio"], schema.SAMPLE_RATE, schema.FPS, 125)
    assert np.corrcoef(env_in, env_out)[0, 1] > 0.95
    assert talk.source == "video" and talk.split == "train"
    assert set(talk.labels) == set(pp.WRITTEN_LABELS)
    for name, x in talk.labels.items():
        shape = schema.LABELS.get(name, schema.BOX_LABELS.get(name))
        assert x.shape == (125, *shape), name
        assert np.all(np.isfinite(x)), name
    assert talk.labels["emotion"].dtype == np.int32


def test_the_face_is_centred_and_moves_with_the_translation(talk, talk_applied, analyzer):
    _, scale, dx, dy = talk_applied
    idx = np.arange(0, talk.num_frames, 4)
    boxes = []
    for frame in talk.decode_frames(idx):
        dets = analyzer.detect(frame)
        assert len(dets) == 1
        boxes.append(fa.crop_box(analyzer.landmarks(frame, dets[0])))
    boxes = np.asarray(boxes) / SIZE  # (cx, cy, side) in crop units
    centre = np.median(boxes[:, :2], axis=0)
    assert np.all(np.abs(centre - 0.5) < 0.04), centre
    assert abs(np.median(boxes[:, 2]) - 1.0) < 0.08  # the convention's framing
    # fixed crop: the face moves in the frame as it moved in the video
    side = talk.attrs["crop"][2]
    assert np.corrcoef(dx[idx], boxes[:, 0])[0, 1] > 0.9
    assert np.corrcoef(dy[idx], boxes[:, 1])[0, 1] > 0.9
    assert abs(np.polyfit(dx[idx] / side, boxes[:, 0], 1)[0] - 1.0) < 0.25
    assert np.corrcoef(scale[idx], boxes[:, 2])[0, 1] > 0.9


def test_roll_follows_the_rotation(talk, talk_applied):
    angle = talk_applied[0]
    roll = talk.labels["pose"][:, 2]
    r = np.corrcoef(angle, roll)[0, 1]
    slope = np.polyfit(angle, roll, 1)[0]
    assert r >= 0.9 and 0.8 < slope < 1.2, (r, slope)
    # an in-plane turn is no yaw or pitch
    for axis in (0, 1):
        assert np.std(talk.labels["pose"][:, axis]) < 0.4 * np.std(roll)


def test_distance_follows_the_scale(talk, talk_applied):
    scale = talk_applied[1]
    dist = talk.labels["distance"]
    assert np.corrcoef(1.0 / scale, dist)[0, 1] >= 0.9
    assert np.ptp(dist * scale) < 0.1 * np.mean(dist * scale)  # distance ~ 1 / scale
    assert 0.85 < np.median(dist) < 1.15  # the median framing is the convention's
    tz = talk.labels["pose"][:, 5]
    assert np.corrcoef(dist, tz)[0, 1] > 0.99


def test_gaze_openness_emotion_and_boxes(talk):
    L = talk.labels
    assert np.all(np.abs(np.median(L["gaze"], axis=0)) < 10)  # she looks into the lens
    assert np.all((L["mouth_open"] >= 0) & (L["mouth_open"] <= 1))
    assert 0.2 < np.median(L["mouth_open"]) < 1.0  # a toothy smile: lips apart
    assert np.all((L["blink"] >= 0) & (L["blink"] <= 1)) and np.median(L["blink"]) < 0.15
    assert 0.3 < talk.attrs["eye_open_level"] < 0.6
    probs = L["emotion_probs"]
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert np.mean(L["emotion"] == schema.EMOTIONS.index("happy")) > 0.9
    offset = np.asarray(talk.attrs["emotion_offset"])
    assert np.allclose(offset, probs.mean(axis=0), atol=1e-5)
    assert schema.EMOTIONS[int(np.argmax(offset))] == "happy"
    eyes, mouth = L["eyes_box"], L["mouth_box"]
    assert np.all(eyes[:, 3] < mouth[:, 1])  # eyes above the mouth
    for b in (eyes, mouth):
        assert np.all((b[:, 0] < b[:, 2]) & (b[:, 1] < b[:, 3]))
    assert abs(np.median((mouth[:, 0] + mouth[:, 2]) / 2) - 0.5) < 0.08


def test_a_video_too_big_to_keep_is_decoded_twice_to_the_same_clip(inputs, talk, monkeypatch):
    monkeypatch.setattr(pp, "FRAME_CACHE_BYTES", 10 * CANVAS[0] * CANVAS[1] * 3)
    settings = pp.Settings(size=SIZE, identity="file", min_seconds=1.0, min_crop_px=100.0)
    path = os.path.join(inputs["dir"], "talk.mp4")
    (task,) = pp.make_tasks(inputs["dir"], [path], settings)
    res = pp.process_input(task, settings)
    assert res.entry["status"] == "done" and res.entry["warnings"] == []
    (clip,) = [schema.decode_clip(r) for _, r in res.records]
    assert clip.frames == talk.frames and clip.clip_id == talk.clip_id
    assert np.array_equal(clip.audio, talk.audio)
    for name, x in talk.labels.items():
        assert np.array_equal(clip.labels[name], x), name


# ----------------------------------------------------------------------------- manifest


def test_manifest_records_failures_and_rejections(out, talk):
    m = manifest(out)
    entries = {e["input"]: e for e in m["inputs"]}
    assert sorted(entries) == sorted(["talk.mp4", "shots.mp4", "mute.mp4", "noface.mp4",
                                      "nosound.mp4", "cut.mp4", "stub.mp4", "phone.mp4"])
    failed = {k: (e["reason"], e["detail"]) for k, e in entries.items() if e["status"] == "failed"}
    assert {k: r for k, (r, _) in failed.items()} == {
        "noface.mp4": "no_face", "nosound.mp4": "no_audio", "cut.mp4": "truncated",
        "stub.mp4": "unreadable"}
    assert "no face" in failed["noface.mp4"][1]
    assert "of 5.00 s" in failed["cut.mp4"][1]  # decoded less than the header promises
    assert all(" @ 0x" not in d for _, d in failed.values())  # no run-dependent addresses
    assert entries["noface.mp4"]["frames"] == 25
    e = entries["talk.mp4"]
    assert e["status"] == "done" and e["clips"] == 1 and e["clip_frames"] == 125
    assert e["clip_ids"] == [talk.clip_id] and e["source"]["fps"] == FPS_IN
    assert e["rejected"] == {} and e["warnings"] == []
    assert entries["mute.mp4"]["rejected"] == {"silent": 1} and entries["mute.mp4"]["clips"] == 0
    # one shot of six kept; each other one rejected for its own reason
    s = entries["shots.mp4"]
    assert s["status"] == "done" and s["clips"] == 1 and s["clip_frames"] == 50
    assert s["segments"] == 6 and s["frames"] == 195 and s["face_frames"] == 185
    assert s["rejected"] == {"blurred": 1, "dark": 1, "multi_person": 1, "small_face": 1,
                             "too_short": 1}
    t = m["totals"]
    assert (t["inputs"], t["done"], t["failed"], t["clips"]) == (8, 4, 4, 3)
    assert t["failed_by_reason"] == {"no_audio": 1, "no_face": 1, "truncated": 1,
                                     "unreadable": 1}
    assert t["rejected"]["silent"] == 1 and sum(t["rejected"].values()) == 6
    info = schema.DatasetInfo.load(out)
    assert info.clips == {"train": 3} and info.num_identities == 8
    assert info.labels == list(pp.WRITTEN_LABELS) and (info.height, info.width) == (SIZE, SIZE)
    assert info.extra["camera"]["focal_px"] == pytest.approx(fa.DEFAULT_FOCAL * SIZE)


def test_shot_changes_split_clips(out):
    (clip,) = [c for c in read_clips(out) if c.attrs["input"] == "shots.mp4"]
    assert clip.num_frames == 50 and clip.attrs["start_frame"] == 0
    assert clip.identity_id != [c for c in read_clips(out)
                                if c.attrs["input"] == "talk.mp4"][0].identity_id
    assert clip.attrs["crop_outside"] == pytest.approx(0.0, abs=0.02)
    assert abs(clip.attrs["crop"][2] - 160) < 12  # the shot's face crop side


def test_a_sideways_phone_video_is_turned_upright(out, talk):
    (clip,) = [c for c in read_clips(out) if c.attrs["input"] == "phone.mp4"]
    assert clip.attrs["source_size"] == [SHOT[0], SHOT[1]]  # as displayed: w, h swapped
    assert clip.num_frames == 30
    roll = np.median(clip.labels["pose"][:, 2])
    assert abs(roll - np.median(talk.labels["pose"][:, 2])) < 3  # her own head tilt
    assert abs(clip.attrs["crop"][0] - SHOT[0] / 2) < 8  # placed at the display's centre


# ----------------------------------------------------------------------------- readers


def test_inspect_and_the_stage1_loader_read_the_output(out, capsys):
    assert inspect_tool.main([out, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "split train: 3 clips" in text and "identities: 3" in text
    assert "pose.roll" in text and "frames: 205" in text
    cfg = data_stage1("tiny")
    cfg.path, cfg.batch_size, cfg.num_workers = out, 2, 0
    batch = next(iter(loaders.stage1_dataset(cfg, num_epochs=1)))
    assert batch["source"].shape == (2, 64, 64, 3) and batch["source"].dtype == np.float32
    assert np.all(batch["identity"] != batch["cross_identity"])
    assert batch["labels"]["driving"]["pose"].shape == (2, 6)
    assert set(batch["labels"]["source"]) == set(pp.WRITTEN_LABELS)
    frames = loaders.read_frames(out, "train", 64, frames_per_clip=2)
    assert frames.images.shape == (6, 64, 64, 3) and frames.labels["gaze"].shape == (6, 2)


# ----------------------------------------------------------------------------- resuming


def test_an_interrupted_run_resumes_to_the_same_records(inputs, out, tmp_path, capsys):
    other = str(tmp_path / "data")
    settings = pp.Settings(size=SIZE, identity="file", min_seconds=1.0, min_crop_px=100.0,
                           inputs_per_shard=3)

    def stop(k):
        raise KeyboardInterrupt(f"stopped after chunk {k}")

    with pytest.raises(KeyboardInterrupt):
        pp.preprocess(inputs["dir"], other, settings, progress=False, on_chunk_done=stop)
    assert not os.path.exists(os.path.join(other, schema.DATASET_INFO))
    # without --resume the run is not touched
    assert pp.main(["--input", inputs["dir"], "--output", other, *FLAGS]) == 1
    assert "--resume" in capsys.readouterr().err
    summary = pp.preprocess(inputs["dir"], other, settings, resume=True, progress=False)
    assert summary["resumed_inputs"] == 3 and summary["processed_inputs"] == 5
    # one process, stopped and resumed == two worker processes in one go
    assert read_records(other) == read_records(out)
    assert entries(other) == entries(out)
    shards = sorted(os.listdir(out))
    assert sorted(os.listdir(other)) == shards
    # a finished run resumed does nothing and leaves the same files
    again = pp.preprocess(inputs["dir"], other, settings, resume=True, progress=False)
    assert again["processed_inputs"] == 0 and again["resumed_inputs"] == 8
    assert read_records(other) == read_records(out)
    # other settings: an error naming them
    assert pp.main(["--input", inputs["dir"], "--output", other, "--resume", *FLAGS,
                    "--min_seconds", "2"]) == 1
    assert "min_seconds" in capsys.readouterr().err


def test_the_beam_runner_writes_the_same_records(inputs, out, tmp_path):
    """Runs where apache-beam is installed (its own venv: scripts/beam_venv.sh)."""
    pytest.importorskip("apache_beam")
    other = str(tmp_path / "beam")
    argv = ["--input", inputs["dir"], "--output", other, *FLAGS, "--runner", "beam",
            "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    assert pp.main(argv) == 0
    assert read_records(other) == read_records(out)
    assert entries(other) == entries(out)
    assert schema.DatasetInfo.load(other).clips == {"train": 3}


# ----------------------------------------------------------------------------- CLI


def test_cli_errors_are_one_line_and_non_zero(tmp_path, capsys):
    def err(argv, code):
        assert pp.main(argv) == code
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "no such folder" in err(["--input", str(tmp_path / "nope"), "--output",
                                    str(tmp_path / "o")], 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no video files" in err(["--input", str(empty), "--output", str(tmp_path / "o")], 1)
    (empty / "a.mp4").write_bytes(b"x")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert "not writable" in err(["--input", str(empty), "--output", str(blocker / "o")], 1)
    assert "--workers" in err(["--input", str(empty), "--output", str(tmp_path / "o"),
                               "--workers", "0"], 2)
    assert pp.main(["--input", str(empty), "--output", str(tmp_path / "o"),
                    "--direct_num_workers=2"]) == 2  # Beam's options need --runner beam
    assert "unrecognized arguments" in capsys.readouterr().err
    assert pp.main(["--input", str(empty)]) == 2  # --output missing: argparse's usage
    assert "--output" in capsys.readouterr().err


def test_inputs_identities_and_splits(tmp_path):
    assert pp.identity_key("id00012/abc/00001.mp4", "top") == "id00012"
    assert pp.identity_key("id00012/abc/00001.mp4", "parent") == "id00012/abc"
    assert pp.identity_key("id00012/abc/00001.mp4", "file") == "id00012/abc/00001"
    assert pp.identity_key("clip.mp4", "top") == "clip"
    for d in ("id1/v1", "id1/v2", "id2/v1"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "00001.mp4").write_bytes(b"")
    (tmp_path / "id1" / "v1" / "notes.txt").write_text("")
    root, paths = pp.find_inputs(str(tmp_path))
    tasks = pp.make_tasks(root, paths, pp.Settings())
    assert [t.name for t in tasks] == ["id1/v1/00001.mp4", "id1/v2/00001.mp4",
                                       "id2/v1/00001.mp4"]
    assert [t.identity_id for t in tasks] == [0, 0, 1]
    listing = tmp_path / "list.txt"
    listing.write_text("# two videos\nid2/v1/00001.mp4\n\nid1/v1/00001.mp4  # again\n"
                       "id2/v1/00001.mp4\n")
    root, paths = pp.find_inputs(str(listing))
    assert root == str(tmp_path) and len(paths) == 2 and paths[0].endswith("id2/v1/00001.mp4")
    # the test split: a stable share of identities
    keys = [f"id{i:05d}" for i in range(2000)]
    test = [pp.is_test_identity(k, 0.2) for k in keys]
    assert abs(np.mean(test) - 0.2) < 0.03
    assert test == [pp.is_test_identity(k, 0.2) for k in keys]
    assert not any(pp.is_test_identity(k, 0.0) for k in keys)
    # a listed file that is gone: a failed entry, not a crash
    gone = pp.Task(str(tmp_path / "gone.mp4"), "gone.mp4", "gone", 0, "train")
    res = pp.process_input(gone, pp.Settings())
    assert (res.entry["status"], res.entry["reason"], res.records) == ("failed", "missing", [])


def test_segments_split_where_the_track_is_lost_or_jumps():
    def o(cx, side=100.0, cut=False):
        lm = fa.FaceLandmarks(np.zeros((468, 3), np.float32), np.zeros((0, 71, 3)),
                              np.zeros((0, 5, 3)), 1.0, (480, 640))
        return pp.FrameObs(lm, np.array([cx, 100.0, side]), np.zeros(8, np.float32), False,
                           cut)

    obs = ([o(100)] * 5 + [None] * 2 + [o(100)] * 3 + [o(160)] * 4 + [o(160, 140)] * 2
           + [o(160, 140, cut=True)] + [o(160, 140)] * 9)
    assert pp.segments(obs, 100) == [(0, 5), (7, 10), (10, 14), (14, 16), (16, 26)]
    assert pp.segments(obs, 4) == [(0, 2), (2, 5), (7, 10), (10, 14), (14, 16), (16, 19),
                                   (19, 23), (23, 26)]
    assert math.isclose(pp.Settings(min_seconds=1.0).min_frames, 25)
