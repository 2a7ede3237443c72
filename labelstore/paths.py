"""Names a label store holds are untrusted input: the one place that turns them into paths.

A store's ``files`` entries (and FKD label-file stems, and the split name in ``dataset.root``) are relative
names made of plain components. :func:`check_names` refuses, for a whole file list at once (vectorised:
~0.1 s per million names), any name that is empty, absolute, holds a ``..``, ``.`` or empty component, or a
NUL byte; :class:`LabelStore.files <labelstore.store.LabelStore>` runs it whenever a store's list is
loaded, so no command ever builds a path from an unchecked name.

:func:`resolve_inside` is the single-path form every command uses for a file it reads or writes by name:
the same checks, then the real path (symlinks resolved) must stay inside the real path of the root.
Images under a dataset root are an exception on purpose (:func:`image_path`): torchvision's
``ImageFolder`` follows symlinks inside the dataset, and so do we, since a link is made by the dataset's
owner, never by a store (a store only holds names, and names cannot leave the root).

:func:`check_no_links` is the store's own confinement: a local store holds no symbolic link (a folder or file
of it linked elsewhere would be read or written through the link), checked whenever one is opened or locked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .errors import StoreFormatError


def _why_bad(name: str) -> str | None:
    """Why one name is not a plain relative path, or None."""
    if not name:
        return "it is empty"
    if "\0" in name:
        return "it holds a NUL byte"
    if name.startswith("/"):
        return "it is an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "it climbs out of its folder with '..'"
    if "." in parts or "" in parts:
        return "it holds an empty or '.' component"
    return None


def _holds_nul(arr: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """Per name: whether it holds a NUL (no file can have one in its path). numpy pads fixed-width strings with
    NULs (and its string functions ignore "\0"), so a NUL code point before a name's end is looked for."""
    out = np.zeros(arr.shape, bool)
    width = arr.dtype.itemsize // 4
    if width == 0:
        return out
    lengths = np.char.str_len(arr)
    codes = arr.reshape(-1).view(np.uint32).reshape(-1, width)
    for a in range(0, len(codes), block):
        inside = np.arange(width) < lengths.reshape(-1)[a:a + block, None]
        out.reshape(-1)[a:a + block] = ((codes[a:a + block] == 0) & inside).any(axis=1)
    return out


def check_names(names: Sequence[str] | np.ndarray, where: str, what: str = "file name") -> None:
    """Refuse any name that is not a plain relative path (see the module doc), naming the first one."""
    arr = np.asarray(names, dtype=str)
    if arr.size == 0:
        return
    s = getattr(np, "strings", np.char)  # numpy 2's string ufuncs; np.char on numpy 1.x
    bad = (s.str_len(arr) == 0) | s.startswith(arr, "/") | s.endswith(arr, "/")
    bad |= (s.find(arr, "//") >= 0) | _holds_nul(arr)
    for comp in ("..", "."):
        bad |= (arr == comp) | s.startswith(arr, comp + "/") | s.endswith(arr, "/" + comp)
        bad |= s.find(arr, "/" + comp + "/") >= 0
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise StoreFormatError(
            f"{where}: {what} {i} is {str(arr[i])!r}: {_why_bad(str(arr[i])) or 'not a plain relative path'} "
            f"({int(bad.sum())} such names). A label store may only name files inside its dataset folder; "
            "this store is damaged or was crafted: do not use it")


def check_name(name: str, where: str, what: str = "file name") -> str:
    why = _why_bad(name)
    if why:
        raise StoreFormatError(f"{where}: {what} {name!r}: {why}. A label store may only name files inside "
                               "its folder; this store is damaged or was crafted: do not use it")
    return name


def resolve_inside(root: str, name: str, where: str, what: str = "file name") -> str:
    """``root/name`` after checking ``name`` and that its real path (symlinks resolved) stays inside
    ``root``'s real path. Use for every file written from a store's names (and read, outside a dataset)."""
    check_name(name, where, what)
    path = os.path.join(root, name)
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise StoreFormatError(f"{where}: {what} {name!r} leads to {real}, outside {root} (a symbolic link "
                               f"under {root} points elsewhere); refusing to follow it. Remove the link or "
                               "choose another folder")
    return path


def check_no_links(root: str, where: str) -> None:
    """Refuse a local store holding a symbolic link anywhere inside ``root`` (``root`` itself may be one: the
    user made it). One ``scandir`` per folder, no ``stat`` per file: a store is a few files per shard."""
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # a missing or unreadable folder is reported by whatever opens it
        for entry in entries:
            if entry.is_symlink():
                try:
                    target = os.readlink(entry.path)
                except OSError:
                    target = "?"
                kind = "folder" if os.path.isdir(entry.path) else "file"
                rel = os.path.relpath(entry.path, root)
                raise StoreFormatError(
                    f"{where}: {rel} is a symbolic link (to {target}); a label store is read and written only "
                    "inside its own folder, never through a link, so fkd-dali does not use this store. Replace "
                    f"the link with the real {kind} (e.g. copy the store without links: cp -rL {where} COPY), "
                    "or remove it if you did not make it: a store that links outside itself may be crafted")
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry.path)


def image_path(root: str, name: str, where: str) -> str:
    """``root/name`` for an image of the dataset: the name is checked; symlinks inside the dataset are
    followed as torchvision's ImageFolder follows them (see the module doc)."""
    return os.path.join(root, check_name(name, where))
