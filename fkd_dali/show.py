"""``fkd-dali show STORE DATA --image I --out DIR``: an image's stored crops as the training loader makes them.

Writes ``crop_<k>.png`` for every crop k of the pool (store column k; uint8 RGB, before normalisation) and
``sheet.png``, a contact sheet with each crop captioned by its flip and its stored top-k classes and
probabilities. The crops come out of the same DALI graph the loader uses (``replay_crops``: the stored box,
the flip in the ROI, bilinear with antialiasing), so what you see is what the student sees. An embedding store's
crops are its self-supervised views (``ssl_crops``: colour jitter, grayscale, blur as stored), captioned with
those parameters.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

import labelstore
from pipelines import graphs
from pipelines.fkd_reader import dataset_files, refuse_resized, resolve_root
from pipelines.generation_reader import GenerationReader


class ShowError(Exception):
    """The image or store cannot be shown."""


def find_row(store: labelstore.LabelStore, image: str) -> int:
    if image.isdigit():
        row = int(image)
        if not 0 <= row < store.num_images:
            raise ShowError(f"--image {row}: the store holds rows 0..{store.num_images - 1}")
        return row
    hits = np.flatnonzero(store.files == image.replace(os.sep, "/"))
    if not hits.size:
        raise ShowError(f"--image {image!r} is neither a row number nor a file of the store (e.g. "
                        f"{store.files[0]!r})")
    return int(hits[0])


def replayed_crops(store: labelstore.LabelStore, data: str, row: int, crop_size: int,
                   device: str = "cpu") -> np.ndarray:
    """(C, S, S, 3) uint8: every stored crop of ``row``, in store-column order, decoded and cut on ``device``
    (``gpu``: as a GPU training run sees them)."""
    root = resolve_root(data, store)
    got = store.read_rows([row])
    C = store.num_crops
    group = min(C, 16)
    reader = GenerationReader(root, dataset_files(root, store, verify=False), group_size=group, batch_size=4,
                              view_params=store.kind.view_params)
    nb = reader.start_job(np.array([row]), got["boxes"].astype(np.int64), got["flips"], got["sizes"], got)
    pipe = graphs.generation_pipeline(reader, num_crops=group, views=[(crop_size, "bilinear", graphs.IMAGENET_MEAN,
                                                                        graphs.IMAGENET_STD)],
                                      device=device, normalize=False, batch_size=4, num_threads=2,
                                      device_id=torch.cuda.current_device() if device == "gpu" else None)
    out = np.zeros((C, crop_size, crop_size, 3), np.uint8)
    for _ in range(nb):
        crops, _index, ids, shapes = (np.array(x.as_cpu().as_tensor()) for x in pipe.run())
        if not np.array_equal(shapes[:, :2], np.broadcast_to(got["sizes"][0], (len(shapes), 2))):
            refuse_resized(root, store, store.files, [row], got["sizes"])  # the graph cut no box of it
        for sample, sample_ids in zip(crops, ids):
            for frame, k in zip(sample, sample_ids):
                if k >= 0:
                    out[k] = frame.transpose(1, 2, 0)
    return out


def show(store_path: str, data: str, image: str, out_dir: str, crop_size: int = 224, columns: int = 8,
         max_crops: int = 64, device: str = "cpu") -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store = labelstore.open_store(store_path)  # shapes bounded, names checked when read
    row = find_row(store, image)
    got = store.read_rows([row])
    if not got["done"][0]:
        raise ShowError(f"row {row} ({store.files[row]}) has no labels yet (generation has not reached it, or it was "
                        "skipped as unreadable)")
    # What train checks before replaying a crop: the labels are possible, the images are those labelled.
    labelstore.check_block(got, store.num_classes, first_row=row, where=store_path, files=store.files,
                           kind=store.kind, fields=store.fields)
    dataset_files(resolve_root(data, store), store)  # each file's size (a shard set: its index) as labelled
    crops = replayed_crops(store, data, row, crop_size, device)
    os.makedirs(out_dir, exist_ok=True)
    for k, crop in enumerate(crops):
        Image.fromarray(crop).save(os.path.join(out_dir, f"crop_{k}.png"))
    classes = list(store.classes)

    def name(i: int) -> str:  # ids past the dataset's names (a teacher with more classes) show as numbers
        return classes[i] if 0 <= i < len(classes) else str(i)
    shown = min(len(crops), max_crops)
    cols = min(columns, shown)
    rows = math.ceil(shown / cols)
    k_lines = store.top_k if "topk_idx" in got else 3
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, (2.1 + 0.17 * (k_lines + 1)) * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k in range(shown):
        ax = axes.ravel()[k]
        ax.imshow(crops[k])
        t, l, h, w = (int(v) for v in got["boxes"][0, k])
        lines = [f"#{k} ({t},{l}) {h}x{w}" + (" flipped" if got["flips"][0, k] else "")]
        if "topk_idx" in got:
            lines += [f"{name(int(c))[:16]} {float(p):.2f}" for c, p in zip(got["topk_idx"][0, k], got["topk_val"][0, k])]
        else:
            lines += view_lines(got, k)
        ax.set_title("\n".join(lines), fontsize=7, loc="left")
    fig.suptitle(f"{store.files[row]} (row {row}, class {name(int(store.targets[row]))}, "
                 f"{got['sizes'][0][1]}x{got['sizes'][0][0]} px): {shown} of {len(crops)} stored crops as the loader "
                 f"replays them at {crop_size} px, with their stored "
                 + (f"top-{store.top_k}" if "topk_idx" in got else "view parameters"), fontsize=9)
    fig.tight_layout()
    sheet = os.path.join(out_dir, "sheet.png")
    fig.savefig(sheet, dpi=100)
    plt.close(fig)
    return {"row": row, "file": str(store.files[row]), "sheet": sheet, "crops": len(crops)}


def view_lines(got: dict, k: int) -> list[str]:
    """A self-supervised view's parameters (crop ``k`` of row 0 of ``got``), for its caption."""
    lines = []
    if got["jitter"][0, k]:
        f = got["jitter_factors"][0, k]
        lines.append(f"jitter {''.join('BCSH'[int(j)] for j in got['jitter_order'][0, k])} b{f[0]:.2f} c{f[1]:.2f}")
        lines.append(f"       s{f[2]:.2f} h{f[3]:+.3f}")
    else:
        lines.append("no jitter")
    sigma = float(got["blur_sigma"][0, k])
    lines.append(("grey " if got["grayscale"][0, k] else "") + (f"blur {sigma:.2f}" if sigma > 0 else "no blur"))
    return lines
