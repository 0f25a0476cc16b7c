"""Trainers: the shared skeleton and one module per stage.

    loop         Stage, EMA, train(config, workdir, make_stage): mesh, sharded state, resume,
                 one jitted step, logs, images, checkpoints (both stages use it)
    logger       metrics.jsonl, TensorBoard, PNG grids, the progress line
    face_latent  stage 1 (VASA-1 sec 3.1): train_and_evaluate(config, workdir)

Stage modules are imported by name (train.py's TRAINERS registry), not here: importing the
package must not pull in every model.
"""

from vasa_jax.trainers.loop import EMA, Stage, TrainResult, train

__all__ = ["EMA", "Stage", "TrainResult", "train"]
