"""``fkd-dali bench train``: is the loader ever the bottleneck, what does FKD save over online KD, and does it
help accuracy.

* **Loader vs synthetic**: the same training step (``Trainer.step``: soft labels, loss, backward, optimizer) fed
  by ``FKDLoader`` and by one batch of random tensors already on the device; crops/s of each and their ratio
  (1.0: the loader costs nothing).
* **FKD vs online KD**: wall time per epoch of FKD training (a pass of ``n`` crops per image counts ``n``
  epochs) against vanilla KD, where a larger teacher runs on the standard crops every step.
* **Accuracy sanity** (``--accuracy``): a teacher trained on generated data labels a store; students with FKD,
  hard labels and online KD train for the same epochs and batch; their validation top-1 is reported.
"""

from __future__ import annotations

import os
import time

import torch
import torchvision

from pipelines import EvalLoader

from ..dataset import scan_image_folder, split_dir
from ..evaluate import evaluate
from ..generate import GenerateConfig, generate
from ..synthetic import write_dataset
from ..teachers import TeacherSpec
from ..train import TrainConfig, Trainer, train
from .generate import train_teacher
from .loader import prepare_data


def _random_checkpoint(arch: str, num_classes: int, path: str) -> str:
    if not os.path.exists(path):
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(arch, num_classes=num_classes).state_dict(), path)
    return path


def _time_steps(trainer: Trainer, batches, steps: int, device: str) -> float:
    """Crops/s of ``steps`` training steps over ``batches`` (after 2 warm-up steps)."""
    it = iter(batches)
    crops = 0
    for i in range(steps + 2):
        if i == 2:
            if device == "gpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            crops = 0
        b = next(it)
        trainer.step(b, 0.01)
        crops += b["images"].shape[0]
    if device == "gpu":
        torch.cuda.synchronize()
    return crops / (time.perf_counter() - t0)


def _loader_batches(trainer: Trainer, crops: int):
    ld = trainer.loader(crops)
    e = 0
    while True:
        ld.set_epoch(e)
        yield from ld
        e += 1


def loader_vs_synthetic(p: dict, *, arch: str, size: int, batch: int, num_crops: int, steps: int, device: str,
                        threads: int, workdir: str) -> dict:
    cfg = TrainConfig(data=p["data"], arch=arch, softlabel_path=p["store"], num_crops=num_crops, batch_size=batch,
                      epochs=100, input_size=size, device=device, workers=threads, show_progress=False,
                      output=os.path.join(workdir, "bench-train-run"))
    trainer = Trainer(cfg)
    b = next(iter(trainer.loader(num_crops)))
    fixed = {k: v.clone() for k, v in b.items()}  # one batch, already on the device

    def synthetic():
        while True:
            yield fixed
    # Interleaved (loader, synthetic, loader, synthetic): noise on a shared machine hits both alike; the best
    # run of each is compared.
    real, syn = [], []
    for _ in range(2):
        real.append(_time_steps(trainer, _loader_batches(trainer, num_crops), steps, device))
        syn.append(_time_steps(trainer, synthetic(), steps, device))
    for ld in trainer.loaders.values():
        ld.close()
    trainer.dist.close()
    return {"loader_crops_per_s": max(real), "synthetic_crops_per_s": max(syn), "ratio": max(real) / max(syn),
            "loader_runs": real, "synthetic_runs": syn}


def fkd_vs_online(p: dict, *, arch: str, teacher_arch: str, size: int, batch: int, num_crops: int, device: str,
                  threads: int, workdir: str, classes: int) -> dict:
    """Wall time per epoch: one FKD pass (num_crops epochs) vs one epoch of vanilla KD with the teacher."""
    teacher = _random_checkpoint(teacher_arch, classes, os.path.join(workdir, f"teacher-{teacher_arch}-{classes}.pth"))
    out = {}
    for labels, epochs in (("fkd", num_crops + 1), ("online", 1)):
        run = os.path.join(workdir, f"bench-train-{labels}")
        cfg = TrainConfig(data=p["data"], arch=arch, labels=labels, softlabel_path=p["store"] if labels == "fkd" else None,
                          teacher_arch=teacher_arch, teacher_path=teacher, num_crops=num_crops, batch_size=batch,
                          epochs=epochs, input_size=size, device=device, workers=threads, show_progress=False,
                          output=run, num_classes=None if labels == "fkd" else classes, overwrite=True)
        if os.path.exists(os.path.join(run, "log.jsonl")):
            os.remove(os.path.join(run, "log.jsonl"))
        train(cfg)
        first = res_history(run)[0]
        out[labels] = {"seconds_per_epoch": first["seconds"] / first["crops_per_image"],
                       "crops_per_s": first["crops_per_s"]}
    out["fkd_speedup"] = out["online"]["seconds_per_epoch"] / out["fkd"]["seconds_per_epoch"]
    return out


def res_history(run: str) -> list[dict]:
    import json
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(x) for x in f]


