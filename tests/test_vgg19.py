"""VGG19 port: matches a torchvision-layout torch VGG19 numerically; weights I/O; fallback."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vasa_jax.losses import perceptual_loss
from vasa_jax.models import vgg19

torch = pytest.importorskip("torch")
nn = torch.nn

# torchvision's vgg19 "features" (configuration E): conv widths, "M" = 2x2 max pool.
_CFG_E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"]
_TAP_INDICES = (1, 6, 11, 20, 29)  # relu1_1 .. relu5_1 in the Sequential


class _TorchVGG19(nn.Module):
    """Layout of torchvision.models.vgg19() (torchvision is not installed here)."""

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for v in _CFG_E:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(8, 4)  # stands in for the (ignored) classifier weights
        for m in self.features:
            if isinstance(m, nn.Conv2d):  # He init: activations stay O(1) at every tap
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.normal_(m.bias, std=0.1)

    def taps(self, x):
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAP_INDICES:
                out.append(x)
            if i == _TAP_INDICES[-1]:
                return out


@pytest.fixture(scope="module")
def torch_vgg(tmp_path_factory):
    torch.manual_seed(0)
    model = _TorchVGG19().eval()
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.save(model.state_dict(), path)
    return model, str(path)


def test_matches_torch_at_every_tap(torch_vgg, tmp_path):
    model, pth = torch_vgg
    out = str(tmp_path / "vgg19.safetensors")
    assert vgg19.main(["convert", pth, out]) == 0
    flax_vgg, pretrained = vgg19.load_vgg19(out)
    assert pretrained

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    # The torch model gets what the Flax one computes internally: ImageNet normalisation.
    normalised = ((images + 1) / 2 - np.array(vgg19.IMAGENET_MEAN)) / np.array(vgg19.IMAGENET_STD)
    with torch.no_grad():
        want = [t.numpy().transpose(0, 2, 3, 1) for t in model.taps(
            torch.from_numpy(normalised.transpose(0, 3, 1, 2).astype(np.float32)))]
    graphdef, state = nnx.split(flax_vgg)
    got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, images)
    assert len(got) == len(vgg19.TAPS) == 5
    for name, g, w in zip(vgg19.TAPS, got, want):
        assert g.shape == w.shape, name
        scale = float(np.abs(w).max())
        assert scale > 0.1, f"{name}: degenerate reference activations"
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-4 * scale, rtol=1e-4, err_msg=name)


def test_converter_formats_and_errors(torch_vgg, tmp_path):
    _, pth = torch_vgg
    npz = str(tmp_path / "vgg19.npz")
    assert vgg19.main(["convert", pth, npz]) == 0
    kept = vgg19.read_weights(npz)
    assert len(kept) == 32 and all(k.startswith("features.") for k in kept)  # 16 convs
    # A .safetensors input converts too, to the same tensors.
    st = str(tmp_path / "a.safetensors")
    vgg19.convert(npz, st)
    again = vgg19.read_weights(st)
    assert sorted(again) == sorted(kept)
    np.testing.assert_array_equal(again["features.28.weight"], kept["features.28.weight"])
    # Keys without the "features." prefix (a bare Sequential state dict) load the same.
    bare = {k[len("features."):]: v for k, v in kept.items()}
    a, b = vgg19.params_from_torch(kept), vgg19.params_from_torch(bare)
    np.testing.assert_array_equal(a["conv5_1"]["kernel"], b["conv5_1"]["kernel"])
    assert a["conv1_1"]["kernel"].shape == (3, 3, 3, 64)

    missing = {k: v for k, v in kept.items() if not k.startswith("features.28.")}
    with pytest.raises(KeyError, match="features.28"):
        vgg19.params_from_torch(missing)
    wrong = dict(kept, **{"features.0.weight": np.zeros((64, 1, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="wrong architecture"):
        vgg19.params_from_torch(wrong)
    with pytest.raises(ValueError, match="convert a .pth"):
        vgg19.read_weights(pth)
    assert vgg19.main(["convert", pth, str(tmp_path / "out.bin")]) == 1


def test_missing_weights_warns_and_gives_random_frozen_vgg(caplog):
    with caplog.at_level(logging.WARNING):
        model, pretrained = vgg19.load_vgg19("", None)
    assert not pretrained
    assert any("RANDOMLY INITIALISED" in r.getMessage() for r in caplog.records)
    with pytest.raises(FileNotFoundError):
        vgg19.load_vgg19("/nonexistent/vgg19.safetensors")

    # The random VGG still gives a working perceptual distance: zero for equal images,
    # growing with the perturbation, finite gradients. Parameters go in as a jit argument
    # (as in a train step): closed over, they would be compiled in as constants (slow).
    graphdef, state = nnx.split(model)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(1), x.shape)
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda y, state: perceptual_loss(nnx.merge(graphdef, state), y, x)))
    (l0, _), (l1, g), (l2, _) = (loss_and_grad(jnp.clip(x + eps * noise, -1, 1), state)
                                 for eps in (0.0, 0.05, 0.3))
    assert 0.0 < float(l1) < float(l2)
    assert float(l0) < 1e-4 * float(l1)  # equal images (up to XLA conv rounding)
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0
