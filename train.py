"""Trains a stage of vasa_jax, resuming from --workdir when it holds a checkpoint.

    python train.py --config configs/face_latent.py:size=tiny --workdir runs/face \
        --config.data.path=data/synthtalk
    python train.py --config configs/motion_dit.py:size=tiny --workdir runs/motion \
        --config.data.path=data/latents

The helper networks train the same way (configs/face_pose.py, face_id.py,
expression_meter.py) and end with a params-only export in their workdir, which is then
the path their consumers take (--config.model.motion.pretrained_pose=runs/pose, ...).

Any config field can be overridden with --config.<field>=<value>; a misspelt field is an error.
Bad input is one line on stderr (vasa_jax.cli): exit status 2 for a bad flag (a misspelt
field, with the closest valid names), 1 for a bad config value, data folder or workdir. A
run that fails so before its first checkpoint removes the workdir it created.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from configs.common import ConfigError
from data_pipeline import schema
from vasa_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/face_latent.py:size=tiny.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, logs, TensorBoard events.")
flags.mark_flags_as_required(["config", "workdir"])

# stage name -> "module:function" of its train_and_evaluate(config, workdir).
TRAINERS = {
    "face_latent": "vasa_jax.trainers.face_latent:train_and_evaluate",
    "motion_dit": "vasa_jax.trainers.motion_dit:train_and_evaluate",
    "capp": "vasa_jax.trainers.capp:train_and_evaluate",
    "face_pose": "vasa_jax.trainers.face_pose:train_and_evaluate",
    "face_id": "vasa_jax.trainers.face_id:train_and_evaluate",
    "expression_meter": "vasa_jax.trainers.expression_meter:train_and_evaluate",
    "syncnet": "vasa_jax.trainers.syncnet:train_and_evaluate",
}
NOT_BUILT: dict[str, str] = {}


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of --name (as `--name=V` or `--name V`) in argv, or None."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _unknown_override(argv: list[str]) -> str | None:
    """The message for the first --config.<field> in argv that names no field of the config
    (ml_collections reports one as a bare AttributeError / KeyError), or None."""
    config = configs.get_config(_flag_value(argv, "config"))
    for arg in argv:
        if arg.startswith("--config."):
            message = configs.unknown_field(config, arg[len("--config."):].split("=")[0])
            if message:
                return message
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (app.run's flags_parser) with a bad flag as one line on stderr
    and exit status 2: a missing config file or bad variant (checked first, so the message
    is ours rather than ml_collections' traceback text), a misspelt --config.<field>, a
    value of the wrong type, a missing required flag."""
    try:
        spec = _flag_value(argv, "config")
        if spec:
            configs.get_config(spec)
        return FLAGS(argv)
    except (flags.Error, ConfigError, OSError, ValueError) as e:
        sys.exit(cli.fail(e, 2))
    except (AttributeError, KeyError) as e:  # the config loaded above, so spec is set
        sys.exit(cli.fail(_unknown_override(argv) or e, 2))


def _check_workdir(workdir: str, stage: str) -> None:
    """Raises if `workdir` cannot hold this run: not a creatable, writable folder, a dataset
    folder, or the checkpoints of another stage (resuming them would fail only in the restore, after this
    stage had written its files into the other run)."""
    cli.check_output(workdir, "workdir")
    if os.path.exists(os.path.join(workdir, schema.DATASET_INFO)):
        raise ValueError(f"workdir {workdir!r} is a clip-record dataset, not a run folder")
    from vasa_jax import checkpointing

    if not os.path.isdir(os.path.join(workdir, checkpointing.CHECKPOINT_DIR)):
        return
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)  # orbax logs ~25 INFO lines per open
    try:
        ckpt, _, _ = checkpointing.open_run(workdir, stage)  # ValueError: another stage
        ckpt.close()
    except FileNotFoundError:
        pass  # no finished checkpoint yet: the run starts afresh
    finally:
        logging.set_verbosity(verbosity)


def train(config, workdir: str) -> int:
    """Validates the config and the workdir, then runs the stage's trainer. Returns 0, or 3
    when the run stopped on a streak of NaN/inf steps (train.max_bad_steps; the reason is
    the last line of the log)."""
    config = configs.validate(config)
    if config.stage not in TRAINERS:
        raise ConfigError(NOT_BUILT.get(config.stage, f"unknown stage {config.stage!r}"))
    _check_workdir(workdir, config.stage)
    module_name, fn_name = TRAINERS[config.stage].split(":")
    module = __import__(module_name, fromlist=[fn_name])
    logging.info("stage %s, workdir %s", config.stage, workdir)
    result = getattr(module, fn_name)(config, workdir)
    if getattr(result, "stop_reason", ""):
        print(f"error: {result.stop_reason}", file=sys.stderr)
        return 3
    return 0


def run(config, workdir: str) -> int:
    """`train` as a command: bad input is one line on stderr and exit status 1, and a fresh
    workdir is removed again (vasa_jax.cli.run_guarded)."""
    return cli.run_guarded(lambda: train(config, workdir), made=workdir)


def main(argv):
    del argv
    sys.exit(run(FLAGS.config, FLAGS.workdir))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
