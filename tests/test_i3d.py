"""I3D port and FVD: the Flax I3D matches a torch model of pytorch-i3d's InceptionI3d (random
weights, random batch-norm statistics, TF 'SAME' padding computed per input size) through the
converter; the Frechet distance is ~0 for a set against itself (also with singular
covariances), grows as the square of a mean shift and matches the closed form on hand-made
Gaussians and scipy's sqrtm formula; clip sampling; a missing weights file names its flag."""

import json
import os
import time

import cv2
import jax
import numpy as np
import pytest
from flax import nnx

from vasa_jax.metrics import fvd
from vasa_jax.models import i3d

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


# ----------------------------------------------------------------------------- reference


def _tf_same(x, kernel, stride):
    """Zero-pads x [B, C, T, H, W] as TensorFlow's 'SAME' for this input size."""
    pads = []
    for n, k, s in zip(x.shape[2:], kernel, stride):
        total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads.append((total // 2, total - total // 2))
    (t0, t1), (h0, h1), (w0, w1) = pads
    return F.pad(x, (w0, w1, h0, h1, t0, t1))


class TorchUnit(nn.Module):
    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1)):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride=stride, bias=False)
        self.bn = nn.BatchNorm3d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv3d(_tf_same(x, self.kernel, self.stride))))


class TorchPool(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        return F.max_pool3d(_tf_same(x, self.kernel, self.stride), self.kernel, self.stride)


class TorchMixed(nn.Module):
    def __init__(self, cin, outs):
        super().__init__()
        self.b0 = TorchUnit(cin, outs[0])
        self.b1a, self.b1b = TorchUnit(cin, outs[1]), TorchUnit(outs[1], outs[2], (3, 3, 3))
        self.b2a, self.b2b = TorchUnit(cin, outs[3]), TorchUnit(outs[3], outs[4], (3, 3, 3))
        self.b3a, self.b3b = TorchPool((3, 3, 3), (1, 1, 1)), TorchUnit(cin, outs[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                          self.b3b(self.b3a(x))], 1)


class TorchI3D(nn.Module):
    """Inception-v1 I3D as pytorch-i3d's InceptionI3d builds it (its module names, so its
    state-dict keys; eval mode), written from the paper's layer table."""

    def __init__(self, num_classes=400):
        super().__init__()
        mixed = {"Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
                 "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
                 "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
                 "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
                 "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
                 "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
                 "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
                 "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
                 "Mixed_5c": (832, (384, 192, 384, 48, 128, 128))}
        layers = [("Conv3d_1a_7x7", TorchUnit(3, 64, (7, 7, 7), (2, 2, 2))),
                  ("MaxPool3d_2a_3x3", TorchPool((1, 3, 3), (1, 2, 2))),
                  ("Conv3d_2b_1x1", TorchUnit(64, 64)),
                  ("Conv3d_2c_3x3", TorchUnit(64, 192, (3, 3, 3))),
                  ("MaxPool3d_3a_3x3", TorchPool((1, 3, 3), (1, 2, 2)))]
        for name in ("Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c",
                     "Mixed_4d", "Mixed_4e", "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b",
                     "Mixed_5c"):
            if name == "MaxPool3d_4a_3x3":
                layers.append((name, TorchPool((3, 3, 3), (2, 2, 2))))
            elif name == "MaxPool3d_5a_2x2":
                layers.append((name, TorchPool((2, 2, 2), (2, 2, 2))))
            else:
                layers.append((name, TorchMixed(*mixed[name])))
        self.order = [name for name, _ in layers]
        for name, module in layers:
            self.add_module(name, module)
        self.logits = nn.Module()
        self.logits.conv3d = nn.Conv3d(1024, num_classes, 1, bias=True)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x):  # [B, 3, T, 224, 224] -> (Mixed_5c map, logits [B, num_classes, T'])
        for name in self.order:
            x = getattr(self, name)(x)
        pooled = F.avg_pool3d(x, (2, 7, 7), stride=1)
        return x, self.logits.conv3d(pooled).squeeze(4).squeeze(3)


