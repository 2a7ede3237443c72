"""Loader crops/s from an ImageFolder vs the same images packed as WebDataset shards (same store, same passes,
alternating), and ``ShardImages`` reads alone in a pass's random order vs in shard order (docs/shards.md).

``python -m fkd_dali.bench.shards WORKDIR [--images 600] [--reps 3]``: synthesizes photo-like JPEGs and a store
with simulated labels (``bench loader``'s data), packs them (``--shard-size 8M``) and prints the figures.

``--index-scale N``: instead, an index of N samples (1000 classes, ImageNet-like keys) whose entries all point at
one JPEG in one tar (the shard analogue of ``bench scale``'s hard links), written, then opened in a fresh process
as a rank does (``scan_image_folder``: the JSON, one stat per shard, the rest mapped) with the time and the
process's resident memory before and after, and the index's bytes on disk.
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


def build_index(root: str, n: int, classes: int = 1000) -> None:
    """An N-sample shard set in ``root`` whose samples all are the one JPEG of its only shard."""
    import io
    import zlib

    from PIL import Image

    from pipelines.formats import Entry, format_named
    from pipelines.shards import ShardSetWriter
    os.makedirs(root)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 150)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    with open(os.path.join(root, "train-000000.tar"), "xb") as f:
        (entry,) = format_named("wds").write_shard(f, [("x.jpg", jpeg, 0)])
    per = -(-n // classes)
    w = ShardSetWriter(root, "wds", [f"n{c:08d}" for c in range(classes)])
    entries = [Entry(f"n{i // per:08d}/n{i // per:08d}_{i:07d}.JPEG", entry.offset, entry.length, i // per)
               for i in range(n)]
    w.add("train-000000.tar", entries, [zlib.crc32(jpeg)] * n)
    w.close()


OPEN_CHILD = """
import os, sys, time
def rss():
    return int([x for x in open('/proc/self/status') if x.startswith('VmRSS')][0].split()[1]) / 1024
from fkd_dali.dataset import scan_image_folder
import pipelines.shards  # DALI's import (a training process makes it anyway) is not the index's cost
before = rss()
t = time.perf_counter()
ds = scan_image_folder(sys.argv[1])
took = time.perf_counter() - t
rows = ds.shards.read(len(ds) // 2)
print(f"{len(ds)} {took:.3f} {before:.0f} {rss():.0f}")
"""


def index_scale(workdir: str, n: int) -> None:
    import subprocess
    import sys
    root = os.path.join(workdir, f"index-{n}", "train")
    if not os.path.exists(root):
        t = time.perf_counter()
        build_index(root, n)
        print(f"wrote the index of {n:,} samples in {time.perf_counter() - t:.1f} s")
    disk = {f: os.path.getsize(os.path.join(root, f)) for f in sorted(os.listdir(root)) if f.startswith("fkd-")}
    print("index files: " + ", ".join(f"{f} {b / 1e6:.1f} MB" for f, b in disk.items()))
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", OPEN_CHILD, root], capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, sys.path))))
        got, took, before, after = out.stdout.split()
        print(f"open {int(got):,} samples: {float(took):.3f} s, resident {before} -> {after} MB")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fkd_dali.bench.shards", description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--index-scale", type=int, default=0, metavar="N", help="measure opening an N-sample index")
    a = ap.parse_args(argv)
    if a.index_scale:
        index_scale(a.workdir, a.index_scale)
        return
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
