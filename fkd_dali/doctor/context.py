"""What every doctor check shares: the device, a work folder, the clock, planted faults, and the data
(real JPEGs and label stores written once, on first use)."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch
from PIL import Image

import labelstore

from .. import imagefiles
from ..synthetic import photo_like

PHOTO_CLASSES = 8  # classes of the doctor's photo-like dataset



@dataclasses.dataclass
class Result:
    """One line of the doctor's report."""

    name: str
    status: str  # pass | fail | below goal | info | skip | error
    figure: str  # the measurement, in one line
    meaning: str = ""  # for fail / below goal / error: what it means for training, and what to do
    details: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def bad(self) -> bool:
        return self.status in ("fail", "error")


@dataclasses.dataclass
class Context:
    device: str
    workdir: str
    threads: int
    deadline: float  # seconds after start
    faults: frozenset = frozenset()
    t0: float = dataclasses.field(default_factory=time.perf_counter)
    cache: dict = dataclasses.field(default_factory=dict)

    @property
    def gpu(self) -> bool:
        return self.device == "gpu"

    @property
    def device_id(self) -> int | None:
        return torch.cuda.current_device() if self.gpu else None

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.gpu else torch.device("cpu")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return self.deadline - self.elapsed()

    def path(self, *parts: str) -> str:
        """A file path under the work folder (its folder made)."""
        p = os.path.join(self.workdir, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def folder(self, *parts: str) -> str:
        """A folder under the work folder (made)."""
        p = os.path.join(self.workdir, *parts)
        os.makedirs(p, exist_ok=True)
        return p

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ data, written once
    def kinds(self) -> list[tuple[str, str]]:
        """One real file per JPEG encoding (and a PNG named .jpg): (kind, path), photo-like 375 x 500 pictures."""
        if "kinds" not in self.cache:
            rng = np.random.default_rng(7)
            out = []
            writers = dict(imagefiles.JPEG_KINDS, **{"PNG named .jpg": imagefiles.png_named_jpg})
            for i, (kind, writer) in enumerate(writers.items()):
                h, w = (375, 500) if i % 2 == 0 else (500, 375)
                path = self.path("kinds", "train", "c0", f"{i:02d}.jpg")
                if not os.path.exists(path):
                    writer(path, photo_like(rng, h, w))
                out.append((kind, path))
            self.cache["kinds"] = out
        return self.cache["kinds"]

    def photos(self, images: int) -> dict:
        """A photo-like ImageFolder dataset with a label store of real boxes (8 per image, simulated top-5)
        and FKD's own label files of it (:func:`fkd_dali.bench.loader.prepare_data`)."""
        key = f"photos-{images}"
        if key not in self.cache:
            from ..bench.loader import prepare_data
            self.cache[key] = prepare_data(self.path("photos"), None, images, PHOTO_CLASSES, pool=8)
        return self.cache[key]

    def shifted_store(self, p: dict) -> str:
        """A copy of ``p``'s store whose boxes sit 2 px right of the true ones (the planted fault)."""
        path = p["store"] + "-shifted"
        if not os.path.exists(os.path.join(path, "zarr.json")):
            src = labelstore.open_store(p["store"])
            rows = src.read_rows(range(src.num_images))
            boxes = rows["boxes"].astype(np.int64)
            sizes = rows["sizes"].astype(np.int64)
            room = boxes[..., 1] + boxes[..., 3] + 2 <= sizes[:, None, 1]
            boxes[..., 1] += 2 * room
            dst = labelstore.create_store(path, files=list(src.files), targets=src.targets, classes=src.classes,
                                          fingerprint=src.meta.fingerprint, dataset_root=src.meta.dataset_root,
                                          num_crops=src.num_crops, top_k=src.top_k, num_classes=src.num_classes,
                                          overwrite=True, source={"kind": "doctor (planted shifted boxes)"})
            for a, b in dst.shard_ranges():
                dst.write_block(a, sizes=sizes[a:b], boxes=boxes[a:b], flips=rows["flips"][a:b],
                                topk_idx=rows["topk_idx"][a:b], topk_val=rows["topk_val"][a:b])
            dst.finalize()
        return path


def pillow_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")