def _calibrate_batch_norms(model, clip):
    """Running statistics of one clip [B, 3, T, H, W], then randomised (mean moved by
    N(0, 0.2) standard deviations, variance scaled by U(0.5, 2), random affine): every
    batch norm is non-trivial, so its conversion is tested, yet the features stay
    input-dependent through the 58 layers (purely random statistics leave deep maps that are
    almost only the per-channel biases)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: the statistics of this one batch
    model.train()
    with torch.no_grad():
        model(clip)
        for m in norms:
            m.running_mean += torch.randn_like(m.running_mean) * 0.2 * m.running_var.sqrt()
            m.running_var *= torch.empty_like(m.running_var).uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.manual_seed(0)
    model = _calibrate_batch_norms(TorchI3D(), torch.rand(1, 3, 9, 224, 224) * 2 - 1)
    root = tmp_path_factory.mktemp("i3d")
    weights = str(root / "rgb_imagenet.pt")
    torch.save(model.state_dict(), weights)
    out = str(root / "converted")
    assert i3d.main(["convert", "--weights", weights, "--out", out]) == 0
    return model, out, i3d.load_i3d(out)


def test_i3d_matches_torch(converted):
    """One 11-frame clip: odd sizes make the 'SAME' pads asymmetric (front < back) in time and
    space, and the last max pool pads its odd 3-frame input."""
    model, out, flax_model = converted
    with open(os.path.join(out, i3d.CONFIG_FILE)) as f:
        assert json.load(f)["num_classes"] == 400
    rng = np.random.default_rng(0)
    # Blobs that change from frame to frame, plus noise: a map that varies over space and time.
    low = rng.uniform(0, 255, (11, 4, 4, 3)).astype(np.float32)
    blobs = np.stack([cv2.resize(f, (224, 224), interpolation=cv2.INTER_CUBIC) for f in low])
    clip = np.clip(blobs + rng.normal(0, 12, blobs.shape), 0, 255).astype(np.uint8)[None]
    x = clip.astype(np.float32) / 127.5 - 1.0
    start = time.perf_counter()
    with torch.no_grad():
        want_map, want = model(torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()))
    torch_s = time.perf_counter() - start
    want_map = want_map.numpy().transpose(0, 2, 3, 4, 1)  # [B, T'', 7, 7, 1024]
    want = want.numpy().transpose(0, 2, 1)  # [B, T', 400]
    graphdef, state = nnx.split(flax_model)
    start = time.perf_counter()
    both = jax.jit(lambda s, v: (nnx.merge(graphdef, s).trunk(v),
                                 nnx.merge(graphdef, s).logits_per_time(v)))
    got_map, got = map(np.asarray, both(state, x))
    flax_s = time.perf_counter() - start
    assert got_map.shape == want_map.shape == (1, 2, 7, 7, 1024)
    assert got.shape == want.shape == (1, 1, 400)
    # The map varies over space and time (the input shows through, not only the biases).
    map_scale = float(np.abs(want_map).max())
    assert float(want_map.std(axis=(1, 2, 3)).mean()) > 0.02 * map_scale
    scale = float(np.abs(want).max())
    assert scale > 0.1 and float(want.std()) > 0.05 * scale, "degenerate reference output"
    map_diff, diff = float(np.abs(got_map - want_map).max()), float(np.abs(got - want).max())
    print(f"I3D: max |flax - torch| Mixed_5c map {map_diff:.2e} (scale {map_scale:.2f}), "
          f"logits {diff:.2e} (scale {scale:.2f}); torch {torch_s:.1f} s, flax "
          f"{flax_s:.1f} s incl. compile")
    np.testing.assert_allclose(got_map, want_map, atol=1e-4 * max(map_scale, 1.0), rtol=1e-4)
    np.testing.assert_allclose(got, want, atol=1e-4 * max(scale, 1.0), rtol=1e-4)
    # The FVD path: uint8 clips scaled on the device, logits averaged over time.
    feats = fvd.I3DFeatures(flax_model, batch=1).features(clip)
    np.testing.assert_allclose(feats, want.mean(1), atol=1e-4 * max(scale, 1.0), rtol=1e-4)


def test_same_padding_is_tensorflows():
    assert i3d.same_pads(224, 7, 2) == (2, 3)
    assert i3d.same_pads(11, 7, 2) == (3, 3)
    assert i3d.same_pads(3, 2, 2) == (0, 1)
    assert i3d.same_pads(8, 2, 2) == (0, 0)
    assert i3d.same_pads(5, 3, 1) == (1, 1)
    x = jax.numpy.arange(2 * 5 * 7 * 9 * 1, dtype=jax.numpy.float32).reshape(2, 5, 7, 9, 1)
    assert i3d.max_pool_same(x, (3, 3, 3), (2, 2, 2)).shape == (2, 3, 4, 5, 1)


def test_missing_or_wrong_weights_are_clear_errors(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert i3d.main(["convert", "--weights", str(tmp_path / "nope.pt"), "--out", out]) == 1
    err = capsys.readouterr().err
    assert "--weights" in err and "nope.pt" in err and err.count("\n") == 1
    assert not os.path.exists(out)
    wrong = str(tmp_path / "wrong.pt")
    torch.save({"Conv3d_1a_7x7.conv3d.weight": torch.zeros(64, 2, 7, 7, 7)}, wrong)
    assert i3d.main(["convert", "--weights", wrong, "--out", out]) == 1
    assert "Conv3d_1a_7x7" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="vasa_jax.models.i3d convert"):
        i3d.load_i3d(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- FVD


def test_fvd_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20))
    total = 2 * float(np.trace(np.cov(feats, rowvar=False)))
    assert fvd.fvd(feats, feats) < 1e-9 * total
    direction = rng.normal(size=20)
    previous = 0.0
    for step in (0.1, 0.5, 2.0):
        shift = step * direction
        d = fvd.fvd(feats, feats + shift)  # same covariance: exactly ||shift||^2
        assert d == pytest.approx(float(shift @ shift), rel=1e-6)
        assert d > previous
        previous = d
    # Fewer samples than dimensions (singular covariances, as with a few clips of the 400-d
    # features): still ~0 against itself, and a shift still counts in full.
    few = rng.normal(size=(6, 120))
    trace = float(np.trace(np.cov(few, rowvar=False)))
    assert fvd.fvd(few, few) < 1e-3 * trace
    assert fvd.fvd(few, few + 1.0) == pytest.approx(120.0, rel=1e-3)


def test_frechet_distance_matches_closed_forms():
    # Diagonal covariances: sum (sqrt(a) - sqrt(b))^2 + ||mu1 - mu2||^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    want = float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2))
    got = fvd.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert want == pytest.approx(1 + 1 + 6.25 + 1 + 0 + 4)  # (1-2)^2 + (2-1)^2 + (3-.5)^2 + mu
    assert got == pytest.approx(want, rel=1e-10)
    # 1-D: (s1 - s2)^2 + (m1 - m2)^2.
    assert fvd.frechet_distance(np.array([3.0]), np.array([[4.0]]), np.array([1.0]),
                                np.array([[1.0]])) == pytest.approx(4.0 + 1.0)
    # Full covariances: the textbook formula with scipy's general sqrtm of sigma1 sigma2.
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(2, 5, 5))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=(2, 5))
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    want = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))
    assert fvd.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    with pytest.raises(ValueError, match="do not match"):
        fvd.frechet_distance(mu1, s1, mu2[:4], s2[:4, :4])
    with pytest.raises(ValueError, match="N >= 2"):
        fvd.gaussian_fit(np.zeros((1, 5)))


def test_video_clips_are_25_frames_with_stride_25_at_224():
    t = np.arange(80, dtype=np.uint8)
    frames = np.broadcast_to(t[:, None, None, None], (80, 48, 64, 3)).copy()
    clips = fvd.video_clips(frames)
    assert clips.shape == (3, 25, 224, 224, 3) and clips.dtype == np.uint8
    np.testing.assert_array_equal(clips[:, :, 100, 100, 0], t[:75].reshape(3, 25))
    assert fvd.video_clips(frames[:24]).shape == (0, 25, 224, 224, 3)
    assert fvd.video_clips(frames[:25]).shape == (1, 25, 224, 224, 3)
    assert fvd.video_clips(frames, clip_frames=10, stride=5, size=32).shape == (15, 10, 32, 32, 3)