def accuracy_sanity(workdir: str, *, device: str, threads: int, epochs: int, size: int = 64) -> dict:
    data = os.path.join(workdir, "acc-data")
    if not os.path.exists(os.path.join(data, "val")):
        write_dataset(data, classes=8, per_class=48, val_per_class=16, size=160, seed=1, workers=threads)
    ds = scan_image_folder(split_dir(data, "train"))
    teacher = train_teacher(ds.root, ds.files, ds.targets.tolist(), len(ds.classes), "resnet34", size, 20, device,
                            threads, os.path.join(workdir, f"acc-teacher-resnet34-{size}.pth"))
    store = os.path.join(workdir, f"acc-store-{size}")
    spec = TeacherSpec("resnet34", path=teacher, input_size=size, interpolation="bilinear")
    generate(GenerateConfig(data=data, save_path=store, teachers=[spec], num_crops=32, top_k=5, group_size=8,
                            batch_size=8, device=device, threads=threads, show_progress=False, scale=(0.08, 1.0)))
    results = {}
    base = dict(data=data, arch="resnet18", num_crops=4, batch_size=64, epochs=epochs, input_size=size, device=device,
                workers=threads, show_progress=False, lr=0.1 * 64 / 256, cos=True)  # linear scaling rule
    for labels in ("fkd", "hard", "online"):
        run = os.path.join(workdir, f"acc-{labels}")
        extra = {"fkd": dict(softlabel_path=store), "hard": {},
                 "online": dict(teacher_arch="resnet34", teacher_path=teacher)}[labels]
        if os.path.exists(os.path.join(run, "log.jsonl")):
            os.remove(os.path.join(run, "log.jsonl"))
        t0 = time.perf_counter()
        res = train(TrainConfig(labels=labels, output=run, overwrite=True, **base, **extra))
        results[labels] = {"val_top1_last": res["last"]["val_top1"], "val_top1_best": res["best_top1"],
                           "seconds": time.perf_counter() - t0}
    model = torchvision.models.get_model("resnet34", num_classes=len(ds.classes))
    model.load_state_dict(torch.load(teacher, map_location="cpu", weights_only=True))
    model.to(torch.device("cuda" if device == "gpu" else "cpu"))
    val = scan_image_folder(split_dir(data, "val"))
    loader = EvalLoader(val.root, val.files, val.targets, batch_size=64, crop_size=size, device=device,
                        num_threads=threads)
    results["teacher_val_top1"] = evaluate(model, loader)["top1"]
    return {"epochs": epochs, "images": len(ds), "classes": len(ds.classes), "input_size": size, **results}


def run(args, device: str, threads: int) -> dict:
    arch = args.arch or ("resnet50" if device == "gpu" else "resnet18")
    size = args.input_size or (224 if device == "gpu" else 64)
    teacher_arch = args.teacher_arch or ("resnet152" if device == "gpu" else "resnet50")
    p = prepare_data(args.workdir, args.data, args.images, args.classes, pool=8)
    ds = scan_image_folder(split_dir(p["data"], "train"))
    out = {"device": device, "arch": arch, "input_size": size, "batch": args.batch_size, "num_crops": args.num_crops,
           "threads": threads, "images": len(ds), "teacher_arch": teacher_arch}
    out["throughput"] = loader_vs_synthetic(p, arch=arch, size=size, batch=args.batch_size, num_crops=args.num_crops,
                                            steps=args.steps, device=device, threads=threads, workdir=args.workdir)
    out["online"] = fkd_vs_online(p, arch=arch, teacher_arch=teacher_arch, size=size, batch=args.batch_size,
                                  num_crops=args.num_crops, device=device, threads=threads, workdir=args.workdir,
                                  classes=len(ds.classes))
    if args.accuracy:
        out["accuracy"] = accuracy_sanity(args.workdir, device=device, threads=threads, epochs=args.accuracy_epochs)
    return out


def format_table(r: dict) -> str:
    t, o = r["throughput"], r["online"]
    lines = [f"Student {r['arch']} at {r['input_size']} px, {r['batch']} crops/step, {r['num_crops']} crops/image, "
             f"{r['device']}, {r['threads']} threads", "",
             "| training fed by | crops/s | ratio |", "|---|---|---|",
             f"| one batch of random tensors on the device | {t['synthetic_crops_per_s']:,.0f} | 1.00 |",
             f"| FKDLoader (real JPEGs, stored crops and labels) | {t['loader_crops_per_s']:,.0f} | {t['ratio']:.2f} |",
             "", "| labels | s per epoch | crops/s |", "|---|---|---|",
             f"| FKD (stored, {r['num_crops']} crops per decode) | {o['fkd']['seconds_per_epoch']:.1f} | "
             f"{o['fkd']['crops_per_s']:,.0f} |",
             f"| online KD, teacher {r['teacher_arch']} every step | {o['online']['seconds_per_epoch']:.1f} | "
             f"{o['online']['crops_per_s']:,.0f} |",
             "", f"FKD is {o['fkd_speedup']:.2f}x faster per epoch than online KD."]
    if "accuracy" in r:
        a = r["accuracy"]
        lines += ["", f"Accuracy sanity: {a['images']} generated images, {a['classes']} classes, {a['epochs']} epochs, "
                  f"resnet18 students at {a['input_size']} px; teacher resnet34 val top-1 {a['teacher_val_top1']:.1f} %",
                  "", "| student labels | val top-1 (last) | val top-1 (best) | train time s |", "|---|---|---|---|"]
        for k in ("fkd", "hard", "online"):
            lines.append(f"| {k} | {a[k]['val_top1_last']:.1f} | {a[k]['val_top1_best']:.1f} | {a[k]['seconds']:.0f} |")
    return "\n".join(lines)
