"""Interop with the soft-label folders of SRe2L, CDA, G-VBSM, EDC and LPLD (dataset distillation).

SRe2L (VILA-Lab/SRe2L ``relabel/generate_soft_label.py``) writes, per epoch E and step B of its relabel pass,
``FKD_PATH/epoch_E/batch_B.tar`` = ``torch.save([coords, flip_status, mix_index, mix_lam, mix_bbox, output])``:

* ``coords`` (b, 4) float32 tensor: each crop's (i/H, j/W, h/H, w/W); ``flip_status`` (b,) bool tensor;
* ``mix_index`` (b,) int64 tensor, a permutation of the step (None without mixing); ``mix_lam`` a Python float
  (``np.random.beta``; None without mixing); ``mix_bbox`` CutMix's ``[bbx1, bby1, bbx2, bby2]`` numpy int64s
  (None for Mixup or no mixing);
* ``output`` (b, K) the teacher's logits on the mixed crops, float16 with ``--use-fp16``, else float32.

The images of a step are not in the file: they are SRe2L's seeded sampler's (:mod:`fkd_dali.sre2l_plan`).
G-VBSM and EDC (shaoshitong/G_VBSM_Dataset_Condensation ``generate_soft_label_with_db.py``) append a 7th field,
``index`` (b,) int64: the step's images. LPLD (he-y/soft-label-pruning-for-dataset-distillation
``generate_soft_label_pruning.py``) writes 6 fields with ``drop_last=True`` for only the first steps of the plan
(the last epoch cut short), and ``sampler_indices_epoch.json`` = {"E": the images of epoch E's steps, in order}.

``import_sre2l`` reads any of them into a relabel store (values kept exactly), ``export_sre2l`` writes one back.
Every file is untrusted: ``torch.load(weights_only=True)`` with only numpy's scalar/array reconstruction allowed,
each file's size bounded before it is loaded, names matched exactly (``epoch_<E>``, ``batch_<B>.tar``), no link
followed, every shape, count and value checked and a file of another layout refused by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Sequence

import numpy as np
import torch

import labelstore.locking
from labelstore import StoreError, check_block
from labelstore.relabel import RelabelStore, create_relabel_store, open_relabel, steps_per_epoch
from pipelines.errors import image_header

from .checkpoint import numpy_globals, read_untrusted
from .dataset import scan_image_folder, split_dir
from .progress import progress
from .sre2l_plan import SRE2L_SEED, sre2l_plan

LPLD_INDEX = "sampler_indices_epoch.json"
EPOCH_RE = re.compile(r"epoch_(0|[1-9][0-9]{0,5})")
BATCH_RE = re.compile(r"batch_(0|[1-9][0-9]{0,8})\.tar")
LAYOUTS = ("sre2l", "g-vbsm", "lpld")
MAX_FIRST_BATCH = 1 << 14  # the first file (which gives the batch size) is refused beyond this many crops' bytes
FILE_SLACK = 1 << 20  # a batch file's bytes besides its rows (zip and pickle framing)


def batch_file_bytes(rows: int, num_classes: int) -> int:
    """The most a batch file of ``rows`` crops may hold unpacked: coords, flips, mix index, index and labels."""
    return rows * (num_classes * 4 + 64) + FILE_SLACK


class SRe2LFormatError(Exception):
    """An SRe2L-family label folder or file cannot be imported (or a store exported) as it is."""


@dataclasses.dataclass
class BatchFile:
    """One batch file's fields as numpy: coords (b, 4), flips (b,), mix_index (b,) | None, mix_lam float | None,
    mix_bbox (4,) | None, output (b, K), index (b,) | None (7-field files)."""

    coords: np.ndarray
    flips: np.ndarray
    mix_index: np.ndarray | None
    mix_lam: float | None
    mix_bbox: np.ndarray | None
    output: np.ndarray
    index: np.ndarray | None

    @property
    def mix(self) -> str:
        return "none" if self.mix_index is None else "mixup" if self.mix_bbox is None else "cutmix"


def _tensor(x, path: str, what: str, dtypes: tuple, shape: tuple) -> np.ndarray:
    if not isinstance(x, torch.Tensor):
        raise SRe2LFormatError(f"{path}: field {what} is a {type(x).__name__}, expected a tensor {shape}; this is not "
                               "a batch file of SRe2L's layout")
    if x.is_sparse or x.layout != torch.strided or str(x.dtype).removeprefix("torch.") not in dtypes:
        sparse = "" if x.layout == torch.strided and not x.is_sparse else " (sparse)"
        raise SRe2LFormatError(f"{path}: field {what} is {str(x.dtype).removeprefix('torch.')} {tuple(x.shape)}"
                               f"{sparse}, expected a dense {' or '.join(dtypes)} tensor of shape "
                               f"{tuple('b' if s is None else s for s in shape)}")
    a = x.detach().numpy()
    ok = a.ndim == len(shape) and all(s is None or s == n for s, n in zip(shape, a.shape))
    if a.dtype.name not in dtypes or not ok:
        raise SRe2LFormatError(f"{path}: field {what} is {a.dtype.name} {tuple(a.shape)}, expected "
                               f"{' or '.join(dtypes)} of shape {tuple('b' if s is None else s for s in shape)}")
    return a


def load_batch_file(path: str, max_bytes: int, num_classes: int) -> BatchFile:
    """One ``batch_B.tar``, every field checked; SRe2LFormatError naming the file and what is wrong."""
    state = read_untrusted(path, SRe2LFormatError, "it is truncated or damaged: regenerate it", numpy_globals(),
                           holds="the tensors of an SRe2L batch file", what="an SRe2L batch file",
                           max_bytes=max_bytes,
                           trusted_fix="load it in a trusted Python session and torch.save its fields as tensors "
                                       "and numbers")
    if not isinstance(state, list) or len(state) not in (6, 7):
        n = len(state) if isinstance(state, (list, tuple, dict)) else None
        raise SRe2LFormatError(f"{path}: holds a {type(state).__name__}{f' of {n} fields' if n is not None else ''}; "
                               "an SRe2L batch file is a list [coords, flip_status, mix_index, mix_lam, mix_bbox, "
                               "output] (G-VBSM/EDC: + index)")
    coords = _tensor(state[0], path, "0 (coords)", ("float32", "float16"), (None, 4))
    b = len(coords)
    flips = _tensor(state[1], path, "1 (flip_status)", ("bool",), (b,))
    output = _tensor(state[5], path, "5 (output)", ("float16", "float32"), (b, None))
    if output.shape[1] != num_classes:
        raise SRe2LFormatError(f"{path}: its labels have {output.shape[1]} classes, the dataset has {num_classes}; "
                               "import the labels with the dataset (--data) they were made for (--num-classes K "
                               "when its class folders are a subset of the teacher's K classes)")
    index = None if len(state) == 6 else _tensor(state[6], path, "6 (index)", ("int64",), (b,))
    mix_index, lam, bbox = state[2:5]
    if mix_index is None:
        if lam is not None or bbox is not None:
            raise SRe2LFormatError(f"{path}: mix_index is None but mix_lam/mix_bbox are not; not SRe2L's layout")
        return BatchFile(coords, flips, None, None, None, output, index)
    mix_index = _tensor(mix_index, path, "2 (mix_index)", ("int64",), (b,))
    if not np.array_equal(np.sort(mix_index), np.arange(b)):
        raise SRe2LFormatError(f"{path}: field 2 (mix_index) is not a permutation of the batch's {b} positions")
    if isinstance(lam, np.generic):
        lam = lam.item()
    if isinstance(lam, bool) or not isinstance(lam, (float, int)):
        raise SRe2LFormatError(f"{path}: field 3 (mix_lam) is a {type(lam).__name__}, expected a number")
    if not 0 <= lam <= 1:
        raise SRe2LFormatError(f"{path}: field 3 (mix_lam) is {lam}, outside [0, 1]")
    if bbox is not None:
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in bbox):
            raise SRe2LFormatError(f"{path}: field 4 (mix_bbox) is {str(bbox)[:80]}, expected None or 4 whole numbers")
        bbox = np.array([int(v) for v in bbox], np.int64)
    return BatchFile(coords, flips, mix_index, float(lam), bbox, output, index)


def _entries(folder: str, pattern: re.Pattern, what: str, allow: tuple = (), dirs: bool = False) -> dict[int, str]:
    """{number: name} of the entries of ``folder`` named by ``pattern`` (folders if ``dirs``, else regular files);
    links, other names and other kinds of entry (a FIFO would block the reader) refused."""
    out = {}
    with os.scandir(folder) as it:
        for e in it:
            if e.is_symlink():
                raise SRe2LFormatError(f"{os.path.join(folder, e.name)} is a symbolic link; an SRe2L label folder is "
                                       "read without following links (copy the files in)")
            m = pattern.fullmatch(e.name)
            if m is None:
                if e.name in allow:
                    continue
                raise SRe2LFormatError(f"{os.path.join(folder, e.name)}: unexpected entry in an SRe2L label folder "
                                       f"(expected only {what}); move it out")
            if not (e.is_dir(follow_symlinks=False) if dirs else e.is_file(follow_symlinks=False)):
                raise SRe2LFormatError(f"{os.path.join(folder, e.name)} is not a {'folder' if dirs else 'regular file'}"
                                       f"; an SRe2L label folder holds {what}: move it out")
            out[int(m.group(1))] = e.name
    return out


@dataclasses.dataclass
class ImportReport:
    store: str
    layout: str
    epochs: int
    steps: int
    batch_size: int
    mix: str
    label_dtype: str


def _lpld_index(src: str, epochs: Sequence[int], n: int) -> dict[int, np.ndarray]:
    path = os.path.join(src, LPLD_INDEX)
    limit = len(epochs) * (n * 12 + 64) + 1024  # at most n indices of <= 10 digits and ", " per epoch
    if os.path.getsize(path) > limit:
        raise SRe2LFormatError(f"{path} is {os.path.getsize(path):,} bytes; LPLD's sampler index of {len(epochs)} "
                               f"epochs of {n} images holds at most {limit:,}: not LPLD's sampler index (refused "
                               "before reading)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise SRe2LFormatError(f"{path}: not JSON ({e}); LPLD writes {{\"epoch\": [image indices]}}") from e
    out = {}
    for e in epochs:
        got = raw.get(str(e)) if isinstance(raw, dict) else None
        if not isinstance(got, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in got):
            raise SRe2LFormatError(f"{path}: epoch {e} has no list of image indices")
        if len(got) > n:
            raise SRe2LFormatError(f"{path}: epoch {e} lists {len(got):,} images; DATA/train has {n}")
        a = np.asarray(got, np.int64)
        if a.size and (a.min() < 0 or a.max() >= n):
            raise SRe2LFormatError(f"{path}: epoch {e} names an image outside 0..{n - 1}")
        out[e] = a
    return out


def import_sre2l(src: str, data: str, save_path: str, *, input_size: int = 224, epochs: int | None = None,
                 seed: int = SRE2L_SEED, num_classes: int | None = None, overwrite: bool = False,
                 show_progress: bool = True) -> ImportReport:
    """Convert an SRe2L / G-VBSM / EDC / LPLD label folder (SRC/epoch_E/batch_B.tar) into a relabel store for the
    distilled images DATA/train. ``epochs``: the plan's epochs (default: those present; more marks the rest
    pruned); ``seed``: SRe2L's ``--fkd-seed`` (the sampler that drew each 6-field step's images); ``num_classes``:
    the teacher's classes, when the images' class folders are a subset of them (default: the folders)."""
    ds = scan_image_folder(split_dir(data, "train"))
    n = len(ds)
    if num_classes is not None and num_classes < len(ds.classes):
        raise SRe2LFormatError(f"--num-classes {num_classes} is fewer than the {len(ds.classes)} class folders of "
                               f"{ds.root}")
    num_classes = num_classes or len(ds.classes)
    if not os.path.isdir(src) or os.path.islink(src):
        raise SRe2LFormatError(f"{src} is not a folder holding epoch_E/batch_B.tar (SRe2L's --fkd-path)")
    lpld = os.path.isfile(os.path.join(src, LPLD_INDEX))
    epoch_dirs = _entries(src, EPOCH_RE, "epoch_E folders", allow=(LPLD_INDEX,), dirs=True)
    if not epoch_dirs:
        raise SRe2LFormatError(f"{src} holds no epoch_E folder; give SRe2L's --fkd-path folder")
    present = sorted(epoch_dirs)
    missing_epochs = sorted(set(range(present[-1] + 1)) - set(present))
    if missing_epochs:
        raise SRe2LFormatError(f"{src}: epoch_{missing_epochs[0]} is missing ({len(missing_epochs)} epoch folders "
                               f"missing below epoch_{present[-1]}); restore it or regenerate the labels")
    files = {e: _entries(os.path.join(src, epoch_dirs[e]), BATCH_RE, "batch_B.tar files") for e in present}
    if not files[0]:
        raise SRe2LFormatError(f"{src}/epoch_0 holds no batch_B.tar file")
    if 0 not in files[0]:
        raise SRe2LFormatError(f"{src}/epoch_0/batch_0.tar is missing (epoch_0 holds batch_{min(files[0])}.tar and "
                               "later); restore it or regenerate the labels")
    first = load_batch_file(os.path.join(src, "epoch_0", files[0][0]),
                            batch_file_bytes(min(n, MAX_FIRST_BATCH), num_classes), num_classes)
    B = len(first.coords)
    max_bytes = batch_file_bytes(B, num_classes)
    drop_last = lpld
    per_epoch = steps_per_epoch(n, B, drop_last)
    if per_epoch == 0:
        raise SRe2LFormatError(f"{src}: batch size {B} with LPLD's drop_last leaves no step for {n} images")
    kept = []
    for e in present:
        steps = sorted(files[e])
        last = e == present[-1]
        want = per_epoch if not (lpld and last) else len(steps)
        gap = sorted(set(range(want)) - set(steps))
        extra = [s for s in steps if s >= per_epoch]
        if extra:
            raise SRe2LFormatError(f"{src}/epoch_{e}/batch_{extra[0]}.tar is beyond the {per_epoch} steps of {n} images "
                                   f"(DATA/train) in batches of {B}; --data is not the dataset these labels were made for")
        if gap:
            raise SRe2LFormatError(f"{src}/epoch_{e}/batch_{gap[0]}.tar is missing ({len(gap)} missing in epoch_{e}); "
                                   "restore it or regenerate the labels")
        kept += [(e, s) for s in range(want)]
    epochs = epochs or len(present)
    if epochs < len(present):
        raise SRe2LFormatError(f"--epochs {epochs} is fewer than the {len(present)} epoch folders in {src}")
    layout = "lpld" if lpld else ("g-vbsm" if first.index is not None else "sre2l")
    lpld_images = _lpld_index(src, present, n) if lpld else None
    plan = None if first.index is not None or lpld else sre2l_plan(n, B, len(present), seed, drop_last)
    sizes = np.empty((n, 2), np.int64)
    for r, name in enumerate(ds.files):
        got, why = image_header(os.path.join(ds.root, name))
        if got is None:
            raise SRe2LFormatError(f"{os.path.join(ds.root, name)}: {why}; replace the image")
        sizes[r] = got
    total = epochs * per_epoch
    pruning = {} if len(kept) == total else {"how": "lpld (the plan's first steps)" if lpld else "epochs",
                                             "kept": len(kept), "of": total}
    plan_meta = {"sampler": "sre2l", "seed": seed} if layout == "sre2l" else {"sampler": "stored", "from": layout}
    if os.path.exists(save_path) and not overwrite:
        raise SRe2LFormatError(f"{save_path} already exists; choose another --save-path, or pass --overwrite")
    report = []

    def build(tmp: str) -> None:
        rs = create_relabel_store(
            tmp, files=ds.files, targets=ds.targets, sizes=sizes, classes=ds.classes, fingerprint=ds.fingerprint,
            num_classes=num_classes, dataset_root=ds.name, epochs=epochs, batch_size=B, mix=first.mix, label_format="full",
            values="logits", label_dtype=first.output.dtype.name, input_size=input_size, drop_last=drop_last,
            kept=np.asarray(kept), pruning=pruning, plan=plan_meta, teachers=[{"name": f"unknown (imported from "
                                                                             f"{layout})"}],
            source={"kind": "import-sre2l", "path": os.path.abspath(src), "layout": layout,
                    "coords_dtype": first.coords.dtype.name})
        _fill(rs, src, epoch_dirs, files, plan, lpld_images, max_bytes, num_classes, first, show_progress)
        rs.finalize()
        report.append(ImportReport(save_path, layout, epochs, len(kept), B, first.mix, first.output.dtype.name))

    lock = labelstore.locking.store_writer_lock(save_path) if overwrite and \
        os.path.isfile(os.path.join(save_path, "zarr.json")) else None  # not under a running writer
    try:
        labelstore.locking.create_atomically(save_path, build, replace=overwrite)
    finally:
        if lock is not None:
            lock.release()
    return report[0]


def _fill(rs: RelabelStore, src: str, epoch_dirs: dict, files: dict, plan, lpld_images, max_bytes: int,
          num_classes: int, first: BatchFile, show_progress: bool) -> None:
    B, index = rs.batch_size, rs.step_index
    sizes = rs.step_sizes
    planned = iter(plan) if plan is not None else None
    bar = progress(total=rs.num_steps, desc="import-sre2l", unit="step", disable=not show_progress)
    try:
        for a, b in rs.shard_rows():
            S = b - a
            out = {"images": np.full((S, B), -1, np.int64), "boxes": np.zeros((S, B, 4), np.float32),
                   "flips": np.zeros((S, B), bool), "mix_partner": np.full((S, B), -1, np.int64),
                   "mix_lam": np.ones(S, np.float64), "mix_box": np.full((S, 4), -1, np.int64),
                   "labels": np.zeros((S, B, num_classes), rs.label_dtype)}
            for r in range(a, b):
                e, s = (int(x) for x in index[r])
                path = os.path.join(src, epoch_dirs[e], files[e][s])
                f = load_batch_file(path, max_bytes, num_classes)
                size = int(sizes[r])
                if len(f.coords) != size:
                    raise SRe2LFormatError(f"{path} holds {len(f.coords)} crops; step {s} of {len(rs.store.files)} "
                                           f"images in batches of {B} holds {size}")
                if (f.index is None) != (first.index is None) or f.mix != first.mix or \
                        f.output.dtype != first.output.dtype or f.coords.dtype != first.coords.dtype:
                    raise SRe2LFormatError(f"{path} differs in layout from {src}/epoch_0/batch_0.tar ({len(f.__dict__)} "
                                           f"fields, mix {f.mix}, labels {f.output.dtype}, coords {f.coords.dtype} vs "
                                           f"mix {first.mix}, labels {first.output.dtype}); the folder mixes two runs")
                if f.index is not None:
                    images = f.index
                elif lpld_images is not None:
                    images = lpld_images[e][s * B:s * B + size]
                    if len(images) != size:
                        raise SRe2LFormatError(f"{os.path.join(src, LPLD_INDEX)}: epoch {e} lists too few images for "
                                               f"step {s}")
                else:
                    pe, ps, images = next(planned)
                    while (pe, ps) != (e, s):  # steps are rows in plan order; none is skipped in SRe2L's layout
                        pe, ps, images = next(planned)
                i = r - a
                out["images"][i, :size] = images
                out["boxes"][i, :size] = f.coords.astype(np.float32)
                out["flips"][i, :size] = f.flips
                out["labels"][i, :size] = f.output
                if f.mix_index is None:
                    out["mix_partner"][i, :size] = np.arange(size)
                else:
                    out["mix_partner"][i, :size] = f.mix_index
                    out["mix_lam"][i] = f.mix_lam
                    if f.mix_bbox is not None:
                        out["mix_box"][i] = f.mix_bbox
                bar.update(1)
            try:
                rs.write_steps(a, **out)
            except StoreError as err:
                raise SRe2LFormatError(_bad_file(rs, src, epoch_dirs, files, a, out, err)) from err
    finally:
        bar.close()


def _bad_file(rs: RelabelStore, src: str, epoch_dirs: dict, files: dict, a: int, out: dict, err: Exception) -> str:
    """The first file of a refused block whose values the store refuses, named with why."""
    store = rs.store
    for i in range(len(out["images"])):
        row = {k: v[i:i + 1] for k, v in out.items()}
        row |= {"step_index": rs.step_index[a + i:a + i + 1], "step_size": rs.step_sizes[a + i:a + i + 1]}
        try:
            check_block(row, store.num_classes, first_row=0, where="", kind=store.kind, fields=store.fields)
        except StoreError as e:
            ep, st = (int(x) for x in rs.step_index[a + i])
            why = str(e).split(": ", 2)[-1].split(" (1 rows affected)")[0]
            return f"{os.path.join(src, epoch_dirs[ep], files[ep][st])}: {why}; regenerate or remove the file"
    return f"importing {src}: {err}"


def _clear_export(out: str) -> None:
    """Remove what an earlier export wrote in ``out`` (epoch_E/batch_B.tar files, their emptied folders, LPLD's
    index), so no file of it is mistaken for this export's; anything else is left as it is."""
    with os.scandir(out) as it:
        epochs = [e.path for e in it if EPOCH_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    for folder in epochs:
        with os.scandir(folder) as it:
            for e in it:
                if BATCH_RE.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                    os.remove(e.path)
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # kept when it holds files the exporter did not write
    index = os.path.join(out, LPLD_INDEX)
    if os.path.isfile(index) and not os.path.islink(index):
        os.remove(index)


@dataclasses.dataclass
class ExportReport:
    out: str
    written: int
    layout: str


def export_sre2l(store_path: str, out: str, *, layout: str = "auto", overwrite: bool = False) -> ExportReport:
    """Write a relabel store as SRe2L's folder ``OUT/epoch_E/batch_B.tar`` (fields, dtypes and shapes as SRe2L
    writes them); ``layout`` g-vbsm adds the 7th field (the images), lpld writes ``sampler_indices_epoch.json``."""
    rs = open_relabel(store_path)
    source = rs.store.meta.source.get("layout")
    layout = source if layout == "auto" and source in LAYOUTS else "sre2l" if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise SRe2LFormatError(f"layout {layout!r}: choose auto, {', '.join(LAYOUTS)}")
    if rs.label_format != "full" or rs.values != "logits":
        raise SRe2LFormatError(f"{store_path} holds {rs.label_format} {rs.values}; SRe2L's files hold every class's "
                               "logits: export a store labelled with full logits")
    rs.store.require_complete()
    total = rs.epochs * rs.steps_per_epoch
    if layout != "lpld" and rs.num_steps != total:
        raise SRe2LFormatError(f"{store_path} keeps {rs.num_steps} of {total} steps (pruned); SRe2L's and G-VBSM's "
                               "trainers read every step: export it with --layout lpld")
    n = rs.store.num_images
    if layout == "lpld" and not rs.drop_last and n % rs.batch_size:
        raise SRe2LFormatError(f"{store_path}: its last step of each epoch holds {n % rs.batch_size} of {rs.batch_size} "
                               f"images ({n} images), and LPLD's folders are read with drop_last (full steps only): "
                               "the export could not be imported again. Export it with --layout sre2l or g-vbsm")
    plan = sre2l_plan(n, rs.batch_size, rs.epochs, rs.plan.get("seed", SRE2L_SEED), rs.drop_last) \
        if layout == "sre2l" else None
    os.makedirs(out, exist_ok=True)
    if os.listdir(out) and not overwrite:
        raise SRe2LFormatError(f"{out} is not empty; choose an empty --out, or pass --overwrite to replace the files")
    if overwrite:
        _clear_export(out)
    lpld_index: dict[str, list] = {}
    written = 0
    bar = progress(total=rs.num_steps, desc="export-sre2l", unit="step")
    try:
        for a, b in rs.shard_rows():
            blk = rs.read_steps(a, b)
            for i in range(b - a):
                e, s = (int(x) for x in blk.step_index[i])
                size = int(blk.step_size[i])
                images = blk.images[i, :size].astype(np.int64)
                if plan is not None:
                    pe, ps, want = next(plan)
                    if (pe, ps) != (e, s) or not np.array_equal(want, images):
                        raise SRe2LFormatError(
                            f"{store_path}: epoch {e} step {s} holds other images than SRe2L's sampler (seed "
                            f"{rs.plan.get('seed', SRE2L_SEED)}) draws, and SRe2L's 6-field files cannot say which: "
                            "export with --layout g-vbsm (the images in a 7th field)")
                fields = [torch.from_numpy(blk.boxes[i, :size].copy()), torch.from_numpy(blk.flips[i, :size].copy())]
                if rs.mix == "none":
                    fields += [None, None, None]
                else:
                    fields += [torch.from_numpy(blk.mix_partner[i, :size].astype(np.int64)),
                               float(blk.mix_lam[i]),  # np.random.beta(a, b) returns a Python float
                               [np.int64(v) for v in blk.mix_box[i]] if rs.mix == "cutmix" else None]
                fields.append(torch.from_numpy(blk.labels[i, :size].copy()))
                if layout == "g-vbsm":
                    fields.append(torch.from_numpy(images))
                folder = os.path.join(out, f"epoch_{e}")
                os.makedirs(folder, exist_ok=True)
                torch.save(fields, os.path.join(folder, f"batch_{s}.tar"))
                lpld_index.setdefault(str(e), []).extend(images.tolist())
                written += 1
                bar.update(1)
    finally:
        bar.close()
    if layout == "lpld":
        with open(os.path.join(out, LPLD_INDEX), "w") as f:
            json.dump(lpld_index, f)
    return ExportReport(out=out, written=written, layout=layout)
