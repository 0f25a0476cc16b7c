"""Trains a stage of vasa_jax, resuming from --workdir when it holds a checkpoint.

    python train.py --config configs/face_latent.py:size=tiny --workdir runs/face \
        --config.data.path=data/synthtalk
    python train.py --config configs/motion_dit.py:size=tiny --workdir runs/motion \
        --config.data.path=data/latents

Any config field can be overridden with --config.<field>=<value>; a misspelt field is an error.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from configs.common import ConfigError

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
}
NOT_BUILT: dict[str, str] = {}


def main(argv):
    del argv
    try:
        config = configs.validate(FLAGS.config)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if config.stage not in TRAINERS:
        sys.exit(f"train.py: {NOT_BUILT.get(config.stage, f'unknown stage {config.stage!r}')}")
    module_name, fn_name = TRAINERS[config.stage].split(":")
    module = __import__(module_name, fromlist=[fn_name])
    logging.info("stage %s, workdir %s", config.stage, FLAGS.workdir)
    getattr(module, fn_name)(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
