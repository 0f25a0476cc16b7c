"""Bad input at every door: each command answers it with one line on stderr and a non-zero
exit status, never a traceback, and leaves nothing half-made (vasa_jax.cli).

Other bad-input cases live with their command's tests (test_configs, test_inspect,
test_evaluate_motion, test_extract_latents, test_preprocess, test_inference, ...)."""

import logging
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import configs
from configs.common import data_stage1
from data_pipeline import inspect as inspect_cli
from data_pipeline import loaders, schema
from data_pipeline import extract_latents
from tests import testdata
from vasa_jax import checkpointing, cli
from vasa_jax.evaluate.__main__ import main as evaluate_main
from vasa_jax.models import expression_meter, face_id, face_pose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_error_line(err: str, prefix: str = "error: ") -> str:
    """The single line of `err` (asserted to be exactly one, starting with `prefix`), progress
    bar updates aside (tqdm redraws them after carriage returns)."""
    lines = [line.strip() for line in err.replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line and not line.endswith("it/s]")]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny clip-record dataset with short clips (5 frames): 3 identities, 3 train shards."""
    d = str(tmp_path_factory.mktemp("corpus") / "data")
    testdata.make_dataset(d, identities=3, clips_per_identity=2, seconds=0.2, size=16,
                          num_shards=3)
    return d


def fake_run(workdir: str, stage: str) -> str:
    """A workdir holding one finished checkpoint of `stage` (a placeholder state)."""
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, checkpointing.CHECKPOINT_DIR),
                                      async_save=False)
    ckpt.save(1, {"w": jnp.zeros(2)}, config={"stage": stage}, force=True)
    ckpt.wait()
    ckpt.close()
    return workdir


# ----------------------------------------------------------------------------- train.py


def test_train_misspelt_field_is_one_short_line():
    workdir = "/nonexistent-parent/run"
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/face_latent.py:size=tiny",
         "--workdir", workdir, "--config.optim.lrr=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "'optim.lrr'" in lines[-1] and 'Did you mean "lr"' in lines[-1], lines[-1]
    assert not os.path.exists(workdir)


def test_unknown_field_names_the_closest_ones():
    config = configs.get_config("configs/face_latent.py:size=tiny")
    assert configs.unknown_field(config, "optim.lr") is None
    message = configs.unknown_field(config, "dat.path")
    assert "'dat.path'" in message and 'Did you mean "data"' in message
    message = configs.unknown_field(config, "zzzzzz")
    assert "the config has" in message and "optim" in message
    assert "not a section" in configs.unknown_field(config, "seed.x")


def test_train_bad_input_is_one_line_and_leaves_no_workdir(corpus, tmp_path, capsys):
    import train

    def run(spec: str, workdir: str, **overrides) -> str:
        config = configs.load(spec, **overrides)
        assert train.run(config, workdir) == 1
        return one_error_line(capsys.readouterr().err)

    workdir = str(tmp_path / "run")
    stage1 = "configs/face_latent.py:size=tiny"
    stage2 = "configs/motion_dit.py:size=tiny"
    missing = str(tmp_path / "missing")
    assert "not a clip-record dataset" in run(stage1, workdir, data__path=missing)
    # stage 2's error handler used to crash here, after making the workdir
    assert "does not exist" in run(stage2, workdir, data__path=missing)
    assert not os.path.exists(workdir)
    # A SynthTalk-like corpus whose clips are shorter than the window: found only after
    # stage 2 computed and saved its normalisation into the workdir, which is removed again.
    assert "has >= 50 frames" in run(stage2, workdir, data__path=corpus)
    assert not os.path.exists(workdir)

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "is a file" in run(stage1, str(blocker), data__path=corpus)
    assert "is a file" in run(stage1, str(blocker / "run"), data__path=corpus)
    assert "is a clip-record dataset" in run(stage2, corpus, data__path=corpus)
    assert not os.path.exists(os.path.join(corpus, "normalization.json"))
    stage1_run = fake_run(str(tmp_path / "stage1_run"), "face_latent")
    assert "holds a 'face_latent' run, not 'motion_dit'" in run(stage2, stage1_run,
                                                               data__path=corpus)
    assert sorted(os.listdir(stage1_run)) == ["checkpoints"]  # nothing written into it


# ----------------------------------------------------------------------------- damaged shards


def _truncate(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _scribble(path: str) -> None:
    """Overwrites bytes inside the shard's first chunk (its footer stays readable)."""
    with open(path, "r+b") as f:
        f.seek(200)
        f.write(b"\0" * 200)


