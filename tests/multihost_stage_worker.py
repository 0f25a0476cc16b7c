"""One process of tests/test_multihost_stages.py: trains stage 1, then stage 2, for a few steps.

    python multihost_stage_worker.py MODE OUT_JSON STAGE1_DATA STAGE2_DATA WORKROOT

MODE "multi": one of 2 processes x 4 CPU devices (the test sets VASA_COORDINATOR /
VASA_NUM_PROCESSES / VASA_PROCESS_ID); the loaders give each process its own rows.
MODE "single": 1 process x 8 CPU devices, the loaders' batch reordered to the row order in
which the 2 processes assemble theirs (`two_process_row_order`), so both runs step on the
same global arrays. Both modes run the real trainers (`train_and_evaluate`) with the same
configs on the same mesh, data=4 x fsdp=2 (FSDP: the rules shard parameters and optimizer
moments over fsdp). Runs go to WORKROOT/{face_latent,motion_dit}; what the test compares
beyond metrics.jsonl and the checkpoints is written as JSON to OUT_JSON (main process).
"""

import dataclasses
import functools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STEPS = 3
BATCH = 8  # one example per device
PROCESSES = 2  # of the multi-process run
MESH_AXES = (("data", 4), ("fsdp", 2), ("tensor", 1))
# Few steps would leave a 0.99 EMA ~97% initial weights: at 0.5 it shows the training.
EMA_DECAY = 0.5
TRAIN = dict(train__total_steps=STEPS, train__log_every=1, train__image_every=0,
             train__checkpoint_every=0, train__ema_decay=EMA_DECAY, mesh__axes=MESH_AXES,
             data__batch_size=BATCH, data__num_workers=0, optim__warmup_steps=1)
ROW_KEYS = {"face_latent": ("clip_index", "cross_clip_index", "frame_index"),
            "motion_dit": ("clip_index", "start")}


def stage_configs(stage1_data: str, stage2_data: str) -> dict:
    """The tiny configs of both stages, shrunk further as their own tests do."""
    import configs

    return {
        # Narrower than tiny (steps at -O0 on 8 devices dominate the test); the GAN from the
        # last step (the discriminator and its optimizer train too); no perceptual (tiny's
        # default) and no face-ID model: the other terms are all on.
        "face_latent": configs.load(
            "configs/face_latent.py:size=tiny", data__path=stage1_data,
            model__volume__channels=8, model__app__stem=8, model__app__channels=(16, 32),
            model__id__stem=8, model__id__channels=(16, 32), model__id__dim=16,
            model__motion__stem=8, model__motion__channels=(16, 32),
            model__warp__seed_channels=16, model__warp__channels=(8,), model__warp__hidden=32,
            model__g3d__channels=(8, 16), model__decoder__channels=32,
            model__decoder__up_channels=(16, 16), model__discriminator__channels=(8, 16, 32),
            loss__gan_start_step=STEPS - 1, disc_optim__warmup_steps=1, **TRAIN),
        "motion_dit": configs.load(
            "configs/motion_dit.py:size=tiny", data__path=stage2_data, data__window=10,
            data__context=3, data__audio__n_mels=16, model__layers=2, model__width=32,
            model__heads=2, model__audio_encoder__hidden=16, diffusion__sample_steps=4,
            **TRAIN),
    }


def two_process_row_order(batch_size: int, processes: int) -> list[int]:
    """Rows of a 1-process batch in the order 2+ processes assemble the same examples.

    The loaders hand process p the global stream's elements p, p + P, p + 2P, ... (module doc
    of data_pipeline.loaders), so with P processes the global batch k holds the same
    examples kB .. kB + B - 1 as with one, but process by process: row p * B / P + j is
    element p + P * j of the 1-process batch.
    """
    local = batch_size // processes
    return [p + processes * j for p in range(processes) for j in range(local)]


def _take_rows(order, batch):
    import jax
    import numpy as np

    return jax.tree.map(lambda x: np.asarray(x)[order], batch)


