"""Portraits for the model (vasa_jax.inference.crop_portrait, sample.py --align): a real
photo (skimage's astronaut.png) and the same photo turned 15 degrees and placed off-centre
in a larger canvas give the same aligned face crop; a face crop at the model's size (the
built-in SynthTalk portrait) is used as it is; an image without a face is a clear error;
--align none keeps the old centre crop."""

import os
import re
import warnings

import cv2
import numpy as np
import pytest

import sample
from data_pipeline import face_analysis as fa
from data_pipeline import transforms
from vasa_jax import audio as audio_lib
from vasa_jax import inference, video

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("ai_edge_litert")

SIZE = 64  # the demo model's


def turned_off_centre(image, angle=15.0, out_hw=(768, 1024), at=(700, 300), fill=128):
    """image turned `angle` degrees counter-clockwise on screen about its centre, which lands
    at `at` (x, y) of a grey out_hw canvas."""
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    m[:, 2] += np.asarray(at) - (w / 2, h / 2)
    return cv2.warpAffine(image, m, (out_hw[1], out_hw[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(fill,) * 3)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


def mad(a, b):
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def framing(crop):
    """(centre offset / side, side ratio, eye line degrees) of the face-crop convention's
    square of the face re-detected in a crop."""
    an = fa.default_analyzer()
    dets = an.detect(crop, small_faces=True)
    assert len(dets) == 1
    lm = an.landmarks(crop, dets[0])
    cx, cy, side = fa.crop_box(lm)
    n = crop.shape[0]
    return np.hypot(cx - n / 2, cy - n / 2) / n, side / n, fa.eye_line_angle(lm)


@pytest.fixture(scope="module")
def photo():
    return skimage_data.astronaut()  # uint8 [512, 512, 3]


@pytest.fixture(scope="module")
def canvas(photo):
    return turned_off_centre(photo)


def save(path, image):
    assert cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1]))
    return str(path)


# ----------------------------------------------------------------------------- crop_portrait


@pytest.mark.filterwarnings("ignore:portrait resized")
@pytest.mark.parametrize("size", [SIZE, 256])
def test_a_turned_off_centre_photo_gives_the_same_crop(photo, canvas, size):
    """Measured: 64 px 3.1 grey levels mean abs difference, 33.3 dB; 256 px 3.5, 32.2 dB;
    re-detected in either crop the face's crop square is within 1% of the crop."""
    ref, note = inference.crop_portrait(photo, size)
    assert "aligned" in note and ref.shape == (size, size, 3) and ref.dtype == np.uint8
    crop, note = inference.crop_portrait(canvas, size, name="canvas.png")
    assert "1024x768, face found and aligned" in note
    assert mad(crop, ref) < 6.0 and psnr(crop, ref) > 28.0, (mad(crop, ref), psnr(crop, ref))
    for c in (ref, crop):
        offset, side, angle = framing(c)
        assert offset < 0.03 and abs(side - 1) < 0.05 and abs(angle) < 2.0, (offset, side, angle)
    # "face" does the same on a photo; the off-centre canvas is no longer centre-cropped
    assert np.array_equal(inference.crop_portrait(canvas, size, "face")[0], crop)
    with pytest.warns(UserWarning, match="not square"):
        blind = inference.crop_portrait(canvas, size, "none")[0]
    assert psnr(blind, ref) < 15.0


