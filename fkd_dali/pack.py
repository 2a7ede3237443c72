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
    listed = {split: scan_image_folder(os.path.join(data, split)) for split in splits}
    for ds in listed.values():  # refused before anything is written
        if ds.shards is not None:
            raise DatasetError(f"{ds.root} is already a shard set")
        check_key = getattr(module, "check_key", None)
        if check_key is not None:
            for key in ds.files:
                check_key(key)
    done = {}
    for split in splits:
        ds = listed[split]
        root = os.path.join(out, split)
        os.makedirs(root)
        shards = write_shards(root, module.NAME, _samples(ds), shard_bytes=shard_bytes, classes=ds.classes,
                              prefix=split)
        if shards.fingerprint != ds.fingerprint:  # the keys and lengths are the folder's, or the folder moved
            raise DatasetError(f"{root}: the packed set's fingerprint differs from {ds.root}'s: the folder changed "
                               "while being packed. Remove the set and pack again")
        done[split] = shards
    return done


MAX_KEY_MAP_BYTES = 4 << 30


def read_key_map(path: str) -> dict[str, str]:
    """A key map file: one ``SHARD_KEY<TAB>STORE_FILE`` a line (the store's relative path of each shard sample)."""
    if os.path.getsize(path) > MAX_KEY_MAP_BYTES:
        raise DatasetError(f"{path} is larger than {MAX_KEY_MAP_BYTES} bytes: not a key map")
    out: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            key, tab, name = line.partition("\t")
            if not tab or not key or not name:
                raise DatasetError(f"{path}, line {n}: {line[:80]!r} is not SHARD_KEY<TAB>STORE_FILE")
            if key in out:
                raise DatasetError(f"{path}, line {n}: the key {key!r} is mapped twice")
            out[key] = name
    return out


def index(shards: str, fmt: str | None = None, classes_file: str | None = None, dali_index: bool = False,
          force: bool = False, key_map: str | None = None, store: str | None = None) -> dict[str, ShardSet]:
    """Index the shards of ``SHARDS/train`` and ``SHARDS/val`` (or of ``SHARDS`` itself when it holds shards).
    With ``store`` (and ``key_map``, when the shards' keys are not the store's file names): the split the store
    was made from, its rows in the store's order, its classes the store's."""
    roots = [os.path.join(shards, s) for s in SPLITS if os.path.isdir(os.path.join(shards, s))] or [shards]
    classes = None
    if classes_file is not None:
        with open(classes_file, encoding="utf-8") as f:
            classes = [line.strip() for line in f if line.strip()]
    mapping = read_key_map(key_map) if key_map else None
    order = None
    if store is not None:
        import labelstore  # noqa: PLC0415
        s = labelstore.open_store(store)
        split = s.meta.dataset_root or "train"
        roots = [r for r in roots if os.path.basename(os.path.normpath(r)) == split] or [shards]
        order, classes = list(s.file_table()), classes or list(s.classes)
    elif mapping is not None:
        raise DatasetError("--key-map needs --store: the store whose rows the mapped keys name")
    done = {}
    for root in roots:
        if is_shard_set(root) and not force:
            raise DatasetError(f"{os.path.join(root, INDEX_JSON)} exists: give --force to index the set again "
                                  "(labels made from the old index must then be regenerated if the shards changed)")
        if dali_index:
            mine = {m.SUFFIX for m in FORMATS.values()}
            made = [n for n in os.listdir(root) if n.endswith(".idx") and (fmt is not None
                                                                            or n[:-4].endswith(tuple(mine)))]
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
            done[os.path.basename(os.path.normpath(root))] = index_shards(root, fmt, names, dali_index, mapping,
                                                                          order)
        except ShardSetError as e:
            raise DatasetError(str(e)) from None
    return done
