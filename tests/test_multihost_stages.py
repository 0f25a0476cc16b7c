"""Both stages under FSDP: 2 processes x 4 CPU devices against 1 process x 8, and the
shardings the logical-axis rules give each stage's train state.

The runs (tests/multihost_stage_worker.py) train the real stages (`train_and_evaluate`, tiny
configs, 3 steps) on the same mesh, data=4 x fsdp=2, once as 2 processes (jax.distributed on
localhost, gloo collectives) and once as 1 process with 8 devices, and must log the same
losses and save the same EMA weights.

Same global batch: the loaders give process p the global stream's elements p, p + 2, ...
(each element's augmentation seeded by its position in that stream), so batch k holds the
same examples in both setups, but the 2 processes assemble them in another row order
([0, 2, 4, 6, 1, 3, 5, 7] of the 1-process batch). Stage 2 draws its noise and condition
drops per row, so the single-process run takes the loaders' batches reordered that way
(`two_process_row_order`): both runs then step on identical global arrays. The test checks
this from the assembled batches themselves: the rows' ids agree exactly, and are the
1-process loader's rows in that order.

Tolerances: collectives sum in another order, and Adam turns the rounding of gradient
elements that cancel across the batch into steps of either sign. One process on data=8
instead of data=4 x fsdp=2 (only the summation order changes) moved stage 1's EMA weights
by 1.1e-5 of their norm (elements by up to 0.44 lr) and z_dyn/std by 1.3e-4 relative; the
2 x 4 run differs from the 1 x 8 one by about as much (7e-6 of the norm, 0.3 lr), its losses
by < 3e-6 relative.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import configs
from data_pipeline import schema
from tests import multihost_stage_worker as worker
from tests import testdata
from vasa_jax import checkpointing
from vasa_jax.parallel import create_mesh, sharding
from vasa_jax.trainers import face_latent, logger, motion_dit

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_stage_worker.py")
TIMEOUT_S = 600
STAGES = ("face_latent", "motion_dit")
RTOL, ATOL = 1e-5, 1e-6  # the losses
DIAGNOSTICS_RTOL = 1e-3  # other metrics
WEIGHTS_RTOL = 1e-4  # |EMA weights difference| / |EMA weights|


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode, out, tmp_path, data, env_extra, tag):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra)
    for name in ("VASA_COORDINATOR", "VASA_NUM_PROCESSES", "VASA_PROCESS_ID", "VASA_DISTRIBUTED"):
        if name not in env_extra:
            env.pop(name, None)
    log = open(tmp_path / f"log_{tag}.txt", "w")
    return subprocess.Popen(
        ["nice", "-n", "19", sys.executable, WORKER, mode, str(out), *data,
         str(tmp_path / mode)],
        env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both stages trained as 2 x 4 and as 1 x 8 (all three processes at once)."""
    tmp_path = tmp_path_factory.mktemp("multihost")
    stage1, stage2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    testdata.make_dataset(stage1, identities=3, clips_per_identity=1, seconds=1.0, size=32,
                          labels=list(schema.LABELS))
    testdata.make_dataset(stage2, identities=2, clips_per_identity=2, seconds=1.2, size=16)
    data = (stage1, stage2)
    port = free_port()
    outs = {"multi": tmp_path / "multi.json", "single": tmp_path / "single.json"}
    procs = {f"multi{i}": _launch("multi", outs["multi"], tmp_path, data, dict(
        JAX_NUM_CPU_DEVICES="4", VASA_COORDINATOR=f"127.0.0.1:{port}",
        VASA_NUM_PROCESSES=str(worker.PROCESSES), VASA_PROCESS_ID=str(i)), f"multi{i}")
        for i in range(worker.PROCESSES)}
    procs["single"] = _launch("single", outs["single"], tmp_path, data,
                              dict(JAX_NUM_CPU_DEVICES="8"), "single")
    try:
        codes = {k: p.wait(timeout=TIMEOUT_S) for k, p in procs.items()}
    finally:
        for p in procs.values():  # a crashed peer leaves the other blocked in a collective
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = {k: (tmp_path / f"log_{k}.txt").read_text()[-4000:] for k in procs}
    assert all(c == 0 for c in codes.values()), "\n\n".join(
        f"--- {k} (exit {codes[k]}):\n{logs[k]}" for k in procs)
    return {mode: dict(json.loads(out.read_text()), workroot=str(tmp_path / mode))
            for mode, out in outs.items()}