def in_two_process_order(make_stage):
    """make_stage, its single-process dataset reordered by `two_process_row_order`."""

    def wrapped(config, *args, **kwargs):
        stage = make_stage(config, *args, **kwargs)
        order = two_process_row_order(config.data.batch_size, PROCESSES)

        def make_dataset(index, count):
            assert (index, count) == (0, 1), (index, count)
            return stage.make_dataset(0, 1).map(functools.partial(_take_rows, order))

        return dataclasses.replace(stage, make_dataset=make_dataset)

    return wrapped


def global_rows(stage, mesh, keys, steps) -> list[dict]:
    """The first `steps` global batches' row identifiers, as the step sees them (assembled
    from every process's rows like the loop's batches, then gathered to every host)."""
    from jax.experimental import multihost_utils

    import jax
    from vasa_jax.parallel import sharding

    it = iter(stage.make_dataset(jax.process_index(), jax.process_count()))
    out = []
    for _ in range(steps):
        local = next(it)
        batch = sharding.global_batch({k: local[k] for k in keys}, sharding.data_sharding(mesh))
        out.append({k: multihost_utils.process_allgather(v, tiled=True).tolist()
                    for k, v in batch.items()})
    return out


def _sharding_of(variable) -> dict:
    x = variable.get_value()
    return dict(spec=[list(a) if isinstance(a, tuple) else a for a in x.sharding.spec],
                shape=list(x.shape),
                local_shard_shapes=[list(s.data.shape) for s in x.addressable_shards])


def main(mode: str, out_path: str, stage1_data: str, stage2_data: str, workroot: str) -> None:
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags

    import jax

    jax.config.update("jax_threefry_partitionable", False)  # as tests/conftest.py

    from vasa_jax.parallel import distributed
    from vasa_jax.parallel.mesh import create_mesh
    from vasa_jax.trainers import face_latent, loop, motion_dit

    assert distributed.maybe_initialize() == (mode == "multi")
    expected = (PROCESSES, 4) if mode == "multi" else (1, 8)
    assert (jax.process_count(), jax.local_device_count()) == expected
    trainers = {"face_latent": face_latent, "motion_dit": motion_dit}
    if mode == "single":  # train_and_evaluate looks make_stage up at call time
        for module in trainers.values():
            module.make_stage = in_two_process_order(module.make_stage)

    result = {"process_count": jax.process_count(), "device_count": jax.device_count()}
    for name, config in stage_configs(stage1_data, stage2_data).items():
        module = trainers[name]
        workdir = os.path.join(workroot, name)
        run = module.train_and_evaluate(config, workdir, compiler_options=loop.FAST_CPU_COMPILE)
        state = run.state
        if name == "face_latent":  # a conv kernel: out channels -> fsdp
            param = ["generator", "decoder", "generator", "blocks", 0, "conv1", "kernel"]
            moments = ["g_opt", "opt_state", 1, 0, "mu"] + param[1:]
        else:  # a DiT MLP kernel: embed -> fsdp
            param = ["model", "blocks", 0, "mlp_in", "kernel"]
            moments = ["opt", "opt_state", 1, 0, "mu"] + param[1:]
        args = (config, workdir) if name == "motion_dit" else (config,)
        stage = module.make_stage(*args)
        mesh = create_mesh(config.mesh.axes)
        result[name] = dict(
            step=run.step, skipped_steps=run.skipped_steps, lr=config.optim.lr,
            mesh=dict(mesh.shape),
            param=_sharding_of(functools.reduce(lambda s, k: s[k], param, state)),
            moment=_sharding_of(functools.reduce(lambda s, k: s[k], moments, state)),
            rows=global_rows(stage, mesh, ROW_KEYS[name], STEPS),
        )
        if mode == "single":  # the loaders' own order: the same examples as a set
            plain = dataclasses.replace(
                stage, make_dataset=lambda i, n, c=config: _plain_dataset(name, c, i, n))
            result[name]["plain_rows"] = global_rows(plain, mesh, ROW_KEYS[name], STEPS)
    distributed.barrier("stage-worker-done")
    if distributed.is_main_process():
        with open(out_path, "w") as f:
            json.dump(result, f)


def _plain_dataset(name, config, index, count):
    from data_pipeline.loaders import stage1_dataset, stage2_dataset

    make = stage1_dataset if name == "face_latent" else stage2_dataset
    return make(config.data, process_index=index, process_count=count)


if __name__ == "__main__":
    main(*sys.argv[1:])
