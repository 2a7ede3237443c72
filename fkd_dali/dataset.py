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

from labelstore import PathTable, fingerprint_of

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(Exception):
    """The dataset folder is missing, empty or malformed."""


@dataclasses.dataclass
class Dataset:
    root: str                 # the split folder, e.g. DATA/train
    classes: list[str]
    files: PathTable          # relative to root, ImageFolder order (a compact sequence of str)
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
    """List an ImageFolder tree exactly as torchvision does; raise DatasetError on empty/missing input.

    One ``stat`` per file (for the fingerprint), relative to an open folder; the paths go straight into a
    :class:`PathTable`. One thread: on the 2-core VM 1.28 M files took 4.5-4.8 s, and 8.0 s with 2 threads,
    11 s with 8 (the GIL hand-offs around each stat cost more than the overlap gains)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"{root} does not exist or is not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DatasetError(f"{root} has no class folders: expected {root}/<class>/<image> (ImageFolder "
                           "layout)")
    per_class = [_scan_class(root, c, extensions) for c in classes]
    empty = [cls for cls, runs in zip(classes, per_class) if not any(names for _, names, _ in runs)]
    if empty:
        raise DatasetError(f"{root}: class folder(s) {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} "
                           f"contain no image (extensions {', '.join(extensions)}). Remove the empty "
                           "folders or add images; torchvision's ImageFolder refuses them too")
    runs = [(rel, names) for class_runs in per_class for rel, names, _ in class_runs]
    counts = [sum(len(names) for _, names, _ in class_runs) for class_runs in per_class]
    sizes = [s for class_runs in per_class for _, _, ss in class_runs for s in ss]
    return Dataset(root=root, classes=classes, files=PathTable.build(runs),
                   targets=np.repeat(np.arange(len(classes), dtype=np.int64), counts),
                   byte_sizes=np.asarray(sizes, dtype=np.int64))


def _scan_class(root: str, cls: str, extensions: tuple[str, ...]) -> list[tuple[str, list[str], list[int]]]:
    """(folder relative to root, sorted image names, their byte sizes) per folder of one class, in
    torchvision's order (``sorted(os.walk(...))``)."""
    class_dir = os.path.join(root, cls)
    out = []
    seen: set[str] = set()
    for dirpath, _dirnames, fnames in sorted(os.walk(class_dir, followlinks=True, onerror=_raise_walk_error)):
        real = os.path.realpath(dirpath)
        if real in seen:
            raise DatasetError(f"{dirpath} links back to {real}, which was already listed: a symlink "
                               "loop in the dataset. Remove the link")
        seen.add(real)
        names = sorted(f for f in fnames if f.lower().endswith(extensions))
        if not names:
            continue
        fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sizes = []
            for name in names:
                try:
                    sizes.append(os.stat(name, dir_fd=fd).st_size)
                except OSError as e:
                    raise DatasetError(f"{os.path.join(dirpath, name)} cannot be read ({e.strerror}); fix its "
                                       "permissions or remove it") from e
        finally:
            os.close(fd)
        rel = cls if dirpath == class_dir else os.path.relpath(dirpath, root)
        out.append((rel, names, sizes))
    return out


def _raise_walk_error(err: OSError) -> None:
    raise DatasetError(f"cannot list {err.filename}: {err.strerror}") from err
