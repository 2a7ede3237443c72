"""Relabelling with mixing (dataset distillation): SRe2L's relabel step into a relabel store.

SRe2L (VILA-Lab/SRe2L @8d00cba ``relabel/generate_soft_label.py``) labels, for each of ``--epochs`` passes over a
(distilled) image folder in steps of ``-b`` images, one random-resized crop per image (scale 0.08-1, bilinear,
flipped with p 0.5), the step mixed by CutMix or Mixup, with the teacher's logits on the MIXED crops. Here:

* the steps' images are SRe2L's own (:func:`fkd_dali.sre2l_plan.sre2l_plan`: its seeded sampler, ``--fkd-seed``
  42), so a store made here and exported lists the images SRe2L's loader expects;
* the crops, flips and the mix plan (partner permutation, ``lam ~ Beta(alpha, alpha)``, SRe2L's ``rand_bbox``) are
  drawn from ``(seed, epoch, step)`` (:func:`step_draws`): SRe2L draws them from unseeded worker RNGs, so no run
  of its own can be reproduced; ours is the same run every time, on any number of ranks, resumed or not;
* the teacher sees the pixels training replays: the crops and the mixing come from the same loader
  (:class:`pipelines.relabel.RelabelLoader`) and graph that ``train --labels relabel`` uses, one code path;
* several teachers are G-VBSM's norm-equalised ensemble (shaoshitong/G_VBSM_Dataset_Condensation @1ed80b0
  ``relabel/generate_soft_label_with_db.py``): each teacher's logits of the step ``(B, K)`` divided by their
  Frobenius norm and multiplied by the teachers' mean norm, then averaged;
* labels are full logits (fp16 by default, SRe2L's ``--use-fp16``) or the top-k logits.

Writers own whole shards of steps (as ``generate``): rank ``r`` of ``W`` labels shards ``s % W == r``, a finished
shard is never labelled again (resume), and rank 0 holds the store's writer lock for the run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import torch

import labelstore
from labelstore.locking import LockedError, create_atomically, store_writer_lock
from labelstore.relabel import RelabelStore, create_relabel_store, open_relabel
from pipelines.graphs import IMAGENET_MEAN, IMAGENET_STD
from pipelines.relabel import EpochSteps, RelabelLoader

from . import distributed
from .crops import ATTEMPTS, DEFAULT_RATIO, DEFAULT_SCALE, get_params, normalized
from .dataset import scan_image_folder, split_dir
from .generate import GenerateError, Teachers, read_sizes
from .progress import progress
from .sre2l_plan import SRE2L_SEED, sre2l_plan
from .teachers import TeacherSpec

STEP_STREAM = 0x72656C61  # separates the relabel draws from every other seeded stream


@dataclasses.dataclass
class RelabelConfig:
    data: str
    save_path: str
    teachers: list[TeacherSpec]
    epochs: int = 300
    batch_size: int = 1024  # SRe2L's relabel.sh (EDC: 100)
    mix: str = "cutmix"
    mixup: float = 0.8  # SRe2L's --mixup alpha
    cutmix: float = 1.0  # SRe2L's --cutmix alpha
    label_format: str = "full"
    top_k: int = 10
    label_dtype: str = "float16"
    num_classes: int | None = None  # the teacher's outputs when more than the dataset's classes (SRe2L's 1000)
    input_size: int = 224
    scale: tuple[float, float] = DEFAULT_SCALE
    fkd_seed: int = SRE2L_SEED  # the step plan (SRe2L's sampler)
    seed: int = 0  # the crops and the mix plans
    device: str | None = None
    amp: bool = False  # SRe2L's teacher runs in float32
    threads: int | None = None
    rows_per_shard: int | None = None
    rank: int | None = None
    world_size: int | None = None
    show_progress: bool = True


def rand_bbox(rng: np.random.Generator, size: int, lam: float) -> tuple[int, int, int, int]:
    """SRe2L's ``rand_bbox`` on square crops of ``size`` px: ``cut = int(size * sqrt(1 - lam))``, centre uniform,
    ends clipped; (bbx1, bby1, bbx2, bby2), rows bbx1:bbx2 and columns bby1:bby2."""
    cut = int(size * np.sqrt(1.0 - lam))
    cx, cy = int(rng.integers(size)), int(rng.integers(size))
    return (int(np.clip(cx - cut // 2, 0, size)), int(np.clip(cy - cut // 2, 0, size)),
            int(np.clip(cx + cut // 2, 0, size)), int(np.clip(cy + cut // 2, 0, size)))


def step_draws(cfg: RelabelConfig, epoch: int, step: int, sizes: np.ndarray) -> dict:
    """One step's crops and mix plan from ``(seed, epoch, step)``: normalised boxes (n, 4) float32 (SRe2L's
    ``(i/H, j/W, h/H, w/W)`` of torchvision's ``get_params``), flips (n,), partner (n,), lam, box (4,)."""
    rng = np.random.default_rng([int(cfg.seed), STEP_STREAM, int(epoch), int(step)])
    n = len(sizes)
    d = rng.random((n, 2 * ATTEMPTS + 3))
    boxes = get_params(sizes[:, 0], sizes[:, 1], d[:, :ATTEMPTS], d[:, ATTEMPTS:2 * ATTEMPTS], d[:, -3], d[:, -2],
                       cfg.scale, DEFAULT_RATIO)
    out = {"boxes": normalized(boxes[:, None], sizes)[:, 0], "flips": d[:, -1] < 0.5, "partner": np.arange(n),
           "lam": 1.0, "box": (-1, -1, -1, -1)}
    if cfg.mix == "cutmix":
        lam = float(rng.beta(cfg.cutmix, cfg.cutmix))
        out.update(partner=rng.permutation(n), lam=lam, box=rand_bbox(rng, cfg.input_size, lam))
    elif cfg.mix == "mixup":
        out.update(partner=rng.permutation(n), lam=float(rng.beta(cfg.mixup, cfg.mixup)))
    return out


