"""python -m data_pipeline.inspect: summary, --check, the mouth-audio correlation."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import inspect as inspect_tool
from data_pipeline import schema
from data_pipeline.transforms import audio_frame_rms, lagged_correlation
from tests import testdata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv):
    code = inspect_tool.main([*map(str, argv), "--no-progress"])
    out = capsys.readouterr().out
    return code, out, out.strip().splitlines()[-1]


def correlation(last_line):
    m = re.fullmatch(r"mouth-audio correlation: (-?\d+\.\d+)", last_line)
    assert m, last_line
    return float(m.group(1))


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    testdata.make_dataset(str(d), identities=4, clips_per_identity=2, test_clips_per_identity=1,
                          size=32, features={"motion": 3})
    return d


def test_summary_and_check_pass(good_dir, capsys):
    code, out, last = run(capsys, good_dir)
    assert code == 0
    assert "split train: 8 clips in 2 shard(s)" in out
    assert "split test: 4 clips" in out
    assert "identities: 4" in out
    assert "frames: 400 (50.0 per clip)" in out
    assert "audio: 16.0 s" in out
    assert "frame size: 32x32" in out
    assert re.search(r"pose\.yaw\s+-?\d", out) and "emotion_probs.happy" in out
    assert "feature motion: [T, 3] in 8 clips" in out
    assert "mouth-audio" not in out  # only measured with --check

    code, out, last = run(capsys, good_dir, "--check", "--split", "train")
    assert code == 0, out
    assert "split test" not in out
    assert "check passed: 8 records verified" in out
    assert correlation(last) > 0.95


def test_best_lag_is_found(tmp_path, capsys):
    testdata.make_dataset(str(tmp_path), identities=2, clips_per_identity=2, size=16, mouth_lag=2)
    code, out, last = run(capsys, tmp_path, "--check")
    assert code == 0, out
    assert correlation(last) > 0.95
    assert "best lag -2 frames" in out  # mouth_open[t] follows the audio of frame t - 2


def test_broken_records_fail_the_check(tmp_path, capsys):
    donor = testdata.make_clip("donor", 0, num_frames=50, size=32)
    testdata.make_dataset(str(tmp_path), identities=2, clips_per_identity=2, size=32,
                          extra_records=[testdata.GARBAGE_RECORD, testdata.bad_frame_record(donor)])
    code, out, _ = run(capsys, tmp_path)  # no --check: frames are not decoded
    assert code == 0
    assert "(1 unreadable records)" in out and "1 broken record(s)" in out
    code, out, last = run(capsys, tmp_path, "--check")
    assert code == 1
    assert "2 broken record(s)" in out and "frame 1: frame bytes do not decode" in out
    assert "check FAILED: 2 broken record(s)" in out
    assert correlation(last) > 0.9  # still the last line


def test_wrong_frame_size_fails_the_check(tmp_path, capsys):
    testdata.make_dataset(str(tmp_path), identities=2, clips_per_identity=1, size=16)
    info = schema.DatasetInfo.load(str(tmp_path))
    info.height = info.width = 32
    info.save(str(tmp_path))
    code, out, _ = run(capsys, tmp_path, "--check")
    assert code == 1 and "frame size 16x16, dataset.json says 32x32" in out


def test_unsynced_mouth_fails_the_check(tmp_path, capsys):
    testdata.make_dataset(str(tmp_path), identities=2, clips_per_identity=2, seconds=4.0,
                          size=16, mouth="random")
    code, out, last = run(capsys, tmp_path, "--check")
    assert code == 1
    assert correlation(last) < 0.6
    assert "< 0.6" in out


def test_missing_mouth_labels_fail_the_check(tmp_path, capsys):
    testdata.make_dataset(str(tmp_path), identities=2, clips_per_identity=1, size=16,
                          labels=["pose", "gaze"])
    code, out, last = run(capsys, tmp_path, "--check")
    assert code == 1
    assert "no clip has mouth_open labels" in out
    assert last == "mouth-audio correlation: n/a (no mouth_open labels)"


def test_not_a_dataset(tmp_path, capsys):
    assert inspect_tool.main([str(tmp_path)]) == 2
    assert "not a clip-record dataset" in capsys.readouterr().err
    schema.DatasetInfo("x", 8, 8).save(str(tmp_path))
    assert inspect_tool.main([str(tmp_path), "--split", "test"]) == 2


def test_command_line(good_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipeline.inspect", str(good_dir), "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("mouth-audio correlation: 0.9")
    assert "records" in proc.stderr  # the progress bar goes to stderr


def test_audio_frame_rms():
    sr, fps = 16000, 25.0
    audio = np.zeros(3 * 640 + 100, np.float32)
    audio[640:1280] = 0.5  # frame 1
    audio[1280:1920:2] = 1.0  # frame 2: half the samples
    rms = audio_frame_rms(audio, sr, fps, 5)
    np.testing.assert_allclose(rms[:3], [0.0, 0.5, math.sqrt(0.5)], rtol=1e-6)
    assert rms[3] == 0.0 and np.isnan(rms[4])  # frame 3 partly covered, frame 4 not at all


def test_lagged_correlation_pools_clips_and_finds_the_lag():
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for n in (40, 60, 80):
        y = rng.normal(size=n)
        xs.append(np.roll(y, 2) + 0.1 * rng.normal(size=n))  # x[t] ~ y[t - 2]
        ys.append(y)
    r, lag, per_lag = lagged_correlation(xs, ys, 3)
    assert lag == -2 and r > 0.95 and set(per_lag) == set(range(-3, 4))
    assert abs(per_lag[0]) < 0.3
    # Pooled over clips: one r over all pairs, not a mean of per-clip r.
    a, b = [np.array([0.0, 1.0])], [np.array([0.0, 1.0])]
    assert lagged_correlation(a * 2, b * 2, 0)[0] == pytest.approx(1.0)
    r, _, _ = lagged_correlation([np.ones(5)], [np.arange(5.0)], 1)
    assert math.isnan(r)
