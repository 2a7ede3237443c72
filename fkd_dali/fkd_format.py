"""Interop with FKD's official soft-label files (szq0214/FKD, FKD_SLG/generate_soft_label.py).

FKD writes one ``torch.save``d file per training image, ``<root>/<class>/<stem>.tar`` (``stem`` = the file
name up to its first dot), holding the list ``[coords, flips, output]`` of numpy arrays:

* ``coords`` (C, 4) float32 (float16 with ``--use_fp16``): ``(i/H, j/W, h/H, w/W)`` of the undecorated PIL
  image (no EXIF rotation);
* ``flips`` (C,) bool: horizontal flip after the crop;
* ``output``: ``(C,)`` int64 class ids for ``hard``, ``(C, 2)`` ``[id, p]`` for ``smoothing``, ``(C, 2, k)``
  ``[[ids], [probs]]`` for ``marginal_*`` (ids stored as floats).

``import_fkd`` turns such a folder into our store (pixel boxes recovered exactly as FKD's replay crops
them), ``export_fkd`` writes a store back in that format under ``OUT/<split>/<class>/<stem>.tar``, so
FKD's own trainer reads it with ``--softlabel_path OUT``. Files are unpickled with ``weights_only=True``
and only numpy's array reconstruction allowed: a label file cannot run code.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

import labelstore
import labelstore.locking
import labelstore.paths
from labelstore import LabelStore, create_store
from pipelines.errors import image_header

from .checkpoint import numpy_globals, read_untrusted
from .crops import from_normalized, normalized
from .dataset import Dataset, scan_image_folder, split_dir
from .progress import progress


class FKDFormatError(Exception):
    """An FKD label file or folder cannot be imported as it is."""


def load_fkd_file(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(coords, flips, output)`` of one FKD label file, as numpy arrays; FKDFormatError if unreadable."""
    state = read_untrusted(path, FKDFormatError, "the file is truncated or corrupt: re-download or regenerate it",
                           numpy_globals(), holds="the three arrays of an FKD label file",
                           trusted_fix="load it in a trusted Python session (torch.load(path, weights_only=False)) "
                                       "and torch.save the three arrays as tensors", what="an FKD label file")
    if not isinstance(state, (list, tuple)) or len(state) != 3:
        raise FKDFormatError(f"{path}: expected [coords, flips, output], got {type(state).__name__}"
                             f"{' of length ' + str(len(state)) if hasattr(state, '__len__') else ''}")
    coords, flips, output = (a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in state)
    return coords, flips, output


