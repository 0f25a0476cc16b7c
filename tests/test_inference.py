"""vasa_jax.inference: the pipeline on random-weight tiny models (shapes, streaming equals
offline, no recompiles, controls, export round trip, bad input)."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

import configs
from data_pipeline import stats as stats_lib
from vasa_jax import audio as audio_lib
from vasa_jax import inference
from vasa_jax.models.face_latent import FaceLatentModel
from vasa_jax.models.motion_dit import MotionDiT
from vasa_jax.motion_sampler import MotionGenerator

W, K, N_MELS = 8, 2, 16


@pytest.fixture(scope="module")
def pipe():
    face_config = configs.load("configs/face_latent.py:size=tiny",
                               model__motion__glimpse_widths=(0.65, 0.4),
                               model__motion__dyn_split=True)
    motion_config = configs.load("configs/motion_dit.py:size=tiny", data__window=W,
                                 data__context=K, model__layers=1, model__width=32,
                                 model__heads=2, diffusion__sample_steps=2)
    dyn = face_config.model.motion.dyn_dim
    da = audio_lib.feature_dim_mel(N_MELS)
    rng = np.random.default_rng(0)
    norm = stats_lib.Normalization(
        "features:motion", "features:audio",
        motion_mean=rng.normal(size=7 + dyn).astype(np.float32) * 0.1,
        motion_std=np.full(7 + dyn, 0.2, np.float32),
        audio_mean=np.zeros(da, np.float32), audio_std=np.ones(da, np.float32),
        gaze_mean=np.zeros(2, np.float32), gaze_std=np.ones(2, np.float32),
        distance_mean=np.zeros(1, np.float32), distance_std=np.ones(1, np.float32))
    face = FaceLatentModel(face_config.model, rngs=nnx.Rngs(0))
    dit = MotionDiT(motion_config.model, 7 + dyn, da, rngs=nnx.Rngs(1))
    motion = MotionGenerator(motion_config, dit, norm)
    return inference.Pipeline(face, face_config, motion, {"frontend": "mel", "n_mels": N_MELS,
                                                          "fps": 25.0})


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    n = int(2.4 * W * 640) + 37  # 2.4 windows: a short last window
    t = np.arange(n) / 16000.0
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    return image, audio


def test_generate_shapes_and_length(pipe, inputs):
    image, audio = inputs
    video = pipe.generate(image, audio, inference.Controls(seed=3))
    t = audio_lib.num_video_frames(len(audio))
    assert video.frames.shape == (t, 64, 64, 3) and video.frames.dtype == np.uint8
    assert video.motion.shape == (t, 7 + pipe.dyn_dim) and video.fps == 25.0
    np.testing.assert_array_equal(video.z_pose, video.motion[:, :7])


def test_stream_equals_offline_and_nothing_recompiles(pipe, inputs):
    image, audio = inputs
    controls = inference.Controls(seed=5)
    before = inference._RENDER._cache_size(), pipe.motion._sample._cache_size()
    offline = pipe.generate(image, audio, controls)  # 3 windows, the last one short
    renders = inference._RENDER._cache_size()
    samples = pipe.motion._sample._cache_size()
    assert renders <= before[0] + 1 and samples <= before[1] + 1
    rng = np.random.default_rng(2)
    cuts = np.sort(rng.choice(len(audio), 9, replace=False))
    chunks = np.split(audio, cuts)
    frames = list(pipe.stream(image, chunks, controls))
    assert [f.index for f in frames] == list(range(len(offline.frames)))
    np.testing.assert_allclose(frames[-1].time, (len(frames) - 1) / 25.0)
    got = np.stack([f.image for f in frames]).astype(int)
    assert np.max(np.abs(got - offline.frames.astype(int))) <= 1
    # One compiled render and one compiled sampler served every window of both runs.
    assert inference._RENDER._cache_size() == renders
    assert pipe.motion._sample._cache_size() == samples


def test_features_of_a_later_window_match_the_whole_clip(pipe, inputs):
    _, audio = inputs
    whole = pipe.features(audio, 0, 20)
    np.testing.assert_allclose(pipe.features(audio, 8, 16), whole[8:16], atol=1e-5)
    # Only samples up to the window's end (+ look-ahead) matter.
    cut = audio[:(16 + 1) * 640]
    np.testing.assert_allclose(pipe.features(cut, 8, 16), whole[8:16], atol=1e-5)


def test_controls(pipe, inputs):
    image, audio = inputs
    portrait = pipe.encode_portrait(image)
    rng = np.random.default_rng(3)
    motion = rng.normal(size=(W, 7 + pipe.dyn_dim)).astype(np.float32)
    still = pipe.apply_controls(motion, portrait, inference.Controls(head="still"))
    np.testing.assert_allclose(still[0], np.broadcast_to(portrait.z_pose, (W, 7)))
    np.testing.assert_array_equal(still[1], motion[:, 7:])
    half = pipe.apply_controls(motion, portrait, inference.Controls(head_amplitude=0.5))[0]
    centre = pipe.motion.motion_mean[:7]
    np.testing.assert_allclose(half - centre, 0.5 * (motion[:, :7] - centre), atol=1e-6)
    pose, dyn = pipe.apply_controls(motion, portrait, inference.Controls(lip_only=True))
    h = pipe.dyn_dim // 2
    np.testing.assert_allclose(pose, np.broadcast_to(portrait.z_pose, (W, 7)))
    np.testing.assert_allclose(dyn[:, :h], np.broadcast_to(portrait.z_dyn[:h], (W, h)))
    np.testing.assert_array_equal(dyn[:, h:], motion[:, 7 + h:])
    driving = rng.normal(size=(5, 7)).astype(np.float32)
    pose = pipe.apply_controls(motion, portrait, inference.Controls(), start=2,
                               driving_pose=driving)[0]
    np.testing.assert_array_equal(pose[:3], driving[2:5])
    np.testing.assert_array_equal(pose[3:], np.broadcast_to(driving[4], (W - 3, 7)))
    assert pipe.encode_pose(np.stack([image] * 3)).shape == (3, 7)


@pytest.mark.parametrize("kwargs, match", [(dict(head="spin"), "head"),
                                            (dict(emotion="glee"), "emotion"),
                                            (dict(head_amplitude=-1.0), "head_amplitude"),
                                            (dict(steps=0), "steps")])
def test_bad_controls(kwargs, match):
    with pytest.raises(ValueError, match=match):
        inference.Controls(**kwargs)


def test_portrait_inputs():
    square = np.zeros((80, 80, 3), np.uint8)
    assert inference.prepare_portrait(square, 64).shape == (64, 64, 3)
    with pytest.warns(UserWarning, match="not square"):
        assert inference.prepare_portrait(np.zeros((64, 90, 3), np.uint8), 64).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="uint8"):
        inference.prepare_portrait(np.zeros((64, 64, 3), np.float32), 64)
    with pytest.raises(ValueError, match="RGB"):
        inference.prepare_portrait(np.zeros((64, 64, 5), np.uint8), 64)


def test_export_round_trip(pipe, inputs, tmp_path):
    image, audio = inputs
    out = str(tmp_path / "export")
    pipe.export(out)
    with pytest.raises(FileExistsError):
        pipe.export(out)
    loaded = inference.Pipeline.load(out)
    a = pipe.generate(image, audio[:W * 640], inference.Controls(seed=1))
    b = loaded.generate(image, audio[:W * 640], inference.Controls(seed=1))
    np.testing.assert_allclose(a.motion, b.motion, atol=1e-5)
    assert np.max(np.abs(a.frames.astype(int) - b.frames.astype(int))) <= 1
    with pytest.raises(FileNotFoundError, match="not a model export"):
        inference.Pipeline.load(str(tmp_path))


# ----------------------------------------------------------------------------- sample.py


@pytest.fixture(scope="module")
def exported(pipe, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "model")
    pipe.export(out)
    return out


@pytest.mark.parametrize("mode", ["offline", "stream"])
def test_sample_cli_writes_video_with_audio(exported, tmp_path, mode, capsys):
    import sample
    from vasa_jax import video

    out = str(tmp_path / "out.mp4")
    rc = sample.main(["--model", exported, "--out", out, "--mode", mode, "--no_progress",
                      "--head", "still", "--seed", "2"])
    assert rc == 0, capsys.readouterr().err
    frames, fps = video.read_video(out)
    speech = audio_lib.load_audio(sample.DEMO_AUDIO)
    assert fps == pytest.approx(25.0)
    assert abs(len(frames) - audio_lib.num_video_frames(len(speech))) <= 1
    assert frames.shape[1:] == (64, 64, 3)
    if mode == "offline":  # the muxed audio track decodes to the speech's length
        track = audio_lib.load_audio(out)
        assert abs(len(track) - len(speech)) < 0.05 * 16000


def test_sample_cli_bad_input(exported, tmp_path, capsys):
    import sample

    def run(*extra):
        return sample.main(["--model", exported, "--no_progress", *extra])

    out = str(tmp_path / "x.mp4")
    assert run("--image", str(tmp_path / "none.png"), "--out", out) == 2
    assert "no such image" in capsys.readouterr().err
    not_image = tmp_path / "not.png"
    not_image.write_text("hello")
    assert run("--image", str(not_image), "--out", out) == 2
    assert "not an image" in capsys.readouterr().err
    assert run("--out", str(tmp_path / "missing" / "x.mp4")) == 2
    assert "does not exist" in capsys.readouterr().err
    silent = tmp_path / "silent.wav"
    from vasa_jax.video import write_wav

    write_wav(str(silent), np.zeros(16000, np.float32), 16000)
    assert run("--audio", str(silent), "--out", out) == 2
    assert "silent" in capsys.readouterr().err
    assert run("--model", str(tmp_path), "--out", out) == 2
    assert "not a model export" in capsys.readouterr().err
    assert sample.main(["--face_workdir", str(tmp_path), "--motion_workdir", str(tmp_path),
                        "--dtype", "bfloat16", "--out", out, "--no_progress"]) == 2
    assert "--dtype applies to a model export" in capsys.readouterr().err
    assert not os.path.exists(out)


def _speech(path, seconds, hz=180.0):
    from vasa_jax.video import write_wav

    t = np.arange(int(seconds * 16000)) / 16000.0
    write_wav(str(path), (0.3 * np.sin(2 * np.pi * hz * t) * (1 + np.sin(2 * np.pi * 3 * t)))
              .astype(np.float32), 16000)


def test_sample_batch_one_compilation_resumes_and_reports(exported, tmp_path, capsys,
                                                         monkeypatch):
    import csv

    import sample
    from vasa_jax import video

    load, held = sample.load_pipeline, {}  # the same pipeline for both runs: count compiles
    monkeypatch.setattr(sample, "load_pipeline", lambda a: held.setdefault("pipe", load(a)))
    (tmp_path / "in").mkdir()
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    import cv2

    assert cv2.imwrite(str(tmp_path / "in" / "face.png"), image)
    _speech(tmp_path / "in" / "short.wav", 1.3)
    _speech(tmp_path / "in" / "long.wav", 2.9, hz=240.0)
    out = tmp_path / "videos"
    first = tmp_path / "in" / "first.csv"
    first.write_text("image,audio,out\nface.png,short.wav,a.mp4\n")
    argv = ["--model", exported, "--out_dir", str(out), "--no_progress", "--align", "none"]
    assert sample.main(["--batch", str(first), *argv]) == 0, capsys.readouterr().err
    pipe = held["pipe"]
    compiled = inference._RENDER._cache_size(), pipe.motion._sample._cache_size()
    jobs = tmp_path / "in" / "jobs.csv"  # a later, longer batch: a.mp4 is done already
    jobs.write_text('image,audio,out,gaze,lip_only,seed,head\n'
                    'face.png,short.wav,a.mp4,,,,\n'
                    'face.png,long.wav,,"-10,5",false,3,still\n'
                    'face.png,long.wav,c.mp4,,true,4,\n'
                    'missing.png,short.wav,d.mp4,,,,\n')
    before = os.path.getmtime(out / "a.mp4")
    assert sample.main(["--batch", str(jobs), *argv]) == 1  # one job failed, the rest made
    err = capsys.readouterr().err
    assert "1 missing file(s): line 5 image" in err and "line 5: error:" in err
    assert (inference._RENDER._cache_size(), pipe.motion._sample._cache_size()) == compiled
    assert os.path.getmtime(out / "a.mp4") == before  # skipped, not redone
    with open(out / "batch_report.csv") as f:
        report = list(csv.DictReader(f))
    assert [r["status"] for r in report] == ["skipped", "ok", "ok", "failed"]
    assert [r["line"] for r in report] == ["2", "3", "4", "5"]
    assert os.path.basename(report[1]["out"]) == "0001_face_long.mp4"
    assert "no such image" in report[3]["message"] and not os.path.exists(out / "d.mp4")
    for row, seconds in zip(report[1:3], (2.9, 2.9)):
        frames, _ = video.read_video(row["out"])
        assert abs(len(frames) - audio_lib.num_video_frames(int(seconds * 16000))) <= 1
        assert int(row["frames"]) == len(frames)


@pytest.mark.parametrize("text, match", [
    ("image,audio,mood\nf.png,s.wav,x\n", "unknown column"),
    ("image,out\nf.png,a.mp4\n", "needs a header row with the column"),
    ('image,audio,gaze\nf.png,s.wav,"0,0"\nf.png,s.wav,"15,x"\n', "line 3: argument --gaze"),
    ("image,audio,emotion\nf.png,s.wav,glee\n", "line 2: emotion 'glee' is not one of"),
    ("image,audio,lip_only\nf.png,s.wav,maybe\n", "lip_only: expected true or false"),
    ("image,audio,out\nf.png,s.wav,a.mp4\ng.png,s.wav,a.mp4\n", "lines 2 and 3 both write"),
    ("image,audio,out\nf.png,s.wav,sub/a.mp4\n", "out must be a file name"),
    ("image,audio\n", "has no jobs"),
    ("image,audio\nf.png,s.wav,extra\n", "more cells than columns"),
])
def test_sample_batch_bad_files(exported, tmp_path, capsys, text, match):
    import sample

    jobs = tmp_path / "jobs.csv"
    jobs.write_text(text)
    out = tmp_path / "videos"
    assert sample.main(["--model", exported, "--batch", str(jobs), "--out_dir", str(out),
                        "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err
    assert not out.exists()  # checked before anything is made


def test_sample_batch_needs_both_flags(tmp_path, capsys):
    import sample

    assert sample.main(["--out_dir", str(tmp_path / "v"), "--no_progress"]) == 2
    assert "--batch and --out_dir go together" in capsys.readouterr().err
    assert sample.main(["--batch", str(tmp_path / "none.csv"), "--out_dir", str(tmp_path / "v"),
                        "--no_progress"]) == 2
    assert "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- serve


def _multipart(fields: dict) -> tuple[bytes, str]:
    """{name: str | (file name, bytes)} -> (body, Content-Type) of multipart/form-data."""
    boundary = "vasa-test-boundary-7d3f"
    out = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            head = f'form-data; name="{name}"; filename="{value[0]}"'
            data = value[1]
        else:
            head, data = f'form-data; name="{name}"', value.encode()
        out.append(f"--{boundary}\r\nContent-Disposition: {head}\r\n\r\n".encode() + data
                   + b"\r\n")
    return b"".join(out) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def server(pipe):
    import threading

    from vasa_jax import serve

    srv = serve.make_server(pipe, "127.0.0.1", 0, max_mb=0.25, name="tiny")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _request(url, body=None, content_type=None):
    """-> (status, headers, body bytes) of a GET (body None) or POST."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_serve_generates_a_video_and_answers_bad_input(server, tmp_path):
    import json

    import cv2

    from vasa_jax import video

    status, _, body = _request(server + "/health")
    assert status == 200 and json.loads(body)["image_size"] == 64
    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    png = cv2.imencode(".png", image)[1].tobytes()
    _speech(tmp_path / "s.wav", 1.5)
    wav = (tmp_path / "s.wav").read_bytes()
    form, kind = _multipart({"image": ("f.png", png), "audio": ("s.wav", wav),
                             "gaze": "-10,5", "seed": "2", "align": "none"})
    status, headers, body = _request(server + "/generate", form, kind)
    assert status == 200, body[:300]
    assert headers["Content-Type"] == "video/mp4"
    (tmp_path / "out.mp4").write_bytes(body)
    frames, fps = video.read_video(str(tmp_path / "out.mp4"))
    assert fps == pytest.approx(25.0) and frames.shape[1:] == (64, 64, 3)
    assert len(frames) == int(headers["X-Frames"])
    assert abs(len(frames) - audio_lib.num_video_frames(int(1.5 * 16000))) <= 1
    track = audio_lib.load_audio(str(tmp_path / "out.mp4"))
    assert abs(len(track) - 1.5 * 16000) < 0.05 * 16000

    def error(fields, status_wanted=400, *, raw=None, content_type=None):
        body_, kind_ = (raw, content_type) if raw is not None else _multipart(fields)
        status_, _, answer = _request(server + "/generate", body_, kind_)
        assert status_ == status_wanted, answer
        return json.loads(answer)["error"]

    assert "not an image" in error({"image": ("f.png", wav), "audio": ("s.wav", wav)})
    assert "field audio" in error({"image": ("f.png", png), "audio": ("s.wav", png)})
    assert "missing form field(s) audio" in error({"image": ("f.png", png)})
    assert "unknown control 'mood'" in error({"image": ("f.png", png), "audio": ("s.wav", wav),
                                              "mood": "x"})
    assert "control gaze" in error({"image": ("f.png", png), "audio": ("s.wav", wav),
                                    "gaze": "up"})
    assert "align must be one of" in error({"image": ("f.png", png), "audio": ("s.wav", wav),
                                            "align": "left"})
    silent = tmp_path / "silent.wav"
    from vasa_jax.video import write_wav

    write_wav(str(silent), np.zeros(16000, np.float32), 16000)
    assert "silent" in error({"image": ("f.png", png), "audio": ("s.wav", silent.read_bytes())})
    assert "multipart/form-data" in error(None, raw=b"a=b",
                                          content_type="application/x-www-form-urlencoded")
    big = _multipart({"image": ("f.png", b"0" * 300_000), "audio": ("s.wav", wav)})
    assert "over the server's --max_mb" in error(None, 413, raw=big[0], content_type=big[1])
    status, _, body = _request(server + "/nowhere")
    assert status == 404 and "no such path" in json.loads(body)["error"]


