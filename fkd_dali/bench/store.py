"""``fkd-dali bench store``: label-store size against FKD's per-image files, and read/append speed.

Size: the same content (simulated teacher top-5 over 1000 classes, exact boxes of ImageNet-like images,
flips) written as our store and as FKD's ``torch.save`` files in float32 and float16; both the apparent
size (sum of file lengths) and the allocated size on this filesystem (``st_blocks``), since a million
14 KB files also pay for partly used blocks.

Speed: a store of N images x C crops x top-k; ``append`` = ``write_block`` over all shards (content made
beforehand, one shard's worth reused), ``read_round`` = rounds of n crops read into RAM (best of 3).

Embedding stores (self-supervised FKD, ``--dim D``): N images x C crops of simulated teacher embeddings
(:func:`~fkd_dali.bench.simulated.teacher_embeddings`, int8 + scale as the store keeps them) with MoCo v2's view
parameters drawn by :func:`fkd_dali.views.sample_views` on ImageNet-like image sizes: bytes per crop on disk, by
array, and the ``read_round`` time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import torch

import labelstore
from labelstore import create_store, open_store
from labelstore.kinds import encode_embeddings

from ..crops import normalized
from ..synthetic import imagenet_like_size
from ..views import sample_views, view_recipe
from .simulated import imagenet_like_crops, teacher_embeddings, teacher_topk


def _sizes_on_disk(path: str) -> tuple[int, int]:
    apparent = allocated = 0
    for d, _, fs in os.walk(path):
        for f in fs:
            st = os.stat(os.path.join(d, f))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def _make_store(path: str, n: int, c: int, k: int, classes: int = 1000, **layout) -> labelstore.LabelStore:
    files = [f"c{i % classes:04d}/img_{i:08d}.JPEG" for i in range(n)]
    return create_store(path, files=files, targets=[i % classes for i in range(n)],
                        classes=[f"c{i:04d}" for i in range(classes)], fingerprint="sha256:bench",
                        dataset_root="train", num_crops=c, top_k=k, overwrite=True, **layout)


def size_vs_fkd(images: int = 1000, crops: int = 500, k: int = 5, workdir: str | None = None) -> dict:
    tmp = tempfile.mkdtemp(prefix="fkd-bench-size-", dir=workdir)
    try:
        sizes, boxes, flips = imagenet_like_crops(images, crops)
        idx, val = teacher_topk(images, crops, k)
        store = _make_store(os.path.join(tmp, "store"), images, crops, k)
        for a, b in store.shard_ranges():
            store.write_block(a, sizes=sizes[a:b], boxes=boxes[a:b], flips=flips[a:b], topk_idx=idx[a:b],
                              topk_val=val[a:b])
        store.finalize()
        ours = _sizes_on_disk(os.path.join(tmp, "store"))
        per_array = {name: _sizes_on_disk(os.path.join(tmp, "store", name))[0] / (images * crops)
                     for name in labelstore.CROP_ARRAYS}
        coords = normalized(boxes, sizes)
        fkd = {}
        for dt in (np.float32, np.float16):
            d = os.path.join(tmp, f"fkd_{np.dtype(dt).name}")
            os.makedirs(d)
            for i in range(images):
                output = np.stack([idx[i].astype(np.float64), val[i].astype(np.float64)], axis=1)
                torch.save([coords[i].astype(dt), flips[i], output.astype(dt)], os.path.join(d, f"{i}.tar"))
            fkd[np.dtype(dt).name] = _sizes_on_disk(d)
        n = images * crops
        return {
            "images": images, "crops": crops, "top_k": k, "content": "simulated teacher (1000 classes)",
            "ours_bytes_per_crop": {"apparent": ours[0] / n, "allocated": ours[1] / n},
            "ours_bytes_per_crop_by_array": per_array,
            "fkd_fp32_bytes_per_crop": {"apparent": fkd["float32"][0] / n, "allocated": fkd["float32"][1] / n},
            "fkd_fp16_bytes_per_crop": {"apparent": fkd["float16"][0] / n, "allocated": fkd["float16"][1] / n},
            "ratio_vs_fp16": {"apparent": ours[0] / fkd["float16"][0], "allocated": ours[1] / fkd["float16"][1]},
            "ratio_vs_fp32": {"apparent": ours[0] / fkd["float32"][0], "allocated": ours[1] / fkd["float32"][1]},
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def throughput(images: int = 100_000, crops: int = 64, k: int = 5, n: int = 4, rounds: int = 3,
               workdir: str | None = None) -> dict:
    tmp = tempfile.mkdtemp(prefix="fkd-bench-speed-", dir=workdir)
    try:
        path = os.path.join(tmp, "store")
        store = _make_store(path, images, crops, k)
        R = store.layout.rows_per_shard
        sizes, boxes, flips = imagenet_like_crops(R, crops)
        idx, val = teacher_topk(R, crops, k)
        t0 = time.perf_counter()
        for a, b in store.shard_ranges():
            m = b - a
            store.write_block(a, sizes=sizes[:m], boxes=boxes[:m], flips=flips[:m], topk_idx=idx[:m],
                              topk_val=val[:m])
        append_s = time.perf_counter() - t0
        store.finalize()
        reader = open_store(path)
        times = []
        for r in range(min(rounds, reader.num_rounds(n))):
            t0 = time.perf_counter()
            rnd = reader.read_round(r, n)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rows = np.random.default_rng(0).choice(images, min(1000, images), replace=False)
        reader.read_rows(rows)
        rows_s = time.perf_counter() - t0
        return {
            "images": images, "crops": crops, "top_k": k, "round_crops": n,
            "layout": {"rows_per_shard": R, "crops_per_chunk": store.layout.crops_per_chunk},
            "append_crops_per_s": images * crops / append_s,
            "read_round_crops_per_s": images * n / min(times), "read_round_s": times,
            "round_mib_in_ram": rnd.nbytes / 2**20,
            "read_rows_random": len(rows), "read_rows_random_s": rows_s,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: how ``format_store`` groups an embedding store's arrays (the view's photometric parameters in one group)
EMBEDDING_GROUPS = {"embedding": ("embedding",), "scale": ("embedding_scale",),
                    "view parameters": ("jitter", "jitter_factors", "jitter_order", "grayscale", "blur_sigma"),
                    "boxes": ("boxes",), "flips": ("flips",)}


def embedding_store(path: str, images: int = 1000, crops: int = 64, dim: int = 128, n: int = 4,
                    rounds: int = 3) -> dict:
    """Build an embedding store of ``images`` x ``crops`` at ``path`` (replaced) and measure it: bytes per crop on
    disk (apparent and allocated, the whole store; apparent by array) and ``read_round`` of n crops (best of
    ``rounds``)."""
    rng = np.random.default_rng(0)
    sizes = np.array([imagenet_like_size(rng) for _ in range(images)], dtype=np.int64)
    views = sample_views(0, range(images), sizes, crops)
    q, scale = encode_embeddings(teacher_embeddings(images, crops, dim))
    store = create_store(path, files=[f"c{i % 1000:04d}/img_{i:08d}.JPEG" for i in range(images)],
                         targets=[i % 1000 for i in range(images)], classes=[f"c{i:04d}" for i in range(1000)],
                         fingerprint="sha256:bench", dataset_root="train", num_crops=crops, overwrite=True,
                         kind="embedding", kind_fields={"dim": dim, "views": view_recipe()})
    for a, b in store.shard_ranges():
        store.write_block(a, sizes=sizes[a:b], embedding=q[a:b], embedding_scale=scale[a:b],
                          **{k: v[a:b] for k, v in views.items()})
    store.finalize()
    reader = open_store(path)
    times = []
    for r in range(min(rounds, reader.num_rounds(n))):
        t0 = time.perf_counter()
        reader.read_round(r, n)
        times.append(time.perf_counter() - t0)
    total = images * crops
    apparent, allocated = _sizes_on_disk(path)
    return {"images": images, "crops": crops, "dim": dim, "round_crops": n,
            "content": "simulated teacher embeddings (unit vectors), MoCo v2 aug-plus views",
            "bytes_per_crop": {"apparent": apparent / total, "allocated": allocated / total},
            "bytes_per_crop_by_array": {name: _sizes_on_disk(os.path.join(path, name))[0] / total
                                        for name in ("boxes", "flips") + reader.kind.names},
            "read_round_s": times, "read_round_crops_per_s": images * n / min(times)}


def embedding_bench(images: int, crops: int, dim: int, n: int, workdir: str | None = None) -> dict:
    """:func:`embedding_store` in a temporary folder, deleted afterwards."""
    tmp = tempfile.mkdtemp(prefix="fkd-bench-embedding-", dir=workdir)
    try:
        return embedding_store(os.path.join(tmp, "store"), images, crops, dim, min(n, crops))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def format_embedding(e: dict) -> str:
    by = e["bytes_per_crop_by_array"]
    groups = {g: sum(by[a] for a in arrays) for g, arrays in EMBEDDING_GROUPS.items()}
    b = e["bytes_per_crop"]
    return "\n".join([
        f"Embedding store (self-supervised FKD), {e['images']:,} images x {e['crops']} crops x D={e['dim']}, "
        f"{e['content']}:", "",
        "| B/crop apparent | B/crop allocated | " + " | ".join(groups) + " | read_round (n="
        f"{e['round_crops']}) |", "|---" * (len(groups) + 3) + "|",
        f"| {b['apparent']:.2f} | {b['allocated']:.2f} | " + " | ".join(f"{v:.2f}" for v in groups.values())
        + f" | {min(e['read_round_s']) * 1e3:.1f} ms ({e['read_round_crops_per_s'] / 1e6:.2f} M crops/s) |"])


def format_store(r: dict) -> str:
    s, p = r["size"], r["speed"]
    lines = [f"Store size, {s['images']} images x {s['crops']} crops x top-{s['top_k']}, {s['content']}:", "",
             "| format | B/crop apparent | B/crop allocated | ours ÷ it (apparent) | ours ÷ it (allocated) |",
             "|---|---|---|---|---|",
             f"| fkd-dali store | {s['ours_bytes_per_crop']['apparent']:.2f} | "
             f"{s['ours_bytes_per_crop']['allocated']:.2f} | 1 | 1 |"]
    for label, key, ratio in (("FKD files, float16", "fkd_fp16_bytes_per_crop", "ratio_vs_fp16"),
                              ("FKD files, float32", "fkd_fp32_bytes_per_crop", "ratio_vs_fp32")):
        lines.append(f"| {label} | {s[key]['apparent']:.2f} | {s[key]['allocated']:.2f} | "
                     f"{s[ratio]['apparent']:.3f} | {s[ratio]['allocated']:.3f} |")
    lines += ["", "Our bytes per crop by array: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                        s["ours_bytes_per_crop_by_array"].items()), "",
              f"Store speed, {p['images']:,} images x {p['crops']} crops x top-{p['top_k']} "
              f"({p['layout']['rows_per_shard']} rows/shard, {p['layout']['crops_per_chunk']} crops/chunk):", "",
              "| operation | crops/s |", "|---|---|",
              f"| append (write_block, whole shards) | {p['append_crops_per_s'] / 1e6:.2f} M |",
              f"| read_round (n={p['round_crops']}, into RAM) | {p['read_round_crops_per_s'] / 1e6:.2f} M |",
              "", f"A round of n={p['round_crops']} holds {p['round_mib_in_ram']:.1f} MiB in RAM; read_rows of "
              f"{p['read_rows_random']} random rows took {p['read_rows_random_s']:.2f} s."]
    if r.get("embedding"):
        lines += ["", format_embedding(r["embedding"])]
    return "\n".join(lines)