@torch.no_grad()
def ensemble_logits(models: Sequence[torch.nn.Module], images: torch.Tensor, amp: bool) -> torch.Tensor:
    """One teacher's logits (float32), or G-VBSM's norm-equalised mean of several teachers' on the same batch."""
    outs = []
    for m in models:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            outs.append(m(images).float())
    if len(outs) == 1:
        return outs[0]
    out = torch.stack(outs, 0)
    norm = torch.norm(out, dim=[1, 2], keepdim=True)
    return (out / norm * norm.mean(0, keepdim=True)).mean(0)


def settings_of(cfg: RelabelConfig) -> dict:
    """What a resumed run must agree on, by option name."""
    return {"--epochs": cfg.epochs, "-b": cfg.batch_size, "--mix-type": cfg.mix, "--mixup": cfg.mixup,
            "--cutmix": cfg.cutmix, "--label-format": cfg.label_format,
            "--top-k": cfg.top_k if cfg.label_format == "topk" else None, "--label-dtype": cfg.label_dtype,
            "--input-size": cfg.input_size, "--min/max-scale-crops": [float(x) for x in cfg.scale],
            "--fkd-seed": cfg.fkd_seed, "--seed": cfg.seed,
            "teachers": [{k: t.record(0)[k] for k in ("name", "weights", "sha256")} for t in cfg.teachers]}


def generate_relabel(cfg: RelabelConfig) -> dict:
    """Label ``cfg.data``'s training images into the relabel store ``cfg.save_path`` (created, or resumed)."""
    device = cfg.device or ("gpu" if torch.cuda.is_available() else "cpu")
    d = distributed.setup(device, cfg.rank, cfg.world_size)
    try:
        return _generate(cfg, device, d)
    finally:
        d.close()


def _check(cfg: RelabelConfig, teachers: Teachers) -> None:
    if cfg.mix not in ("cutmix", "mixup", "none"):
        raise GenerateError(f"--mix-type {cfg.mix!r}: use cutmix, mixup or none")
    if cfg.label_format == "topk" and not 1 <= cfg.top_k <= teachers.num_classes:
        raise GenerateError(f"--top-k {cfg.top_k} must be between 1 and the {teachers.num_classes} classes")
    for spec in cfg.teachers:
        if spec.input_size != cfg.input_size or tuple(spec.mean) != tuple(IMAGENET_MEAN) or \
                tuple(spec.std) != tuple(IMAGENET_STD):
            raise GenerateError(f"teacher {spec.arch} sees {spec.input_size} px crops normalised by {spec.mean}/"
                                f"{spec.std}; a relabel store's teachers see the student's view: --input-size "
                                f"{cfg.input_size} crops with ImageNet's mean and std (SRe2L's). Give the teacher "
                                f"--input-size {cfg.input_size}")


