"""Ahead-of-time compile of a stage's training step for a TPU topology, without TPUs.

    pip install --target /tmp/libtpu libtpu==0.0.42.1   # jax 0.10.2's libtpu (jax[tpu])
    PYTHONPATH=/tmp/libtpu python -m vasa_jax.bench.aot \
        --config configs/motion_dit.py:size=full --topology v5e:16x16 --data data/latents \
        [--set data.batch_size=512] [--set mesh.axes='(("data",-1),("fsdp",4),("tensor",1))']

Builds the stage exactly as `train.py` would (`make_stage`, the mesh from config.mesh.axes
over the topology's devices, shardings from config.mesh.rules, the one jitted step of the
shared loop, `loop.jit_step`), lowers it for abstract inputs (the state as shapes with their
shardings; the global batch shaped like one batch of --data at config.data.batch_size) and
compiles it with libtpu's compiler for the topology. Prints the parameter count, compile
time, XLA's memory analysis per device (arguments, outputs, temporaries: does it fit the
chip's HBM?) and its FLOP count per step. --data only gives example shapes: a small corpus
at the config's resolution will do.

The host needs libtpu (a PyPI wheel) but no TPU: jax runs on CPU (JAX_PLATFORMS=cpu) and
`jax.experimental.topologies` describes the target chips.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from typing import Sequence

# libtpu looks for TPU worker hosts at start-up; there are none here.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}  # per chip (Google Cloud data sheets)


def _override(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def parse_sets(items: Sequence[str]) -> dict:
    """["a.b=1", ...] -> {"a__b": 1} (configs.load's override names)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set wants FIELD=VALUE, got {item!r}")
        out[key.replace(".", "__")] = _override(value)
    return out


def abstract_batch(stage, config, batch_sharding):
    """One local batch of the stage's dataset at batch size 2 -> ShapeDtypeStructs of the
    global batch (config.data.batch_size rows) with the batch sharding."""
    import jax
    import numpy as np

    from vasa_jax.parallel import sharding

    global_batch = int(config.data.batch_size)
    fits = sharding.round_batch_size(batch_sharding.mesh, global_batch,
                                     sharding.batch_axes(config.mesh.rules))
    if fits != global_batch:
        raise ValueError(f"data.batch_size {global_batch} does not split over the mesh's batch "
                         f"axes ({dict(batch_sharding.mesh.shape)}): pass e.g. --set "
                         f"data.batch_size={fits}")
    local = next(iter(stage.make_dataset(0, 1)))
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((global_batch,) + np.shape(x)[1:], np.asarray(x).dtype,
                                       sharding=batch_sharding),
        {k: local[k] for k in stage.batch_keys})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="e.g. configs/face_latent.py:size=full")
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:16x16, v5p:4x4x4")
    p.add_argument("--data", required=True, help="a dataset folder (example shapes only)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override (repeatable)")
    args = p.parse_args(argv)

    import importlib

    import jax
    import numpy as np
    from flax import nnx
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    import configs
    import train as train_cli
    from vasa_jax.models import layers
    from vasa_jax.parallel import sharding
    from vasa_jax.parallel.mesh import create_mesh
    from vasa_jax.trainers import loop

    overrides = parse_sets(args.set)
    overrides.setdefault("data__path", args.data)
    config = configs.load(args.config, **overrides)
    try:
        topology = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
    except Exception as e:  # noqa: BLE001 - libtpu missing or an unknown topology
        print(f"error: no TPU topology {args.topology!r} ({type(e).__name__}: {e}); is libtpu "
              "installed (see --help)?", file=sys.stderr)
        return 1
    devices = topology.devices
    mesh = create_mesh(config.mesh.axes, devices=devices)
    print(f"{args.config} on {args.topology}: {len(devices)} chips, mesh "
          f"{dict(mesh.shape)}, global batch {config.data.batch_size}")

    module = importlib.import_module(train_cli.TRAINERS[config.stage].split(":")[0])
    small = configs.load(args.config, **{**overrides, "data__batch_size": 2,
                                          "data__num_workers": 0})
    # The stage as train.py builds it (its normalisation, frozen nets, step); a batch of 2
    # from its loader gives the example shapes, the global batch is config.data.batch_size.
    stage = module.make_stage(small)
    rules = config.mesh.rules
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = sharding.data_sharding(mesh, sharding.batch_axes(rules))
    graphdef, abstract, shardings = sharding.abstract_state(stage.create_state, mesh, rules)
    counts = loop.param_counts(nnx.merge(graphdef, abstract))
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
    try:
        batch = abstract_batch(stage, config, batch_sharding)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                         sharding=replicated), stage.frozen)
    step_index = jax.ShapeDtypeStruct((), np.int32, sharding=replicated)
    step_fn = loop.jit_step(graphdef, stage, config.seed, shardings, batch_sharding, replicated)
    start = time.perf_counter()
    # Traced as on TPU: layers that pick an implementation per platform pick TPU's.
    with sharding.mesh_rules(mesh, rules), layers.target_platform("tpu"):
        lowered = step_fn.lower(abstract, batch, step_index, frozen)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    memory = loop.memory_stats(compiled)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", float("nan")))
    gib = lambda n: n / 2**30  # noqa: E731
    per_device = (memory.get("argument_size_in_bytes", 0) + memory.get("output_size_in_bytes", 0)
                  + memory.get("temp_size_in_bytes", 0)
                  - memory.get("alias_size_in_bytes", 0))
    chip = args.topology.split(":")[0]
    print(f"compiled in {seconds:.1f} s; per device: " + ", ".join(
        f"{k.removesuffix('_size_in_bytes')} {gib(v):.2f} GiB" for k, v in memory.items() if v))
    hbm = HBM_GIB.get(chip)
    print(f"per-device total {gib(per_device):.2f} GiB"
          + (f" of {hbm} GiB HBM ({'fits' if gib(per_device) < hbm else 'does NOT fit'})"
             if hbm else ""))
    print(f"XLA cost analysis: {flops / 1e12:.2f} TFLOP per step per device")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))))
    sys.exit(main())
