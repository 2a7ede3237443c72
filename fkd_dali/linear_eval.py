"""``fkd-dali linear-eval CHECKPOINT DATA``: how good a network's features are, by the protocol of MoCo and S2-BNN
(facebookresearch/moco ``main_lincls.py``, kept by szq0214/S2-BNN ``Distillation_only/step2/main_lincls.py``),
and a weighted-kNN monitor on the same frozen features.

The linear probe is an ordinary ``train`` run: the ``hard`` objective (cross-entropy on DALI's
RandomResizedCrop + flip of DATA/train, validation on Resize 256 / CenterCrop 224 of DATA/val) with the
``linear-eval`` recipe (:data:`fkd_dali.train_config.LINEAR_EVAL`: SGD momentum 0.9, lr 30, no weight decay,
100 epochs, x0.1 at 60 and 80, batch 256), whose student starts from CHECKPOINT's backbone
(:mod:`fkd_dali.backbone`) with a new classifier, N(0, 0.01) and bias 0, and whose backbone is frozen and kept in
eval mode (``freeze_backbone``). DDP, exact resume, checkpoints, ``log.jsonl`` and validation are ``train``'s.
After the probe, MoCo's sanity check: the backbone's weights and BatchNorm statistics are bit for bit CHECKPOINT's.

``--knn K`` (InstDisc's and DINO's monitor): the L2-normalised features of DATA/train's and DATA/val's centre
crops; each validation image votes with its K most similar training images (cosine), weighted exp(sim / 0.07);
top-1/top-5 of the votes. Memory: each rank keeps its own share of the training features (N / R x F float32,
not gathered: ImageNet-1k's 1.28 M x 2048 is 10.5 GB on one rank, 1.3 GB on each of 8); the validation features
are gathered (50 k x 2048 x 4 B = 0.4 GB), each rank finds its share's K best for every query, in chunks of
:data:`QUERY_CHUNK`, and the K best of the R x K candidates are kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipelines import EvalLoader

from . import backbone
from .backbone import Backbone, read_backbone
from .dataset import Scan, split_dir
from .models import create_model, without_classifier
from .train_config import TrainConfig, recipe_config
from .trainer import Trainer

QUERY_CHUNK = 1024  # validation images compared with the bank at once: a chunk x (N / R) similarity matrix
KNN_FILE = "knn.json"


class LinearEvalError(Exception):
    """A linear evaluation cannot start, or its result is not one; the message says why and what to do."""


@dataclasses.dataclass
class LinearEvalConfig:
    checkpoint: str  # PATH or ARCH:PATH (fkd_dali.backbone)
    data: str
    arch: str | None = None  # the architecture CHECKPOINT must be (default: whatever it holds)
    knn: int = 0  # neighbours of the kNN monitor (0: none)
    knn_temperature: float = 0.07
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # TrainConfig fields over the recipe's


def probe_config(cfg: LinearEvalConfig, found: Backbone) -> TrainConfig:
    """The ``train`` run of the probe: the linear-eval recipe under ``cfg.options``."""
    options = dict(cfg.options)
    options.setdefault("output", os.path.join("runs", f"{found.arch}-linear-eval"))
    return recipe_config("linear-eval", data=cfg.data, arch=found.arch, init_backbone_from=cfg.checkpoint, **options)


def linear_eval(cfg: LinearEvalConfig, scan: Scan | None = None) -> dict[str, Any]:
    """The kNN monitor (``cfg.knn``), then the linear probe (unless ``epochs`` is 0); returns what each gave."""
    try:
        epochs = cfg.options.get("epochs", 1)
        if cfg.knn < 0 or epochs is not None and epochs < 0:
            raise LinearEvalError(f"--knn {cfg.knn}, --epochs {epochs}: give numbers >= 0")
        if cfg.knn == 0 and epochs == 0:
            raise LinearEvalError("--epochs 0 without --knn K does nothing: give --knn K for the kNN monitor alone, "
                                  "or epochs for the linear probe")
        if not cfg.knn_temperature > 0:
            raise LinearEvalError(f"--knn-temp {cfg.knn_temperature}: give a temperature > 0 (DINO's: 0.07)")
        found = read_backbone(cfg.checkpoint, cfg.arch)
        run_cfg = probe_config(cfg, found)
        if cfg.knn:
            _claim_knn_file(run_cfg)
    except BaseException:
        if scan is not None:
            scan.cancel()
        raise
    trainer = Trainer(run_cfg, scan)
    report: dict[str, Any] = {"checkpoint": cfg.checkpoint, "arch": found.arch, "source": found.source,
                              "dropped": found.dropped, "output": trainer.cfg.output}
    try:
        if cfg.knn:
            report["knn"] = knn_monitor(trainer, found, cfg.knn, cfg.knn_temperature)
    except BaseException:
        trainer.close()
        trainer.dist.close()
        raise
    if trainer.cfg.epochs == 0:
        trainer.close()
        trainer.dist.close()
    else:  # (train_run claims the output folder: a folder of another run is refused before anything is written)
        report["probe"] = trainer.run()
    if cfg.knn and trainer.main:
        os.makedirs(trainer.cfg.output, exist_ok=True)
        with open(os.path.join(trainer.cfg.output, KNN_FILE), "w") as f:
            json.dump({"checkpoint": cfg.checkpoint, **report["knn"]}, f, indent=2)
    if "probe" not in report:
        return report
    moved = backbone.changed(trainer.model, found)
    if moved:
        raise LinearEvalError(f"the frozen backbone changed during the probe ({len(moved)} tensors, e.g. "
                              f"{moved[:3]}): its accuracy is not a linear evaluation of {cfg.checkpoint}. This is "
                              "a bug: please report it with the command")
    report["backbone_unchanged"] = True
    return report


# ---------------------------------------------------------------------------------------------- kNN
def _claim_knn_file(run_cfg: TrainConfig) -> None:
    """Refuse, before anything is computed, to replace the kNN result another linear-eval left in the output
    folder, unless ``--overwrite`` says so or the run continues the probe there (``--resume``)."""
    path = os.path.join(run_cfg.output, KNN_FILE)
    if not os.path.exists(path) or run_cfg.overwrite or run_cfg.resume:
        return
    try:
        with open(path) as f:
            knn = json.load(f)
        made = f" (k={knn['k']}, top-1 {knn['top1']:.2f}%, of {knn['checkpoint']})"
    except (OSError, ValueError, KeyError, TypeError):
        made = ""
    raise LinearEvalError(f"{path} already holds the kNN result of another linear-eval{made}; pass --overwrite to "
                          "replace it, or choose another --output")


def knn_monitor(run: Trainer, found: Backbone, k: int, temperature: float) -> dict[str, Any]:
    """Weighted kNN top-1/top-5 of DATA/val against DATA/train on ``found``'s frozen features (every rank takes
    part; every rank returns the same figures; rank 0 prints them)."""
    cfg = run.cfg
    model = create_model(found.arch, run.num_classes, cfg.input_size)
    backbone.start_from(model, found)
    model = without_classifier(model).to(run.torch_device).eval()
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train = run.train_set
    loader = EvalLoader(train.root, train.files, train.targets, batch_size=cfg.val_batch_size,
                        crop_size=cfg.input_size, device=run.device, rank=run.dist.rank,
                        world_size=run.dist.world_size, channels_last=run.channels_last, num_threads=cfg.workers,
                        decoder=run.decoder)
    try:
        bank, bank_labels = _real(*features(model, loader, amp=run.amp))
    finally:
        loader.close()
    queries, labels = gather(*features(model, run.eval_loader(), amp=run.amp), group=run.dist.group)
    run.loaders["val"].release()
    votes = knn_votes(bank, bank_labels, queries, k, temperature, run.num_classes, group=run.dist.group)
    top = votes.topk(min(5, votes.shape[1]), dim=1).indices
    n = len(train.files)
    out = {"k": min(k, n), "temperature": temperature, "top1": 100.0 * (top[:, 0] == labels).float().mean().item(),
           "top5": 100.0 * (top == labels[:, None]).any(1).float().mean().item(), "train_images": n,
           "val_images": len(labels), "feature_dim": int(bank.shape[1]),
           "bank_bytes_per_rank": int(bank.numel() * bank.element_size())}
    if run.main:
        print(f"kNN (k={out['k']}, T={temperature:g}) of {split_dir(cfg.data, 'val')} ({out['val_images']} images) "
              f"against {train.root} ({n} images, {out['feature_dim']}-d features, "
              f"{out['bank_bytes_per_rank'] / 2**20:.1f} MiB on each of {run.dist.world_size} rank(s)): top-1 "
              f"{out['top1']:.2f}%  top-5 {out['top5']:.2f}%", flush=True)
    return out


@torch.no_grad()
def features(model: torch.nn.Module, loader: EvalLoader, *, amp: bool = False):
    """This rank's share of ``loader``'s images through ``model``: (L2-normalised float32 features, classes,
    real), where ``real`` is False for the padding that evens the ranks' shares (sample i of rank r is image
    r + i * R)."""
    dev = next(model.parameters()).device
    n_real, rank, world = loader.reader.num_rows, loader.reader.rank, loader.reader.world_size
    feats, labels, real, i = [], [], [], 0
    for batch in loader:
        x, t = batch["images"], batch["targets"].to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        feats.append(F.normalize(out.float().flatten(1), dim=1))
        labels.append(t.long())
        real.append(rank + world * torch.arange(i, i + len(t), device=dev) < n_real)
        i += len(t)
    return torch.cat(feats), torch.cat(labels), torch.cat(real)


def _real(feats: torch.Tensor, labels: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return feats[real], labels[real]


def gather(feats: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, group: bool = False):
    """Every rank's (features, classes) of its real images, on every rank (the shares are of equal length)."""
    if group:
        parts = []
        for t in (feats, labels, real.to(torch.uint8)):  # (gloo gathers no bool tensors)
            every = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(every, t)
            parts.append(torch.cat(every))
        feats, labels, real = parts
    return feats[real.bool()], labels[real.bool()]


