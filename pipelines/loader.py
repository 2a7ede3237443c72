"""Loaders: a reader (epoch plan + external source) and a DALI pipeline, yielding dicts of torch tensors.

``FKDLoader`` replays stored crops with their soft labels; ``EvalLoader`` is the validation view;
``StandardLoader`` is the usual random-resized-crop DALI pipeline with hard labels (the baseline and
``--labels hard``). All three shard like DistributedSampler and deliver the last partial batch unless
``drop_last``.

Outputs reach torch without a host round trip: each DALI output is wrapped with DLPack (zero copy) on
the pipeline's device, so on a GPU the crops never leave it before the model.

How long a batch's tensors stay valid (GPU): as long as any Python reference to them (or to a view of
them) lives; tensors kept across later batches stay unchanged. The batch is handed over on the CUDA stream
that is current in torch when the batch is taken (``next(iter(loader))``, :mod:`pipelines.handoff`): DALI's
work is ordered before that stream's next kernels, with no host synchronisation per batch. Kernels on
another stream must wait for that one first (``s.wait_stream(torch.cuda.current_stream())``). Dropping the
last reference while kernels that read the batch are still queued is safe: DALI frees the memory only after
a device synchronisation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from labelstore import LabelStore, PathTable

from . import graphs, handoff
from .dali_install import check_gpu_build
from .errors import LoaderError, probe_image
from .fkd_reader import FKDReader, refuse_resized
from .image_reader import ImageReader
from .order import EpochPlan
from .round_reads import RoundReads
from .view_reader import Draw, FreshViewReader


def default_threads() -> int:
    """CPU threads for one pipeline: the cores this process may run on, shared by the ranks on this node
    (LOCAL_WORLD_SIZE) unless the rank was pinned to cores of its own (``FKD_RANK_CPUS``, set by
    ``fkd_dali.affinity``), which it then uses alone."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    if os.environ.get("FKD_RANK_CPUS"):
        return max(1, cpus)
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _device(device: str) -> str:
    device = {"cuda": "gpu"}.get(device, device)
    graphs.devices(device)  # validates the name
    if device == "gpu":
        if not torch.cuda.is_available():
            raise LoaderError("device='gpu' was asked for but torch sees no CUDA device; use device='cpu' "
                              "(DALI's CPU backend runs the same pipeline)")
        check_gpu_build()
    return device


MAX_LOADER_STATE_BYTES = 64 << 20  # a DALI checkpoint holds a few KB of generator state per sample and operator


def check_loader_state(state: object) -> str | None:
    """Why ``state`` (from an untrusted checkpoint) cannot be a loader's :meth:`~_DaliLoader.state`, or None when
    it can: its fields, types and sizes are checked before DALI parses the pipeline part."""
    if not isinstance(state, dict) or set(state) != {"pipeline", "epoch", "offset", "batch", "at_end"}:
        return "it is not a loader state (pipeline, epoch, offset, batch, at_end)"
    if not isinstance(state["pipeline"], bytes) or not 0 < len(state["pipeline"]) <= MAX_LOADER_STATE_BYTES:
        return f"its pipeline state is not 1 B to {MAX_LOADER_STATE_BYTES >> 20} MiB of bytes"
    if not all(isinstance(state[k], int) and not isinstance(state[k], bool) and 0 <= state[k] < 1 << 40
               for k in ("epoch", "offset", "batch")) or state["offset"] > state["batch"]:
        return "its epoch, offset and batch are not a position in an epoch"
    if not isinstance(state["at_end"], bool):
        return "its at_end flag is not a bool"
    return None


