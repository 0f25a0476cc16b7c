"""The device-scaling benchmark (vasa_jax.bench.scaling): its table arithmetic, the child
processes' device environment, and one real weak-scaling run over 1 and 2 CPU devices."""

import json

import pytest

from tests import testdata
from vasa_jax.bench import scaling


def test_table_weak_and_strong_scaling_arithmetic():
    rows = [{"devices": 1, "batch": 2, "seconds": 1.0}, {"devices": 4, "batch": 8, "seconds": 2.0}]
    weak = scaling.table(rows, strong=False).splitlines()
    # 4x the examples in 2x the time: throughput 2x on 4 devices, 50 % efficient.
    assert weak[-1] == "| 4 | 8 | 2.000 | 4.0 | 2.00x | 50% |"
    assert weak[2] == "| 1 | 2 | 1.000 | 2.0 | 1.00x | 100% |"
    strong = scaling.table([{"devices": 1, "batch": 8, "seconds": 4.0},
                            {"devices": 2, "batch": 8, "seconds": 2.5}], strong=True)
    assert strong.splitlines()[-1] == "| 2 | 8 | 2.500 | 3.2 | 1.60x | 80% |"


def test_device_environment_and_reading_step_times(tmp_path):
    env = scaling.device_env(4, "cpu")
    assert env["XLA_FLAGS"].split().count("--xla_force_host_platform_device_count=4") == 1
    assert env["JAX_NUM_CPU_DEVICES"] == "4"  # the test session's own 8 are replaced
    assert scaling.device_env(2, "gpu")["CUDA_VISIBLE_DEVICES"] == "0,1"
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for row in ({"step": 5, "perf/step_seconds": 0.9}, {"step": 5, "eval/x": 1.0},
                    {"step": 10, "perf/step_seconds": 0.4}):
            f.write(json.dumps(row) + "\n")
    assert abs(scaling.step_seconds(str(tmp_path)) - 0.4) < 1e-9


@pytest.mark.slow  # two fresh train.py processes (imports + compiles, ~40 s)
def test_weak_scaling_run_over_one_and_two_devices(tmp_path, capsys):
    data = str(tmp_path / "data")
    testdata.make_dataset(data, identities=2, clips_per_identity=2, test_clips_per_identity=1,
                          seconds=1.6, size=16)
    out = str(tmp_path / "scaling.json")
    sets = ["data.window=10", "data.context=3", "data.audio.n_mels=16", "model.layers=1",
            "model.width=16", "model.heads=2", "model.audio_encoder.hidden=8",
            "diffusion.sample_steps=2", "optim.warmup_steps=0"]
    argv = ["--config", "configs/motion_dit.py:size=tiny", "--data", data, "--devices", "2,1",
            "--per_device_batch", "2", "--steps", "4", "--out", out]
    for s in sets:
        argv += ["--set", s]
    assert scaling.main(argv) == 0
    report = json.load(open(out))
    assert [(r["devices"], r["batch"]) for r in report["rows"]] == [(1, 2), (2, 4)]
    assert all(r["seconds"] > 0 for r in report["rows"])
    printed = capsys.readouterr().out
    assert "weak scaling, cpu" in printed and "| 2 | 4 |" in printed
    # A bad override fails the child run: one line naming the device count.
    with pytest.raises(ValueError, match="train.py on 1 devices failed"):
        scaling.main(argv[:-2] + ["--set", "model.no_such_field=1"])
