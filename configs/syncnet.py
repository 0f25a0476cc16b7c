"""SyncNet trained here, for the Sc / SD lip-sync metrics when syncnet_python's public
weights are not at hand (vasa_jax.trainers.syncnet).

    python -m data_pipeline.sync_crops --data data/synthtalk --out data/sync_crops
    python train.py --config configs/syncnet.py:size=tiny --workdir runs/syncnet \
        --config.data.path=data/sync_crops
    python -m vasa_jax.evaluate videos ... --syncnet runs/syncnet

The network is syncnet_python's, layer for layer (vasa_jax.models.syncnet), so the export
loads where converted syncnet_v2.model weights do. Variants: `size=tiny` (400 steps: the
CPU recipe's), `size=small` / `size=full` (5000 steps); the network is the same at every
size. Sections:

  data   a `data_pipeline.sync_crops` folder; batch_size lip windows (5 crops) a step, each
         with the MFCC windows of its own audio at offset 0 and at loss.num_shifted other
         offsets.
  loss   a softmax over negative distances (SyncNet's Euclidean feature distance, the one
         Sc and SD are read from): each lip window against its own audio at offset 0 (the
         target), at num_shifted random offsets 1..max_shift frames away (the
         offset search's near misses), and the other batch rows' audio.
  final_eval  Sc / SD / offset on held-out clips with their own audio and with another
         clip's, written with the export.
  export bn_batches: training batches whose statistics become the batch norms' stored
         mean and var (the train step normalises with each batch's own).
  train, optim, mesh: the shared loop's sections (no EMA: the trained weights are exported).
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, size="full", choices={"size": common.SIZES})
    c = ml_collections.ConfigDict()
    c.stage = "syncnet"
    c.size = arg.size
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(embed_dim=1024))  # syncnet_v2.model's
    c.data = ml_collections.ConfigDict(dict(
        path="",
        split="train",
        batch_size={"tiny": 16, "small": 64, "full": 64}[arg.size],
        num_workers=0,  # crops are memory-mapped .npy reads: threads suffice
        seed=0,
    ))
    c.loss = ml_collections.ConfigDict(dict(
        num_shifted=3,  # own-audio negatives per lip window
        max_shift=15,  # frames: the scorer's offset search range
        temperature=1.0,  # logits = -distance / temperature
    ))
    c.mesh = common.mesh_config("conv")
    c.train = common.helper_train_config(
        total_steps={"tiny": 400, "small": 5000, "full": 5000}[arg.size],
        checkpoint_every=100)
    c.train.log_every = 20
    c.optim = common.helper_optim_config(lr=3e-4, warmup_steps=50, weight_decay=1e-4)
    c.final_eval = ml_collections.ConfigDict(dict(max_clips=8))  # ~0.1 s a frame on a CPU
    c.export = ml_collections.ConfigDict(dict(bn_batches=20))
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    check = common.check
    common.check_choice(c.size, common.SIZES, "size")
    common.check_choice(c.data.split, ("train", "test"), "data.split")
    check(c.data.batch_size >= 2, f"data.batch_size must be >= 2 (the other rows are "
                                  f"negatives), got {c.data.batch_size}")
    check(c.data.num_workers >= 0, f"data.num_workers must be >= 0, got {c.data.num_workers}")
    common.validate_train(c.train)
    common.validate_optim(c.optim, c.train.total_steps)
    check(c.model.embed_dim > 0, f"model.embed_dim must be > 0, got {c.model.embed_dim}")
    lc = c.loss
    check(lc.num_shifted >= 0, f"loss.num_shifted must be >= 0, got {lc.num_shifted}")
    check(lc.max_shift >= 1, f"loss.max_shift must be >= 1, got {lc.max_shift}")
    check(lc.temperature > 0, f"loss.temperature must be > 0, got {lc.temperature}")
    check(c.final_eval.max_clips >= 1,
          f"final_eval.max_clips must be >= 1, got {c.final_eval.max_clips}")
    check(c.export.bn_batches >= 1, f"export.bn_batches must be >= 1, got {c.export.bn_batches}")
    check("batch" in dict(c.mesh.rules), "mesh.rules lacks the logical axis 'batch'")
