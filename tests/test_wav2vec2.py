"""Wav2Vec2 port: numerics against the PyTorch reference (random weights), loading, alignment."""

import json
import os
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configs.common import audio_config  # noqa: E402
from vasa_jax.audio import (  # noqa: E402
    Wav2Vec2CheckpointError,
    Wav2Vec2Features,
    build_frontend,
    feature_dim,
)
from vasa_jax.audio import wav2vec2 as w2v  # noqa: E402

# Both layouts Hugging Face ships: "base" (wav2vec2-base/-960h: GroupNorm feature encoder,
# post-LN transformer, no conv bias) and "large" (lv60/XLSR: LayerNorm convs, pre-LN).
LAYOUTS = {
    "base": dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False),
    "large": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
}
SR = 16000


def tiny_config(layout):
    # Default conv kernels/strides (so R = 400, S = 320 as in the real models), tiny widths.
    return transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        **LAYOUTS[layout],
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{layout: (torch model, folder with config.json + model.safetensors)}."""
    out = {}
    for seed, layout in enumerate(LAYOUTS):
        torch.manual_seed(seed)
        model = transformers.Wav2Vec2Model(tiny_config(layout)).eval()
        with torch.no_grad():  # random LayerNorm/GroupNorm affines: the port must use them
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        path = str(tmp_path_factory.mktemp(layout))
        model.save_pretrained(path)  # safetensors
        assert os.path.isfile(os.path.join(path, "model.safetensors"))
        out[layout] = (model, path)
    return out


_FEATURES = {}


def features(checkpoints, layout, layer=-1, **kwargs):
    """Cached Wav2Vec2Features, so each (layout, layer) compiles once per test session."""
    key = (layout, layer, tuple(sorted(kwargs.items())))
    if key not in _FEATURES:
        _FEATURES[key] = Wav2Vec2Features(checkpoints[layout][1], layer, **kwargs)
    return _FEATURES[key]


def speech_like(seconds, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)  # syllable-rate envelope
    voice = np.sin(2 * np.pi * 220 * t) + 0.3 * rng.standard_normal(t.size)
    return (0.1 * env * voice).astype(np.float32)


def torch_hidden_states(model, normalized):
    with torch.no_grad():
        out = model(torch.from_numpy(normalized)[None], output_hidden_states=True)
    return [h[0].numpy() for h in out.hidden_states]


@pytest.mark.parametrize("layout,layer", [("base", 0), ("base", -1), ("large", 1), ("large", -1)])
def test_matches_pytorch(checkpoints, layout, layer):
    audio = speech_like(1.0)
    feats = features(checkpoints, layout, layer)
    ref = torch_hidden_states(checkpoints[layout][0], feats.normalize(audio))[layer]
    got = feats.hidden_states(audio)
    assert got.shape == ref.shape == (49, 32)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_normalize_matches_feature_extractor(checkpoints):
    audio = speech_like(0.5, seed=1)
    extractor = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SR, do_normalize=True
    )
    ref = extractor(audio, sampling_rate=SR, return_tensors="np").input_values[0]
    np.testing.assert_allclose(features(checkpoints, "base").normalize(audio), ref, atol=1e-5)


def test_geometry_from_config():
    arch = w2v.Wav2Vec2Arch.from_config(transformers.Wav2Vec2Config().to_dict())
    assert (arch.receptive_field, arch.stride) == (400, 320)
    # Video frame t's centre (640 t + 320) is the centre (320 i + 200) of output i = 2t + 0.375.
    positions = w2v.frame_positions(4, SR, 25.0, arch)
    np.testing.assert_allclose(positions, [0.375, 2.375, 4.375, 6.375])
    np.testing.assert_allclose(w2v.frame_positions(2, SR, 25.0, arch, offset=640), [-1.625, 0.375])


def test_interpolate_frames():
    hidden = np.arange(10, dtype=np.float32)[:, None] * np.array([[1.0, -2.0]], np.float32)
    out = w2v.interpolate_frames(hidden, np.array([-1.0, 0.375, 2.5, 8.75, 20.0]))
    np.testing.assert_allclose(out[:, 0], [0.0, 0.375, 2.5, 8.75, 9.0])  # edges clamp
    np.testing.assert_allclose(out[:, 1], -2 * out[:, 0])


def test_video_frames(checkpoints):
    feats = features(checkpoints, "base")
    audio = speech_like(1.0)
    out = feats(audio)
    assert out.shape == (25, 32) and out.dtype == np.float32
    hidden = feats.hidden_states(audio)  # [49, 32]
    t = np.arange(24)  # the last frame's position clamps to the last output frame
    expected = 0.625 * hidden[2 * t] + 0.375 * hidden[2 * t + 1]
    np.testing.assert_allclose(out[:24], expected, atol=1e-5)
    np.testing.assert_allclose(out[24], hidden[48], atol=1e-5)
    assert feats(audio, num_frames=0).shape == (0, 32)


def test_chunk_plan():
    assert w2v.chunk_plan(30, chunk=20, context=5) == [(0, 30, 0, 30)]  # fits one window
    plan = w2v.chunk_plan(47, chunk=10, context=3)
    covered = np.concatenate([np.arange(o0, o1) for _, _, o0, o1 in plan])
    np.testing.assert_array_equal(covered, np.arange(47))  # every frame exactly once, in order
    for i0, i1, o0, o1 in plan:
        assert i1 - i0 == 16 and 0 <= i0 and i1 <= 47 and i0 <= o0 and o1 <= i1
        assert o0 - i0 >= 3 or i0 == 0
        assert i1 - o1 >= 3 or i1 == 47


def test_long_audio_is_chunked(checkpoints):
    # 2 s = 50 frames in windows of 0.4 + 2 * 0.2 s = 20 frames (12800 samples).
    feats = features(checkpoints, "base", chunk_seconds=0.4, context_seconds=0.2)
    audio = speech_like(2.0, seed=2)
    out = feats(audio)
    assert out.shape == (50, 32)
    x = feats.normalize(audio)
    plan = w2v.chunk_plan(50, 10, 5)
    assert len(plan) == 5
    for i0, i1, o0, o1 in plan:
        hidden = feats.forward(x[i0 * 640:i1 * 640])
        expected = w2v.interpolate_frames(
            hidden, w2v.frame_positions(50, SR, 25.0, feats.arch, offset=i0 * 640)[o0:o1]
        )
        np.testing.assert_allclose(out[o0:o1], expected, atol=1e-5)
    # num_frames trims / zero-pads the audio to exactly T frames. (T = 20 runs one window of
    # the same 12800 samples, so nothing recompiles.)
    trimmed = feats(audio, num_frames=20)
    assert trimmed.shape == (20, 32)
    positions = w2v.frame_positions(20, SR, 25.0, feats.arch)
    expected = w2v.interpolate_frames(feats.forward(x[:12800]), positions)
    np.testing.assert_allclose(trimmed, expected, atol=1e-5)
    assert feats(audio, num_frames=63).shape == (63, 32)
    assert feats(audio[:200], num_frames=20).shape == (20, 32)  # shorter than a receptive field


def _params(path, num_layers=2):
    arch = w2v.read_arch(path)
    return w2v._params_from_state_dict(w2v._read_state_dict(path), arch, num_layers, path)


def _assert_same_params(a, b):
    import jax

    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_flax_msgpack_folder(checkpoints, tmp_path):
    """A folder holding Hugging Face's own Flax export (flax_model.msgpack) loads the same."""
    from flax import serialization
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    model, path = checkpoints["large"]  # HF Flax implements only this layout
    # HF's converter only needs parameter shapes; eval_shape avoids its slow random init.
    shapes = transformers.FlaxWav2Vec2Model(model.config, _do_init=False).params_shape_tree
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flax_params = convert_pytorch_state_dict_to_flax(
        state, types.SimpleNamespace(base_model_prefix="wav2vec2", params=shapes)
    )
    model.config.save_pretrained(tmp_path)
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(flax_params))
    _assert_same_params(_params(str(tmp_path)), _params(path))


