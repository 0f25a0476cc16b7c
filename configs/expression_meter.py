"""The expression meter: reads mouth, blink and gaze off frames, for the evaluators'
expression transfer and lip sync (vasa_jax.trainers.expression_meter).

    python train.py --config configs/expression_meter.py:size=tiny --workdir runs/meter \
        --config.data.path=data/synthtalk

Variants: `size=tiny` (1500 steps: the CPU recipe's), `size=small` / `size=full` (3000
steps); the network is the same at every size. Sections:

  data   the stage-1 loader (configs.common.data_stage1: its light scale/shift/colour
         jitter, as the generator sees), at the meter's size (data.image_size follows
         model.image_size); data.aug.blur: the share of images blurred 2x in the step.
  model  vasa_jax.models.expression_meter.ExpressionMeterConfig's fields.
  loss   column_weights: the MSE weight of each output column (mouth_open, blink,
         gaze_theta, gaze_phi); None = 1 / each column's variance over the first
         balance_batches batches (mean 1; 0 batches: a plain MSE). The run's config
         records the weights used.
  final_eval  Pearson r and MAE per column on the test split, written with the export.
  train, optim, mesh: the shared loop's sections (no EMA: the trained weights are exported).
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, size="full", choices={"size": common.SIZES})
    c = ml_collections.ConfigDict()
    c.stage = "expression_meter"
    c.size = arg.size
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        image_size=64,  # side images are resized to
        channels=(32, 64, 64, 128),  # one 3x3 conv each
        hidden=128,  # width of the dense layer after the head
        gaze_scale=20.0,  # degrees per output unit of gaze_theta / gaze_phi
        head="flatten",  # the final map's layout reaches the dense layer (gaze); "mean": pooled
    ))
    c.data = common.data_stage1("tiny")
    c.data.image_size = c.model.get_ref("image_size")
    c.data.batch_size = 16  # stage-1 examples per step; each gives 3 labelled faces
    c.data.num_workers = 2
    c.data.aug.blur = 0.3  # 2x down/up-sampling: reads soft generator output too
    c.loss = ml_collections.ConfigDict(dict(
        balance_batches=20,
        column_weights=ml_collections.config_dict.placeholder(tuple),
    ))
    c.mesh = common.mesh_config("conv")
    c.train = common.helper_train_config(
        total_steps={"tiny": 1500, "small": 3000, "full": 3000}[arg.size],
        checkpoint_every=500)
    c.optim = common.helper_optim_config(lr=2e-3, warmup_steps=50, weight_decay=1e-4)
    c.final_eval = common.final_eval_config(frames_per_clip=10)
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    from vasa_jax.models.expression_meter import OUTPUT_COLUMNS, ExpressionMeterConfig

    common.validate_helper(c)
    common.check(0.0 <= c.data.aug.blur <= 1.0,
                 f"data.aug.blur must be in [0, 1], got {c.data.aug.blur}")
    try:
        ExpressionMeterConfig(**{**c.model.to_dict(), "channels": tuple(c.model.channels)})
    except (TypeError, ValueError) as e:
        raise common.ConfigError(f"model: {e}") from e
    lc = c.loss
    common.check(lc.balance_batches >= 0,
                 f"loss.balance_batches must be >= 0, got {lc.balance_batches}")
    weights = lc.column_weights
    common.check(weights is None or (len(weights) == len(OUTPUT_COLUMNS)
                                     and all(w > 0 for w in weights)),
                 f"loss.column_weights must be None or {len(OUTPUT_COLUMNS)} weights > 0 "
                 f"({', '.join(OUTPUT_COLUMNS)}), got {weights}")
