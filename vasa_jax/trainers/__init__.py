"""Trainers: the shared skeleton and one module per stage.

    loop         Stage, EMA, train(config, workdir, make_stage): mesh, sharded state, resume,
                 one jitted step, logs, images, checkpoints (every stage uses it)
    logger       metrics.jsonl, TensorBoard, PNG grids, the progress line
    face_latent  stage 1 (VASA-1 sec 3.1): train_and_evaluate(config, workdir)
    motion_dit   stage 2 (VASA-1 sec 3.2); capp: the contrastive audio-pose model
    face_pose, face_id, expression_meter
                 the helper networks (stage 1's pre-trained pose net, l_cross-id's embedder,
                 the evaluators' expression meter): each run ends with a params-only export
                 in its workdir (loop.train_and_export)

Stage modules are imported by name (train.py's TRAINERS registry), not here: importing the
package must not pull in every model.
"""

from vasa_jax.trainers.loop import EMA, Stage, TrainResult, train

__all__ = ["EMA", "Stage", "TrainResult", "train"]