def test_auto_keeps_a_face_crop_at_the_model_size(photo):
    """The built-in 64 px SynthTalk portrait: a face is found (its crop square 9% off
    centre, 0.86 of the side) and the image is used as it is, exactly as before (align none);
    also near the model's size, and for a crop that auto made itself."""
    demo = inference.read_portrait(sample.DEMO_IMAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no face" fallback, no resize warning
        out, note = inference.crop_portrait(demo, SIZE, "auto", name="portrait.png")
        assert "already a face crop" in note
        assert np.array_equal(out, demo)
        assert np.array_equal(inference.read_portrait(sample.DEMO_IMAGE, SIZE), demo)
        big = cv2.resize(demo, (72, 72), interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(inference.crop_portrait(big, SIZE)[0],
                              inference.crop_portrait(big, SIZE, "none")[0])
        aligned = inference.crop_portrait(photo, SIZE)[0]
        again, note = inference.crop_portrait(aligned, SIZE)
        assert "already a face crop" in note and np.array_equal(again, aligned)
    # the whole photo shrunk to the model's size is not a face crop: aligned
    small = cv2.resize(photo, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    assert "aligned" in inference.crop_portrait(small, SIZE)[1]


@pytest.mark.parametrize("kind", ["noise", "flat"])
def test_an_image_without_a_face(kind):
    rng = np.random.default_rng(0)
    big = (rng.integers(0, 256, (300, 400, 3), dtype=np.uint8) if kind == "noise"
           else np.full((300, 400, 3), 200, np.uint8))
    for align in ("auto", "face"):
        with pytest.raises(fa.NoFaceError, match=r"no face found in x\.png \(400x300\)"):
            inference.crop_portrait(big, SIZE, align, name="x.png")
    # at the model's size, auto falls back to the image as it is, with a warning
    small = np.ascontiguousarray(big[:SIZE, :SIZE])
    with pytest.warns(UserWarning, match=r"no face found in x\.png \(64x64\).*used as it is"):
        out, note = inference.crop_portrait(small, SIZE, "auto", name="x.png")
    assert np.array_equal(out, small) and "no face found" in note
    with pytest.raises(fa.NoFaceError):
        inference.crop_portrait(small, SIZE, "face")
    with pytest.raises(ValueError, match="align must be"):
        inference.crop_portrait(small, SIZE, "centre")


@pytest.mark.filterwarnings("ignore:portrait resized")
def test_none_is_the_old_centre_crop(photo):
    wide = np.ascontiguousarray(photo[100:400])  # 512x300
    with pytest.warns(UserWarning, match="not square"):
        out = inference.prepare_portrait(wide, SIZE)  # the default: none
    assert np.array_equal(out, transforms.resize_square(wide, SIZE))
    with pytest.warns(UserWarning, match="resized from 512"):
        assert np.array_equal(inference.crop_portrait(photo, SIZE, "none")[0],
                              transforms.resize_square(photo, SIZE))


# ----------------------------------------------------------------------------- sample.py


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """1.2 s of the built-in speech: 30 frames."""
    audio = audio_lib.load_audio(sample.DEMO_AUDIO)[8000:8000 + 19200]
    path = str(tmp_path_factory.mktemp("speech") / "speech.wav")
    video.write_wav(path, audio, 16000)
    return path, audio_lib.num_video_frames(len(audio))


@pytest.fixture
def used_portraits(monkeypatch):
    """What sample.py hands the model: crop_portrait's outputs by image name."""
    seen = {}
    crop = inference.crop_portrait

    def recording(image, size, align="auto", name="the portrait"):
        out = crop(image, size, align, name)
        seen.setdefault(name, out[0])  # the first: sample.py's (the pipeline's come later)
        return out

    monkeypatch.setattr(inference, "crop_portrait", recording)
    return seen


def run_sample(image, out, speech, *extra):
    return sample.main(["--model", sample.DEMO_MODEL, "--image", image, "--audio", speech[0],
                        "--out", out, "--no_progress", "--head", "still", *extra])


def test_sample_cli_aligns_a_real_photo(photo, canvas, speech, tmp_path, used_portraits,
                                        capsys):
    rc = run_sample(save(tmp_path / "astronaut.png", photo), str(tmp_path / "a.mp4"), speech)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "portrait (--align auto): 512x512, face found and aligned" in err
    path = save(tmp_path / "turned.png", canvas)
    rc = run_sample(path, str(tmp_path / "b.mp4"), speech)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "1024x768, face found and aligned" in err
    for name in ("a.mp4", "b.mp4"):
        frames, fps = video.read_video(str(tmp_path / name))
        assert len(frames) == speech[1] and frames.shape[1:] == (SIZE, SIZE, 3)
        assert fps == pytest.approx(25.0)
    a, b = used_portraits[str(tmp_path / "astronaut.png")], used_portraits[path]
    assert mad(a, b) < 6.0 and psnr(a, b) > 28.0


@pytest.mark.filterwarnings("ignore:portrait resized")
def test_sample_cli_without_a_face(speech, tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = save(tmp_path / "noise.png", rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    out = str(tmp_path / "x.mp4")
    for align in ("auto", "face"):
        assert run_sample(path, out, speech, "--align", align) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert re.fullmatch(rf"sample\.py: error: no face found in {re.escape(path)} \(400x300\)"
                            r": .*--align none.*", err[-1]), err
    assert not os.path.exists(out)
    # --align none: the old behaviour, the image centre-cropped (with a warning) and used
    with pytest.warns(UserWarning, match="not square"):
        assert run_sample(path, out, speech, "--align", "none") == 0
    assert "portrait (--align none): 400x300 used as it is" in capsys.readouterr().err
    assert len(video.read_video(out)[0]) == speech[1]
