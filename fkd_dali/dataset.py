"""ImageFolder-compatible dataset scan: the same classes, files, order and extensions as torchvision.

``torchvision.datasets.ImageFolder(root)`` lists class folders with ``sorted(os.scandir)``, walks each one
with ``sorted(os.walk(..., followlinks=True))`` and keeps files whose lower-cased name ends with one of
:data:`IMG_EXTENSIONS`. We do exactly that (without opening any image), record each file's byte size for
the fingerprint, and turn the cases where torchvision would loop forever or fail obscurely into errors
that name the folder.
"""

from __future__ import annotations

import dataclasses
import os
from functools import cached_property

import numpy as np

from labelstore import fingerprint_of

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(Exception):
    """The dataset folder is missing, empty or malformed."""


@dataclasses.dataclass
class Dataset:
    root: str                 # the split folder, e.g. DATA/train
    classes: list[str]
    files: list[str]          # relative to root, ImageFolder order
    targets: np.ndarray       # int64 class index per file
    byte_sizes: np.ndarray    # int64 file size per file

    def __len__(self) -> int:
        return len(self.files)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.root))

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint_of(self.files, self.byte_sizes)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])


def split_dir(data: str | os.PathLike, split: str) -> str:
    """``DATA/<split>``, with an error that says what a dataset root must look like."""
    data = os.fspath(data)
    if not os.path.isdir(data):
        raise DatasetError(f"dataset root {data} does not exist (expected a folder holding train/ and val/ "
                           "in ImageFolder layout: train/<class>/<image>.jpg)")
    path = os.path.join(data, split)
    if not os.path.isdir(path):
        # Accept the split folder itself when it is given directly.
        if os.path.basename(os.path.normpath(data)) == split:
            return data
        raise DatasetError(f"{path} does not exist: the dataset root must hold {split}/<class>/<image> "
                           "(ImageFolder layout)")
    return path


def scan_image_folder(root: str | os.PathLike, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> Dataset:
    """List an ImageFolder tree exactly as torchvision does; raise DatasetError on empty/missing input."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"{root} does not exist or is not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DatasetError(f"{root} has no class folders: expected {root}/<class>/<image> (ImageFolder "
                           "layout)")
    files: list[str] = []
    targets: list[int] = []
    byte_sizes: list[int] = []
    empty: list[str] = []
    for index, cls in enumerate(classes):
        class_dir = os.path.join(root, cls)
        before = len(files)
        seen: set[str] = set()
        for dirpath, dirnames, fnames in sorted(os.walk(class_dir, followlinks=True,
                                                        onerror=_raise_walk_error)):
            real = os.path.realpath(dirpath)
            if real in seen:
                raise DatasetError(f"{dirpath} links back to {real}, which was already listed: a symlink "
                                   "loop in the dataset. Remove the link")
            seen.add(real)
            for fname in sorted(fnames):
                if not fname.lower().endswith(extensions):
                    continue
                path = os.path.join(dirpath, fname)
                try:
                    size = os.stat(path).st_size
                except OSError as e:
                    raise DatasetError(f"{path} cannot be read ({e.strerror}); fix its permissions or "
                                       "remove it") from e
                files.append(os.path.relpath(path, root))
                targets.append(index)
                byte_sizes.append(size)
        if len(files) == before:
            empty.append(cls)
    if empty:
        raise DatasetError(f"{root}: class folder(s) {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} "
                           f"contain no image (extensions {', '.join(extensions)}). Remove the empty "
                           "folders or add images; torchvision's ImageFolder refuses them too")
    return Dataset(root=root, classes=classes, files=files, targets=np.asarray(targets, dtype=np.int64),
                   byte_sizes=np.asarray(byte_sizes, dtype=np.int64))


def _raise_walk_error(err: OSError) -> None:
    raise DatasetError(f"cannot list {err.filename}: {err.strerror}") from err
