"""Throughput of the grain loaders (data_pipeline.loaders) at 64x64.

    python -m benchmarks.bench_loader                      # builds a 64x64 test dataset
    python -m benchmarks.bench_loader --data DIR --workers 2 --seconds 20

Stage 1: (source, driving, cross) triplets with the default augmentation, in samples/s.
Stage 2: W=50 / K=10 windows with ground-truth motion and log-mel audio, in windows/s.
Without --data it writes a procedural dataset (tests/testdata.py: 32 identities x 16
clips x 2 s, 64x64 JPEG) to a temporary folder. Not fewer clips: grain's global shuffle
(index_shuffle) costs about 80 / N ms per element on an N-clip dataset, which dominates
below ~1K clips and is negligible at real sizes. Prints measurements; asserts nothing. The first
batch (worker start-up) is excluded from the timing. It also prints the CPU time per item
(measured without workers), which barely depends on machine load: 1000 / ms = items/s that
one free core sustains.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _measure(ds, batch_size: int, seconds: float) -> tuple[float, int, int]:
    """(items per second, batches timed, records skipped) after one warm-up batch."""
    it = iter(ds)
    try:
        next(it)  # starts the workers
        start, batches, skipped = time.perf_counter(), 0, 0
        while time.perf_counter() - start < seconds:
            skipped += int(next(it)["num_skipped"].sum())
            batches += 1
        elapsed = time.perf_counter() - start
    finally:
        if hasattr(it, "close"):
            it.close()
    return batches * batch_size / elapsed, batches, skipped


def _cpu_cost(ds, batch_size: int, batches: int) -> float:
    """CPU milliseconds per item in this process (all threads; run without workers).

    Unlike items/s this barely depends on what else the machine is running, so it tells
    what a free core gives: 1000 / cost items/s per worker.
    """
    it = iter(ds)
    next(it)
    start = time.process_time()
    for _ in range(batches):
        next(it)
    return (time.process_time() - start) * 1e3 / (batches * batch_size)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="a 64x64 clip-record dataset (default: build one)")
    parser.add_argument("--workers", type=int, default=2, help="grain worker processes")
    parser.add_argument("--seconds", type=float, default=10.0, help="timing per stage")
    parser.add_argument("--batch1", type=int, default=32, help="stage-1 batch size")
    parser.add_argument("--batch2", type=int, default=32, help="stage-2 batch size")
    parser.add_argument("--stage", choices=("1", "2", "both"), default="both")
    args = parser.parse_args(argv)

    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags

    from configs.common import data_stage1, data_stage2
    from data_pipeline import loaders

    tmp = None
    data = args.data
    if data is None:
        from tests import testdata

        tmp = tempfile.TemporaryDirectory()
        data = tmp.name
        t0 = time.perf_counter()
        testdata.make_dataset(data, identities=32, clips_per_identity=16, seconds=2.0, size=64,
                              num_shards=8)
        print(f"built 512 clips x 50 frames at 64x64 in {time.perf_counter() - t0:.1f} s")
    print(f"data {data}, {args.workers} workers, {os.cpu_count()} CPUs")

    if args.stage in ("1", "both"):
        cfg = data_stage1("tiny")
        cfg.path, cfg.image_size, cfg.batch_size = data, 64, args.batch1
        cfg.num_workers = args.workers
        rate, batches, skipped = _measure(loaders.stage1_dataset(cfg), cfg.batch_size, args.seconds)
        print(f"stage 1: {rate:.0f} samples/s (triplets at 64x64, augmented; batch "
              f"{cfg.batch_size}, {batches} batches, {skipped} skipped)")
        cfg.num_workers = 0
        cost = _cpu_cost(loaders.stage1_dataset(cfg), cfg.batch_size, 10)
        print(f"stage 1: {cost:.2f} CPU ms per sample = {1e3 / cost:.0f} samples/s per free core")
    if args.stage in ("2", "both"):
        cfg = data_stage2("tiny")
        cfg.path, cfg.batch_size, cfg.num_workers = data, args.batch2, args.workers
        rate, batches, skipped = _measure(loaders.stage2_dataset(cfg), cfg.batch_size, args.seconds)
        print(f"stage 2: {rate:.0f} windows/s (W={cfg.window}, K={cfg.context}, motion "
              f"{cfg.motion_source}, audio {cfg.audio_source}; batch {cfg.batch_size}, "
              f"{batches} batches, {skipped} skipped)")
        cfg.num_workers = 0
        cost = _cpu_cost(loaders.stage2_dataset(cfg), cfg.batch_size, 10)
        print(f"stage 2: {cost:.2f} CPU ms per window = {1e3 / cost:.0f} windows/s per free core")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