@torch.no_grad()
def knn_votes(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int, temperature: float,
              num_classes: int, group: bool = False) -> torch.Tensor:
    """(Q, classes) votes: each query's ``k`` most similar bank features (over every rank's bank when ``group``)
    vote for their class with weight exp(similarity / ``temperature``). ``bank`` and ``queries`` are
    L2-normalised: their product is the cosine."""
    world = dist.get_world_size() if group else 1
    votes = torch.zeros(len(queries), num_classes, device=queries.device)
    kk = min(k, len(bank))
    for s in range(0, len(queries), QUERY_CHUNK):
        sim, idx = (queries[s:s + QUERY_CHUNK] @ bank.T).topk(kk, dim=1)
        lab = bank_labels[idx]
        if group:  # every rank's best: padded to k with -inf (a weight of 0) where a share has fewer images
            pad = k - kk
            sim = F.pad(sim, (0, pad), value=float("-inf"))
            lab = F.pad(lab, (0, pad))
            sims, labs = [torch.empty_like(sim) for _ in range(world)], [torch.empty_like(lab) for _ in range(world)]
            dist.all_gather(sims, sim)
            dist.all_gather(labs, lab)
            sim, lab = torch.cat(sims, 1), torch.cat(labs, 1)
            sim, pick = sim.topk(min(k, sim.shape[1]), dim=1)
            lab = lab.gather(1, pick)
        votes[s:s + QUERY_CHUNK].scatter_add_(1, lab, (sim / temperature).exp())
    return votes
