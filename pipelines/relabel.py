"""Replaying a relabel store's steps (SRe2L's dataset-distillation labels): each step's stored crops, and its
stored mixing applied on the device right after the hand-off, so the student sees the pixels the teacher labelled.

SRe2L (VILA-Lab/SRe2L @8d00cba, ``relabel/utils_fkd.py``) stores per step the crop of each image as a normalised
box ``(i, j, h, w)`` (float32: top / height over the image's height, left / width over its width), a flip, and the
step's mix plan: a partner position ``perm[p]`` for every position ``p`` of the step, ``lam`` and, for CutMix, a box
``(bbx1, bby1, bbx2, bby2)`` in crop pixels. Its replay:

* **crop** (``RandomResizedCropWithCoords`` + torchvision's ``resized_crop`` on a PIL image): ``i = c0 * H``,
  ``j = c1 * W``, ``h = c2 * H``, ``w = c3 * W`` in double precision, then PIL's ``Image.crop((j, i, j + w, i + h))``,
  which rounds each end half-to-even (``map(int, map(round, box))``); the pixel box is those rounded ends
  (:func:`labelstore.relabel.pixel_boxes`), resized bilinear (PIL, antialiased) to the crop size, then flipped;
* **mixing** (``mix_aug`` on the normalised batch): CutMix ``x[:, :, bbx1:bbx2, bby1:bby2] = x[perm, :, bbx1:bbx2,
  bby1:bby2]`` (the first pair indexes rows, the second columns), Mixup ``lam * x + (1 - lam) * x[perm]``
  (:func:`mix_step`). Normalisation is affine per channel, so mixing after it is mixing the pixels.

A training batch is a *piece* of a step (:func:`step_pieces`): the step's positions cut into global batches of
``G = batch * world`` (``G`` must divide the stored step size), each cut again over the ranks. A rank decodes the
positions it trains and their partners (once each), mixes on the device, and keeps its own (:class:`RelabelLoader`);
so any rank layout replays the same mixed crops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import nvidia.dali.types as types
import torch
from nvidia.dali.types import BatchInfo

from labelstore import PathTable
from labelstore.relabel import pixel_boxes

from . import graphs
from .errors import LoaderError
from .fkd_reader import roi_from_boxes
from .image_reader import ImagePaths, source_nodes
from .loader import _DaliLoader

MIX_MODES = ("cutmix", "mixup", "none")


def mix_step(images: torch.Tensor, partners: torch.Tensor, mode: str, lam: float, box: Sequence[int]) -> torch.Tensor:
    """SRe2L's ``mix_aug`` replayed: image ``k`` of ``images`` mixed with image ``k`` of ``partners`` (its partner's
    crop, ``x[perm]`` in SRe2L), as a new tensor. CutMix pastes rows ``box[0]:box[2]``, columns ``box[1]:box[3]`` of
    the partner; Mixup blends ``lam * x + (1 - lam) * partner``; ``none`` returns the images."""
    if mode == "none":
        return images
    if mode == "cutmix":
        x1, y1, x2, y2 = (int(v) for v in box)
        out = images.clone()
        out[:, :, x1:x2, y1:y2] = partners[:, :, x1:x2, y1:y2]
        return out
    if mode == "mixup":
        return lam * images + (1 - lam) * partners
    raise ValueError(f"mix mode must be one of {', '.join(MIX_MODES)}, got {mode!r}")


@dataclasses.dataclass
class EpochSteps:
    """One stored epoch's steps, concatenated: ``rows`` (n,) image rows in stored order, step ``s`` at positions
    ``starts[s]:starts[s + 1]``; per position its normalised box ``coords`` (n, 4), ``flips`` (n,) and ``partner``
    (n,: a position inside its own step, 0-based from the step's start); per step ``lam`` (S,) and ``box`` (S, 4)."""

    rows: np.ndarray
    starts: np.ndarray
    coords: np.ndarray
    flips: np.ndarray
    partner: np.ndarray
    lam: np.ndarray
    box: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.starts) - 1

    def step_size(self, s: int) -> int:
        return int(self.starts[s + 1] - self.starts[s])


