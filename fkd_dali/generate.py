"""``fkd-dali generate``: label every image's crops with one or several teachers, into a label store.

The work unit is one *shard* of the store (R images x all C crops, one file per array): the image sizes are
read from the file headers, the boxes and flips drawn per row from ``(seed, row)`` (or taken from a
``--reference`` store), the DALI generation pipeline decodes each image once per group of ``num_seg``
crops and cuts the group at each teacher's input size, the teachers run (bf16 autocast + channels-last on
a GPU) and the softmax(logits / T), averaged over teachers, is reduced to its top-k. A finished shard is
handed to a writer thread (data first, ``done`` last) while the next one is generated.

Resume: rerunning the same command opens the store, checks that every setting matches, and generates only
the shards still pending. Teacher batches never span shards, so a shard's labels are bit-identical whether
it is generated in one run, after a kill, or by another rank. Sharding: with torchrun (or ``--rank`` /
``--world-size``) rank r generates the pending shards s with s % world_size == r; no two ranks ever write one
file. One run per store: a new store is created whole (built beside its path and renamed into place) and rank 0
holds the store's writer lock for the run, so a second run on the same store is refused, naming the first
(``labelstore.locking``; on object storage the settings check alone protects the store).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import threading
import time
from collections.abc import Sequence

import numpy as np
import torch

import labelstore
from labelstore import LabelStore, create_store, open_store
from labelstore.kinds import MAX_DIM, encode_embeddings
from labelstore.locking import Lock, LockedError, create_atomically, store_writer_lock
from pipelines import DecoderOptions, graphs, handoff
from pipelines.errors import probe_image, read_headers
from pipelines.generation_reader import GenerationReader
from pipelines.loader import EvalLoader, default_threads

from . import distributed
from .crops import sample_crops
from .views import sample_views, view_recipe
from .dataset import Dataset, scan_image_folder, split_dir
from .progress import progress
from .teachers import TeacherError, TeacherSpec, build_teacher, output_classes

DEFAULT_SCALE = (0.08, 0.936)  # FKD's generator defaults (the EfficientNet-L2-475 teacher's range)
DEFAULT_RATIO = (3 / 4, 4 / 3)


class GenerateError(Exception):
    """Generation cannot go on; the message names the file or setting and the fix."""


@dataclasses.dataclass
class GenerateConfig:
    data: str
    save_path: str
    teachers: list[TeacherSpec]
    num_crops: int = 500
    top_k: int = 5
    temperature: float = 1.0
    scale: tuple[float, float] = DEFAULT_SCALE
    ratio: tuple[float, float] = DEFAULT_RATIO
    seed: int = 0
    group_size: int = 50
    batch_size: int = 4
    device: str | None = None
    num_classes: int | None = None
    skip_corrupt: bool = False
    reference: str | None = None
    rows_per_shard: int | None = None
    crops_per_chunk: int | None = None
    threads: int | None = None
    amp: bool | None = None
    channels_last: bool | None = None
    label_type: str | None = None
    rank: int | None = None
    world_size: int | None = None
    show_progress: bool = True
    evaluate: bool = False
    eval_batch_size: int = 64
    crop_dtype: str = "float32"  # teacher inputs out of DALI: float32, or float16 (half the bandwidth)
    device_id: int | None = None  # CUDA device of this process (default: its local rank)
    cpu_affinity: str = "auto"  # auto: each rank of a node pinned to its share of the cores near its GPU
    decoder: DecoderOptions = dataclasses.field(default_factory=DecoderOptions)  # mixed-decoder settings
    # A self-supervised teacher (instead of ``teachers``): an embedding store of its outputs on MoCo v2's views
    embedding_teacher: "EmbeddingTeacher | None" = None
    views: dict | None = None  # the view recipe's entries that differ from MoCo v2's aug-plus (fkd_dali.views)


@dataclasses.dataclass
class EmbeddingTeacher:
    """A self-supervised teacher: any module mapping normalised images (N, 3, S, S) to embeddings (N, dim), e.g. a
    MoCo v2 query encoder with its MLP head. ``name`` and ``sha256`` say which weights labelled the store (a resume
    must give the same); how the module was loaded is the caller's business."""

    module: torch.nn.Module
    dim: int
    name: str = "embedding-teacher"
    sha256: str | None = None
    input_size: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = graphs.IMAGENET_MEAN
    std: tuple[float, float, float] = graphs.IMAGENET_STD
    info: dict | None = None  # what the loader says of the weights (ssl_teachers' describe()), kept in the store

    @classmethod
    def of(cls, module: torch.nn.Module) -> "EmbeddingTeacher":
        """The teacher of a module from :func:`fkd_dali.ssl_teachers.load_embedding_teacher` (its ``dim``,
        ``describe()`` and view ``spec``): named by format and architecture, its sha256 the file's (an ensemble's:
        its members', in order)."""
        info = module.describe()
        members = info.get("members", [info])
        spec = module.spec
        return cls(module=module, dim=module.dim, name="+".join(f"{m['format']}:{m['arch']}" for m in members),
                   sha256=",".join(m["sha256"] for m in members), input_size=spec.input_size,
                   interpolation=spec.interpolation, mean=tuple(spec.mean), std=tuple(spec.std), info=info)

    @property
    def view(self) -> tuple:
        return (self.input_size, self.interpolation, tuple(self.mean), tuple(self.std))

    def record(self, full: bool = True) -> dict:
        """The store's record of the teacher (``full``: with the loader's description, which names the file's
        path; a resume compares the rest, so the same weights elsewhere resume the store)."""
        out = {"name": self.name, "sha256": self.sha256, "dim": self.dim, "input_size": self.input_size,
               "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}
        if full and self.info is not None:
            out["describe"] = self.info
        return out


@dataclasses.dataclass
class GenerateReport:
    store: str
    rank: int
    world_size: int
    shards: int
    images: int
    crops: int
    skipped: list[tuple[int, str]]
    seconds: float
    complete: bool

    @property
    def crops_per_s(self) -> float:
        return self.crops / self.seconds if self.seconds > 0 else 0.0


class Teachers:
    """The ensemble on its device; teachers with the same view share crops. It labels a ``topk`` store."""

    def __init__(self, specs: Sequence[TeacherSpec], dataset_classes: int, num_classes: int | None, device: str,
                 amp: bool, channels_last: bool):
        self.specs = list(specs)
        self.torch_device = torch.device("cuda") if device == "gpu" else torch.device("cpu")
        self.amp = amp and device == "gpu"
        self.channels_last = channels_last
        expected = num_classes or dataset_classes
        if expected < dataset_classes:
            raise TeacherError(f"--num-classes {expected} is fewer than the dataset's {dataset_classes} classes: the "
                               "ground-truth classes would fall outside the teacher's; use a teacher with at least "
                               f"{dataset_classes} classes")
        self.models = []
        counts = []
        for spec in self.specs:
            model = build_teacher(spec, expected).to(self.torch_device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            counts.append(output_classes(model, spec, self.torch_device))
            self.models.append(model)
        for spec, c in zip(self.specs, counts):
            if c != expected:
                how = (f"--num-classes {num_classes}" if num_classes else
                       f"the dataset's {dataset_classes} classes")
                raise TeacherError(f"teacher {spec.arch} outputs {c} classes but {how} were expected. Use a "
                                   f"teacher for this dataset, or pass --num-classes {c} to store its {c} classes "
                                   "deliberately")
        self.num_classes = expected
        self.views: list[tuple] = []
        self.view_of: list[int] = []
        for spec in self.specs:
            if spec.view not in self.views:
                self.views.append(spec.view)
            self.view_of.append(self.views.index(spec.view))

    def label_arrays(self, k: int) -> dict[str, tuple[tuple, torch.dtype]]:
        """The arrays :meth:`labels` fills per crop: name -> (trailing shape, dtype)."""
        return {"topk_idx": ((k,), torch.int64), "topk_val": ((k,), torch.float32)}

    def labels(self, crops_by_view: Sequence[torch.Tensor], cfg: "GenerateConfig") -> dict[str, torch.Tensor]:
        pv, pi = self.probs(crops_by_view, cfg.temperature).topk(cfg.top_k, dim=1)
        return {"topk_idx": pi, "topk_val": pv}

    def to_store(self, labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return labels

    def check_options(self, cfg: "GenerateConfig") -> None:
        if not 1 <= cfg.top_k <= self.num_classes:
            raise GenerateError(f"--top-k {cfg.top_k} must be between 1 and the number of classes "
                                f"({self.num_classes}); --top-k {self.num_classes} stores full labels")

    def sample(self, cfg: "GenerateConfig", rows: np.ndarray, sizes: np.ndarray, num_crops: int) -> dict:
        """The rows' crops: FKD's RandomResizedCrop boxes and flips, drawn from the seed."""
        boxes, flips = sample_crops(cfg.seed, rows, sizes, num_crops, cfg.scale, cfg.ratio)
        return {"boxes": boxes, "flips": flips}

    def settings(self, cfg: "GenerateConfig", num_crops: int) -> dict:
        """What a resumed run must agree on, by option name."""
        return {"--num-crops": num_crops, "--top-k": cfg.top_k, "--num-classes": self.num_classes,
                "--temperature": float(cfg.temperature), "--seed": cfg.seed,
                "--min/max-scale-crops": [float(x) for x in cfg.scale], "--ratio": [float(x) for x in cfg.ratio],
                TEACHERS_KEY: [{k: t.record(self.num_classes)[k] for k in ("name", "weights", "sha256", "input_size",
                                                                           "interpolation", "mean", "std")}
                               for t in self.specs],
                "--reference": os.path.abspath(cfg.reference) if cfg.reference else None}

    def create(self, path: str, cfg: "GenerateConfig", ds: Dataset, num_crops: int, settings: dict) -> LabelStore:
        """A new top-k store for these teachers."""
        return create_store(
            path, files=ds.files, targets=ds.targets, classes=ds.classes, fingerprint=ds.fingerprint,
            dataset_root=ds.name, num_crops=num_crops, top_k=cfg.top_k, num_classes=self.num_classes,
            temperature=cfg.temperature, teachers=[t.record(self.num_classes) for t in self.specs],
            crop={"scale": list(cfg.scale), "ratio": list(cfg.ratio), "interpolation":
                  [t.interpolation for t in self.specs], "input_size": [t.input_size for t in self.specs],
                  "group_size": cfg.group_size},
            seed=cfg.seed, source={"kind": "generate", "settings": settings, "label_type": cfg.label_type},
            rows_per_shard=cfg.rows_per_shard, crops_per_chunk=cfg.crops_per_chunk, checksums=ds.checksums)

    @torch.no_grad()
    def probs(self, crops_by_view: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
        """Mean over teachers of softmax(logits / T), float32 (N, classes)."""
        total = None
        for model, v in zip(self.models, self.view_of):
            x = crops_by_view[v]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                logits = model(x)
            p = torch.softmax(logits.float() / temperature, dim=1)
            total = p if total is None else total + p
        return total / len(self.models)


class EmbeddingTeachers:
    """A self-supervised teacher on its device, labelling an ``embedding`` store: its output per view, stored as
    int8 with a per-crop scale (:func:`labelstore.kinds.encode_embeddings`)."""

    def __init__(self, teacher: EmbeddingTeacher, dataset_classes: int, device: str, amp: bool, channels_last: bool):
        if isinstance(teacher.dim, bool) or not isinstance(teacher.dim, int) or not 1 <= teacher.dim <= MAX_DIM:
            raise TeacherError(f"embedding teacher {teacher.name}: dim {teacher.dim!r} must be a whole number in "
                               f"1..{MAX_DIM}")
        self.teacher = teacher
        self.specs: list = []
        self.torch_device = torch.device("cuda") if device == "gpu" else torch.device("cpu")
        self.amp = amp and device == "gpu"
        self.channels_last = channels_last
        self.model = teacher.module.to(self.torch_device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.num_classes = dataset_classes  # the store's ground-truth classes (never trained on by SSL)
        self.views, self.view_of = [teacher.view], [0]

    def label_arrays(self, k: int) -> dict[str, tuple[tuple, torch.dtype]]:
        return {"embedding": ((self.teacher.dim,), torch.float32)}

    @torch.no_grad()
    def labels(self, crops_by_view: Sequence[torch.Tensor], cfg: "GenerateConfig") -> dict[str, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(crops_by_view[0])
        if out.ndim != 2 or out.shape[1] != self.teacher.dim:
            raise TeacherError(f"embedding teacher {self.teacher.name} outputs shape {tuple(out.shape)} for "
                               f"{crops_by_view[0].shape[0]} crops, not (N, {self.teacher.dim}) (its dim): give the "
                               "dim of its output")
        return {"embedding": out.float()}

    def to_store(self, labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        q, scale = encode_embeddings(labels["embedding"])
        return {"embedding": q, "embedding_scale": scale}

    def check_options(self, cfg: "GenerateConfig") -> None:
        pass

    def sample(self, cfg: "GenerateConfig", rows: np.ndarray, sizes: np.ndarray, num_crops: int) -> dict:
        """The rows' views: boxes, flips and photometric parameters drawn from the seed (``--views``)."""
        return sample_views(cfg.seed, rows, sizes, num_crops, cfg.views)

    def settings(self, cfg: "GenerateConfig", num_crops: int) -> dict:
        """What a resumed run must agree on, by option name."""
        return {"--num-crops": num_crops, "--seed": cfg.seed, "kind": "embedding",
                "teacher": self.teacher.record(full=False), "views": view_recipe(cfg.views)}

    def create(self, path: str, cfg: "GenerateConfig", ds: Dataset, num_crops: int, settings: dict) -> LabelStore:
        """A new embedding store: the teacher's embeddings on the views drawn from the seed."""
        t = self.teacher
        return create_store(path, files=ds.files, targets=ds.targets, classes=ds.classes, fingerprint=ds.fingerprint,
                            dataset_root=ds.name, num_crops=num_crops, num_classes=self.num_classes,
                            teachers=[t.record()], kind="embedding",
                            kind_fields={"dim": t.dim, "views": view_recipe(cfg.views)},
                            checksums=ds.checksums,
                            crop={"input_size": [t.input_size], "interpolation": [t.interpolation],
                                  "group_size": cfg.group_size},
                            seed=cfg.seed, source={"kind": "generate", "settings": settings},
                            rows_per_shard=cfg.rows_per_shard, crops_per_chunk=cfg.crops_per_chunk)


def read_sizes(ds: Dataset, rows: np.ndarray, workers: int = 8) -> tuple[np.ndarray, dict[int, str]]:
    """Image sizes of ``rows`` from their headers (threads); rows that cannot be used, with the reason."""
    got, bad = read_headers([ds.header_source(int(r)) for r in rows], workers)
    sizes = np.array([s or (1, 1) for s in got], np.int64).reshape(len(rows), 2)
    return sizes, {int(rows[i]): why for i, why in bad.items()}


class _ShardWriter:
    """Writes finished shards in a background thread, so the teachers never wait for compression or disk."""

    def __init__(self, store: LabelStore, lock: Lock | None = None):
        self.store, self.lock = store, lock
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fkd-shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            start, arrays, mask = item
            try:
                if self.lock is not None and not self.lock.still_ours():
                    raise GenerateError(f"{self.store.path} was deleted or replaced while this run wrote it (its "
                                        "lock file is gone); stopping so that no labels land in another run's store")
                self.store.write_block(start, rows_done=mask, overwrite=True, **arrays)
            except BaseException as e:  # noqa: BLE001 - surfaced in put()/close()
                self.error = e

    def put(self, start: int, arrays: dict, mask: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((start, arrays, mask))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


TEACHERS_KEY = "teachers (-a, --weights, --input-size, --interpolation, --mean, --std)"  # + the weights' sha256


def _create_or_resume(cfg: GenerateConfig, ds: Dataset, teachers: Teachers, num_crops: int,
                      d: distributed.DistInfo) -> tuple[LabelStore, Lock | None]:
    """Open (rank 0: first create, atomically) the store and check it was made with these settings. Rank 0
    holds the store's writer lock for the run (returned): a second run on the same store is refused."""
    settings = teachers.settings(cfg, num_crops)
    path = cfg.save_path
    lock = None
    if d.is_main:
        url = "://" in path
        if not url and os.path.exists(path) and not os.path.isdir(path):
            raise GenerateError(f"--save-path {path} is a file; it must name the label store's folder (to create "
                                "or resume): choose another path")
        if not labelstore.store_exists(path, writing=True):  # refuses a place holding other files
            create_atomically(path, lambda tmp: teachers.create(tmp, cfg, ds, num_crops, settings))
        try:
            lock = store_writer_lock(path)
        except LockedError as e:
            raise GenerateError(f"{e}. (To share one generation between processes, launch it with torchrun or "
                                "--rank/--world-size: ranks of one run own disjoint shards)") from None
    try:
        return _open_checked(cfg, ds, settings, d), lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _open_checked(cfg: GenerateConfig, ds: Dataset, settings: dict, d: distributed.DistInfo) -> LabelStore:
    path = cfg.save_path
    if d.group:
        d.barrier()
    else:
        _wait_for_store(path)
    store = open_store(path, mode="r+")
    store.check_dataset(files=ds.files, classes=ds.classes, fingerprint=ds.fingerprint, targets=ds.targets,
                        data_dir=ds.root, checksums=ds.checksums)
    made = store.meta.source.get("settings")
    if made is None:
        raise GenerateError(f"{path} was not made by `fkd-dali generate` (its source is "
                            f"{store.meta.source.get('kind', 'unknown')}); choose another --save-path")
    for key, value in settings.items():
        if key == TEACHERS_KEY and isinstance(made.get(key), list) and all("sha256" not in t for t in made[key]):
            value = [{k: v for k, v in t.items() if k != "sha256"} for t in value]  # a store made before sha256
        if made.get(key) != value:
            raise GenerateError(f"{path} was generated with {key} = {made.get(key)!r} but this run asks for "
                                f"{value!r}. Rerun with the same options to resume it, or choose a new --save-path")
    if d.world_size == 1:
        store.remove_partial_files()  # left by a writer killed mid-write; safe when no other rank writes
    return store


def _wait_for_store(path: str, timeout_s: float = 600.0) -> None:
    """Plain multi-process launches: ranks > 0 wait for rank 0 to create the store. On a file system the
    creation is atomic (a rename), so any error but "not found" is final; on object storage the group and its
    arrays appear one object at a time, so a store still missing arrays is waited for too."""
    t0 = time.monotonic()
    retry = labelstore.StoreError if "://" in str(path) else labelstore.StoreNotFoundError
    while True:
        try:
            open_store(path)
            return
        except retry:
            if time.monotonic() - t0 > timeout_s:
                raise GenerateError(f"waited {timeout_s:.0f} s for rank 0 to create {path}; start rank 0 (it "
                                    "creates the store) or create it with a single-process run first") from None
            time.sleep(0.5)


def _open_reference(path: str, ds: Dataset, num_crops: int | None) -> LabelStore:
    ref = open_store(path)
    try:
        ref.check_dataset(files=ds.files, classes=ref.classes, fingerprint=ds.fingerprint, data_dir=ds.root,
                          checksums=ds.checksums)
    except labelstore.StoreMismatchError as e:
        raise GenerateError(f"--reference {path} was made from another dataset: {e}") from e
    ref.require_complete()
    if num_crops is not None and num_crops != ref.num_crops:
        raise GenerateError(f"--reference {path} holds {ref.num_crops} crops per image but --num-crops "
                            f"{num_crops} was asked for; drop --num-crops to reuse its crops")
    return ref


def generate(cfg: GenerateConfig) -> GenerateReport:
    device = cfg.device or ("gpu" if torch.cuda.is_available() else "cpu")
    if device == "gpu" and not torch.cuda.is_available():
        raise GenerateError("--device gpu was asked for but torch sees no CUDA device; use --device cpu")
    d = distributed.setup(device, cfg.rank, cfg.world_size, device_id=cfg.device_id, cpu_affinity=cfg.cpu_affinity)
    try:
        return _generate(cfg, device, d)
    finally:
        d.close()


def _generate(cfg: GenerateConfig, device: str, d: distributed.DistInfo) -> GenerateReport:
    t_start = time.perf_counter()
    ds = scan_image_folder(split_dir(cfg.data, "train"))
    amp = cfg.amp if cfg.amp is not None else device == "gpu"
    channels_last = cfg.channels_last if cfg.channels_last is not None else device == "gpu"
    if cfg.embedding_teacher is not None:
        if cfg.teachers or cfg.reference or cfg.evaluate:
            raise GenerateError("an embedding teacher labels its own views: give it without classifier teachers "
                                "(-a), --reference or --evaluate")
        teachers = EmbeddingTeachers(cfg.embedding_teacher, len(ds.classes), device, amp, channels_last)
    else:
        teachers = Teachers(cfg.teachers, len(ds.classes), cfg.num_classes, device, amp, channels_last)
    teachers.check_options(cfg)
    if cfg.evaluate:
        evaluate_teachers(cfg, teachers, device, d)
        return GenerateReport(store="", rank=d.rank, world_size=d.world_size, shards=0, images=0, crops=0,
                              skipped=[], seconds=time.perf_counter() - t_start, complete=False)
    ref = _open_reference(cfg.reference, ds, None if cfg.num_crops is None else cfg.num_crops) if cfg.reference \
        else None
    num_crops = ref.num_crops if ref else cfg.num_crops
    store, lock = _create_or_resume(cfg, ds, teachers, num_crops, d)
    try:
        return _run_shards(cfg, ds, teachers, store, lock, ref, device, num_crops, d)
    finally:
        if lock is not None:
            lock.release()


def _run_shards(cfg: GenerateConfig, ds: Dataset, teachers: Teachers, store: LabelStore, lock: Lock | None,
                ref: LabelStore | None, device: str, num_crops: int, d: distributed.DistInfo) -> GenerateReport:
    jobs = [s for s in store.pending_shards() if s % d.world_size == d.rank]
    ranges = store.shard_ranges()
    skipped_before = set(store.skipped_rows().tolist())
    todo_rows = sum(b - a for s in jobs for a, b in [ranges[s]])
    gen = _ShardGenerator(cfg, ds, teachers, store, ref, device, num_crops)
    bar = progress(total=todo_rows, desc=f"generate r{d.rank}" if d.world_size > 1 else "generate", unit="img",
                   disable=not cfg.show_progress)
    writer = _ShardWriter(store, lock)
    skipped: list[tuple[int, str]] = []
    crops = images = 0
    t0 = time.perf_counter()
    sizes_next = None
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fkd-sizes")
    try:
        for n, s in enumerate(jobs):
            a, b = ranges[s]
            rows = np.array([r for r in range(a, b) if r not in skipped_before], dtype=np.int64)
            sizes_f = sizes_next or pool.submit(gen.sizes_for, rows)
            if n + 1 < len(jobs):  # read the next shard's image headers while this one runs
                na, nb = ranges[jobs[n + 1]]
                sizes_next = pool.submit(gen.sizes_for, np.array([r for r in range(na, nb)
                                                                  if r not in skipped_before], dtype=np.int64))
            else:
                sizes_next = None
            sizes, bad = sizes_f.result()
            arrays, mask, bad = gen.shard(a, b, rows, sizes, bad)
            for r, why in bad.items():
                skipped.append((r, f"{ds.files[r]}: {why}"))
            if bad:
                store.mark_skipped([(r, f"{ds.files[r]}: {why}") for r, why in bad.items()])
            writer.put(a, arrays, mask)
            done_rows = int(mask.sum())
            images += done_rows
            crops += done_rows * num_crops
            bar.update(b - a)
            bar.set_postfix(crops_s=f"{crops / max(1e-9, time.perf_counter() - t0):,.0f}", refresh=False)
        writer.close()
    finally:
        bar.close()
        pool.shutdown(wait=False, cancel_futures=True)
        gen.close()
    seconds = time.perf_counter() - t0
    d.barrier()
    complete = store.finalize()
    return GenerateReport(store=cfg.save_path, rank=d.rank, world_size=d.world_size, shards=len(jobs),
                          images=images, crops=crops, skipped=skipped, seconds=seconds, complete=complete)


class _ShardGenerator:
    """One DALI generation pipeline fed shard by shard, and the teachers behind it."""

    def __init__(self, cfg: GenerateConfig, ds: Dataset, teachers: Teachers, store: LabelStore,
                 ref: LabelStore | None, device: str, num_crops: int):
        self.cfg, self.ds, self.teachers, self.store, self.ref = cfg, ds, teachers, store, ref
        self.device, self.num_crops = device, num_crops
        self.group = max(1, min(cfg.group_size, num_crops))
        self.view_params = store.kind.view_params
        self.reader = GenerationReader(ds.root, ds.files, self.group, cfg.batch_size, view_params=self.view_params)
        self.threads = cfg.threads or default_threads()
        self.device_id = torch.cuda.current_device() if device == "gpu" else None
        self.pipe = None
        self.k = cfg.top_k

    def sizes_for(self, rows: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        if self.ref is not None:
            return self.ref.read_rows(rows)["sizes"].astype(np.int64), {}
        return read_sizes(self.ds, rows)

    def _boxes(self, rows: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
        """Boxes and flips of the rows' crops (and a self-supervised store's view parameters)."""
        if self.ref is not None:
            got = self.ref.read_rows(rows)
            return {"boxes": got["boxes"].astype(np.int64), "flips": got["flips"]}
        return self.teachers.sample(self.cfg, rows, sizes, self.num_crops)

    def _pipeline(self):
        if self.pipe is None:
            self.pipe = graphs.generation_pipeline(
                self.reader, num_crops=self.group, views=self.teachers.views, device=self.device,
                dtype=self.cfg.crop_dtype, channels_last=self.teachers.channels_last, batch_size=self.cfg.batch_size,
                num_threads=self.threads, device_id=self.device_id, prefetch_queue_depth=2, exec_dynamic=True,
                decoder=self.cfg.decoder)
            self.pipe.build()
        else:
            self.pipe.reset()
        return self.pipe


    def shard(self, a: int, b: int, rows: np.ndarray, sizes: np.ndarray, bad: dict[int, str]):
        """Labels of one shard: (arrays for write_block, rows_done mask, rows left out with reasons)."""
        bad = dict(bad)
        while True:
            keep = np.array([r not in bad for r in rows], dtype=bool)
            ok_rows, ok_sizes = rows[keep], sizes[keep]
            if bad and not self.cfg.skip_corrupt:
                r, why = next(iter(bad.items()))
                raise GenerateError(f"{self.ds.path(r)}: {why}. Replace or remove the file, or pass --skip-corrupt "
                                    f"to leave such images out (they are recorded in the store and never trained on)"
                                    + (f"; {len(bad)} such files in rows {a}..{b - 1}" if len(bad) > 1 else ""))
            views_ok = self._boxes(ok_rows, ok_sizes)
            try:
                labels = self._label(ok_rows, ok_sizes, views_ok)
                break
            except _BadImage as e:
                bad[e.row] = e.reason
                self.pipe = None  # DALI's pipeline is unusable after an error: rebuild
        R, C = b - a, self.num_crops
        local = ok_rows - a
        arrays = {"sizes": np.ones((R, 2), np.int64), "boxes": np.tile(np.array([0, 0, 1, 1]), (R, C, 1))}
        arrays["sizes"][local] = ok_sizes
        arrays["boxes"][local] = views_ok.pop("boxes")
        for name, v in (views_ok | self.teachers.to_store(labels)).items():  # rows left out stay zero (not done)
            arrays[name] = np.zeros((R,) + v.shape[1:], v.dtype)
            arrays[name][local] = v
        mask = np.zeros(R, bool)
        mask[local] = True
        return arrays, mask, {r: why for r, why in bad.items()}

    def _label(self, rows: np.ndarray, sizes: np.ndarray, views: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The teachers' labels (top-k ids and probabilities, or embeddings) of every crop of ``rows``: name ->
        (m, C, ...)."""
        m, C = len(rows), self.num_crops
        dev = self.teachers.torch_device
        out = {name: torch.zeros((m, C) + tail, dtype=dt, device=dev)
               for name, (tail, dt) in self.teachers.label_arrays(self.k).items()}
        if m == 0:
            return {name: t.cpu().numpy() for name, t in out.items()}
        nb = self.reader.start_job(rows, views["boxes"], views["flips"], sizes, views)
        pipe = self._pipeline()
        pipe.schedule_run()
        V = len(self.teachers.views)
        for i in range(nb):
            try:
                outs = handoff.take(pipe, self.device, self.device_id)
            except RuntimeError as e:
                raise self._explain(e, i, nb) from e
            crops = [handoff.to_torch(o, self.device, self.device_id) for o in outs[:V]]
            index = np.array(outs[V].as_tensor())
            crop_ids = np.array(outs[V + 1].as_tensor())
            shapes = np.array(outs[V + 2].as_tensor())
            pos = np.searchsorted(rows, index)
            if not np.array_equal(shapes[:, :2], sizes[pos]):
                j = int(np.flatnonzero((shapes[:, :2] != sizes[pos]).any(axis=1))[0])
                said = f"--reference {self.cfg.reference} labelled it at" if self.ref is not None else \
                    "its header says"
                raise _BadImage(int(index[j]), f"decodes to {shapes[j][1]}x{shapes[j][0]} px but {said} "
                                               f"{sizes[pos[j]][1]}x{sizes[pos[j]][0]}")
            x = []
            for c, (size, *_rest) in zip(crops, self.teachers.views):
                B, G = c.shape[0], c.shape[1]
                if self.teachers.channels_last:
                    x.append(c.view(B * G, size, size, 3).permute(0, 3, 1, 2))
                else:
                    x.append(c.view(B * G, 3, size, size))
            if not self.teachers.amp:  # float16 crops feed a float32 teacher
                x = [t.float() for t in x]
            got = self.teachers.labels(x, self.cfg)
            valid = torch.from_numpy(crop_ids.reshape(-1) >= 0)
            r_pos = torch.from_numpy(np.repeat(pos, crop_ids.shape[1]))[valid].to(dev)
            c_pos = torch.from_numpy(crop_ids.reshape(-1))[valid].to(dev)
            for name, t in got.items():
                out[name][r_pos, c_pos] = t[valid.to(dev)].to(out[name].dtype)
            pipe.release_outputs()
            pipe.schedule_run()
        try:
            handoff.take(pipe, self.device, self.device_id)
        except StopIteration:
            pass
        except RuntimeError:
            self.pipe = None
        return {name: t.cpu().numpy() for name, t in out.items()}

    def _explain(self, err: RuntimeError, i: int, nb: int) -> Exception:
        for j in range(i, min(nb, i + 3)):
            for r in self.reader.rows_of_batch(j):
                why = probe_image(self.ds.header_source(int(r)))
                if why:
                    return _BadImage(int(r), why)
        return GenerateError(f"DALI failed while generating (batch {i}): {str(err)[:2000]}")

    def close(self) -> None:
        self.pipe = None


class _BadImage(Exception):
    def __init__(self, row: int, reason: str):
        super().__init__(reason)
        self.row, self.reason = row, reason


def evaluate_teachers(cfg: GenerateConfig, teachers: Teachers, device: str, d: distributed.DistInfo) -> dict:
    """Top-1/top-5 of the teacher(s) (mean of probabilities) on DATA/val, FKD's view: Resize(int(256/224*S))
    + CenterCrop(S). Rank 0 evaluates; the result is printed and returned."""
    result = {}
    if d.is_main:
        val = scan_image_folder(split_dir(cfg.data, "val"))
        if len(val.classes) > teachers.num_classes:
            raise GenerateError(f"{val.root} has {len(val.classes)} classes but the teachers output "
                                f"{teachers.num_classes}: their class ids cannot be checked against these folders")
        loaders = [EvalLoader(val.root, val.files, val.targets, batch_size=cfg.eval_batch_size, crop_size=size,
                              resize_size=int(256 / 224 * size), device=device, mean=mean, std=std,
                              channels_last=teachers.channels_last, num_threads=cfg.threads, decoder=cfg.decoder)
                   for size, _interp, mean, std in teachers.views]
        top1 = top5 = n = 0
        for batches in zip(*loaders):
            probs = teachers.probs([b["images"] for b in batches], temperature=1.0)
            target = batches[0]["targets"].to(probs.device)
            top = probs.topk(min(5, probs.shape[1]), dim=1).indices
            top1 += int((top[:, 0] == target).sum())
            top5 += int((top == target[:, None]).any(dim=1).sum())
            n += len(target)
        result = {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "images": n}
        names = "+".join(t.arch for t in teachers.specs)
        print(f"teacher {names} on {val.root}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
              f"({n} images)")
    d.barrier()
    return result
