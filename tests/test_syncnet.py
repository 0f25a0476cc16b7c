"""SyncNet port: both streams match a torch model of syncnet_python's architecture (random
weights, random batch-norm statistics) through the converter; the MFCC matches
python_speech_features; the offset search finds a constructed shift; the crop geometry; the
scorer's windows; a missing weights file names its flag."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from vasa_jax.models import syncnet

torch = pytest.importorskip("torch")
nn = torch.nn


# ----------------------------------------------------------------------------- reference


def _conv_bn(conv, norm, cin, cout, kernel, stride=1, padding=0):
    return [conv(cin, cout, kernel, stride=stride, padding=padding), norm(cout), nn.ReLU()]


def _head(embed):
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(),
                         nn.Linear(512, embed))


class TorchSyncNet(nn.Module):
    """The layer list of syncnet_python's SyncNetModel.S, same Sequential indices (so the
    same state-dict keys as syncnet_v2.model)."""

    def __init__(self, embed=1024):
        super().__init__()
        c2 = lambda *a, **k: _conv_bn(nn.Conv2d, nn.BatchNorm2d, *a, **k)  # noqa: E731
        c3 = lambda *a, **k: _conv_bn(nn.Conv3d, nn.BatchNorm3d, *a, **k)  # noqa: E731
        self.netcnnaud = nn.Sequential(
            *c2(1, 64, 3, padding=1), nn.MaxPool2d(1, 1),
            *c2(64, 192, 3, padding=1), nn.MaxPool2d(3, (1, 2)),
            *c2(192, 384, 3, padding=1), *c2(384, 256, 3, padding=1),
            *c2(256, 256, 3, padding=1), nn.MaxPool2d(3, 2),
            *c2(256, 512, (5, 4)))
        self.netfcaud = _head(embed)
        self.netfclip = _head(embed)
        self.netcnnlip = nn.Sequential(
            *c3(3, 96, (5, 7, 7), stride=(1, 2, 2)), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *c3(96, 256, (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), padding=(0, 1, 1)),
            *c3(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            *c3(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            *c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *c3(256, 512, (1, 6, 6)))
        for m in self.modules():  # non-trivial batch norms, so their conversion is tested
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0.0, 0.2)

    def audio(self, x):  # [B, 1, 13, 20]
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def lip(self, x):  # [B, 3, 5, 224, 224]
        return self.netfclip(self.netcnnlip(x).flatten(1))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.manual_seed(0)
    model = TorchSyncNet().eval()
    root = tmp_path_factory.mktemp("syncnet")
    weights = str(root / "syncnet_v2.model")
    torch.save(model.state_dict(), weights)
    out = str(root / "converted")
    assert syncnet.main(["convert", "--weights", weights, "--out", out]) == 0
    return model, out, syncnet.load_syncnet(out)


def _close(got, want, name):
    got = np.asarray(got)
    scale = float(np.abs(want).max())
    assert scale > 0.1, f"{name}: degenerate reference output"
    diff = float(np.abs(got - want).max())
    print(f"{name}: max |flax - torch| {diff:.2e} (output scale {scale:.2f})")
    np.testing.assert_allclose(got, want, atol=1e-4 * max(scale, 1.0), rtol=1e-4, err_msg=name)


def test_both_streams_match_torch(converted):
    model, out, flax_model = converted
    with open(os.path.join(out, syncnet.CONFIG_FILE)) as f:
        assert json.load(f)["embed_dim"] == 1024
    rng = np.random.default_rng(0)
    mfcc = rng.normal(0, 5, (2, 13, 20)).astype(np.float32)
    frames = rng.uniform(0, 255, (2, 5, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        want_audio = model.audio(torch.from_numpy(mfcc[:, None])).numpy()
        want_lip = model.lip(torch.from_numpy(frames.transpose(0, 4, 1, 2, 3).copy())).numpy()
    graphdef, state = nnx.split(flax_model)
    got_audio = jax.jit(lambda s, x: nnx.merge(graphdef, s).audio_features(x))(state, mfcc)
    got_lip = jax.jit(lambda s, x: nnx.merge(graphdef, s).lip_features(x))(state, frames)
    assert got_audio.shape == got_lip.shape == (2, 1024)
    _close(got_audio, want_audio, "audio stream")
    _close(got_lip, want_lip, "lip stream")


def test_the_scorer_windows_frames_and_mfcc_as_syncnet_python(converted):
    """features(): lip window t = frames t..t+4 (BGR), audio window t = MFCC steps 4t..4t+19,
    N = min(frames, samples / 640) - 5 of them."""
    _, _, flax_model = converted
    scorer = syncnet.SyncNetScorer(flax_model, chunk=2)
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 256, (9, 224, 224, 3), dtype=np.uint8)
    audio = rng.normal(0, 0.1, 8 * 640 + 100).astype(np.float32)  # 8 frames of audio
    lips, aud = scorer.features(crops, audio)
    assert lips.shape == aud.shape == (3, 1024)  # min(9, 8) - 5; the last chunk padded
    cep = syncnet.mfcc(syncnet.to_pcm16(audio)).T
    want_lips = flax_model.lip_features(
        np.stack([crops[t:t + 5, ..., ::-1] for t in range(3)]).astype(np.float32))
    want_aud = flax_model.audio_features(np.stack([cep[:, 4 * t:4 * t + 20] for t in range(3)]))
    np.testing.assert_allclose(lips, np.asarray(want_lips), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(aud, np.asarray(want_aud), rtol=1e-4, atol=1e-3)
    scores = scorer.score(crops, audio)
    assert set(scores) == {"Sc", "SD", "offset"} and np.isfinite(scores["Sc"])
    with pytest.raises(ValueError, match="at least 6 frames"):
        scorer.features(crops[:5], audio)


# ----------------------------------------------------------------------------- pipeline


def test_mfcc_matches_python_speech_features():
    psf = pytest.importorskip("python_speech_features")
    rng = np.random.default_rng(0)
    t = np.arange(int(1.013 * 16000)) / 16000
    speechy = (3000 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
               + 800 * rng.normal(size=t.size))
    pcm = syncnet.to_pcm16(speechy / 32768)
    want = psf.mfcc(pcm, 16000)
    got = syncnet.mfcc(pcm)
    assert got.shape == want.shape == (100, 13)  # 1 + ceil((16208 - 400) / 160)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(syncnet.mel_filterbank(), psf.get_filterbanks(26, 512, 16000),
                               atol=1e-12)
    for short in (np.zeros(1000), pcm[:300]):  # zero energy (eps), one padded frame
        np.testing.assert_allclose(syncnet.mfcc(short), psf.mfcc(short, 16000), rtol=1e-7,
                                   atol=1e-7)


def test_offset_search_finds_a_constructed_shift():
    rng = np.random.default_rng(0)
    video = rng.normal(size=(80, 32)).astype(np.float32)
    scores = {}
    for k in (-4, 0, 6):
        audio = np.roll(video, -k, axis=0)  # audio[t - k] = video[t]
        d = np.asarray(syncnet.offset_distances(video, audio))
        assert d.shape == (31,)
        scores[k] = syncnet.sync_scores(d)
        assert scores[k]["offset"] == pytest.approx(k), k
        assert scores[k]["Sc"] > 3.0 and scores[k]["SD"] < 0.25 * float(np.median(d)), scores[k]
    shuffled = syncnet.sync_scores(syncnet.offset_distances(video, video[rng.permutation(80)]))
    assert 0.0 <= shuffled["Sc"] < 0.25 * scores[0]["Sc"], (shuffled, scores[0])

    # The same numbers as syncnet_python's torch code (calc_pdist, mean, min, median).
    vid, aud = (torch.from_numpy(rng.normal(size=(40, 16)).astype(np.float32)) for _ in "va")
    padded = torch.nn.functional.pad(aud, (0, 0, 15, 15))
    dists = [torch.nn.functional.pairwise_distance(vid[[i]].repeat(31, 1), padded[i:i + 31])
             for i in range(40)]
    mdist = torch.stack(dists, 1).mean(1)
    got = np.asarray(syncnet.offset_distances(vid.numpy(), aud.numpy()))
    np.testing.assert_allclose(got, mdist.numpy(), rtol=1e-5)
    s = syncnet.sync_scores(got)
    assert s["SD"] == pytest.approx(float(mdist.min()), rel=1e-5)
    assert s["Sc"] == pytest.approx(float(mdist.median() - mdist.min()), rel=1e-4, abs=1e-5)
    assert s["offset"] == pytest.approx(15 - int(mdist.argmin()))


def test_crops_follow_syncnet_pythons_geometry():
    # Channel 0 encodes x, channel 1 encodes y (2 grey levels per pixel).
    ys, xs = np.mgrid[0:120, 0:120]
    image = np.stack([2 * xs, 2 * ys, np.full_like(xs, 50)], -1).astype(np.uint8)
    frames = np.stack([image] * 3)
    box = np.array([40.0, 40.0, 80.0, 80.0])  # half-size 20, centre (60, 60)
    crops = syncnet.syncnet_crops(frames, np.stack([box] * 3))
    assert crops.shape == (3, 224, 224, 3) and crops.dtype == np.uint8
    # rows [60 - 20, 60 + 36) = [40, 96), columns [60 - 28, 60 + 28) = [32, 88): 56 px -> 4x
    c = crops[0].astype(float)
    assert c[0, 0, 0] == pytest.approx(2 * 32, abs=2) and c[0, 0, 1] == pytest.approx(2 * 40, abs=2)
    assert c[-1, -1, 0] == pytest.approx(2 * 87, abs=2)
    assert c[-1, -1, 1] == pytest.approx(2 * 95, abs=2)
    corner = syncnet.syncnet_crops(frames, np.stack([np.array([0.0, 0.0, 40.0, 40.0])] * 3))
    assert (corner[0, :20, :20] == syncnet.CROP_PAD_VALUE).all()  # outside the frame: grey
    idx = syncnet.frames_at_25fps(60, 30.0)
    assert len(idx) == 50 and idx[0] == 0 and idx[-1] == 58
    np.testing.assert_array_equal(syncnet.frames_at_25fps(7, 25.0), np.arange(7))


def test_missing_or_wrong_weights_are_clear_errors(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert syncnet.main(["convert", "--weights", str(tmp_path / "nope.model"),
                         "--out", out]) == 1
    err = capsys.readouterr().err
    assert "--weights" in err and "nope.model" in err and err.count("\n") == 1
    assert not os.path.exists(out)
    wrong = str(tmp_path / "wrong.model")
    torch.save({"netcnnaud.0.weight": torch.zeros(64, 1, 3, 3)}, wrong)
    assert syncnet.main(["convert", "--weights", wrong, "--out", out]) == 1
    assert "syncnet_v2.model" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="vasa_jax.models.syncnet convert"):
        syncnet.load_syncnet(str(tmp_path / "missing"))
