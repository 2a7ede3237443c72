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
    step size), naming the sizes to use; None when they can."""
    B = int(step_sizes[0])
    G = batch * world
    divisors = [d for d in range(world, B + 1, world) if B % d == 0]
    use = ", ".join(str(d // world) for d in divisors[-6:]) or "none: use fewer ranks"
    if G > B or B % G:
        return (f"-b {G} ({batch} per rank x {world} ranks) does not divide the stored step of {B} crops, whose mixing "
                f"pairs crops anywhere in the step; use a per-rank batch whose total divides {B} (per rank: {use})")
    small = [n for n in step_sizes if (n - 1) % G + 1 < world]
    if small:
        return (f"a stored step of {small[0]} crops leaves a last piece of {(small[0] - 1) % G + 1} crops, fewer than "
                f"the {world} ranks; use a per-rank batch from: {use}")
    return None


def step_pieces(size: int, global_batch: int, world: int, rank: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One step's training batches for ``rank``: per piece, (positions this rank trains, every position of the
    piece), positions 0-based in the step. Pieces are ``global_batch`` consecutive positions (the last one shorter);
    each is cut over the ranks as ``np.array_split``."""
    out = []
    for a in range(0, size, global_batch):
        piece = np.arange(a, min(size, a + global_batch))
        out.append((np.array_split(piece, world)[rank], piece))
    return out


@dataclasses.dataclass
class _Piece:
    step: int
    own: np.ndarray  # positions in the step this rank trains
    served: np.ndarray  # the positions decoded: own and their partners, sorted, distinct


class RelabelPlan:
    """What one rank serves in one epoch: its pieces of every step, in stored order (the same count on every rank)."""

    def __init__(self, epoch: int, steps: EpochSteps, batch: int, world: int, rank: int):
        self.epoch, self.steps = epoch, steps
        self.pieces: list[_Piece] = []
        for s in range(steps.num_steps):
            partner = steps.partner[steps.starts[s]:steps.starts[s + 1]]
            for own, _ in step_pieces(steps.step_size(s), batch * world, world, rank):
                served = np.union1d(own, partner[own]).astype(np.int64)
                self.pieces.append(_Piece(s, own, served))
        self.offset = 0  # pieces skipped (a resume inside the epoch)

    @property
    def num_batches(self) -> int:
        return len(self.pieces) - self.offset

    def piece(self, i: int) -> _Piece:
        if i >= self.num_batches:
            raise StopIteration
        return self.pieces[self.offset + i]

    def batch_rows(self, i: int) -> np.ndarray:
        p = self.piece(i)
        return self.steps.rows[self.steps.starts[p.step] + p.served]