def _create_or_open(cfg: RelabelConfig, ds, sizes: np.ndarray, teachers: Teachers, d) -> tuple[RelabelStore, object]:
    settings = settings_of(cfg)
    lock = None
    if d.is_main:
        if not labelstore.store_exists(cfg.save_path, writing=True):
            create_atomically(cfg.save_path, lambda tmp: create_relabel_store(
                tmp, files=ds.files, targets=ds.targets, sizes=sizes, classes=ds.classes, fingerprint=ds.fingerprint,
                dataset_root=ds.name, epochs=cfg.epochs, batch_size=cfg.batch_size, mix=cfg.mix,
                label_format=cfg.label_format, top_k=cfg.top_k if cfg.label_format == "topk" else 0,
                values="logits", label_dtype=cfg.label_dtype, input_size=cfg.input_size,
                plan={"sampler": "sre2l", "seed": cfg.fkd_seed}, num_classes=teachers.num_classes,
                teachers=[t.record(teachers.num_classes) for t in cfg.teachers],
                crop={"scale": list(cfg.scale), "ratio": list(DEFAULT_RATIO), "interpolation": "bilinear",
                      "input_size": cfg.input_size}, seed=cfg.seed,
                source={"kind": "generate-relabel", "settings": settings}, rows_per_shard=cfg.rows_per_shard))
        try:
            lock = store_writer_lock(cfg.save_path)
        except LockedError as e:
            raise GenerateError(f"{e}. (Ranks of one run share a store: launch them with torchrun)") from None
    if d.group:
        d.barrier()
    try:
        rs = open_relabel(cfg.save_path, mode="r+")
        rs.store.check_dataset(files=ds.files, classes=ds.classes, fingerprint=ds.fingerprint, targets=ds.targets,
                               data_dir=ds.root)
        made = rs.store.meta.source.get("settings")
        for key, value in settings.items():
            if made is None or made.get(key) != value:
                was = None if made is None else made.get(key)
                raise GenerateError(f"{cfg.save_path} was relabelled with {key} = {was!r} but this run asks for "
                                    f"{value!r}. Rerun with the same options to resume it, or choose a new "
                                    "--save-path")
        if d.world_size == 1:
            rs.store.remove_partial_files()  # left by a writer killed mid-write; safe when no other rank writes
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return rs, lock


def _generate(cfg: RelabelConfig, device: str, d) -> dict:
    ds = scan_image_folder(split_dir(cfg.data, "train"))
    sizes, bad = read_sizes(ds, np.arange(len(ds.files)))
    if bad:
        names = "; ".join(f"{ds.files[r]} ({why})" for r, why in list(bad.items())[:5])
        raise GenerateError(f"{len(bad)} image(s) under {ds.root} cannot be used: {names}. Replace or remove them: "
                            "a distilled set is relabelled whole")
    teachers = Teachers(cfg.teachers, len(ds.classes), cfg.num_classes, device, amp=cfg.amp, channels_last=False)
    _check(cfg, teachers)
    _first_step(cfg, ds, sizes, teachers, device)
    rs, lock = _create_or_open(cfg, ds, sizes, teachers, d)
    try:
        return _label_shards(cfg, ds, sizes, teachers, rs, device, d)
    finally:
        if lock is not None:
            lock.release()


def _label_shards(cfg: RelabelConfig, ds, sizes: np.ndarray, teachers: Teachers, rs: RelabelStore, device: str,
                  d) -> dict:
    ranges = rs.shard_rows()
    jobs = [s for s in rs.pending_shards() if s % d.world_size == d.rank]
    held: dict[int, EpochSteps] = {}
    loader = RelabelLoader(ds.root, ds.files, ds.targets, sizes, steps_of=held.__getitem__, stored_step=cfg.batch_size,
                           mix=cfg.mix, batch_size=cfg.batch_size, crop_size=cfg.input_size, device=device,
                           num_threads=cfg.threads)
    bar = progress(total=sum(ranges[s][1] - ranges[s][0] for s in jobs), desc="relabel", unit="step",
                   disable=not cfg.show_progress)
    t0 = time.perf_counter()
    try:
        for s, steps in _shard_steps(cfg, len(ds.files), ranges, jobs):
            a, b = ranges[s]
            arrays, held[s] = _shard_plan(cfg, steps, sizes)
            loader.set_epoch(s)
            labels = []
            for batch in loader:
                logits = ensemble_logits(teachers.models, batch["images"], teachers.amp)
                labels.append(_labels(cfg, logits, f"shard {s} of {cfg.save_path}"))
            del held[s]
            stacked = {k: v.astype(rs.store.array(k).dtype) for k, v in _stack(labels, cfg.batch_size).items()}
            rs.write_steps(a, **arrays, **stacked)
            bar.update(b - a)
    finally:
        bar.close()
        loader.close()
    seconds = time.perf_counter() - t0
    d.barrier()
    complete = rs.finalize()
    return {"store": cfg.save_path, "rank": d.rank, "shards": len(jobs), "seconds": seconds, "complete": complete}