def test_torch_bin_and_convert(checkpoints, tmp_path):
    model, path = checkpoints["base"]
    ctc = transformers.Wav2Vec2ForCTC(model.config)  # weights under "wav2vec2." + an lm_head
    ctc.wav2vec2.load_state_dict(model.state_dict())
    ctc.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "bin")) == ["config.json", "pytorch_model.bin"]
    _assert_same_params(_params(str(tmp_path / "bin")), _params(path))
    w2v.convert_checkpoint(tmp_path / "bin", tmp_path / "st")
    assert sorted(os.listdir(tmp_path / "st")) == ["config.json", "model.safetensors"]
    _assert_same_params(_params(str(tmp_path / "st")), _params(path))


def test_checkpoint_errors(checkpoints, tmp_path):
    with pytest.raises(Wav2Vec2CheckpointError, match="not found"):
        Wav2Vec2Features(tmp_path / "missing")
    with pytest.raises(Wav2Vec2CheckpointError, match="wav2vec2_path is empty"):
        Wav2Vec2Features("")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Wav2Vec2CheckpointError, match="no config.json"):
        Wav2Vec2Features(empty)
    _, path = checkpoints["base"]
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(Wav2Vec2CheckpointError, match="no weights found"):
        Wav2Vec2Features(no_weights)
    # A truncated checkpoint names the first missing weight.
    from safetensors.numpy import load_file, save_file

    state = load_file(os.path.join(path, "model.safetensors"))
    del state["encoder.layers.1.attention.q_proj.weight"]
    save_file(state, str(no_weights / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Wav2Vec2CheckpointError, match="no weight 'encoder.layers.1.attention.q_"):
        Wav2Vec2Features(no_weights)
    hubert = tmp_path / "hubert"
    hubert.mkdir()
    (hubert / "config.json").write_text(json.dumps({"model_type": "hubert"}))
    with pytest.raises(Wav2Vec2CheckpointError, match="only 'wav2vec2'"):
        Wav2Vec2Features(hubert)
    with pytest.raises(ValueError, match="out of range"):
        Wav2Vec2Features(path, layer=3)  # 2 layers: hidden states 0..2


def test_from_audio_config(checkpoints):
    cfg = audio_config()
    cfg.frontend, cfg.wav2vec2_path, cfg.wav2vec2_layer = "wav2vec2", checkpoints["large"][1], 1
    assert feature_dim(cfg) == 32
    frontend = build_frontend(cfg)
    assert isinstance(frontend, Wav2Vec2Features)
    assert (frontend.dim, frontend.layer) == (32, 1)
    assert (frontend.chunk_frames, frontend.context_frames) == (500, 50)  # 20 s, 2 s
    assert len(frontend.params["layers"]) == 1  # layers above the selected one are not loaded