def batch_refusal(step_sizes: Sequence[int], batch: int, world: int) -> str | None:
    """Why ``batch`` crops per rank on ``world`` ranks cannot replay steps of ``step_sizes`` (the first is the stored
    step size), naming the sizes to use; None when they can. The global batch ``G`` must divide the stored step
    (a step trained as pieces) or be a multiple of it (several whole steps per batch)."""
    B = int(step_sizes[0])
    G = batch * world
    divisors = [d for d in range(world, B + 1, world) if B % d == 0]
    use = ", ".join(str(d // world) for d in divisors[-6:]) or "none: use fewer ranks"
    multiples = ", ".join([str(m * B // world) for m in range(2, 40) if m * B % world == 0][:3])
    if G > B and G % B == 0:
        short = min(int(n) for n in step_sizes)
        if short < world:
            return (f"a stored step of {short} crops is fewer than the {world} ranks (a batch may hold it alone); use "
                    "fewer ranks")
        return None
    if G > B or B % G:
        return (f"-b {G} ({batch} per rank x {world} ranks) neither divides the stored step of {B} crops, whose "
                f"mixing pairs crops anywhere in the step, nor is a multiple of it (whole steps per batch); use a "
                f"per-rank batch whose total divides {B} (per rank: {use}) or is a multiple of it (per rank: "
                f"{multiples or 'none'})")
    small = [n for n in step_sizes if (n - 1) % G + 1 < world]
    if small:
        return (f"a stored step of {small[0]} crops leaves a last piece of {(small[0] - 1) % G + 1} crops, fewer than "
                f"the {world} ranks; use a per-rank batch from: {use}")
    return None


def step_pieces(size: int, global_batch: int, world: int, rank: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One step's training batches for ``rank`` (``global_batch`` <= the step): per piece, (positions this rank
    trains, every position of the piece), positions 0-based in the step. Pieces are ``global_batch`` consecutive
    positions (the last one shorter); each is cut over the ranks as ``np.array_split``."""
    out = []
    for a in range(0, size, global_batch):
        piece = np.arange(a, min(size, a + global_batch))
        out.append((np.array_split(piece, world)[rank], piece))
    return out


def epoch_pieces(sizes: Sequence[int], global_batch: int, world: int, rank: int,
                 stored_step: int | None = None) -> list[list[tuple[int, np.ndarray]]]:
    """An epoch's training batches for ``rank``, the epoch being steps of ``sizes`` in training order: per batch, its
    parts ``(step t, positions of step t this rank trains)``. A global batch up to the stored step (default: the
    largest of ``sizes``) cuts each step into pieces (:func:`step_pieces`); a multiple ``k`` of it takes ``k`` whole
    consecutive steps (fewer at the epoch's end), their positions concatenated and cut over the ranks as
    ``np.array_split``: each step's mixing stays inside its own step."""
    sizes = [int(n) for n in sizes]
    B = int(stored_step) if stored_step else (max(sizes) if sizes else 1)
    out = []
    if global_batch <= B:
        for t, n in enumerate(sizes):
            out += [[(t, own)] for own, _ in step_pieces(n, global_batch, world, rank)]
        return out
    k = global_batch // B
    for g in range(0, len(sizes), k):
        steps = np.concatenate([np.full(sizes[t], t) for t in range(g, min(len(sizes), g + k))])
        pos = np.concatenate([np.arange(sizes[t]) for t in range(g, min(len(sizes), g + k))])
        mine = np.array_split(np.arange(len(pos)), world)[rank]
        out.append([(int(t), pos[mine][steps[mine] == t]) for t in np.unique(steps[mine])])
    return out


@dataclasses.dataclass
class StepData:
    """One step as the reader serves it: per position (n = the step's size) the image ``rows``, normalised boxes
    ``coords`` (n, 4), ``flips``, ``partner`` (a position of the same step), the labels by name (n, ...; may be
    empty); the step's ``lam`` and CutMix ``box`` (4,)."""

    rows: np.ndarray
    coords: np.ndarray
    flips: np.ndarray
    partner: np.ndarray
    lam: float
    box: np.ndarray
    labels: dict[str, np.ndarray]


class EpochStepsSource:
    """Steps from whole epochs held in memory (:class:`EpochSteps` by epoch: generation, which plans a shard at a
    time, and tests): ``sizes(epoch)`` of the steps in order, ``step(epoch, t)``."""

    def __init__(self, steps_of: Callable[[int], EpochSteps],
                 labels_of: Callable[[int, int, np.ndarray], dict[str, np.ndarray]] | None = None,
                 sizes_of: Callable[[int], np.ndarray] | None = None):
        self.steps_of, self.labels_of = steps_of, labels_of
        self.sizes_of = sizes_of or (lambda e: np.diff(steps_of(e).starts))
        self._held: tuple[int, EpochSteps] | None = None

    def sizes(self, epoch: int) -> np.ndarray:
        return np.asarray(self.sizes_of(epoch), dtype=np.int64)

    def step(self, epoch: int, t: int) -> StepData:
        if self._held is None or self._held[0] != epoch:
            self._held = (epoch, self.steps_of(epoch))
        st = self._held[1]
        a, b = int(st.starts[t]), int(st.starts[t + 1])
        labels = self.labels_of(epoch, t, np.arange(b - a)) if self.labels_of is not None else {}
        return StepData(st.rows[a:b], st.coords[a:b], st.flips[a:b], st.partner[a:b], float(st.lam[t]),
                        np.asarray(st.box[t]), labels)

    def close(self) -> None:
        self._held = None


@dataclasses.dataclass
class _Part:
    step: int  # the step's index in the epoch's training order
    own: np.ndarray  # positions in the step this rank trains


class RelabelPlan:
    """What one rank serves in one epoch: its batches (:func:`epoch_pieces`) over the epoch's steps in training
    order (the same count on every rank); nothing of the steps but their sizes is read to plan it."""

    def __init__(self, epoch: int, sizes: np.ndarray, batch: int, world: int, rank: int,
                 stored_step: int | None = None):
        self.epoch, self.sizes = epoch, np.asarray(sizes, dtype=np.int64)
        self.pieces = [[_Part(t, own) for t, own in parts if len(own)]
                       for parts in epoch_pieces(self.sizes, batch * world, world, rank, stored_step)]
        self.offset = 0  # pieces skipped (a resume inside the epoch)

    @property
    def num_batches(self) -> int:
        return len(self.pieces) - self.offset

    def piece(self, i: int) -> list[_Part]:
        if i >= self.num_batches:
            raise StopIteration
        return self.pieces[self.offset + i]


class RelabelReader:
    """External source of a relabel store's replay: per batch (:class:`RelabelPlan`: parts of one or more steps) the
    served positions' paths, pixel ROIs (SRe2L's boxes, flip encoded), stored image sizes, and per sample
    ``partner`` (the index in this batch of its partner; -1 for a sample decoded only as a partner), ``lam`` and
    ``mixbox`` (its step's), ``part`` (which part of the batch: samples of one step share it), the labels of the
    samples it trains (zeros for partner-only samples), target, store row (``index``) and ``crop_ids`` (the
    position in the step).

    The steps come from ``source`` (``sizes(epoch)``, ``step(epoch, t)`` -> :class:`StepData`; e.g.
    :class:`pipelines.relabel_steps.StepWindow`, which reads a few steps ahead), or from whole epochs
    (``steps_of``, ``labels_of``, ``sizes_of``: :class:`EpochStepsSource`). ``label_specs`` {name: (dtype,
    trailing shape)}.
    """

    view_params: tuple[str, ...] = ()

    def __init__(self, root: str, files: Sequence[str] | PathTable, targets: Sequence[int], sizes: np.ndarray, *,
                 steps_of: Callable[[int], EpochSteps] | None = None, stored_step: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0,
                 labels_of: Callable[[int, int, np.ndarray], dict[str, np.ndarray]] | None = None,
                 label_specs: dict[str, tuple[np.dtype, tuple[int, ...]]] | None = None,
                 sizes_of: Callable[[int], np.ndarray] | None = None, source=None):
        self.root = root
        self.source = source if source is not None else EpochStepsSource(steps_of, labels_of, sizes_of)
        self.paths = ImagePaths(root, files)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int32)
        self.stored_step, self.train_batch = int(stored_step), int(batch_size)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.label_specs = dict(label_specs or {})
        self.label_names = ("partner", "lam", "mixbox", "part", *self.label_specs)
        specs = [(types.INT64, 0), (types.FLOAT, 0), (types.INT32, 1), (types.INT64, 0)]
        specs += [(_dali_type(d), len(t)) for d, t in self.label_specs.values()]
        self.names = ("paths", "roi_start", "roi_end", *self.label_names, "target", "index", "crop_ids", "sizes")
        self.dtypes = (types.UINT8, types.FLOAT, types.FLOAT, *(d for d, _ in specs), types.INT64, types.INT64,
                       types.INT64, types.INT32)
        self.ndims = (1, 2, 2, *(n for _, n in specs), 0, 0, 1, 1)
        G = self.train_batch * world_size
        # the most a batch decodes: its own crops and their partners, inside its step(s)
        self.batch_size = min(max(self.stored_step, G), 2 * self.train_batch)
        self.current: RelabelPlan | None = None
        self._selected: tuple[int, ...] | None = None

    def plan(self, epoch: int) -> RelabelPlan:
        return RelabelPlan(epoch, self.source.sizes(epoch), self.train_batch, self.world_size, self.rank,
                           self.stored_step)

    def start_epoch(self, epoch: int, reset: bool = False, start_batch: int = 0) -> RelabelPlan:
        plan = self.current if self.current is not None and self.current.epoch == epoch else self.plan(epoch)
        if not 0 <= start_batch <= len(plan.pieces):
            raise ValueError(f"start_batch {start_batch} is outside 0..{len(plan.pieces)}")
        plan.offset = start_batch
        self.current = plan
        return plan

    def __len__(self) -> int:
        """Batches of an epoch (every epoch trains as many: the first's), counted from the step sizes alone."""
        G = self.train_batch * self.world_size
        sizes = self.source.sizes(0)
        if G > self.stored_step:
            return -(-len(sizes) // (G // self.stored_step))
        return int(sum(-(-int(n) // G) for n in sizes))

    @property
    def num_rows(self) -> int:
        """Crops an epoch serves, all ranks together."""
        return int(np.sum(self.source.sizes(0)))

    def path_of(self, row: int) -> str:
        return self.paths.path_of(row)

    def _part(self, epoch: int, part: _Part) -> tuple:
        st = self.source.step(epoch, part.step)
        served = np.union1d(part.own, st.partner[part.own]).astype(np.int64)
        where = np.full(len(st.rows), -1, dtype=np.int64)
        where[served] = np.arange(len(served))
        partner = np.full(len(served), -1, dtype=np.int64)
        own_at = where[part.own]
        partner[own_at] = where[st.partner[part.own]]
        return st, served, own_at, partner

    def batch(self, i: int) -> tuple:
        plan = self.current
        cols: dict[str, list] = {k: [] for k in ("rows", "coords", "flips", "partner", "lam", "box", "part", "pos",
                                                 *self.label_specs)}
        base = 0
        for k, part in enumerate(plan.piece(i)):
            st, served, own_at, partner = self._part(plan.epoch, part)
            n = len(served)
            cols["rows"].append(st.rows[served])
            cols["coords"].append(st.coords[served])
            cols["flips"].append(st.flips[served])
            cols["partner"].append(np.where(partner >= 0, partner + base, -1))
            cols["lam"].append(np.full(n, st.lam, dtype=np.float32))
            cols["box"].append(np.tile(np.asarray(st.box, dtype=np.int32), (n, 1)))
            cols["part"].append(np.full(n, k, dtype=np.int64))
            cols["pos"].append(served)
            for name, (dtype, tail) in self.label_specs.items():
                full = np.zeros((n, *tail), dtype=dtype)
                full[own_at] = st.labels[name][part.own]
                cols[name].append(full)
            base += n
        c = {k: np.concatenate(v) for k, v in cols.items()}
        rows = c["rows"].astype(np.int64)
        sizes = self.sizes[rows]
        boxes = pixel_boxes(c["coords"], sizes).astype(np.float32)
        self._check_boxes(rows, boxes, sizes)
        start, end = roi_from_boxes(boxes[:, None], c["flips"][:, None])
        return (self.paths.encoded(rows), start, end, c["partner"], c["lam"], c["box"], c["part"],
                *(c[name] for name in self.label_specs), self.targets[rows], rows, c["pos"][:, None].copy(), sizes)

    def _check_boxes(self, rows: np.ndarray, boxes: np.ndarray, sizes: np.ndarray) -> None:
        """Each crop at least 1 px high and wide and inside its image (a damaged or crafted store's normalised
        box can round to an empty or outside crop)."""
        top, left, h, w = boxes.T
        bad = np.flatnonzero((h < 1) | (w < 1) | (top < 0) | (left < 0) | (top + h > sizes[:, 0]) |
                             (left + w > sizes[:, 1]))
        if bad.size:
            k = bad[0]
            raise LoaderError(f"{self.paths.path_of(rows[k])}: its stored crop is {int(h[k])}x{int(w[k])} px at "
                              f"({int(top[k])}, {int(left[k])}) in an image of {int(sizes[k, 0])}x{int(sizes[k, 1])} "
                              f"px ({bad.size} such crops in this batch); a crop must be at least 1x1 px and inside "
                              "the image. The label store is damaged or was crafted: regenerate it")

    def __call__(self, info: BatchInfo):
        out = self.batch(info.iteration)
        return out if self._selected is None else tuple(out[i] for i in self._selected)

    def nodes(self, names: Sequence[str] | None = None) -> dict:
        return source_nodes(self, names)

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if close is not None:
            close()


def _dali_type(dtype) -> types.DALIDataType:
    return {"int16": types.INT16, "int32": types.INT32, "int64": types.INT64, "float16": types.FLOAT16,
            "float32": types.FLOAT}[np.dtype(dtype).name]


class RelabelLoader(_DaliLoader):
    """Replays a relabel store's steps: per batch (a piece of a step, :class:`RelabelPlan`) the crops this rank
    trains, mixed with their partners exactly as the stored plan says, on the pipeline's device.

    Yields ``images`` (b, 3, S, S) normalised float32 (or uint8 RGB with ``normalize=False``: mixing is then left
    to the caller, ``partner``/``lam``/``mixbox`` given), the labels named in ``label_specs`` (as stored),
    ``targets``, ``indices`` (store rows), ``positions`` (in the step). ``set_epoch(e)`` picks the stored epoch.
    """

    def __init__(self, root: str, files, targets, sizes, *, steps_of=None, stored_step: int, mix: str, batch_size: int,
                 labels_of=None, label_specs=None, crop_size: int = 224, device: str = "gpu", rank: int = 0,
                 world_size: int = 1, seed: int = 0, normalize: bool = True, channels_last: bool = False,
                 num_threads: int | None = None, device_id: int | None = None, prefetch_queue_depth: int = 2,
                 decoder: graphs.DecoderOptions | None = None, refuse: Callable[[np.ndarray], None] | None = None,
                 sizes_of: Callable[[int], np.ndarray] | None = None, source=None):
        if mix not in MIX_MODES:
            raise ValueError(f"mix must be one of {', '.join(MIX_MODES)}, got {mix!r}")
        reader = RelabelReader(root, files, targets, sizes, steps_of=steps_of, stored_step=stored_step,
                               batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                               labels_of=labels_of, label_specs=label_specs, sizes_of=sizes_of, source=source)
        super().__init__(reader, device=device, num_threads=num_threads, device_id=device_id,
                         prefetch_queue_depth=prefetch_queue_depth, decoder=decoder)
        self.mix, self.crop_size, self.normalize, self.channels_last = mix, crop_size, normalize, channels_last
        self.refuse = refuse
        self.output_names = ("images", *reader.label_names, "targets", "indices", "positions")

    def close(self) -> None:
        super().close()
        self.reader.close()

    def _new_pipeline(self):
        return graphs.fkd_pipeline(self.reader, num_crops=1, size=self.crop_size, device=self.device,
                                   normalize=self.normalize, channels_last=self.channels_last, decoder=self.decoder,
                                   labels_on_device=False, **self._pipeline_args())

    def _check(self, outputs) -> None:
        fits = np.asarray(outputs[-1].as_tensor()).reshape(-1)
        if fits.all():
            return
        index = np.asarray(outputs[self.output_names.index("indices")].as_cpu().as_tensor()).reshape(-1)
        rows = index[~fits]
        if self.refuse is not None:
            self.refuse(rows)
        raise LoaderError(f"the images {[self.reader.path_of(r) for r in rows[:5]]} are not the size their crops "
                          "were stored for; restore the original files or relabel the images as they are now")

    def _convert(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, S = t["images"], self.crop_size
        n = images.shape[0]
        images = images.view(n, S, S, 3).permute(0, 3, 1, 2) if self.channels_last else images.view(n, 3, S, S)
        partner = t["partner"].reshape(n).long()  # host tensors: the plan's small per-sample values
        own = torch.nonzero(partner >= 0).reshape(-1)
        dev = images.device
        out = {k: t[k][own].to(dev, non_blocking=True) for k in self.reader.label_specs}
        common = {"targets": t["targets"].reshape(-1)[own].to(dev), "indices": t["indices"].reshape(-1)[own].to(dev),
                  "positions": t["positions"].reshape(-1)[own].to(dev)}
        if not self.normalize:  # uint8 pixels: the served batch as it is, with its plan (mixing is the caller's)
            return {"images": images, **{k: t[k][:].reshape(n, -1) for k in self.reader.label_specs},
                    "partner": partner, "lam": t["lam"].reshape(n), "mixbox": t["mixbox"].reshape(n, 4),
                    "part": t["part"].reshape(n), "targets": t["targets"].reshape(-1),
                    "indices": t["indices"].reshape(-1), "positions": t["positions"].reshape(-1)}
        part = t["part"].reshape(n)[own]
        lams, boxes = t["lam"].reshape(n), t["mixbox"].reshape(n, 4)
        mixed = []
        for k in torch.unique_consecutive(part).tolist():  # a batch of whole steps: each step mixed by its plan
            sel = own[part == k]
            first = int(sel[0])
            mixed.append(mix_step(images[sel.to(dev)], images[partner[sel].to(dev)], self.mix, float(lams[first]),
                                  boxes[first].tolist()))
        return {"images": mixed[0] if len(mixed) == 1 else torch.cat(mixed), **out, **common}


class StoreSteps:
    """A relabel store (``labelstore.relabel.RelabelStore``) as the loader's ``steps_of`` / ``labels_of``: stored
    epoch ``e``'s kept steps, read as one contiguous block of rows when the epoch is planned (boxes, flips, plan and
    labels; an epoch's labels are held while it trains: steps x batch x label width), labels served by position.
    ``labels=False``: only the plan (generation, before the labels exist)."""

    def __init__(self, store, labels: bool = True):
        self.store = store
        self.with_labels = labels
        self.label_specs = {}
        if labels:
            arr = store.store
            self.label_specs = {n: (arr.array(n).dtype, tuple(arr.array(n).shape[2:])) for n in store.label_arrays}
        self._held: tuple[int, dict[str, np.ndarray]] | None = None

    def rows(self, epoch: int) -> tuple[int, int]:
        a, b = self.store.rows_of_epoch(epoch)
        if a == b:
            raise LoaderError(f"{self.store.path}: epoch {epoch} has no kept step (pruned away); train fewer epochs "
                              f"or on a store that keeps steps of every epoch")
        return a, b

    def sizes_of(self, epoch: int) -> np.ndarray:
        a, b = self.rows(epoch)
        return np.asarray(self.store.step_sizes[a:b], dtype=np.int64)

    def steps_of(self, epoch: int) -> EpochSteps:
        a, b = self.rows(epoch)
        blk = self.store.read_steps(a, b)
        sizes = np.asarray(blk.step_size, dtype=np.int64)
        used = np.arange(self.store.batch_size)[None, :] < sizes[:, None]
        self._held = (epoch, {n: blk.arrays[n] for n in self.label_specs})
        return EpochSteps(rows=blk.images[used].astype(np.int64), starts=np.concatenate([[0], np.cumsum(sizes)]),
                          coords=blk.boxes[used], flips=blk.flips[used], partner=blk.mix_partner[used].astype(np.int64),
                          lam=np.asarray(blk.mix_lam), box=np.asarray(blk.mix_box))

    def labels_of(self, epoch: int, step: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        key, held = self._held
        if key != epoch:  # pragma: no cover - the reader plans an epoch before serving it
            raise LoaderError(f"labels of epoch {epoch} asked while epoch {key} is held")
        return {n: v[step][positions] for n, v in held.items()}
