"""Dataset fingerprint: a hash of the relative paths and byte sizes of the training images, in store order.

It detects a store used with another dataset, and files added, removed, renamed or replaced by a file of
a different size since the store was made. It reads no image content (stat only), so it costs ~1 s per
million files on a local disk.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

from .pathtable import PathTable

FINGERPRINT_PREFIX = "sha256:"


def fingerprint_of(files: Iterable[str] | PathTable, sizes: Iterable[int]) -> str:
    h = hashlib.sha256()
    if isinstance(files, PathTable):
        files.fingerprint_update(h, sizes)
    else:
        for rel, size in zip(files, sizes, strict=True):
            h.update(f"{rel}\0{int(size)}\n".encode("utf-8", "surrogateescape"))
    return FINGERPRINT_PREFIX + h.hexdigest()


def file_sizes(root: str | os.PathLike, files: Sequence[str]) -> list[int]:
    """Byte size of each file under root; raises FileNotFoundError naming the first missing file."""
    sizes = []
    for rel in files:
        try:
            sizes.append(os.stat(os.path.join(root, rel)).st_size)
        except FileNotFoundError:
            raise FileNotFoundError(f"{os.path.join(root, rel)} is listed in the label store but does not "
                                    "exist: the dataset changed since the store was made") from None
    return sizes


def fingerprint_dir(root: str | os.PathLike, files: Sequence[str]) -> str:
    return fingerprint_of(files, file_sizes(root, files))