def _weights(workroot, stage):
    ckpt = checkpointing.Checkpointer(os.path.join(workroot, stage, checkpointing.CHECKPOINT_DIR))
    try:
        assert ckpt.latest_step() == worker.STEPS
        return jax.tree_util.tree_flatten_with_path(jax.device_get(ckpt.restore_weights()))[0]
    finally:
        ckpt.close()


@pytest.mark.slow  # 3 processes training both stages (two XLA compiles each)
@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_fsdp_match_one_process(runs, stage):
    multi, single = runs["multi"], runs["single"]
    assert (multi["process_count"], multi["device_count"]) == (2, 8)
    assert (single["process_count"], single["device_count"]) == (1, 8)
    m, s = multi[stage], single[stage]
    assert m["mesh"] == s["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
    assert m["step"] == s["step"] == worker.STEPS
    assert m["skipped_steps"] == s["skipped_steps"] == 0

    # The same global batches: identical rows, and the loaders' 1-process examples as a set.
    assert m["rows"] == s["rows"]
    order = worker.two_process_row_order(worker.BATCH, worker.PROCESSES)
    assert order == [0, 2, 4, 6, 1, 3, 5, 7]
    for step_rows, plain in zip(m["rows"], s["plain_rows"]):
        got = list(zip(*(map(str, step_rows[k]) for k in sorted(step_rows))))
        loader = list(zip(*(map(str, plain[k]) for k in sorted(plain))))
        assert got == [loader[i] for i in order]

    # FSDP: the parameter and its Adam moment are split over fsdp, 1/2 on each device.
    for kind in ("param", "moment"):
        assert m[kind]["spec"] == s[kind]["spec"] and "fsdp" in m[kind]["spec"], m[kind]
        dim = m[kind]["spec"].index("fsdp")
        assert len(m[kind]["local_shard_shapes"]) == 4  # this process's devices
        for shape in m[kind]["local_shard_shapes"]:
            assert shape[dim] * 2 == m[kind]["shape"][dim]

    # The logged metrics of every step (perf/* are timings).
    logs = {mode: logger.read_metrics(os.path.join(runs[mode]["workroot"], stage))
            for mode in ("multi", "single")}
    assert [r["step"] for r in logs["multi"]] == [r["step"] for r in logs["single"]] == [1, 2, 3]
    worst, worst_loss = {}, {}  # relative differences
    for rm, rs in zip(logs["multi"], logs["single"]):
        keys = sorted(k for k in rm if not k.startswith("perf/") and k != "step")
        assert keys == sorted(k for k in rs if not k.startswith("perf/") and k != "step")
        loss_keys = [k for k in keys if k.startswith("loss/")]
        assert loss_keys and all(np.isfinite(rm[k]) for k in loss_keys)
        for k in keys:
            # The losses tightly; diagnostics (gradient / update norms, z_dyn spread, ...)
            # feel the elements whose Adam steps the rounding decides (below) more.
            rtol = RTOL if k in loss_keys else DIAGNOSTICS_RTOL
            np.testing.assert_allclose(rm[k], rs[k], rtol=rtol, atol=ATOL, err_msg=k)
            rel = abs(rm[k] - rs[k]) / max(abs(rs[k]), ATOL)
            worst[k] = max(worst.get(k, 0.0), rel)
            if k in loss_keys:
                worst_loss[k] = max(worst_loss.get(k, 0.0), rel)

    # The EMA weights of the final checkpoint (what inference restores), as one vector: a
    # wrong batch or a missing reduction moves them by ~1e-2 of their norm. Single elements
    # whose gradient cancels across the batch (the attention key bias's is 0 analytically:
    # softmax ignores a shift of all logits) take Adam steps whose sign the summation order
    # decides, so they are only held to one step (lr).
    wm, ws = _weights(runs["multi"]["workroot"], stage), _weights(runs["single"]["workroot"], stage)
    assert [p for p, _ in wm] == [p for p, _ in ws] and len(wm) > 10
    a = np.concatenate([np.ravel(x) for _, x in wm])
    b = np.concatenate([np.ravel(x) for _, x in ws])
    rel_norm = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    max_abs = float(np.max(np.abs(a - b)))
    close = float(np.mean(np.isclose(a, b, rtol=RTOL, atol=1e-7)))
    print(f"{stage}: |2x4 - 1x8| of the losses max {max(worst_loss.values()):.3g} "
          f"({max(worst_loss, key=worst_loss.get)}), of all metrics "
          f"{max(worst.values()):.3g} relative ({max(worst, key=worst.get)}); EMA weights: "
          f"max {max_abs:.3g}, relative norm {rel_norm:.3g}, {100 * close:.2f}% of {a.size} "
          f"elements within rtol {RTOL}")
    assert rel_norm < WEIGHTS_RTOL
    assert max_abs < m["lr"], (max_abs, m["lr"])


# ------------------------------------------------------------------------ shardings by rules


def _abstract(stage):
    """The abstract train state of `stage`'s tiny config on data=2 x fsdp=2 x tensor=2."""
    axes = (("data", 2), ("fsdp", 2), ("tensor", 2))
    if stage == "face_latent":
        config = configs.load("configs/face_latent.py:size=tiny", mesh__axes=axes)
        create = lambda: face_latent.TrainState(config)  # noqa: E731
    else:
        config = configs.load("configs/motion_dit.py:size=tiny", mesh__axes=axes)
        create = lambda: motion_dit.TrainState(config, 13, 64)  # noqa: E731
    mesh = create_mesh(config.mesh.axes)
    _, abstract, _ = sharding.abstract_state(create, mesh, config.mesh.rules)
    return mesh, abstract


def _mesh_axes(spec) -> set:
    return {a for dim in spec if dim is not None
            for a in ((dim,) if isinstance(dim, str) else dim)}


def _specs(tree) -> dict:
    return {jax.tree_util.keystr(path): x.sharding.spec
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _moments_follow_params(specs, model, opt):
    """Every Adam moment of `opt` has its parameter's PartitionSpec (and the EMA copy's)."""
    params = {k[len(f"['{model}']"):]: v for k, v in specs.items()
              if k.startswith(f"['{model}']")}
    checked = 0
    for key, spec in specs.items():
        for moment in ("mu", "nu"):
            prefix = f"['{opt}']['opt_state'][1][0]['{moment}']"
            if key.startswith(prefix):
                assert spec == params[key[len(prefix):]], key
                checked += 1
    assert checked == 2 * len([k for k in params if not k.endswith("['u'].value")])
    return params


def test_face_latent_state_shardings():
    mesh, abstract = _abstract("face_latent")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    specs = _specs(abstract)
    gen = _moments_follow_params(specs, "generator", "g_opt")
    _moments_follow_params(specs, "discriminator", "d_opt")
    # conv rules: out channels -> fsdp; in channels, taps and `tensor` unused.
    assert gen["['decoder']['generator']['blocks'][0]['conv1']['kernel'].value"] == P(
        None, None, None, "fsdp")
    assert gen["['decoder']['generator']['blocks'][0]['conv1']['bias'].value"] == P("fsdp")
    assert gen["['app_encoder']['blocks_3d'][0]['conv1']['kernel'].value"] == P(
        None, None, None, None, "fsdp")
    assert specs["['discriminator']['scales'][0]['convs'][1]['kernel'].value"] == P(
        None, None, None, "fsdp")
    for key, spec in specs.items():  # the EMA copy is placed like the live generator
        if key.startswith("['ema']"):
            assert spec == gen[key[len("['ema']"):]], key
    used = set().union(*map(_mesh_axes, specs.values()))
    assert used == {"fsdp"}  # FSDP only: replicated over data, tensor unused by conv rules
    # Scalars (optimizer steps, counts) and the spectral norms' vectors: replicated.
    assert specs["['g_opt']['step'].value"] == P()
    assert specs["['discriminator']['scales'][0]['convs'][0]['u'].value"] == P()


def test_motion_dit_state_shardings():
    _, abstract = _abstract("motion_dit")
    specs = _specs(abstract)
    model = _moments_follow_params(specs, "model", "opt")
    # Attention: heads -> tensor, embed -> fsdp; MLP: mlp -> tensor.
    block = "['blocks'][0]"
    assert model[f"{block}['attn']['qkv']['kernel'].value"] == P("fsdp", None, "tensor", None)
    assert model[f"{block}['attn']['qkv']['bias'].value"] == P(None, "tensor", None)
    assert model[f"{block}['attn']['out']['kernel'].value"] == P("tensor", None, "fsdp")
    assert model[f"{block}['mlp_in']['kernel'].value"] == P("fsdp", "tensor")
    assert model[f"{block}['mlp_out']['kernel'].value"] == P("tensor", "fsdp")
    assert model[f"{block}['norm1']['scale'].value"] == P("fsdp")
    # 13 motion dims do not divide fsdp=2: that dimension stays replicated.
    assert model["['head']['dense']['bias'].value"] == P(None)
    for key, spec in specs.items():
        if key.startswith("['ema']"):
            assert spec == model[key[len("['ema']"):]], key
    used = set().union(*map(_mesh_axes, specs.values()))
    assert used == {"fsdp", "tensor"}  # parameters and moments never split over data