class RelabelReader:
    """External source of a relabel store's replay: per piece (:class:`RelabelPlan`) the served positions' paths,
    pixel ROIs (SRe2L's boxes, flip encoded), stored image sizes, and per sample ``partner`` (the index in this
    batch of its partner; -1 for a sample decoded only as a partner), ``lam`` and ``mixbox`` (the step's), the labels
    of the samples it trains (``labels_of(epoch, step, positions)`` -> {name: array}; zeros for partner-only samples),
    target, store row (``index``) and ``crop_ids`` (the position in the step).

    ``steps_of(epoch)`` gives an :class:`EpochSteps`; ``label_specs`` {name: (dtype, trailing shape)}.
    """

    view_params: tuple[str, ...] = ()

    def __init__(self, root: str, files: Sequence[str] | PathTable, targets: Sequence[int], sizes: np.ndarray, *,
                 steps_of: Callable[[int], EpochSteps], stored_step: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0,
                 labels_of: Callable[[int, int, np.ndarray], dict[str, np.ndarray]] | None = None,
                 label_specs: dict[str, tuple[np.dtype, tuple[int, ...]]] | None = None,
                 sizes_of: Callable[[int], np.ndarray] | None = None):
        self.root = root
        self.sizes_of = sizes_of or (lambda e: np.diff(steps_of(e).starts))
        self.paths = ImagePaths(root, files)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int32)
        self.steps_of, self.labels_of = steps_of, labels_of
        self.stored_step, self.train_batch = int(stored_step), int(batch_size)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.label_specs = dict(label_specs or {})
        self.label_names = ("partner", "lam", "mixbox", *self.label_specs)
        specs = [(types.INT64, 0), (types.FLOAT, 0), (types.INT32, 1)]
        specs += [(_dali_type(d), len(t)) for d, t in self.label_specs.values()]
        self.names = ("paths", "roi_start", "roi_end", *self.label_names, "target", "index", "crop_ids", "sizes")
        self.dtypes = (types.UINT8, types.FLOAT, types.FLOAT, *(d for d, _ in specs), types.INT64, types.INT64,
                       types.INT64, types.INT32)
        self.ndims = (1, 2, 2, *(n for _, n in specs), 0, 0, 1, 1)
        self.batch_size = min(self.stored_step, 2 * self.train_batch)  # the most a piece decodes: own + partners
        self.current: RelabelPlan | None = None
        self._selected: tuple[int, ...] | None = None

    def plan(self, epoch: int) -> RelabelPlan:
        return RelabelPlan(epoch, self.steps_of(epoch), self.train_batch, self.world_size, self.rank)

    def start_epoch(self, epoch: int, reset: bool = False, start_batch: int = 0) -> RelabelPlan:
        plan = self.current if self.current is not None and self.current.epoch == epoch else self.plan(epoch)
        if not 0 <= start_batch <= len(plan.pieces):
            raise ValueError(f"start_batch {start_batch} is outside 0..{len(plan.pieces)}")
        plan.offset = start_batch
        self.current = plan
        return plan

    def __len__(self) -> int:
        """Batches of an epoch (the first: a store whose pruning keeps other step counts in other epochs is
        refused by the objective), counted from the step sizes alone (no labels read)."""
        G = self.train_batch * self.world_size
        return int(sum(-(-int(n) // G) for n in self.sizes_of(0)))

    @property
    def num_rows(self) -> int:
        """Crops an epoch serves, all ranks together."""
        return int(np.sum(self.sizes_of(0)))

    def path_of(self, row: int) -> str:
        return self.paths.path_of(row)

    def batch(self, i: int) -> tuple:
        plan = self.current
        p = plan.piece(i)
        st = plan.steps
        at = st.starts[p.step] + p.served
        rows = st.rows[at]
        sizes = self.sizes[rows]
        boxes = pixel_boxes(st.coords[at], sizes).astype(np.float32)
        start, end = roi_from_boxes(boxes[:, None], st.flips[at][:, None])
        where = np.full(st.step_size(p.step), -1, dtype=np.int64)
        where[p.served] = np.arange(len(p.served))
        partner = np.full(len(p.served), -1, dtype=np.int64)
        own_at = where[p.own]
        partner[own_at] = where[st.partner[st.starts[p.step] + p.own]]
        n = len(p.served)
        lam = np.full(n, st.lam[p.step], dtype=np.float32)
        box = np.tile(np.asarray(st.box[p.step], dtype=np.int32), (n, 1))
        labels = []
        if self.label_specs:
            got = self.labels_of(plan.epoch, p.step, p.own)
            for name, (dtype, tail) in self.label_specs.items():
                full = np.zeros((n, *tail), dtype=dtype)
                full[own_at] = got[name]
                labels.append(full)
        return (self.paths.encoded(rows), start, end, partner, lam, box, *labels, self.targets[rows], rows,
                p.served[:, None].copy(), sizes)

    def __call__(self, info: BatchInfo):
        out = self.batch(info.iteration)
        return out if self._selected is None else tuple(out[i] for i in self._selected)

    def nodes(self, names: Sequence[str] | None = None) -> dict:
        return source_nodes(self, names)

    def close(self) -> None:
        pass


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

    def __init__(self, root: str, files, targets, sizes, *, steps_of, stored_step: int, mix: str, batch_size: int,
                 labels_of=None, label_specs=None, crop_size: int = 224, device: str = "gpu", rank: int = 0,
                 world_size: int = 1, seed: int = 0, normalize: bool = True, channels_last: bool = False,
                 num_threads: int | None = None, device_id: int | None = None, prefetch_queue_depth: int = 2,
                 decoder: graphs.DecoderOptions | None = None, refuse: Callable[[np.ndarray], None] | None = None,
                 sizes_of: Callable[[int], np.ndarray] | None = None):
        if mix not in MIX_MODES:
            raise ValueError(f"mix must be one of {', '.join(MIX_MODES)}, got {mix!r}")
        reader = RelabelReader(root, files, targets, sizes, steps_of=steps_of, stored_step=stored_step,
                               batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                               labels_of=labels_of, label_specs=label_specs, sizes_of=sizes_of)
        super().__init__(reader, device=device, num_threads=num_threads, device_id=device_id,
                         prefetch_queue_depth=prefetch_queue_depth, decoder=decoder)
        self.mix, self.crop_size, self.normalize, self.channels_last = mix, crop_size, normalize, channels_last
        self.refuse = refuse
        self.output_names = ("images", *reader.label_names, "targets", "indices", "positions")

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
                    "targets": t["targets"].reshape(-1), "indices": t["indices"].reshape(-1),
                    "positions": t["positions"].reshape(-1)}
        lam = float(t["lam"].reshape(-1)[0])
        box = t["mixbox"].reshape(n, 4)[0].tolist()
        mixed = mix_step(images[own.to(dev)], images[partner[own].to(dev)], self.mix, lam, box)
        return {"images": mixed, **out, **common}


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
