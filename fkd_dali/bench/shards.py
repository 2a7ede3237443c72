"""Loader crops/s from an ImageFolder vs the same images packed as WebDataset shards (same store, same passes,
alternating), and ``ShardImages`` reads alone in a pass's random order vs in shard order (docs/shards.md).

``python -m fkd_dali.bench.shards WORKDIR [--images 600] [--reps 3]``: synthesizes photo-like JPEGs and a store
with simulated labels (``bench loader``'s data), packs them (``--shard-size 8M``) and prints the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from pipelines import FKDLoader
from pipelines.shards import ShardImages, open_shard_set

from ..pack import pack
from .loader import prepare_data


def crops_per_second(data: str, store: str, threads: int) -> float:
    ld = FKDLoader(data, store, batch_size=32, num_crops=2, crop_size=112, device="cpu", num_threads=threads, seed=0)
    t, n = time.perf_counter(), 0
    for b in ld:
        n += b["images"].shape[0]
    return n / (time.perf_counter() - t)


def read_us_per_sample(root: str, order: np.ndarray, reps: int = 5) -> float:
    images = ShardImages(open_shard_set(root), workers=4)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for a in range(0, len(order), 64):
            images.encoded(order[a:a + 64])
        ts.append((time.perf_counter() - t) / len(order) * 1e6)
    images.close()
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fkd_dali.bench.shards", description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    p = prepare_data(a.workdir, None, a.images, 4, 4)
    shards = os.path.join(a.workdir, f"shards-{a.images}")
    if not os.path.exists(shards):
        pack(p["data"], shards, "wds", 8 << 20)
    runs: dict[str, list[float]] = {"folder": [], "shards": []}
    for _ in range(a.reps):
        for name, data in (("folder", p["data"]), ("shards", shards)):
            runs[name].append(crops_per_second(data, p["store"], a.threads))
    for name, v in runs.items():
        print(f"{name}: crops/s {', '.join(f'{x:.0f}' for x in v)} (median {statistics.median(v):.0f})")
    root = os.path.join(shards, "train")
    n = len(open_shard_set(root))
    for name, order in (("random (pass order)", np.random.default_rng(0).permutation(n)),
                        ("sequential (shard order)", np.arange(n))):
        print(f"reads {name}: {read_us_per_sample(root, order):.0f} us/sample (median of 5, {n} samples)")


if __name__ == "__main__":
    main()
