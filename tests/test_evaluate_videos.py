"""python -m vasa_jax.evaluate videos on videos built here from a real face photo
(skimage's astronaut.png, moved over 3.2 s and muxed with espeak-ng speech): real-vs-real
gives identical numbers and fidelity r 1, a still head has dP near 0 and less jitter than a
moving one, the report files exist and the columns without their weights say so; with
--syncnet (random converted weights) Sc / SD are numbers, identical for real vs real; with
--i3d (random converted weights) FVD25 is ~0 for real vs real and larger for a still head;
bad input is one line."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from data_pipeline import face_analysis as fa
from data_pipeline.synthtalk import speech
from vasa_jax.evaluate import videos
from vasa_jax.evaluate.__main__ import main as evaluate_main

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("ai_edge_litert")
if not speech.espeak_available():
    pytest.skip("espeak-ng is not installed", allow_module_level=True)

FPS, SECONDS, SIZE = 25, 3.2, 256


def _frames(photo, face, amplitude: float):
    import cv2

    n = int(FPS * SECONDS)
    for i in range(n):
        t = i / FPS
        angle = amplitude * 10.0 * np.sin(2 * np.pi * t / 1.6)
        dx = amplitude * 12.0 * np.sin(2 * np.pi * t / 2.1)
        m = cv2.getRotationMatrix2D(face[:2], angle, 120.0 / face[2])
        m[:, 2] += np.array([SIZE / 2 + dx, SIZE / 2]) - face[:2]
        yield cv2.warpAffine(photo, m, (SIZE, SIZE), borderValue=(128, 128, 128))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    from vasa_jax.video import write_video

    root = tmp_path_factory.mktemp("videos")
    photo = skimage_data.astronaut()
    analyzer = fa.FaceAnalyzer()
    face = np.asarray(fa.crop_box(analyzer.landmarks(photo, analyzer.detect(photo)[0])))
    audio = speech.espeak_speech(["Tell me what you see over there, near the river."],
                                 "en-us", 160, 50, [])
    n = int(SECONDS * 16000)
    audio = np.pad(audio, (0, max(0, n - len(audio))))[:n]
    real, gen, still = root / "real", root / "generated", root / "still"
    for d in (real, gen, still):
        d.mkdir()
    for name, amp in (("a", 1.0), ("b", 0.6)):
        write_video(str(real / f"{name}.mp4"), _frames(photo, face, amp), FPS, audio, 16000)
        shutil.copy(real / f"{name}.mp4", gen / f"{name}.mp4")
        write_video(str(still / f"{name}.mp4"), _frames(photo, face, 0.0), FPS, audio, 16000)
    return {"real": str(real), "generated": str(gen), "still": str(still), "root": root}


def _report(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def test_real_vs_real_is_identical_and_the_report_is_complete(sets, capsys):
    out = str(sets["root"] / "report_same")
    assert evaluate_main(["videos", "--generated", sets["generated"], "--real", sets["real"],
                          "--out", out]) == 0
    rep = _report(out)
    g, r = rep["sets"]["generated"], rep["sets"]["real"]
    for k in ("dP", "jitter", "lip r", "blinks/min", "faces"):
        assert g[k] == pytest.approx(r[k], abs=1e-6), k
    assert g["dP"] > 0.3  # the head turns by up to 10 degrees
    assert g["faces"] == pytest.approx(1.0)
    assert g["mouth fidelity"] == pytest.approx(1.0, abs=1e-6)
    table = open(os.path.join(out, "table.md")).read()
    assert "| set | videos | Sc | SD | CAPP | dP | FVD25 |" in table
    assert "n/a: pass --syncnet DIR" in table and "n/a: pass --i3d DIR" in table
    assert "FVD25: pass --i3d DIR" in table and rep["not_built"]["FVD25"] == videos.NO_I3D
    assert "pass --capp RUN" in table and "Sc/SD: pass --syncnet DIR" in table
    assert rep["not_built"]["Sc"] == rep["not_built"]["SD"] == videos.NO_SYNCNET
    assert np.isnan(g["Sc"]) and np.isnan(g["SD"])  # not computed
    with open(os.path.join(out, "videos.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted((row["set"], row["video"]) for row in rows) == [
        ("generated", "a"), ("generated", "b"), ("real", "a"), ("real", "b")]
    assert all(int(row["frames"]) == int(FPS * SECONDS) for row in rows)
    assert os.path.getsize(os.path.join(out, "metrics.png")) > 1000
    assert "| generated | 2 |" in capsys.readouterr().out


def test_syncnet_fills_sc_and_sd(sets, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from tests.test_syncnet import TorchSyncNet
    from vasa_jax.models import syncnet

    torch.manual_seed(0)
    weights = str(tmp_path / "syncnet_v2.model")
    torch.save(TorchSyncNet().eval().state_dict(), weights)
    converted = str(tmp_path / "syncnet")
    assert syncnet.main(["convert", "--weights", weights, "--out", converted]) == 0
    # One video per set keeps SyncNet's ~0.2 s a frame on 2 CPU cores affordable.
    gen, real = tmp_path / "gen", tmp_path / "real"
    for d in (gen, real):
        d.mkdir()
        shutil.copy(os.path.join(sets["real"], "a.mp4"), d / "a.mp4")
    out = str(tmp_path / "report")
    assert evaluate_main(["videos", "--generated", str(gen), "--real", str(real),
                          "--syncnet", converted, "--out", out]) == 0
    rep = _report(out)
    g, r = rep["sets"]["generated"], rep["sets"]["real"]
    for k in ("Sc", "SD"):
        assert isinstance(g[k], float) and np.isfinite(g[k]), (k, g[k])
        assert g[k] == pytest.approx(r[k], rel=1e-6, abs=1e-6), k
    assert g["Sc"] >= 0.0 and g["SD"] > 0.0
    assert "Sc" not in rep["not_built"]
    with open(os.path.join(out, "videos.csv")) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert np.isfinite(float(row["Sc"])) and np.isfinite(float(row["SD"]))
        assert -15 <= float(row["AV offset"]) <= 15
    table = open(os.path.join(out, "table.md")).read()
    assert "pass --syncnet" not in table
    assert f"| generated | 1 | {g['Sc']:.3f} | {g['SD']:.3f} |" in table

    missing = str(tmp_path / "no_syncnet")
    capsys.readouterr()
    assert evaluate_main(["videos", "--generated", str(gen), "--syncnet", missing,
                          "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "--syncnet" in err and "no_syncnet" in err and "syncnet convert" in err


def test_i3d_fills_fvd25(sets, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from tests.test_i3d import TorchI3D, _calibrate_batch_norms
    from vasa_jax.models import i3d
    from vasa_jax.video import read_audio, read_video, write_video

    torch.manual_seed(0)
    weights = str(tmp_path / "rgb_imagenet.pt")
    model = _calibrate_batch_norms(TorchI3D(), torch.rand(1, 3, 9, 224, 224) * 2 - 1)
    torch.save(model.state_dict(), weights)
    converted = str(tmp_path / "i3d")
    assert i3d.main(["convert", "--weights", weights, "--out", converted]) == 0
    # One 2-second video per set: 2 clips of 25 frames each (I3D at 224 px is slow on CPU).
    dirs = {k: tmp_path / k for k in ("real", "same", "still")}
    for key, source in (("real", "real"), ("same", "real"), ("still", "still")):
        dirs[key].mkdir()
        path = os.path.join(sets[source], "a.mp4")
        frames, fps = read_video(path)
        write_video(str(dirs[key] / "a.mp4"), frames[:50], fps, read_audio(path, 16000)[:32000],
                    16000)
    reports = {}
    for key in ("same", "still"):
        out = str(tmp_path / f"report_{key}")
        assert evaluate_main(["videos", "--generated", str(dirs[key]), "--real",
                              str(dirs["real"]), "--i3d", converted, "--out", out]) == 0
        reports[key] = _report(out)
        table = open(os.path.join(out, "table.md")).read()
        assert "pass --i3d" not in table and "FVD25" not in reports[key]["not_built"]
        assert reports[key]["fvd"]["clips"] == {"generated": 2, "real": 2}
        assert np.isnan(reports[key]["sets"]["real"]["FVD25"])  # the reference set
    same = reports["same"]["sets"]["generated"]["FVD25"]
    still = reports["still"]["sets"]["generated"]["FVD25"]
    with capsys.disabled():
        print(f"FVD25 real vs real {same:.3g}, still head vs real {still:.3g}")
    assert still > 1.0 and same < 1e-3 * still, (same, still)
    assert f"| {still:.3f} |" in open(os.path.join(tmp_path / "report_still", "table.md")).read()

    capsys.readouterr()
    assert evaluate_main(["videos", "--generated", str(dirs["same"]), "--real",
                          str(dirs["real"]), "--i3d", str(tmp_path / "no_i3d"),
                          "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "--i3d" in err and "no_i3d" in err and "i3d convert" in err
    assert evaluate_main(["videos", "--generated", str(dirs["same"]), "--i3d", converted,
                          "--out", str(tmp_path / "o")]) == 1
    assert "--i3d needs --real" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_a_still_head_has_no_pose_motion_and_less_jitter(sets):
    out = str(sets["root"] / "report_still")
    assert evaluate_main(["videos", "--generated", sets["still"], "--real", sets["real"],
                          "--out", out]) == 0
    rep = _report(out)
    g, r = rep["sets"]["generated"], rep["sets"]["real"]
    assert g["dP"] < 0.25 * r["dP"], (g["dP"], r["dP"])
    assert g["jitter"] < r["jitter"]


def test_metric_helpers():
    t = np.arange(100, dtype=np.float32)
    lm = np.stack([np.stack([t, 2 * t], -1)] * 3, 1)  # constant velocity: no acceleration
    assert videos.landmark_jitter(lm, 10.0) == pytest.approx(0.0, abs=1e-6)
    lm[50, :, 0] += 1.0  # one frame off by 1 px -> |acc| 1, 2, 1 px at frames 49..51
    assert videos.landmark_jitter(lm, 10.0) == pytest.approx(100 * 4 / 98 / 10, rel=1e-5)
    blink = np.zeros(25 * 60)
    for start in range(0, len(blink), 25 * 4):  # one 3-frame blink every 4 s
        blink[start:start + 3] = 1.0
    assert videos.blinks_per_minute(blink, 25.0) == pytest.approx(15.0)
    filled = videos._fill(np.array([1.0, 0.0, 3.0]), np.array([True, False, True]))
    np.testing.assert_allclose(filled, [1.0, 2.0, 3.0])


def test_bad_input_is_one_line(sets, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluate_main(["videos", "--generated", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "holds no videos" in capsys.readouterr().err
    assert evaluate_main(["videos", "--generated", str(tmp_path / "missing"),
                          "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    noface = tmp_path / "noface"
    noface.mkdir()
    from vasa_jax.video import write_video

    rng = np.random.default_rng(0)
    write_video(str(noface / "n.mp4"), (rng.integers(0, 255, (96, 96, 3), np.uint8)
                                        for _ in range(10)), 25, np.zeros(6400, np.float32))
    assert evaluate_main(["videos", "--generated", str(noface), "--out", str(tmp_path / "o")]) == 1
    assert "a face in only" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
