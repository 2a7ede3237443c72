"""Shard formats: each stores every image's bytes unchanged and contiguous inside a shard file, so a sample is a
byte range (offset, length) of that file. One module per format (wds.py, tfrecord.py, recordio.py) exposes

- ``NAME`` (str) and ``SUFFIX`` (".tar", ".tfrecord", ".rec"),
- ``write_shard(f, samples) -> list[Entry]``: f a binary file object opened for writing, samples an iterable of
  (key: str, image: bytes, label: int); one Entry per sample, offset/length of the IMAGE bytes in the file,
- ``scan_shard(f, name) -> Iterator[Entry]``: the samples of an existing shard (a foreign one too); raises
  ShardFormatError naming the shard file, the byte offset and the fault,
- optionally ``check_key(key)``: raises ValueError for a key the format cannot record (RecordIO: numbers only),
  so ``fkd-dali pack`` refuses a dataset before it writes anything,
- ``write_dali_index(shard_path, entries) -> str | None``: writes the index file DALI's own reader of the format
  needs (so ``fn.readers.*`` read our shards too) and returns its path.

This package imports no torch and no fkd_dali: it is the pipelines room's input.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NamedTuple


class Entry(NamedTuple):
    """One sample of a shard: its key, where its image bytes lie in the shard file, and its class."""

    key: str
    offset: int
    length: int
    label: int


#: Classes a shard may name: 0..2**31-1 (the index stores int32), refused beyond, naming the shard and byte.
CLASS_LIMIT = 1 << 31


class ShardFormatError(ValueError):
    """A shard file is not what its format says; the message names the file, the byte offset and the fault."""

    def __init__(self, name: str, offset: int | None, fault: str):
        self.name, self.offset, self.fault = name, offset, fault
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"shard {name}{where}: {fault}")


#: The format modules this package holds (the ones that exist in this checkout are registered).
_MODULES = ("wds", "tfrecord", "recordio")


def file_size(f) -> int:
    """The byte size of an open shard file; its position is left where it was."""
    here = f.tell()
    size = f.seek(0, os.SEEK_END)
    f.seek(here)
    return size


def _load() -> dict[str, ModuleType]:
    formats = {}
    for stem in _MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{stem}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{stem}":
                raise  # the format exists but one of its imports is missing: say so, do not hide the format
            continue
        formats[module.NAME] = module
    return formats


#: name -> format module.
FORMATS: dict[str, ModuleType] = _load()


def format_named(name: str) -> ModuleType:
    """The format module called `name`, or a ValueError listing the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown shard format {name!r}: known formats are {', '.join(sorted(FORMATS))}") from None


def format_of_path(path: str) -> ModuleType | None:
    """The format whose SUFFIX the file name ends with, or None."""
    for module in FORMATS.values():
        if path.endswith(module.SUFFIX):
            return module
    return None


__all__ = ["FORMATS", "Entry", "ShardFormatError", "format_named", "format_of_path"]
