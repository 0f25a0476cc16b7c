"""Step time of a stage against the number of devices (emulated CPU devices by default).

    python -m vasa_jax.bench.scaling --config configs/motion_dit.py:size=tiny \
        --data data/synthtalk --devices 1,2,4,8 --per_device_batch 2 --steps 20 \
        --set optim.warmup_steps=1 \
        [--set mesh.axes='(("data",-1),("fsdp",1),("tensor",1))'] [--out scaling.json]

For each device count N, one `train.py` run in a fresh temporary workdir, in its own
process with N devices (on CPU: JAX_NUM_CPU_DEVICES=N; on a
GPU host the first N visible GPUs via CUDA_VISIBLE_DEVICES), global batch N x
--per_device_batch (weak scaling: the work per device stays the same) or --global_batch
for all (strong scaling). The train step is compiled before the first step, so the step
time read back (`perf/step_seconds` of metrics.jsonl, its last logging interval: the
second half of the run) has no compile in it. Prints a Markdown table: devices, global
batch, seconds per step, examples per second, speed-up and efficiency against the
smallest N (weak scaling: efficiency = t_1 / t_N; strong: t_1 / (N t_N)).

Emulated CPU devices share the host's cores: on a 2-core machine this measures what
sharding costs (partitioning, collectives, more, smaller kernels), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Sequence

from vasa_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def device_env(n: int, platform: str) -> dict[str, str]:
    """The environment of a child process that sees n devices of `platform`."""
    env = dict(os.environ)
    if platform == "cpu":
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
        env["JAX_NUM_CPU_DEVICES"] = str(n)  # jax's own setting wins over XLA_FLAGS
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
    return env


def step_seconds(workdir: str) -> float:
    """The last logged perf/step_seconds of a run."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    times = [r["perf/step_seconds"] for r in rows if "perf/step_seconds" in r]
    if not times:
        raise ValueError(f"{workdir}/metrics.jsonl has no perf/step_seconds")
    return float(times[-1])


def run_one(config: str, data: str, devices: int, batch: int, steps: int,
            sets: Sequence[str], platform: str) -> float:
    """One train.py run on `devices` devices; its steady step time (seconds)."""
    with tempfile.TemporaryDirectory(prefix="scaling_") as workdir:
        cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--config={config}",
               f"--workdir={workdir}", f"--config.data.path={data}",
               f"--config.data.batch_size={batch}", f"--config.train.total_steps={steps}",
               f"--config.train.log_every={max(steps // 2, 1)}",
               f"--config.train.checkpoint_every={steps}", "--config.train.image_every=0"]
        cmd += [f"--config.{s}" for s in sets]
        done = subprocess.run(cmd, env=device_env(devices, platform), cwd=REPO,
                              capture_output=True, text=True)
        if done.returncode:
            lines = (done.stderr or done.stdout or "no output").strip().splitlines()
            raise ValueError(f"train.py on {devices} devices failed: {lines[-1]}")
        return step_seconds(workdir)


def table(rows: list[dict], strong: bool) -> str:
    """Markdown table of the runs (rows: devices, batch, seconds)."""
    base = rows[0]
    lines = ["| devices | global batch | s / step | examples / s | speed-up | efficiency |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        speedup = base["seconds"] / r["seconds"]
        if not strong:
            speedup *= r["batch"] / base["batch"]  # throughput ratio
        efficiency = speedup * base["devices"] / r["devices"]
        lines.append(f"| {r['devices']} | {r['batch']} | {r['seconds']:.3f} | "
                     f"{r['batch'] / r['seconds']:.1f} | {speedup:.2f}x | {efficiency:.0%} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="e.g. configs/motion_dit.py:size=tiny")
    p.add_argument("--data", required=True, help="the stage's dataset folder")
    p.add_argument("--devices", type=cli.int_list, default="1,2,4,8",
                   help="device counts, comma-separated")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--per_device_batch", type=int, default=2,
                       help="weak scaling: global batch = devices x this (default)")
    group.add_argument("--global_batch", type=int, default=0,
                       help="strong scaling: this global batch for every device count")
    p.add_argument("--steps", type=int, default=20, help="steps per run (>= 2)")
    p.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override, as train.py's --config.FIELD=VALUE (repeatable)")
    p.add_argument("--out", default="", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.steps < 2 or min(args.devices) < 1:
        p.error("--steps must be >= 2 and --devices >= 1")
    if not os.path.isdir(args.data):
        p.error(f"--data {args.data!r} is not a folder")
    strong = args.global_batch > 0
    rows = []
    for n in sorted(set(args.devices)):
        batch = args.global_batch if strong else n * args.per_device_batch
        seconds = run_one(args.config, args.data, n, batch, args.steps, args.set, args.platform)
        rows.append({"devices": n, "batch": batch, "seconds": seconds})
        print(f"{n} devices, global batch {batch}: {seconds:.3f} s/step", flush=True)
    print(f"\n{args.config}, {'strong' if strong else 'weak'} scaling, {args.platform}:\n")
    print(table(rows, strong))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "strong": strong, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_guarded(main))
