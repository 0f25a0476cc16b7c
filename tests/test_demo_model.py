"""The built-in demo model (assets/demo_model) on the built-in portrait and speech: the
mouth follows the speech, windows join without a seam, streaming equals offline."""

import os

import numpy as np
import pytest

import sample
from data_pipeline.synthtalk.sync import correlation_from_envelopes, frame_rms
from vasa_jax import audio as audio_lib
from vasa_jax import inference


@pytest.fixture(scope="module")
def demo():
    pipe = inference.Pipeline.load(sample.DEMO_MODEL)
    image = inference.read_portrait(sample.DEMO_IMAGE)
    speech = audio_lib.load_audio(sample.DEMO_AUDIO)
    video = pipe.generate(image, speech, inference.Controls(seed=0))
    return pipe, image, speech, video


def test_demo_assets_are_small_and_complete():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(sample.DEMO_MODEL)
                for f in fs)
    assert total < 30e6
    assert os.path.isfile(os.path.join(sample.DEMO_MODEL, inference.PIPELINE_FILE))
    assert os.path.isdir(sample.DEMO_METER)


def test_demo_mouth_follows_the_speech(demo):
    """The meter's mouth reading of the output frames against the speech envelope (best lag
    within +-3 frames) and against the clip's true mouth opening."""
    pipe, _, speech, video = demo
    assert len(video.frames) == pipe.num_frames(len(speech))
    r, lag = sample.lip_sync(video.frames, speech, sample.DEMO_METER)
    assert r >= 0.5, (r, lag)
    truth = np.load(os.path.join(os.path.dirname(sample.DEMO_IMAGE), "mouth_open.npy"))
    r_truth, _ = correlation_from_envelopes([truth], [frame_rms(speech, len(truth))])
    assert r_truth > 0.8  # the proxy itself tracks the true mouth on this clip


def test_demo_windows_join_without_a_seam(demo):
    """The largest frame-to-frame motion jump at a window join is no larger than the
    largest inside the windows (jumps in units of the data's motion std)."""
    pipe, _, _, video = demo
    w = pipe.window
    assert len(video.motion) > 2 * w  # at least two joins
    jumps = np.linalg.norm(np.diff(video.motion / pipe.motion.motion_std, axis=0), axis=1)
    at_join = np.zeros(len(jumps), bool)
    at_join[w - 1::w] = True  # jumps[t] is frame t -> t + 1; frame k*W starts a window
    assert jumps[at_join].max() <= jumps[~at_join].max(), (jumps[at_join], jumps.max())


def test_demo_stream_equals_offline(demo):
    pipe, image, speech, video = demo
    chunks = [speech[i:i + 640] for i in range(0, len(speech), 640)]
    frames = np.stack([f.image for f in pipe.stream(image, chunks, inference.Controls(seed=0))])
    assert frames.shape == video.frames.shape
    assert np.max(np.abs(frames.astype(int) - video.frames.astype(int))) <= 1


def test_demo_renders_in_bfloat16_like_float32(demo):
    """bf16 compute in the face model (weights, norms and warps float32): the same motion,
    frames within a few grey levels (measured: 56.7 dB, at most 3 levels apart)."""
    _, image, speech, video = demo
    pipe = inference.Pipeline.load(sample.DEMO_MODEL, dtype="bfloat16")
    assert pipe.face_config.model.dtype == "bfloat16"
    half = pipe.generate(image, speech, inference.Controls(seed=0))
    np.testing.assert_allclose(half.motion, video.motion, atol=1e-4)
    diff = half.frames.astype(np.float64) - video.frames.astype(np.float64)
    mse = np.mean(diff ** 2)
    assert mse > 0  # bf16 did round somewhere: not float32 again
    assert 10 * np.log10(255.0 ** 2 / mse) > 40 and np.abs(diff).max() <= 16
    with pytest.raises(ValueError, match="dtype"):
        inference.Pipeline.load(sample.DEMO_MODEL, dtype="float16")