def split_output(output: np.ndarray, path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(ids (C, k) int64, probs (C, k) float32, FKD label type) of an FKD ``output`` array."""
    if output.ndim == 1:  # hard: class ids; the probability is unknown, stored as 1.0
        ids, probs, kind = output[:, None], np.ones((len(output), 1), np.float32), "hard"
    elif output.ndim == 2 and output.shape[1] == 2:
        ids, probs, kind = output[:, :1], output[:, 1:], "smoothing"
    elif output.ndim == 3 and output.shape[1] == 2:
        ids, probs, kind = output[:, 0, :], output[:, 1, :], f"marginal_k{output.shape[2]}"
    else:
        raise FKDFormatError(f"{path}: output of shape {output.shape} is none of FKD's label layouts "
                             "(C,), (C, 2) or (C, 2, k)")
    fids = np.asarray(ids, dtype=np.float64)
    rid = np.round(fids)
    if not np.all(np.abs(fids - rid) < 1e-3):
        raise FKDFormatError(f"{path}: class ids are not whole numbers; the file is not FKD output")
    return rid.astype(np.int64), np.asarray(probs, dtype=np.float32), kind


def label_stem(rel: str) -> str:
    """FKD's key of an image: ``<class>/<file name up to its first dot>``."""
    parts = rel.replace(os.sep, "/").split("/")
    return f"{parts[0]}/{parts[-1].split('.')[0]}"


def find_label_root(src: str, classes: Sequence[str]) -> str:
    """The folder holding ``<class>/<stem>.tar``: SRC itself, SRC/train or SRC/<name>/train."""
    cands = [src, os.path.join(src, "train")]
    if os.path.isdir(src):
        cands += [os.path.join(src, d, "train") for d in sorted(os.listdir(src))]
    for c in cands:
        if any(os.path.isdir(os.path.join(c, cls)) for cls in classes[:50]):
            return c
    raise FKDFormatError(f"{src} holds no FKD label folders named after the dataset's classes (looked in "
                         f"{src}, {src}/train and {src}/*/train for e.g. {classes[0]}/)")


@dataclasses.dataclass
class ImportReport:
    store: str
    imported: int
    missing: list[str]
    label_type: str
    coord_dtype: str
    max_rounding_px: float


def _image_size(path: str) -> tuple[int, int]:
    size, why = image_header(path)
    if size is None:
        raise FKDFormatError(f"{path}: {why}; replace or remove the image (FKD's labels for it cannot be replayed)")
    return size


def check_coords(coords: np.ndarray, path: str, slack: float = 1e-3) -> None:
    """FKD's (i/H, j/W, h/H, w/W) must describe a non-empty box inside the image (fp16 rounding allowed)."""
    c = coords.astype(np.float64)
    bad = ~np.isfinite(c).all(1) | (c[:, :2] < -slack).any(1) | (c[:, 2:] <= 0).any(1) | \
        (c[:, 0] + c[:, 2] > 1 + slack) | (c[:, 1] + c[:, 3] > 1 + slack)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise FKDFormatError(f"{path}: crop {j} has coords {c[j].round(4).tolist()} (i/H, j/W, h/H, w/W), a box "
                             f"outside its image ({int(bad.sum())} such crops in this file). The file is damaged "
                             "or not FKD output for this dataset: regenerate it, or import with --allow-missing "
                             "after removing it")


def _load_rows(args: tuple) -> dict:
    """Worker: load the label files and image sizes of one shard."""
    label_root, image_root, files, C, k, want_kind = args
    out = {"sizes": [], "coords": [], "flips": [], "ids": [], "probs": [], "present": [],
           "dtype": set(), "rounding": 0.0, "errors": [], "missing": [], "odd": []}
    for rel in files:
        lpath = os.path.join(label_root, label_stem(rel) + ".tar")
        if not os.path.isfile(lpath):
            out["missing"].append(rel)
            out["present"].append(False)
            continue
        try:
            coords, flips, output = load_fkd_file(lpath)
            ids, probs, kind = split_output(output, lpath)
            if coords.shape != (C, 4) or flips.shape != (C,) or ids.shape != (C, k) or kind != want_kind:
                out["odd"].append(f"{lpath} ({_shape_text(len(coords), ids.shape[1], kind)}; coords "
                                  f"{coords.shape}, flips {flips.shape}, output {output.shape})")
                out["present"].append(False)
                continue
            check_coords(coords, lpath)
            size = _image_size(os.path.join(image_root, rel))
        except FKDFormatError as e:
            out["errors"].append(str(e))
            out["present"].append(False)
            continue
        out["sizes"].append(size)
        out["coords"].append(coords)
        out["flips"].append(flips.astype(bool))
        out["ids"].append(ids)
        out["probs"].append(probs)
        out["present"].append(True)
        out["dtype"].add(str(coords.dtype))
    return out


def _shape_text(crops: int, k: int, kind: str) -> str:
    return f"{crops} crops, {kind} labels" + (f" (top-{k})" if kind.startswith("marginal") else "")


def majority_shape(label_root: str, stems: Sequence[str], sample: int = 64) -> tuple[int, int, str, int, int]:
    """(crops, k, label type, files agreeing, files read) of most label files, from up to ``sample`` files
    spread over the dataset (so one odd file, first or not, never becomes the reference)."""
    present = [s for s in stems if os.path.isfile(os.path.join(label_root, s + ".tar"))]
    if not present:
        raise FKDFormatError(f"{label_root} holds none of the {len(stems)} label files the dataset needs "
                             f"(e.g. {stems[0]}.tar)")
    picks = sorted({int(i) for i in np.linspace(0, len(present) - 1, min(sample, len(present)))})
    seen: collections.Counter = collections.Counter()
    for i in picks:
        p = os.path.join(label_root, present[i] + ".tar")
        try:
            coords, _, output = load_fkd_file(p)
            ids, _, kind = split_output(output, p)
        except FKDFormatError:
            continue  # named by the import itself
        seen[(len(coords), ids.shape[1], kind)] += 1
    if not seen:
        raise FKDFormatError(f"none of {len(picks)} label files read under {label_root} is an FKD label file "
                             f"(e.g. {present[picks[0]]}.tar)")
    (C, k, kind), agree = seen.most_common(1)[0]
    return C, k, kind, agree, sum(seen.values())


def _shard_jobs(store: LabelStore, label_root: str, image_root: str, C: int, k: int, kind: str) -> Iterator[tuple]:
    files = store.files
    for a, b in store.shard_ranges():
        yield (label_root, image_root, list(files[a:b]), C, k, kind)


def import_fkd(src: str, data: str, save_path: str, *, allow_missing: bool = False, workers: int = 0,
               overwrite: bool = False, show_progress: bool = True) -> ImportReport:
    """Convert FKD's per-image label folder into a label store for DATA/train."""
    ds: Dataset = scan_image_folder(split_dir(data, "train"))
    label_root = find_label_root(src, ds.classes)
    stems = [label_stem(f) for f in ds.files]
    clashes = stem_collisions(ds.files)
    if clashes:
        stem, first, other = clashes[0]
        raise FKDFormatError(f"{first} and {other} map to the same FKD label file {stem}.tar (FKD keys images by "
                             "class and name up to the first dot); rename one of them")
    C, k, kind, agree, sampled = majority_shape(label_root, stems)
    if os.path.exists(save_path) and not overwrite:
        raise FKDFormatError(f"{save_path} already exists; choose another --save-path, or pass --overwrite to "
                             "replace it (the old store stays until the import has succeeded)")
    lock = labelstore.locking.store_writer_lock(save_path) if overwrite and \
        os.path.isfile(os.path.join(save_path, "zarr.json")) else None  # not under a running generate
    try:
        report: list[ImportReport] = []
        labelstore.locking.create_atomically(save_path, lambda tmp: report.append(_import_into(
            tmp, src, ds, label_root, C, k, kind, (agree, sampled), allow_missing=allow_missing, workers=workers,
            show_progress=show_progress)), replace=overwrite)
    finally:
        if lock is not None:
            lock.release()
    return dataclasses.replace(report[0], store=save_path)


def _import_into(path: str, src: str, ds: Dataset, label_root: str, C: int, k: int, kind: str,
                 sampled: tuple[int, int], *, allow_missing: bool, workers: int, show_progress: bool) -> ImportReport:
    """The import proper, into a fresh store at ``path`` (a staging folder: it is moved into place on success)."""
    store = create_store(path, files=ds.files, targets=ds.targets, classes=ds.classes,
                         fingerprint=ds.fingerprint, dataset_root=ds.name, num_crops=C, top_k=k,
                         temperature=1.0, teachers=[{"name": "unknown (imported from FKD)"}],
                         crop={"interpolation": "bilinear (FKD replay)"}, seed=None,
                         source={"kind": "import-fkd", "path": os.path.abspath(src), "label_type": kind})
    missing: list[str] = []
    errors: list[str] = []
    odd: list[str] = []
    dtypes: set[str] = set()
    rounding = 0.0
    imported = 0
    jobs = list(_shard_jobs(store, label_root, ds.root, C, k, kind))
    pool = ProcessPoolExecutor(workers) if workers > 0 else None
    results = pool.map(_load_rows, jobs) if pool else map(_load_rows, jobs)
    bar = progress(total=len(ds), desc="import-fkd", unit="img", disable=not show_progress)
    try:
        for (a, b), res in zip(store.shard_ranges(), results):
            missing += res["missing"]
            errors += res["errors"]
            odd += res["odd"]
            dtypes |= res["dtype"]
            present = np.asarray(res["present"], dtype=bool)
            bar.update(b - a)
            if not present.any():
                continue
            count = b - a
            sizes = np.ones((count, 2), np.int64)
            boxes = np.zeros((count, C, 4), np.int64)
            boxes[..., 2:] = 1
            flips = np.zeros((count, C), bool)
            ids = np.zeros((count, C, k), np.int64)
            probs = np.zeros((count, C, k), np.float32)
            sizes[present] = np.asarray(res["sizes"])
            got_boxes, r = from_normalized(np.stack(res["coords"]), sizes[present])
            rounding = max(rounding, r)
            boxes[present] = got_boxes
            flips[present] = np.stack(res["flips"])
            ids[present] = np.stack(res["ids"])
            probs[present] = np.stack(res["probs"])
            try:
                store.write_block(a, sizes=sizes, boxes=boxes, flips=flips, topk_idx=ids, topk_val=probs,
                                  rows_done=present)
            except labelstore.StoreError as e:
                raise FKDFormatError(f"importing {label_root} rows {a}..{b - 1}: {e}") from e
            imported += int(present.sum())
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    if odd:
        raise FKDFormatError(
            f"{label_root}: the label files disagree on their shape. Most hold {_shape_text(C, k, kind)} "
            f"({sampled[0]} of {sampled[1]} files sampled across the dataset); {len(odd)} differ: "
            f"{'; '.join(odd[:5])}{' ...' if len(odd) > 5 else ''}. Regenerate or remove those files (then "
            "--allow-missing imports the rest)")
    if errors:
        raise FKDFormatError(f"{len(errors)} label file(s) could not be imported; first: {errors[0]}")
    if missing and not allow_missing:
        raise FKDFormatError(
            f"{len(missing)} of {len(ds)} images have no FKD label file under {label_root} (first: "
            f"{label_stem(missing[0])}.tar for {missing[0]}). Pass --allow-missing to import the rest and "
            "leave those rows not done (training then needs --allow-incomplete)")
    store.update_meta(source={**store.meta.source, "coord_dtype": "/".join(sorted(dtypes)),
                              "max_box_rounding_px": rounding, "missing": len(missing)})
    store.finalize()
    return ImportReport(store=path, imported=imported, missing=missing, label_type=kind,
                        coord_dtype="/".join(sorted(dtypes)), max_rounding_px=rounding)


def stem_collisions(files: Sequence[str]) -> list[tuple[str, str, str]]:
    """(stem, first file, other file) for every file whose FKD label-file name another file already has."""
    seen: dict[str, str] = {}
    clashes = []
    for f in files:
        stem = label_stem(str(f))
        if stem in seen:
            clashes.append((stem, seen[stem], str(f)))
        else:
            seen[stem] = str(f)
    return clashes


#: ``--soft_label_type`` of FKD's trainer for each exported layout (marginal by its k; marginal_renorm reads any k).
FKD_TRAINER_TYPE = {"hard": "hard", "smoothing": "smoothing", 5: "marginal_smoothing_k5", 10: "marginal_smoothing_k10"}


def export_layout(store: LabelStore, label_type: str = "auto") -> str:
    """hard, smoothing or marginal: ``auto`` follows the label type the store was made for."""
    if label_type == "auto":
        made_for = str(store.meta.source.get("label_type") or "")
        label_type = "hard" if made_for == "hard" else "smoothing" if store.top_k == 1 else "marginal"
    if label_type not in ("hard", "smoothing", "marginal"):
        raise FKDFormatError(f"--label-type {label_type!r}: choose hard, smoothing, marginal or auto")
    return label_type


@dataclasses.dataclass
class ExportReport:
    written: int
    layout: str
    fkd_label_type: str  # the --soft_label_type FKD's trainer needs for these files


def meal_v2_prefix(name: str, classes: Sequence[str]) -> str:
    """``name`` checked as the folder MEAL V2's FKD_train.py puts between its ``--softlabel_path`` and
    ``train/``: it reads ``os.path.join(softlabel_path, '/'.join(path.split('/')[-4:]).split('.')[0] + '.tar')``
    for ``path = IMAGENET/train/<class>/<file>``, i.e. ``SOFTLABEL_PATH/<last folder of --imagenet>/train/<class>/
    <stem>.tar``, cut at the first dot of that whole relative path: a dot in the folder's or a class's name
    would make it read another file."""
    if not name or name in (".", "..") or "/" in name or os.sep in name or "." in name:
        raise FKDFormatError(f"--dataset-folder {name!r}: give the last folder name of the --imagenet path MEAL V2's "
                             "FKD_train.py is given (one name without '/' or '.'; MEAL V2 cuts its label path at the "
                             "first dot)")
    dotted = [c for c in classes if "." in c]
    if dotted:
        raise FKDFormatError(f"class folder {dotted[0]!r} has a dot in its name: MEAL V2's FKD_train.py cuts its label "
                             f"path at the first dot and would look for {name}/train/{dotted[0].split('.')[0]}.tar "
                             f"({len(dotted)} such class folder(s)); rename them for MEAL V2")
    return name


def export_fkd(store_path: str, out: str, *, fp16: bool = False, label_type: str = "auto", arrays: str = "torch",
               dataset_folder: str | None = None, overwrite: bool = False, show_progress: bool = True) -> ExportReport:
    """Write every done row of a store as FKD label files ``OUT/<split>/<class>/<stem>.tar``, or, with
    ``dataset_folder``, ``OUT/<dataset_folder>/<split>/<class>/<stem>.tar``: the layout MEAL V2's FKD_train.py
    reads (:func:`meal_v2_prefix`).

    The default is what FKD's own trainer reads unpatched on any torch: ``[coords, flips, output]`` as torch
    tensors (torch >= 2.6 loads them with its default ``weights_only=True``; numpy arrays would need
    ``weights_only=False``), float32, hard labels as (C,) int64 class ids. Rows are validated as ``train``
    validates them, every destination stays inside OUT, and two images with one FKD name are refused.
    """
    store = labelstore.open_store(store_path)
    store.require_kind("topk")  # FKD's files hold soft labels
    layout = export_layout(store, label_type)
    if arrays not in ("torch", "numpy"):
        raise FKDFormatError(f"arrays={arrays!r}: choose torch or numpy")
    split = store.meta.dataset_root or "train"
    if dataset_folder is not None:
        split = meal_v2_prefix(dataset_folder, list(store.meta.classes)) + "/train"
    dt = np.float16 if fp16 else np.float32
    files = store.files
    done = store.done()
    if not done.any():
        raise FKDFormatError(f"{store_path} has no labelled row yet (0 of {store.num_images:,} rows done): nothing to "
                             "export. Finish the store first (rerun the `fkd-dali generate` command that made it)")
    clashes = stem_collisions(files[done])
    if clashes:
        stem, a, b = clashes[0]
        raise FKDFormatError(f"{a} and {b} would both be written as {split}/{stem}.tar: FKD keys an image by its "
                             f"class and its name up to the first dot ({len(clashes)} such clashes). FKD's trainer "
                             "could not tell them apart; rename the images (and regenerate), or keep the labels in "
                             "the store")
    where = f"{store_path} (exporting to {out})"
    dest = {i: labelstore.paths.resolve_inside(out, f"{split}/{label_stem(files[i])}.tar", where)
            for i in np.flatnonzero(done)}
    there = [p for p in dest.values() if os.path.exists(p)]
    if there and not overwrite:
        raise FKDFormatError(f"{out} already holds {len(there)} of the {len(dest)} label files to write (e.g. "
                             f"{there[0]}); pass --overwrite to replace them, or choose another --out")
    written = 0
    bar = progress(total=store.num_images, desc="export-fkd", unit="img", disable=not show_progress)
    try:
        for a, b in store.shard_ranges():
            rows = store.read_rows(np.arange(a, b))
            labelstore.check_block(rows, store.num_classes, first_row=a, where=store_path, files=files,
                                   rows_mask=rows["done"])
            coords = normalized(rows["boxes"], rows["sizes"])
            for i in range(b - a):
                bar.update(1)
                if not rows["done"][i]:
                    continue
                ids, vals = rows["topk_idx"][i], rows["topk_val"][i].astype(np.float64)
                if layout == "hard":  # FKD's trainer scatters with these as indices: int64, whatever --fp16
                    output = ids[:, 0].astype(np.int64)
                elif layout == "smoothing":
                    output = np.stack([ids[:, 0], vals[:, 0]], axis=1).astype(dt)
                else:
                    output = np.stack([ids.astype(np.float64), vals], axis=1).astype(dt)
                state = [coords[i].astype(dt), rows["flips"][i].astype(bool), output]
                if arrays == "torch":
                    state = [torch.from_numpy(np.ascontiguousarray(x)) for x in state]
                path = dest[a + i]
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.save(state, path + ".tmp")
                os.replace(path + ".tmp", path)
                written += 1
    finally:
        bar.close()
    kind = FKD_TRAINER_TYPE.get(layout if layout != "marginal" else store.top_k, "marginal_renorm")
    return ExportReport(written=written, layout=layout, fkd_label_type=kind)
