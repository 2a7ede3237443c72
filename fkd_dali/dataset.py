"""ImageFolder-compatible dataset scan: the same classes, files, order and extensions as torchvision.

``torchvision.datasets.ImageFolder(root)`` lists class folders with ``sorted(os.scandir)``, walks each one
with ``sorted(os.walk(..., followlinks=True))`` and keeps files whose lower-cased name ends with one of
:data:`IMG_EXTENSIONS`. We do exactly that (without opening any image), record each file's byte size for
the fingerprint, and turn the cases where torchvision would loop forever or fail obscurely into errors
that name the folder.

A split folder holding a shard set's index (``fkd-dali pack`` / ``fkd-dali index``: ``pipelines.shards``) is
opened instead of scanned: O(shards) work, its keys, classes and lengths memory-mapped, and the same Dataset
(``files`` are the keys, the relative paths of the packed folder, so a store pairs with either).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
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

    @property
    def shards(self):
        """The shard set the images are read from, or None (an image folder)."""
        return getattr(self.files, "shards", None)  # pipelines.shards.ShardKeys

    @property
    def checksums(self) -> np.ndarray | None:
        """The CRC-32 of each image's bytes when the dataset's index records them (a shard set), else None."""
        return None if self.shards is None else self.shards.checksums()

    def path(self, i: int) -> str:
        """Where image ``i`` is, for messages (a shard set: its key and shard)."""
        if self.shards is not None:
            shard = int(self.shards.shard_of(np.asarray([i]))[0])
            return f"{self.files[i]} (in {self.shards.shard_path(shard)})"
        return os.path.join(self.root, self.files[i])

    def header_source(self, i: int):
        """What ``pipelines.errors.image_header`` / ``probe_image`` read image ``i`` from: its path, or its bytes
        (a shard set's sample, CRC-checked)."""
        if self.shards is not None:
            import io
            return io.BytesIO(self.shards.read(i))
        return self.path(i)


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
    from pipelines.shards import is_shard_set  # noqa: PLC0415 - DALI is imported only for a shard set
    if is_shard_set(root):
        return open_shards(root)
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


def open_shards(root: str) -> Dataset:
    """The Dataset of a shard set's split folder: its index opened and every shard's size checked (O(shards))."""
    from pipelines.shards import ShardSetError, open_shard_set  # noqa: PLC0415
    try:
        shards = open_shard_set(root)
    except ShardSetError as e:
        raise DatasetError(str(e)) from None
    if not len(shards):
        raise DatasetError(f"{root}: the shard set holds no sample")
    ds = Dataset(root=root, classes=shards.classes, files=shards.keys, targets=shards.labels,
                 byte_sizes=shards.byte_sizes())
    ds.__dict__["fingerprint"] = shards.fingerprint  # computed when the set was indexed
    return ds


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


CHILD_MIN_FILES = 100_000  # below this (estimated) a scan in this process is quicker than starting another


class Scan:
    """A scan started by :func:`start_scan`; :meth:`result` gives the :class:`Dataset` (its fingerprint
    computed) or raises the scan's DatasetError."""

    def __init__(self, root: str, extensions: tuple[str, ...], child: bool):
        self.root, self.extensions = root, extensions
        self.proc: subprocess.Popen | None = None
        if child:
            pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the child imports this fkd_dali
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [pkg_parent, os.environ.get("PYTHONPATH")])))
            try:
                self.proc = subprocess.Popen([sys.executable, "-m", "fkd_dali.dataset", root, *extensions],
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            except OSError:  # no interpreter to start: scan here
                self.proc = None

    def result(self) -> Dataset:
        if self.proc is None:
            ds = scan_image_folder(self.root, self.extensions)
            ds.fingerprint  # noqa: B018 - computed here, as the child does
            return ds
        out, err = self.proc.communicate()
        try:
            got = pickle.loads(out) if self.proc.returncode == 0 else None
        except Exception:  # noqa: BLE001 - a child that died mid-write: scan here
            got = None
        if got is None:  # the child failed (not the dataset: that comes back as an error message); scan here
            self.proc = None
            return self.result()
        if "error" in got:
            raise DatasetError(got["error"])
        ds = Dataset(root=self.root, classes=got["classes"],
                     files=PathTable(got["dirs"], got["dir_starts"], got["names"], got["ends"]),
                     targets=got["targets"], byte_sizes=got["byte_sizes"])
        ds.__dict__["fingerprint"] = got["fingerprint"]  # the cached_property, computed by the child
        return ds

    def cancel(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def start_scan(root: str | os.PathLike, extensions: tuple[str, ...] = IMG_EXTENSIONS,
               child: bool | None = None) -> Scan:
    """:func:`scan_image_folder` and the fingerprint, in a child process when the dataset is large (``child``
    None: an estimate from the first class folder says whether it holds ``CHILD_MIN_FILES`` files or more).

    The scan is one ``stat`` per file, most of it with Python's GIL held: run in this process it slows
    (and is slowed by) other threads (on the 2-core VM, scanning 1.28 M files while reading labels took
    longer than doing the two one after the other). In a child it runs on another core while this process
    reads the first pass's labels and builds the model. Small datasets are scanned here, in ``result()``."""
    root = os.fspath(root)
    if child is None:
        child = _estimated_files(root) >= CHILD_MIN_FILES
    return Scan(root, tuple(extensions), child)


def start_train_scan(data: str | os.PathLike, evaluate: bool = False) -> Scan | None:
    """The scan of ``DATA/train`` that ``train`` needs (None when it scans nothing: ``--evaluate``). The CLI
    calls it before it imports torch, so that the scan runs beside those imports."""
    if evaluate:
        return None
    return start_scan(split_dir(data, "train"))


def _estimated_files(root: str) -> int:
    """Class folders x entries of the first one (0 when it cannot be listed: the scan names the problem)."""
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        return len(classes) * len(os.listdir(os.path.join(root, classes[0]))) if classes else 0
    except OSError:
        return 0


def _child_main(argv: list[str]) -> None:
    """``python -m fkd_dali.dataset ROOT EXT...``: the scan of :func:`start_scan`, pickled to stdout."""
    try:
        ds = scan_image_folder(argv[0], tuple(argv[1:]))
        f = ds.files
        got = {"classes": ds.classes, "dirs": f.dirs, "dir_starts": f.dir_starts, "names": f.names, "ends": f.ends,
               "targets": ds.targets, "byte_sizes": ds.byte_sizes, "fingerprint": ds.fingerprint}
    except DatasetError as e:
        got = {"error": str(e)}
    sys.stdout.buffer.write(pickle.dumps(got, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.flush()


if __name__ == "__main__":
    _child_main(sys.argv[1:])