def _first_step(cfg: RelabelConfig, ds, sizes: np.ndarray, teachers: Teachers, device: str) -> None:
    """Label the plan's first step and drop it: a teacher whose logits are not finite or overflow the label dtype
    is refused before the store is created (every rank checks it, so no rank waits for one that failed), and a
    rerun with other settings (``--fp32``) finds no store of this run's in its way."""
    epoch, step, imgs = next(iter(sre2l_plan(len(ds.files), cfg.batch_size, cfg.epochs, cfg.fkd_seed)))
    _, replay = _shard_plan(cfg, [(epoch, step, imgs)], sizes)
    loader = RelabelLoader(ds.root, ds.files, ds.targets, sizes, steps_of=lambda e: replay,
                           stored_step=cfg.batch_size, mix=cfg.mix, batch_size=cfg.batch_size,
                           crop_size=cfg.input_size, device=device, num_threads=cfg.threads)
    try:
        loader.set_epoch(0)
        for batch in loader:
            _labels(cfg, ensemble_logits(teachers.models, batch["images"], teachers.amp),
                    "the first step (nothing was written)")
    finally:
        loader.close()


def _shard_steps(cfg: RelabelConfig, num_images: int, ranges: list, jobs: list):
    """(shard, its steps) for each of ``jobs`` in order, as SRe2L's sampler reaches them: the plan is walked once
    (its passes are sequential draws of one generator) and only the steps of this rank's shards are held, one shard
    at a time; the walk stops after the last one."""
    jobs = sorted(jobs)
    if not jobs:
        return
    j, held = 0, []
    for row, (epoch, step, images) in enumerate(sre2l_plan(num_images, cfg.batch_size, cfg.epochs, cfg.fkd_seed)):
        a, b = ranges[jobs[j]]
        if a <= row < b:
            held.append((epoch, step, images))
        if row == b - 1:
            yield jobs[j], held
            j, held = j + 1, []
            if j == len(jobs):
                return


def _shard_plan(cfg: RelabelConfig, steps: list, sizes: np.ndarray) -> tuple[dict, EpochSteps]:
    """The plan arrays of a shard's steps as the store keeps them (padded to the step size) and as the loader
    replays them."""
    S, B = len(steps), cfg.batch_size
    images = np.full((S, B), -1, np.int32)
    boxes = np.zeros((S, B, 4), np.float32)
    flips = np.zeros((S, B), bool)
    partner = np.full((S, B), -1, np.int32)
    lam = np.ones(S, np.float64)
    box = np.full((S, 4), -1, np.int32)
    for k, (epoch, step, imgs) in enumerate(steps):
        n = len(imgs)
        got = step_draws(cfg, epoch, step, sizes[imgs])
        images[k, :n], boxes[k, :n], flips[k, :n], partner[k, :n] = imgs, got["boxes"], got["flips"], got["partner"]
        lam[k], box[k] = got["lam"], got["box"]
    n = np.array([len(imgs) for _, _, imgs in steps])
    used = np.arange(B)[None, :] < n[:, None]
    replay = EpochSteps(rows=images[used].astype(np.int64), starts=np.concatenate([[0], np.cumsum(n)]),
                        coords=boxes[used], flips=flips[used], partner=partner[used].astype(np.int64), lam=lam,
                        box=box)
    return {"images": images, "boxes": boxes, "flips": flips, "mix_partner": partner, "mix_lam": lam,
            "mix_box": box}, replay


def _labels(cfg: RelabelConfig, logits: torch.Tensor, where: str) -> dict[str, np.ndarray]:
    """The step's labels as the store keeps them; a teacher whose logits are not finite, or overflow float16, is
    refused before anything of the step (``where``) is written."""
    dtype = torch.float16 if cfg.label_dtype == "float16" else torch.float32
    if not torch.isfinite(logits).all():
        raise GenerateError(f"the teacher's logits of {where} are not finite: the teacher is broken (diverged "
                            "weights?); check it with `fkd-dali generate --evaluate`")
    big = float(logits.abs().max())
    if dtype == torch.float16 and big > torch.finfo(torch.float16).max:
        fix = "relabel with --fp32" + (" (same --save-path)" if "nothing was written" in where
                                       else " into a new --save-path")
        raise GenerateError(f"the teacher's logits reach {big:.3g}, beyond float16's "
                            f"{torch.finfo(torch.float16).max:.0f} ({where}); {fix}")
    if cfg.label_format == "full":
        return {"labels": logits.to(dtype).cpu().numpy()}
    val, idx = logits.topk(cfg.top_k, dim=1)
    return {"label_idx": idx.to(torch.int32).cpu().numpy(), "label_val": val.to(dtype).cpu().numpy()}


def _stack(labels: list[dict[str, np.ndarray]], B: int) -> dict[str, np.ndarray]:
    """Per-step label arrays (n, ...) as (S, B, ...), padded with zeros."""
    out = {}
    for name in labels[0]:
        first = labels[0][name]
        arr = np.zeros((len(labels), B, *first.shape[1:]), first.dtype)
        for k, lab in enumerate(labels):
            arr[k, :len(lab[name])] = lab[name]
        out[name] = arr
    return out
