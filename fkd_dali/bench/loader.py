"""``fkd-dali bench loader``: FKD-DALI against FKD's own loader, the standard DALI pipeline and the decoder.

All contenders read the same JPEGs (photo-like synthetic ones unless ``--data`` is given), with the same
number of CPU workers/threads and the same images per batch, and produce training-ready tensors
(normalised float32 NCHW, on the GPU when ``--device gpu``). Epochs of the contenders are interleaved
(A B C D A B C D ...) so the machine's noise hits all of them alike; each figure is the median epoch.

* **FKD-DALI**: :class:`pipelines.FKDLoader`, ``num_crops`` crops per decode.
* **FKD original**: :mod:`fkd_dali.bench.fkd_original` (torch DataLoader, PIL, one ``torch.load`` per image).
* **standard DALI**: one random-resized crop per decode (fused ROI decode + resize + flip), antialiased as
  ours, and as NVIDIA's ResNet-50 example does it (``antialias=False``).
* **decode only**: the decoder alone; its images/s x ``num_crops`` is the ceiling of a decode-once design.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from PIL import Image

import labelstore
from pipelines import FKDLoader, StandardLoader, graphs
from pipelines.image_reader import ImageReader

from ..crops import sample_crops
from ..dataset import scan_image_folder, split_dir
from ..fkd_format import export_fkd
from ..synthetic import write_dataset


def prepare_data(workdir: str, data: str | None, images: int, classes: int, pool: int, seed: int = 0) -> dict:
    """Dataset, label store (real boxes, simulated top-5) and FKD label files, reused when present."""
    os.makedirs(workdir, exist_ok=True)
    synth_info = None
    if data is None:
        name = f"photo-n{images}-c{classes}"
        data = os.path.join(workdir, name)
        info_path = os.path.join(workdir, name + ".json")
        if not os.path.exists(info_path):
            synth_info = write_dataset(data, classes=classes, per_class=-(-images // classes), val_per_class=4,
                                       seed=seed, workers=os.cpu_count() or 1)
            with open(info_path, "w") as f:
                json.dump(synth_info, f)
        with open(info_path) as f:
            synth_info = json.load(f)
    ds = scan_image_folder(split_dir(data, "train"))
    store_path = os.path.join(workdir, f"store-{ds.fingerprint[7:19]}-c{pool}")
    fkd_dir = store_path + "-fkd"
    if not os.path.exists(os.path.join(fkd_dir, ".complete")):
        sizes = np.array([_size(ds.path(i)) for i in range(len(ds))])
        boxes, flips = sample_crops(seed, range(len(ds)), sizes, pool)
        k = min(5, len(ds.classes))
        rng = np.random.default_rng(seed)
        idx = np.argsort(rng.random((len(ds), pool, len(ds.classes))), axis=-1)[..., :k]
        val = np.sort(rng.dirichlet(np.ones(len(ds.classes)), (len(ds), pool))[..., :k], axis=-1)[..., ::-1]
        store = labelstore.create_store(store_path, files=ds.files, targets=ds.targets, classes=ds.classes,
                                        fingerprint=ds.fingerprint, dataset_root=ds.name, num_crops=pool,
                                        top_k=k, overwrite=True, source={"kind": "bench (simulated labels)"})
        for a, b in store.shard_ranges():
            store.write_block(a, sizes=sizes[a:b], boxes=boxes[a:b], flips=flips[a:b], topk_idx=idx[a:b],
                              topk_val=val[a:b])
        store.finalize()
        export_fkd(store_path, fkd_dir, fp16=True, arrays="numpy", overwrite=True,  # as FKD writes them
                   show_progress=False)
        open(os.path.join(fkd_dir, ".complete"), "w").close()
    return {"data": data, "root": ds.root, "files": ds.files, "targets": ds.targets.tolist(),
            "store": store_path, "fkd_labels": os.path.join(fkd_dir, ds.name), "synthetic": synth_info,
            "images": len(ds)}


def _size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        w, h = im.size
    return h, w


DECODE_ONLY = "decode only (x n: the ceiling)"


class Contender:
    """One loader under test: ``epoch(e)`` runs a full epoch and returns (crops, images, seconds)."""

    def __init__(self, name: str, crops_per_image: int, run: Callable[[int], tuple[int, int]]):
        self.name, self.crops_per_image, self._run = name, crops_per_image, run
        self.epochs: list[tuple[int, int, float]] = []

    def epoch(self, e: int) -> None:
        t0 = time.perf_counter()
        crops, images = self._run(e)
        self.epochs.append((crops, images, time.perf_counter() - t0))

    def summary(self, skip: int) -> dict:
        rows = self.epochs[skip:] or self.epochs
        crops_s = [c / t for c, _, t in rows]
        images_s = [i / t for _, i, t in rows]
        return {"name": self.name, "crops_per_s": statistics.median(crops_s),
                "images_per_s": statistics.median(images_s), "epochs": len(rows),
                "crops_per_s_all": crops_s}


def _sync(device: str) -> None:
    if device == "gpu":
        torch.cuda.synchronize()


def make_contenders(p: dict, *, device: str, batch_size: int, num_crops: int, threads: int,
                    which: Iterable[str]) -> list[Contender]:
    from .fkd_original import fkd_original_loader, iterate
    out = []
    which = set(which)
    # FKD's DataLoader forks its workers first: forked later, they would share (copy-on-write) the DALI
    # buffers allocated before, and the first DALI epoch after the fork would pay for the page copies.
    if "fkd-original" in which:
        dl = fkd_original_loader(p["root"], p["files"], p["targets"], p["fkd_labels"], batch_size=batch_size,
                                 num_crops=num_crops, workers=threads, pin_memory=device == "gpu")

        def run_orig(e: int) -> tuple[int, int]:
            crops = 0
            for images, soft, hard in iterate(dl):
                if device == "gpu":
                    images = images.cuda(non_blocking=True)
                    soft = soft.cuda(non_blocking=True)
                crops += images.shape[0]
            _sync(device)
            return crops, crops // num_crops
        out.append(Contender("FKD original", num_crops, run_orig))
    if "fkd-dali" in which:
        loader = FKDLoader(p["data"], p["store"], batch_size=batch_size, num_crops=num_crops, device=device,
                           num_threads=threads, verify_files=False)

        def run_fkd(e: int) -> tuple[int, int]:
            loader.set_epoch(e)
            crops = 0
            for b in loader:
                crops += b["images"].shape[0]
            _sync(device)
            return crops, crops // num_crops
        out.append(Contender("FKD-DALI", num_crops, run_fkd))
    for aa in (True, False):
        key = "standard" if aa else "standard-noaa"
        if key not in which:
            continue
        std = StandardLoader(p["root"], p["files"], p["targets"], batch_size=batch_size * num_crops,
                             device=device, num_threads=threads, antialias=aa)

        def run_std(e: int, std=std) -> tuple[int, int]:
            std.set_epoch(e)
            n = 0
            for b in std:
                n += b["images"].shape[0]
            _sync(device)
            return n, n
        out.append(Contender("standard DALI" + ("" if aa else " (antialias off, NVIDIA RN50 recipe)"), 1, run_std))
    if "decode" in which:
        out.append(Contender(DECODE_ONLY, num_crops, _DecodeOnly(p, device, batch_size, threads, num_crops)))
    return out


class _DecodeOnly:
    """The decoder alone over the same files; ``__call__(e)`` runs epoch e."""

    def __init__(self, p: dict, device: str, batch_size: int, threads: int, num_crops: int):
        self.reader = ImageReader(p["root"], p["files"], p["targets"], batch_size=batch_size)
        self.device, self.num_crops = device, num_crops
        self.pipe = graphs.decode_pipeline(self.reader, device=device, batch_size=batch_size, num_threads=threads,
                                           device_id=torch.cuda.current_device() if device == "gpu" else None,
                                           prefetch_queue_depth=2)
        self.pipe.build()
        self.started = False

    def __call__(self, e: int) -> tuple[int, int]:
        self.reader.start_epoch(e)
        if self.started:
            self.pipe.reset()
        self.started = True
        count = 0
        try:
            while True:
                count += len(self.pipe.run()[0])
        except StopIteration:
            pass
        _sync(self.device)
        return count * self.num_crops, count  # the crops a decode-once design could cut from them


def benchmark(p: dict, *, device: str, batch_size: int, num_crops: int, threads: int, epochs: int,
              which: Iterable[str], progress: Callable[[str], None] = print) -> dict:
    contenders = make_contenders(p, device=device, batch_size=batch_size, num_crops=num_crops, threads=threads,
                                 which=which)
    for e in range(epochs + 1):  # epoch 0 warms up (worker start, page cache, pipeline build)
        for c in contenders:
            c.epoch(e)
            crops, images, t = c.epochs[-1]
            progress(f"  epoch {e} {c.name:45s} {crops / t:9.0f} crops/s  {images / t:8.0f} images/s")
    rows = [c.summary(skip=1) for c in contenders]
    by = {r["name"]: r for r in rows}
    ours = by.get("FKD-DALI")
    ratios = {}
    if ours:
        if "FKD original" in by:
            ratios["fkd_dali_vs_fkd_original_crops"] = ours["crops_per_s"] / by["FKD original"]["crops_per_s"]
        if "standard DALI" in by:
            ratios["fkd_dali_crops_vs_standard_samples"] = ours["crops_per_s"] / by["standard DALI"]["crops_per_s"]
        noaa = [r for n, r in by.items() if n.startswith("standard DALI (")]
        if noaa:
            ratios["fkd_dali_crops_vs_standard_noaa_samples"] = ours["crops_per_s"] / noaa[0]["crops_per_s"]
        if DECODE_ONLY in by:
            ratios["fkd_dali_crops_vs_decode_only_x_n"] = ours["crops_per_s"] / by[DECODE_ONLY]["crops_per_s"]
    return {"device": device, "batch_images": batch_size, "num_crops": num_crops, "threads": threads,
            "epochs_measured": epochs, "images": p["images"], "data": p["data"], "synthetic": p["synthetic"],
            "results": rows, "ratios": ratios}


def format_table(r: dict) -> str:
    lines = ["| loader | crops/s | images (decodes)/s | FKD-DALI ÷ it (crops/s) |", "|---|---|---|---|"]
    ours = next((x for x in r["results"] if x["name"] == "FKD-DALI"), None)
    for x in r["results"]:
        ratio = f"{ours['crops_per_s'] / x['crops_per_s']:.2f}" if ours else "-"
        lines.append(f"| {x['name']} | {x['crops_per_s']:,.0f} | {x['images_per_s']:,.0f} | {ratio} |")
    lines.append("")
    lines.append(f"crops/s of the decoder = its images/s x {r['num_crops']}: the crops a decode-once loader could "
                 "deliver if cropping were free.")
    return "\n".join(lines)


def plot(r: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [x["name"].replace(" (", "\n(") for x in r["results"]]
    vals = [x["crops_per_s"] for x in r["results"]]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bars = ax.barh(names[::-1], vals[::-1], color=["#76b900" if n == "FKD-DALI" else "#8c8c8c"
                                                  for n in names[::-1]])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals[::-1]], padding=3)
    ax.set_xlabel("training crops per second (224 px, normalised, on the loader's device)")
    ax.set_title(f"{r['num_crops']} crops per image, {r['batch_images']} images/batch, {r['threads']} threads, "
                 f"{r['device']}")
    ax.set_xlim(0, max(vals) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
