"""One of the processes of tests/test_multiprocess.py (2 processes x 4 CPU devices).

Run by the test with VASA_COORDINATOR / VASA_NUM_PROCESSES / VASA_PROCESS_ID set; writes what it
computed as JSON to argv[1]. Checkpoints go to argv[2], a directory both processes share.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(out_path: str, ckpt_dir: str) -> None:
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags

    import grain
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    from vasa_jax import checkpointing
    from vasa_jax.parallel import distributed, mesh as mesh_lib, sharding

    jax.config.update("jax_threefry_partitionable", False)  # faster CPU compiles
    assert distributed.maybe_initialize(), "the test sets VASA_COORDINATOR etc."
    assert distributed.maybe_initialize()  # idempotent
    pid = jax.process_index()
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "data"))
    mesh = mesh_lib.create_mesh((("data", -1), ("fsdp", 2)))  # data=4 x fsdp=2 over 2 hosts
    batch_sharding = sharding.data_sharding(mesh)

    # A global batch from per-process rows, reduced by a jitted sum.
    local = {"x": np.arange(12, dtype=np.float32).reshape(4, 3) + 100 * pid}
    batch = sharding.global_batch(local, batch_sharding)
    total = float(jax.jit(jnp.sum)(batch["x"]))

    # An explicit collective: psum of each device's value over the whole mesh.
    ones = sharding.global_batch(np.full((4,), pid + 1.0, np.float32), batch_sharding)
    psum = jax.jit(
        jax.shard_map(
            lambda v: jax.lax.psum(v.sum(), ("data", "fsdp")),  # one value per device
            mesh=mesh, in_specs=P(("data", "fsdp")), out_specs=P(),
        )
    )(ones)

    # Sharded train state, two jitted steps, async checkpoint with this host's data iterator.
    def create():
        init = nnx.initializers.lecun_normal()
        model = nnx.Sequential(
            nnx.Linear(3, 16, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                       rngs=nnx.Rngs(0)),
            nnx.relu,
            nnx.Linear(16, 1, kernel_init=nnx.with_partitioning(init, ("mlp", None)),
                       rngs=nnx.Rngs(1)),
        )
        return model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    graphdef, state, shardings = sharding.create_sharded_state(create, mesh, rules)

    def train_step(state, batch):
        model, opt = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: (m(batch["x"] / 100.0) ** 2).mean())(model)
        opt.update(model, grads)
        return nnx.split((model, opt))[1], loss

    step = jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, None), donate_argnums=0)
    losses = []
    with sharding.mesh_rules(mesh, rules):
        for _ in range(2):
            state, loss = step(state, batch)
            losses.append(float(loss))
    checksum = jax.jit(lambda s: sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(s)))

    data = grain.MapDataset.range(32)[pid::jax.process_count()].batch(2).to_iter_dataset()
    it = iter(data)
    next(it)
    ckpt = checkpointing.Checkpointer(ckpt_dir)
    ckpt.save(2, state, data_iter=it)
    expected_next = next(it).tolist()
    ckpt.wait()

    mesh_b = mesh_lib.create_mesh((("data", 2), ("fsdp", -1)))
    _, abstract_b, _ = sharding.abstract_state(create, mesh_b, rules)
    new_it = iter(data)
    restored = ckpt.restore(abstract_b, data_iter=new_it)
    ckpt.close()
    kernel = nnx.merge(graphdef, restored)[0].layers[0].kernel

    result = dict(
        process_index=pid,
        process_count=jax.process_count(),
        device_count=jax.device_count(),
        local_device_count=jax.local_device_count(),
        main=distributed.is_main_process(),
        batch_shape=list(batch["x"].shape),
        total=total,
        psum=float(psum),
        losses=losses,
        checksum_saved=float(checksum(state)),
        checksum_restored=float(checksum(restored)),
        restored_mesh=dict(kernel.sharding.mesh.shape),
        restored_spec=list(kernel.sharding.spec),
        expected_next=expected_next,
        restored_next=next(new_it).tolist(),
    )
    distributed.barrier("worker-done")
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