def _stage1_cfg(path: str):
    cfg = data_stage1("tiny")
    cfg.update(path=path, batch_size=2, num_workers=0)
    return cfg


def test_loader_skips_and_counts_a_truncated_shard(corpus, tmp_path, caplog):
    data = str(tmp_path / "data")
    testdata.make_dataset(data, identities=3, clips_per_identity=2, seconds=0.2, size=16,
                          num_shards=3)
    bad = schema.list_shards(data, "train")[1]
    _truncate(bad)
    with caplog.at_level(logging.WARNING):
        index = loaders.load_clip_index(data, "train")
        batches = list(loaders.stage1_dataset(_stage1_cfg(data), num_epochs=1))
    assert list(index.broken) == [bad] and bad not in index.paths
    assert len(index) == 4  # the 2 records of the damaged shard are left out
    assert len(batches) == 2
    assert any(bad in r.getMessage() and "damaged shard" in r.getMessage()
               for r in caplog.records)
    # inspect --check lists it, with its file, and fails
    assert inspect_cli.main([data, "--check", "--no-progress"]) == 1


def test_loader_skips_and_counts_unreadable_records(tmp_path, caplog, capsys):
    data = str(tmp_path / "data")
    testdata.make_dataset(data, identities=3, clips_per_identity=2, seconds=0.2, size=16,
                          num_shards=3)
    bad = schema.list_shards(data, "train")[0]
    _scribble(bad)
    records = schema.read_records([bad])
    with pytest.raises(schema.CorruptRecordError, match=os.path.basename(bad)):
        records[0]
    with caplog.at_level(logging.WARNING):  # 4 batches: 8 examples of 2 epochs of 6 clips
        it = iter(loaders.stage1_dataset(_stage1_cfg(data), num_epochs=None))
        skipped = sum(int(np.sum(next(it)["num_skipped"])) for _ in range(4))
    assert skipped >= 1
    assert any(bad in r.getMessage() for r in caplog.records)
    capsys.readouterr()
    assert inspect_cli.main([data, "--check", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"{os.path.basename(bad)}[0]" in out and "unreadable" in out


def test_inspect_lists_a_truncated_shard(tmp_path, capsys):
    data = str(tmp_path / "data")
    testdata.make_dataset(data, identities=2, clips_per_identity=2, seconds=0.2, size=16,
                          num_shards=2)
    bad = schema.list_shards(data, "train")[0]
    _truncate(bad)
    assert inspect_cli.main([data, "--check", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"{os.path.basename(bad)}: damaged shard" in out
    assert "check FAILED: 1 broken record(s)" in out


# ----------------------------------------------------------------------------- other commands


def test_evaluate_checks_runs_and_outputs_first(corpus, tmp_path, capsys):
    stage1_run = fake_run(str(tmp_path / "s1"), "face_latent")
    stage2_run = fake_run(str(tmp_path / "s2"), "motion_dit")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")

    def error(*argv) -> str:
        assert evaluate_main(list(argv)) == 1
        return one_error_line(capsys.readouterr().err)

    assert "holds a 'motion_dit' run, not 'face_latent'" in error(
        "face_latent", "--workdir", stage2_run, "--data", corpus)
    assert "is a file, not a run folder" in error("motion", "--workdir", str(blocker),
                                                  "--data", corpus)
    assert "is a file" in error("face_latent", "--workdir", stage1_run, "--data", corpus,
                                "--out", str(blocker))
    assert "is a folder" in error("motion", "--workdir", stage2_run, "--data", corpus,
                                  "--json", str(tmp_path))
    assert "is a file" in error("motion", "--workdir", stage2_run, "--data", corpus,
                                "--json", str(blocker / "r.json"))
    # a usage error is one line too (vasa_jax.cli.ArgumentParser)
    with pytest.raises(SystemExit) as e:
        evaluate_main(["motion", "--workdir", stage2_run, "--seeds", "x"])
    assert e.value.code == 2
    line = one_error_line(capsys.readouterr().err, "python -m vasa_jax.evaluate motion: error")
    assert "--seeds" in line and "--help" in line


def test_extract_latents_checks_its_output_first(corpus, tmp_path, capsys):
    stage1_run = fake_run(str(tmp_path / "s1"), "face_latent")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = extract_latents.main(["--face_workdir", stage1_run, "--data", corpus, "--out",
                                 str(blocker), "--no_progress"])
    assert code == 1
    assert "is a file" in one_error_line(capsys.readouterr().err)
    stage2_run = fake_run(str(tmp_path / "s2"), "motion_dit")
    out = str(tmp_path / "latents")
    code = extract_latents.main(["--face_workdir", stage2_run, "--data", corpus, "--out", out,
                                 "--no_progress"])
    assert code == 1 and not os.path.exists(out)
    assert "not 'face_latent'" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("stage", ["face_pose", "face_id", "expression_meter"])
def test_helper_networks_bad_input_through_train(stage, corpus, tmp_path, capsys):
    """The helper networks train through train.py: its checks, one line each, nothing left
    behind; a folder holding an export made elsewhere is no workdir."""
    import train

    spec = f"configs/{stage}.py:size=tiny"

    def run(workdir: str, prefix: str = "error: ", **fields) -> str:
        config = configs.get_config(spec)
        config.update_from_flattened_dict({"data.path": corpus, "data.num_workers": 0,
                                           **fields})
        assert train.run(config, workdir) == 1
        return one_error_line(capsys.readouterr().err, prefix)

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = str(tmp_path / "out")
    assert "is a file" in run(str(blocker / "out"))
    assert "not a clip-record dataset" in run(out, **{"data.path": str(tmp_path / "none")})
    assert "train.total_steps must be > 0" in run(out, "config error: ",
                                                  **{"train.total_steps": -1})
    assert not os.path.exists(out)
    export = tmp_path / "export"
    export.mkdir()
    meta = {"face_pose": face_pose.CONFIG_FILE, "face_id": face_id.CONFIG_FILE,
            "expression_meter": expression_meter.CONFIG_FILE}[stage]
    (export / meta).write_text("{}")
    assert "holds an export" in run(str(export))
    assert sorted(os.listdir(export)) == [meta]


def test_helper_network_misspelt_field_is_one_line(corpus, tmp_path):
    out = str(tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/face_pose.py:size=tiny",
         "--workdir", out, f"--config.data.path={corpus}",
         "--config.model.motion.glimpse_widht=(0.5,)"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert "'model.motion.glimpse_widht'" in line and 'Did you mean "glimpse_widths"' in line
    assert not os.path.exists(out)


def test_check_output(tmp_path):
    cli.check_output(str(tmp_path / "new" / "deeper"))  # creatable: fine, and not created
    assert not os.path.exists(tmp_path / "new")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        cli.check_output(str(blocker))
    with pytest.raises(NotADirectoryError, match="is a file"):
        cli.check_output(str(blocker / "sub"), folder=False)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        cli.check_output(str(tmp_path), "--json file", folder=False)
    with pytest.raises(ValueError, match="empty"):
        cli.check_output("")


def test_synthtalk_checks_its_output_first(tmp_path, capsys):
    from data_pipeline.synthtalk.__main__ import main as synthtalk_main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, message in ((blocker, "is a file, not a folder"),
                         (blocker / "sub", "is a file")):
        assert synthtalk_main(["--out", str(out), "--num_identities", "1",
                               "--clips_per_identity", "1", "--seconds", "0.2",
                               "--no_progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err
