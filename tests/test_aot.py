"""vasa_jax.bench.aot: the stage's step lowered and compiled for a topology's devices ahead
of time. libtpu is not a test dependency, so the topology here is this host's CPU devices
(the same code path: mesh over the topology's devices, abstract state and batch, compile)."""

import types

import jax
import pytest

from tests import testdata
from vasa_jax.bench import aot


def test_parse_sets():
    assert aot.parse_sets(["data.batch_size=8", "mesh.axes=(('data', -1),)", "x.y=abc"]) == {
        "data__batch_size": 8, "mesh__axes": (("data", -1),), "x__y": "abc"}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        aot.parse_sets(["data.batch_size"])


def test_compiles_the_stage_2_step_for_a_topology(tmp_path, monkeypatch, capsys):
    data = str(tmp_path / "data")
    testdata.make_dataset(data, identities=2, clips_per_identity=2, seconds=1.2, size=16)
    from jax.experimental import topologies

    monkeypatch.setattr(topologies, "get_topology_desc",
                        lambda **kw: types.SimpleNamespace(devices=jax.devices()))
    assert aot.main([
        "--config", "configs/motion_dit.py:size=tiny", "--topology", "v5e:2x4", "--data", data,
        "--set", "data.window=10", "--set", "data.context=3", "--set", "data.batch_size=16",
        "--set", "data.audio.n_mels=16", "--set", "model.layers=1", "--set", "model.width=32",
        "--set", "model.heads=2",
    ]) == 0
    out = capsys.readouterr().out
    assert f"{len(jax.devices())} chips" in out and "global batch 16" in out
    assert "compiled in" in out and "of 16 GiB HBM (fits)" in out and "TFLOP per step" in out
