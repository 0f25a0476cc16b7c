"""config.evals: evaluators run by the training loop every train.eval_every steps on the
checkpoint of that step, their numbers logged as eval/<name>/<key> (big_vision style)."""

import json
import os

import pytest

import configs
from configs.common import ConfigError
from tests import testdata
from tests.test_capp import small_model_config
from vasa_jax.evaluate import scalars, training_settings


def test_scalars_flattens_finite_numbers():
    result = {"a": 1, "b": {"c": 2.5, "d": float("nan"), "e": True, "f": "x", 3: 0.5},
              "g": [1, 2]}
    assert scalars(result) == {"a": 1.0, "b/c": 2.5, "b/3": 0.5}


def test_eval_options_are_checked_with_the_config():
    c = configs.load("configs/capp.py:size=tiny", train__eval_every=10)
    assert c.evals.shift.type == "capp"
    with pytest.raises(ConfigError, match=r"evals.shift: unknown option\(s\) \['shfit'\]"):
        with c.unlocked():
            c.evals.shift.shfit = 3
        configs.validate(c)
    with pytest.raises(ConfigError, match="evals.reenact.type"):
        configs.load("configs/face_latent.py:size=tiny", evals__reenact__type="nope")
    with pytest.raises(ValueError, match="max_shift"):
        training_settings("capp", {"max_shift": -1}, step=0)


def test_the_loop_runs_the_evals_and_logs_their_numbers(tmp_path):
    from vasa_jax.trainers import capp as trainer
    from vasa_jax.trainers import loop

    data = str(tmp_path / "data")
    testdata.make_dataset(data, identities=2, clips_per_identity=2, test_clips_per_identity=1,
                          seconds=3.4, size=16)
    c = configs.load("configs/capp.py:size=tiny", data__path=data, data__batch_size=8,
                     data__audio__n_mels=16, train__total_steps=4, train__log_every=2,
                     train__checkpoint_every=0, train__eval_every=2, optim__warmup_steps=1,
                     evals__shift__max_shift=1, loss__shift_negatives=(-2, 2),
                     data__window=79)  # 85-frame clips: a 75-frame window + 2 x 2
    with c.unlocked():
        c.model = small_model_config(75)
    workdir = str(tmp_path / "run")
    trainer.train_and_evaluate(c, workdir, compiler_options=loop.FAST_CPU_COMPILE)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = {r["step"]: r for r in rows if "eval/shift/shift/0" in r}
    assert sorted(evals) == [2, 4]
    for r in evals.values():
        assert {"eval/shift/shift/-1", "eval/shift/shift/1", "eval/shift/shuffled"} <= set(r)
        assert -1.0 <= r["eval/shift/shift/0"] <= 1.0
        assert r["eval/shift/clips"] == 2.0  # the 2 test clips