def test_controls_from_text():
    c = inference.Controls.from_text({"gaze": "15,-5", "distance": "1.2", "emotion": "happy",
                                      "guidance": "audio=0.5,gaze=1", "steps": "4", "seed": "7",
                                      "head": "still", "head_amplitude": "0.5",
                                      "lip_only": "yes"})
    assert c.gaze == pytest.approx((15.0, -5.0)) and c.distance == pytest.approx(1.2)
    assert c.guidance == {"audio": pytest.approx(0.5), "gaze": pytest.approx(1.0)}
    assert (c.emotion, c.steps, c.seed, c.head, c.lip_only) == ("happy", 4, 7, "still", True)
    assert inference.Controls.from_text({"gaze": ""}) == inference.Controls()
    with pytest.raises(ValueError, match="control steps"):
        inference.Controls.from_text({"steps": "many"})
    with pytest.raises(ValueError, match="emotion 'glee'"):
        inference.Controls.from_text({"emotion": "glee"})


def test_serve_cli_bad_input(tmp_path, capsys):
    from vasa_jax import serve

    assert serve.main(["--model", str(tmp_path), "--port", "0", "--no_warmup"]) == 2
    assert "not a model export" in capsys.readouterr().err
    assert serve.main(["--face_workdir", str(tmp_path), "--port", "0"]) == 2
    assert "go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve.main(["--port", "http"])
    assert "invalid int value" in capsys.readouterr().err
