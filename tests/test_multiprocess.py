"""2 processes x 4 CPU devices on localhost through jax.distributed (gloo collectives)."""

import json
import os
import socket
import subprocess
import sys

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")
NUM_PROCESSES = 2
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_on_sharded_computations_and_checkpoints(tmp_path):
    port = free_port()
    procs, outs = [], []
    for i in range(NUM_PROCESSES):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            JAX_NUM_CPU_DEVICES="4",
            VASA_COORDINATOR=f"127.0.0.1:{port}",
            VASA_NUM_PROCESSES=str(NUM_PROCESSES),
            VASA_PROCESS_ID=str(i),
        )
        outs.append(tmp_path / f"result_{i}.json")
        log = open(tmp_path / f"log_{i}.txt", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, str(outs[-1]), str(tmp_path / "ckpt")],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        )
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:  # a crashed peer leaves the other blocked in a collective
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [(tmp_path / f"log_{i}.txt").read_text()[-3000:] for i in range(NUM_PROCESSES)]
    assert codes == [0] * NUM_PROCESSES, "\n\n".join(logs)

    r = [json.loads(o.read_text()) for o in outs]
    assert [x["process_index"] for x in r] == [0, 1]
    assert [x["main"] for x in r] == [True, False]
    for x in r:
        assert (x["process_count"], x["device_count"], x["local_device_count"]) == (2, 8, 4)
        # Rows 0..11 from process 0 and 100..111 from process 1, assembled into one array.
        assert x["batch_shape"] == [8, 3]
        assert x["total"] == sum(range(12)) + sum(range(100, 112))
        assert x["psum"] == 4 * 1.0 + 4 * 2.0
        assert x["losses"] == r[0]["losses"] and x["losses"][1] < x["losses"][0]
        # Saved on data=4 x fsdp=2, restored bit-exactly onto data=2 x fsdp=4.
        assert x["checksum_restored"] == x["checksum_saved"] == r[0]["checksum_saved"]
        assert x["restored_mesh"] == {"data": 2, "fsdp": 4}
        # kernel [3, 16] ("embed", "mlp"): 3 rows do not divide fsdp=4 -> replicated dim.
        assert x["restored_spec"] == [None, "data"]
        assert x["restored_next"] == x["expected_next"]
    # Each process resumed its own slice of the data.
    assert r[0]["expected_next"] == [4, 6] and r[1]["expected_next"] == [5, 7]
