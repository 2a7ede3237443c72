"""``fkd-dali pack DATA --out SHARDS``: an ImageFolder written as shard sets (``SHARDS/train``, ``SHARDS/val``), the
images' bytes unchanged, in the folder's ImageFolder order (a store's row order), each sample's key its relative
path; and ``fkd-dali index SHARDS``, the index of shards made elsewhere (``pipelines.shards``)."""

from __future__ import annotations

import os
import re

from pipelines.formats import FORMATS, format_named
from pipelines.shards import INDEX_JSON, ShardSet, ShardSetError, index_shards, is_shard_set, write_shards

from .dataset import Dataset, DatasetError, scan_image_folder

SPLITS = ("train", "val")
DEFAULT_SHARD_BYTES = 1 << 30
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """``512M``, ``1G``, ``300000``: a positive byte count."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"{text!r} is not a size: give bytes, e.g. 1G, 512M or 300000")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _samples(ds: Dataset):
    for i in range(len(ds)):
        path = ds.path(i)
        with open(path, "rb") as f:
            data = f.read()
        if len(data) != int(ds.byte_sizes[i]):
            raise DatasetError(f"{path} is {len(data)} bytes now, {int(ds.byte_sizes[i])} when the folder was "
                               "listed: it changed while being packed. Pack again once the folder is still")
        yield ds.files[i], data, int(ds.targets[i])


def pack(data: str, out: str, fmt: str = "wds", shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict[str, ShardSet]:
    """Pack ``DATA/train`` and ``DATA/val`` (those that exist) into ``OUT/<split>``; refuses to write into a split
    folder that exists (nothing is overwritten)."""
    module = format_named(fmt)
    splits = [s for s in SPLITS if os.path.isdir(os.path.join(data, s))]
    if not splits:
        raise DatasetError(f"{data} holds neither train/ nor val/: pack takes a dataset root in ImageFolder layout "
                           "(DATA/train/<class>/<image>)")
    for split in splits:
        if os.path.exists(os.path.join(out, split)):
            raise DatasetError(f"{os.path.join(out, split)} exists: pack writes new shard sets only. Give "
                                  "another --out, or remove that folder")
    done = {}
    for split in splits:
        ds = scan_image_folder(os.path.join(data, split))
        if ds.shards is not None:
            raise DatasetError(f"{ds.root} is already a shard set")
        root = os.path.join(out, split)
        os.makedirs(root)
        shards = write_shards(root, module.NAME, _samples(ds), shard_bytes=shard_bytes, classes=ds.classes,
                              prefix=split)
        if shards.fingerprint != ds.fingerprint:  # the keys and lengths are the folder's, or the folder moved
            raise DatasetError(f"{root}: the packed set's fingerprint differs from {ds.root}'s: the folder changed "
                               "while being packed. Remove the set and pack again")
        done[split] = shards
    return done


def index(shards: str, fmt: str | None = None, classes_file: str | None = None, dali_index: bool = False,
          force: bool = False) -> dict[str, ShardSet]:
    """Index the shards of ``SHARDS/train`` and ``SHARDS/val`` (or of ``SHARDS`` itself when it holds shards)."""
    roots = [os.path.join(shards, s) for s in SPLITS if os.path.isdir(os.path.join(shards, s))] or [shards]
    classes = None
    if classes_file is not None:
        with open(classes_file, encoding="utf-8") as f:
            classes = [line.strip() for line in f if line.strip()]
    done = {}
    for root in roots:
        if is_shard_set(root) and not force:
            raise DatasetError(f"{os.path.join(root, INDEX_JSON)} exists: give --force to index the set again "
                                  "(labels made from the old index must then be regenerated if the shards changed)")
        if dali_index:
            mine = {m.SUFFIX for m in FORMATS.values()}
            made = [n for n in os.listdir(root) if n.endswith(".idx") and n[:-4].endswith(tuple(mine))]
            if made and not force:
                raise DatasetError(f"{root} already holds DALI index files ({made[0]} ...): give --force to "
                                      "write them again, or leave --dali-index out")
        names = classes
        if names is None and is_shard_set(root):  # indexed again: the class names of its index stay
            try:
                names = ShardSet(root).classes
            except ShardSetError:
                names = None
        try:
            done[os.path.basename(os.path.normpath(root))] = index_shards(root, fmt, names, dali_index)
        except ShardSetError as e:
            raise DatasetError(str(e)) from None
    return done