class _DaliLoader:
    """Pipeline lifecycle and the epoch loop shared by the loaders.

    A loader whose pipeline draws random numbers (``random_state``: StandardLoader's random crops and flips)
    keeps them reproducible across a stop: :meth:`state` is DALI's checkpoint of the pipeline (its random
    generators; ``enable_checkpointing``) with the batch it is at, :meth:`restore` makes the next pipeline built
    go on from there, and a pipeline released between epochs keeps its state the same way. A resumed training
    run therefore sees the crops an uninterrupted one would have seen. Loaders that replay stored crops have no
    random state: their batches are a function of (seed, epoch, rank) alone.
    """

    output_names: tuple[str, ...] = ()
    random_state: bool = False

    def __init__(self, reader: ImageReader, *, device: str, num_threads: int | None, device_id: int | None,
                 prefetch_queue_depth: int, decoder: graphs.DecoderOptions | None = None):
        self.reader = reader
        self.device = _device(device)
        self.decoder = decoder or graphs.DEFAULT_DECODER
        self.num_threads = num_threads or default_threads()
        if self.device == "gpu":
            self.device_id = torch.cuda.current_device() if device_id is None else device_id
        else:
            self.device_id = None
        self.prefetch_queue_depth = prefetch_queue_depth
        self.epoch = 0
        self.start_batch = 0
        self._pipe = None
        self._at_boundary = False  # the built pipeline has finished an epoch: a reset is enough
        self._kept: dict | None = None  # random state for the next pipeline built (restore / release)
        self._checkpoint: bytes | None = None  # DALI checkpoint the next _new_pipeline() starts from
        # (epoch, plan rows skipped when its pipeline epoch began, next batch of the epoch's plan)
        self._position = (0, 0, 0)

    @property
    def batch_size(self) -> int:
        return self.reader.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch: a new permutation (and, for FKD, the next round of stored crops). ``start_batch``
        skips that many batches of it (resuming inside an epoch); it applies to the next iteration only."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def plan(self, epoch: int | None = None) -> EpochPlan:
        return self.reader.plan(self.epoch if epoch is None else epoch)

    def __len__(self) -> int:
        """Steps per epoch (identical on every rank)."""
        return len(self.reader)

    def _new_pipeline(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _convert(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _pipeline_args(self) -> dict:
        args = dict(batch_size=self.reader.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                    prefetch_queue_depth=self.prefetch_queue_depth,
                    seed=self.reader.seed + 1000 * self.reader.rank, exec_dynamic=True)
        if self.random_state:
            args["enable_checkpointing"] = True
            if self._checkpoint is not None:
                args["checkpoint"], self._checkpoint = self._checkpoint, None
        return args

    # ------------------------------------------------------------------ random state across a stop
    def state(self) -> dict | None:
        """What a training checkpoint keeps of this loader so that a resumed run draws the same random crops: the
        pipeline's DALI checkpoint and where it is (epoch, batch). None without random state, or before the
        loader first ran (a new loader then starts where this one would have)."""
        if not self.random_state:
            return None
        if self._pipe is None:
            return self._kept
        epoch, offset, batch = self._position
        return {"pipeline": self._pipe.checkpoint(), "epoch": epoch, "offset": offset, "batch": batch,
                "at_end": self._at_boundary}

    def restore(self, state: dict | None) -> None:
        """Go on from ``state`` (:meth:`state` of a loader like this one, e.g. from a checkpoint): the next
        iteration builds its pipeline from it. It applies when that iteration starts the epoch after the one
        the state ended, or continues that epoch at its batch (``set_epoch(epoch, start_batch)``)."""
        if state is not None and not self.random_state:
            raise LoaderError(f"{type(self).__name__} has no random state to restore")
        why = None if state is None else check_loader_state(state)
        if why:
            raise LoaderError(f"cannot restore {type(self).__name__} from this state: {why}")
        self.release(keep_state=False)
        self._kept = state

    def _build(self, checkpoint: bytes | None = None):
        self._checkpoint = checkpoint
        pipe = self._new_pipeline()
        pipe.build()
        return pipe

    def _at_epoch_end(self, kept: dict):
        """A pipeline restored from ``kept``, taken at the end of an epoch, brought to that end again (it reads
        its end-of-epoch marker), so that the next epoch starts with a reset as in the run that saved it."""
        self.reader.start_epoch(kept["epoch"], reset=True, start_batch=kept["offset"])
        pipe = self._build(kept["pipeline"])
        pipe.schedule_run()
        try:
            handoff.take(pipe, self.device, self.device_id)
        except StopIteration:
            self._at_boundary = True
            return pipe
        raise LoaderError(f"a pipeline restored at the end of epoch {kept['epoch']} went on past it; the saved "
                          "loader state does not belong to this loader (other data, batch size or rank?)")

    def _check(self, outputs) -> None:
        """Refuse a batch before it is handed out (raise naming the file); the FKD loader's images' sizes."""

    def _to_torch(self, outputs) -> dict[str, torch.Tensor]:
        """Each output named in ``output_names`` as a torch tensor over DALI's own memory (DLPack, zero copy);
        outputs after those (the FKD graph's ``fits`` flags) are for :meth:`_check` only."""
        return {name: handoff.to_torch(tl, self.device, self.device_id)
                for name, tl in zip(self.output_names, outputs)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start, self.start_batch = self.start_batch, 0
        kept, self._kept = self._kept, None
        first, offset = 0, start
        if self._pipe is None and kept is not None and kept["at_end"]:
            self._pipe = self._at_epoch_end(kept)
        if self._pipe is None and kept is not None and (kept["epoch"], kept["batch"]) == (self.epoch, start):
            # the restored pipeline goes on with this batch of the epoch, in the plan as it was sliced then
            offset = kept["offset"]
            plan = self.reader.start_epoch(self.epoch, reset=True, start_batch=offset)
            self._pipe = self._build(kept["pipeline"])
            first = start - offset
        else:
            plan = self.reader.start_epoch(self.epoch, reset=True, start_batch=start)
            if self._pipe is not None and self._at_boundary:
                self._pipe.reset()
            else:  # first epoch, or the last one was abandoned half way / failed: start afresh
                self._pipe = self._build()
        pipe = self._pipe
        self._at_boundary = False
        self._position = (self.epoch, offset, offset + first)
        pipe.schedule_run()
        for i in range(first, plan.num_batches):
            try:
                outputs = handoff.take(pipe, self.device, self.device_id)
            except StopIteration:
                self._pipe = None
                raise LoaderError(f"the pipeline ended after {i} of {plan.num_batches} batches") from None
            except RuntimeError as e:
                self._pipe = None
                raise self._explain(e, plan, i) from e
            try:
                self._check(outputs)
            except Exception:
                self._pipe = None
                raise
            tensors = self._to_torch(outputs)
            pipe.release_outputs()
            pipe.schedule_run()
            self._position = (self.epoch, offset, offset + i + 1)
            yield self._convert(tensors)
        try:
            handoff.take(pipe, self.device, self.device_id)
        except StopIteration:
            self._at_boundary = True
        except RuntimeError:
            self._pipe = None  # a read-ahead past the end failed; the next epoch rebuilds
        else:  # pragma: no cover - the reader always ends the epoch
            self._pipe = None

    def _explain(self, err: RuntimeError, plan: EpochPlan, i: int) -> Exception:
        """DALI's error as one that names the file (read-ahead means it is in this batch or the next few)."""
        msg = str(err)
        m = re.search(r"File mapping failed: (.+?)(?:\s*C\+\+ context|$)", msg, flags=re.S)
        if m:
            path = m.group(1).strip()
            reason = probe_image(path) or "it cannot be read"
            return LoaderError(f"{path}: {reason}. Restore or remove the file (a removed file needs a new "
                               "label store: the dataset fingerprint no longer matches)")
        for j in range(i, min(plan.num_batches, i + self.prefetch_queue_depth + 1)):
            for r in plan.batch_rows(j):
                path = self.reader.path_of(r)
                reason = probe_image(path)
                if reason:
                    return LoaderError(f"{path}: {reason}. Replace the file with a valid image, or regenerate "
                                       "the labels with --skip-corrupt so that it is left out")
        last = msg.strip().splitlines()[-1] if msg.strip() else type(err).__name__
        return LoaderError(f"DALI failed on batch {i} of epoch {plan.epoch} ({last}); every file of the batch "
                           f"decodes with Pillow, so the cause is not a corrupt image. Full error: {msg[:2000]}")

    def release(self, keep_state: bool = True) -> None:
        """Free the pipeline (its threads, decoder state and buffers) while the loader is not in use; the next
        iteration builds it again (a fraction of a second), going on with its random state unless ``keep_state``
        is False. Batches already taken stay valid."""
        if self._pipe is None:
            return
        if self.random_state and keep_state:
            self._kept = self.state()  # the next pipeline built goes on drawing where this one stopped
        self._pipe = None
        self._at_boundary = False
        import gc

        from nvidia.dali.backend import ReleaseUnusedMemory
        gc.collect()  # a DALI pipeline sits in reference cycles: free it now, not at some later collection
        ReleaseUnusedMemory()  # and hand DALI's pooled (device / pinned) memory back

    def close(self) -> None:
        self.release(keep_state=False)


def _check_dtype(dtype: str) -> None:
    if dtype not in ("float32", "float16", "bfloat16", "uint8"):
        raise ValueError(f"dtype must be float32, float16, bfloat16 or uint8, got {dtype!r}")


class FKDLoader(_DaliLoader):
    """Replays the stored crops of a label store, each with its stored soft label.

    >>> loader = FKDLoader(data="DATA/train", store="STORE", batch_size=B, num_crops=n, crop_size=S,
    ...                    device="cpu", rank=0, world_size=1, seed=0, normalize=True)
    >>> loader.set_epoch(p)               # pass p over the images: new permutation, its round of crops
    >>> for batch in loader: ...          # images (B*n, 3, S, S), topk_idx, topk_val (B*n, k),
    ...                                   # targets, indices (store row), crop_ids (pool column), (B*n,)

    The store's kind decides the labels: a top-k store gives ``topk_idx`` (int64) and ``topk_val`` (float32); an
    embedding store gives ``embedding`` (B*n, D) float32 instead, and its images are the stored self-supervised
    views (crop, flip, colour jitter, grayscale, blur: ``graphs.ssl_crops``, the graph generation ran).

    One loader epoch is one *pass* over the images (FKD counts it as ``num_crops`` epochs): ``set_epoch``
    takes the pass index 0, 1, 2, ..., which picks the round of stored crops (each once before any repeats).
    ``files`` and ``targets``: the dataset scan's paths and classes, already checked against the store (saves
    reading the store's ``files`` and ``targets`` and a stat per file). ``reads``: a
    :class:`~pipelines.round_reads.RoundReads` of this store and these settings whose first pass's read started
    earlier (the FKD objective starts it before the dataset scan).
    Crops of one image are adjacent. ``batch_size`` counts images; a batch
    holds ``batch_size * n`` crops.
    ``dtype``: float32 / float16 / bfloat16 (DALI 2.4 has no bfloat16: cast from float32 on the device) /
    uint8 (no normalisation, RGB). ``channels_last`` gives NCHW tensors with channels-last strides.
    """

    def __init__(self, data: str, store: str | LabelStore, batch_size: int, num_crops: int = 4,
                 crop_size: int = 224, device: str = "gpu", rank: int = 0, world_size: int = 1, seed: int = 0,
                 normalize: bool = True, dtype: str = "float32", channels_last: bool = False,
                 mean: Sequence[float] = graphs.IMAGENET_MEAN, std: Sequence[float] = graphs.IMAGENET_STD,
                 interp: str = "bilinear", shuffle: bool = True, drop_last: bool = False,
                 allow_incomplete: bool = False, verify_files: bool = True, num_threads: int | None = None,
                 device_id: int | None = None, prefetch_queue_depth: int = 2,
                 decoder: graphs.DecoderOptions | None = None,
                 files: Sequence[str] | PathTable | None = None, targets: Sequence[int] | None = None,
                 reads: RoundReads | None = None):
        _check_dtype(dtype)
        reader = FKDReader(data, store, num_crops=num_crops, batch_size=batch_size, seed=seed, rank=rank,
                           world_size=world_size, shuffle=shuffle, drop_last=drop_last,
                           allow_incomplete=allow_incomplete, verify_files=verify_files, files=files, targets=targets,
                           reads=reads)
        super().__init__(reader, device=device, num_threads=num_threads, device_id=device_id,
                         prefetch_queue_depth=prefetch_queue_depth, decoder=decoder)
        self.store = reader.store
        self.output_names = ("images", *reader.label_names, "targets", "indices", "crop_ids")
        self._view_settings(num_crops, crop_size, normalize, dtype, channels_last, mean, std, interp)

    def _view_settings(self, num_crops, crop_size, normalize, dtype, channels_last, mean, std, interp) -> None:
        """What the replay graph makes of each view (this loader's and FreshViewLoader's)."""
        self.num_crops, self.crop_size = num_crops, crop_size
        self.normalize = normalize and dtype != "uint8"
        self.dtype, self.channels_last = dtype, channels_last
        self.mean, self.std, self.interp = tuple(mean), tuple(std), interp

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    @property
    def num_rounds(self) -> int:
        return self.reader.num_rounds

    def round_of(self, pass_index: int) -> int:
        return self.reader.round_of(pass_index)

    def _new_pipeline(self):
        return graphs.fkd_pipeline(
            self.reader, num_crops=self.num_crops, size=self.crop_size, device=self.device,
            normalize=self.normalize, dtype="float32" if self.dtype == "bfloat16" else self.dtype,
            channels_last=self.channels_last, mean=self.mean, std=self.std, interp=self.interp,
            decoder=self.decoder, **self._pipeline_args())

    def _check(self, outputs) -> None:
        """Every image of the batch has the size its boxes were stored for (the graph compared its header with the
        stored size, :func:`graphs.fit_rois`); otherwise the batch is refused naming the files."""
        fits = np.asarray(outputs[-1].as_tensor())
        if fits.all():
            return
        index = np.asarray(outputs[self.output_names.index("indices")].as_cpu().as_tensor()).reshape(-1)
        rows = index[~fits.reshape(-1)]
        r = self.reader
        refuse_resized(r.root, self.store, r.paths.files, rows, self.store.read_rows(rows)["sizes"])

    def _convert(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n, S = self.num_crops, self.crop_size
        images = t["images"]
        B = images.shape[0]
        if self.channels_last:  # (B, n, S, S, 3) -> NCHW view with channels-last strides
            images = images.view(B * n, S, S, 3).permute(0, 3, 1, 2)
        else:
            images = images.view(B * n, 3, S, S)
        if self.dtype == "bfloat16":
            images = images.to(torch.bfloat16)
        labels = {k: t[k].reshape(B * n, -1) for k in self.reader.label_names}
        return {
            "images": images,
            **{k: v.long() if not v.is_floating_point() else v.float() for k, v in labels.items()},
            "targets": t["targets"].repeat_interleave(n),
            "indices": t["indices"].repeat_interleave(n),
            "crop_ids": t["crop_ids"].reshape(B * n),
        }

    def close(self) -> None:
        super().close()
        self.reader.close()


class FreshViewLoader(FKDLoader):
    """Self-supervised views drawn anew every pass (:class:`~pipelines.view_reader.FreshViewReader`), through
    the FKD replay graph (``graphs.ssl_crops``: the graph that replays an embedding store's views):

    >>> loader = FreshViewLoader(root, files, targets, draw=draw, batch_size=B, num_crops=2, crop_size=S,
    ...                          device="cpu")
    >>> loader.set_epoch(p)          # pass p: draw(p, rows, sizes) gives its views
    >>> for batch in loader: ...     # images (B*n, 3, S, S), targets, indices, crop_ids (view 0..n-1), (B*n,)

    The views of one image are adjacent. No label store: the batch holds no labels. ``draw`` is called per batch
    with the pass, the rows and their (height, width) read from the headers."""

    def __init__(self, root: str, files: Sequence[str] | PathTable, targets: Sequence[int], *, draw: Draw,
                 batch_size: int, num_crops: int = 2, crop_size: int = 224, device: str = "gpu", rank: int = 0,
                 world_size: int = 1, seed: int = 0, normalize: bool = True, dtype: str = "float32",
                 channels_last: bool = False, mean: Sequence[float] = graphs.IMAGENET_MEAN,
                 std: Sequence[float] = graphs.IMAGENET_STD, interp: str = "bilinear", shuffle: bool = True,
                 drop_last: bool = False, num_threads: int | None = None, device_id: int | None = None,
                 prefetch_queue_depth: int = 2, decoder: graphs.DecoderOptions | None = None):
        _check_dtype(dtype)
        reader = FreshViewReader(root, files, targets, draw=draw, num_crops=num_crops, batch_size=batch_size,
                                 seed=seed, rank=rank, world_size=world_size, shuffle=shuffle, drop_last=drop_last)
        _DaliLoader.__init__(self, reader, device=device, num_threads=num_threads, device_id=device_id,
                             prefetch_queue_depth=prefetch_queue_depth, decoder=decoder)
        self.store = None
        self.output_names = ("images", "targets", "indices", "crop_ids")
        self._view_settings(num_crops, crop_size, normalize, dtype, channels_last, mean, std, interp)

    @property
    def num_classes(self) -> int:
        raise AttributeError("a FreshViewLoader serves no labels, and so no classes")

    @property
    def num_rounds(self) -> int:
        raise AttributeError("a FreshViewLoader draws new views every pass: it has no rounds")

    def round_of(self, pass_index: int) -> int:
        return pass_index

    def _check(self, outputs) -> None:
        """An image whose header changed between the reader's read and the decoder's (replaced meanwhile) is
        refused, named."""
        fits = np.asarray(outputs[-1].as_tensor())
        if fits.all():
            return
        index = np.asarray(outputs[self.output_names.index("indices")].as_cpu().as_tensor()).reshape(-1)
        names = [self.reader.path_of(r) for r in index[~fits.reshape(-1)]]
        raise LoaderError(f"{len(names)} image(s) changed while being read: {'; '.join(names[:5])}; run again "
                          "once the dataset is no longer being written")


class _SingleViewLoader(_DaliLoader):
    """One view per image from explicit (root, files, targets)."""

    output_names = ("images", "targets", "indices")

    def __init__(self, reader: ImageReader, *, crop_size: int, device: str, normalize: bool, dtype: str,
                 channels_last: bool, mean: Sequence[float], std: Sequence[float], interp: str,
                 num_threads: int | None, device_id: int | None, prefetch_queue_depth: int,
                 decoder: graphs.DecoderOptions | None):
        super().__init__(reader, device=device, num_threads=num_threads, device_id=device_id,
                         prefetch_queue_depth=prefetch_queue_depth, decoder=decoder)
        self.root = reader.root
        self.crop_size = crop_size
        self.normalize, self.dtype, self.channels_last = normalize, dtype, channels_last
        self.mean, self.std, self.interp = tuple(mean), tuple(std), interp

    def _convert(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = t["images"]
        B, S = images.shape[0], self.crop_size
        images = images.view(B, S, S, 3).permute(0, 3, 1, 2) if self.channels_last else images.view(B, 3, S, S)
        return {"images": images, "targets": t["targets"], "indices": t["indices"]}

    def close(self) -> None:
        super().close()
        self.reader.close()

    def _view_args(self) -> dict:
        return dict(size=self.crop_size, device=self.device, normalize=self.normalize, dtype=self.dtype,
                    channels_last=self.channels_last, mean=self.mean, std=self.std, interp=self.interp,
                    decoder=self.decoder)


class EvalLoader(_SingleViewLoader):
    """Validation exactly as torchvision's Resize(round(S*256/224)) + CenterCrop(S); fixed order. With
    several ranks the shards are padded by wrapping: use ``indices`` to count each image once.
    ``check_headers``: each file's header is checked before its batch reaches DALI (in the background, by
    the rank that serves it; see ImageReader), so an unusable file is named, never decoded to garbage."""

    def __init__(self, root: str, files: Sequence[str] | PathTable, targets: Sequence[int], batch_size: int,
                 crop_size: int = 224, resize_size: int | None = None, device: str = "gpu", rank: int = 0,
                 world_size: int = 1, normalize: bool = True, dtype: str = "float32",
                 channels_last: bool = False, mean: Sequence[float] = graphs.IMAGENET_MEAN,
                 std: Sequence[float] = graphs.IMAGENET_STD, interp: str = "bilinear",
                 num_threads: int | None = None, device_id: int | None = None, prefetch_queue_depth: int = 2,
                 check_headers: bool = True, decoder: graphs.DecoderOptions | None = None):
        self.resize_size = resize_size or round(crop_size * 256 / 224)
        reader = ImageReader(root, files, targets, batch_size=batch_size, rank=rank, world_size=world_size,
                             shuffle=False, check_headers=check_headers)
        super().__init__(reader, crop_size=crop_size, device=device, normalize=normalize, dtype=dtype,
                         channels_last=channels_last, mean=mean, std=std, interp=interp,
                         num_threads=num_threads, device_id=device_id, prefetch_queue_depth=prefetch_queue_depth,
                         decoder=decoder)

    def _new_pipeline(self):
        return graphs.eval_pipeline(self.reader, resize_size=self.resize_size, **self._view_args(),
                                    **self._pipeline_args())


class StandardLoader(_SingleViewLoader):
    """The usual DALI ImageNet training input: fused decode + random-resized crop, flip, hard labels.
    ``check_headers`` as for EvalLoader. Its random crops and flips are DALI's; :meth:`state` /
    :meth:`restore` carry them across a stop."""

    random_state = True

    def __init__(self, root: str, files: Sequence[str] | PathTable, targets: Sequence[int], batch_size: int,
                 crop_size: int = 224, device: str = "gpu", rank: int = 0, world_size: int = 1, seed: int = 0,
                 normalize: bool = True, dtype: str = "float32", channels_last: bool = False,
                 mean: Sequence[float] = graphs.IMAGENET_MEAN, std: Sequence[float] = graphs.IMAGENET_STD,
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 antialias: bool = True, interp: str = "bilinear", drop_last: bool = False,
                 num_threads: int | None = None, device_id: int | None = None, prefetch_queue_depth: int = 2,
                 check_headers: bool = True, decoder: graphs.DecoderOptions | None = None):
        self.scale, self.ratio, self.antialias = tuple(scale), tuple(ratio), antialias
        reader = ImageReader(root, files, targets, batch_size=batch_size, seed=seed, rank=rank,
                             world_size=world_size, shuffle=True, drop_last=drop_last, check_headers=check_headers)
        super().__init__(reader, crop_size=crop_size, device=device, normalize=normalize, dtype=dtype,
                         channels_last=channels_last, mean=mean, std=std, interp=interp,
                         num_threads=num_threads, device_id=device_id, prefetch_queue_depth=prefetch_queue_depth,
                         decoder=decoder)

    def _new_pipeline(self):
        return graphs.standard_pipeline(self.reader, scale=self.scale, ratio=self.ratio,
                                        antialias=self.antialias, **self._view_args(), **self._pipeline_args())
