"""``fkd-dali demo``: the whole FKD flow on generated data, on a laptop CPU, in a few minutes.

1. **data**: the ``objects`` flavour of ``fkd-dali synth`` — a class object (shape and hue) at a random place
   on clutter, with smaller distractor objects of other classes — where many random-resized crops miss the
   object or show only a distractor, so the image's hard label is wrong for them. The students get a small
   labelled set; the teacher learned from a five times larger one (as FKD's and ReLabel's teachers were
   trained on far more data than the students see);
2. **teacher**: a ResNet-18 trained on hard labels on its larger set;
3. **generate**: the teacher labels 16 stored crops of every student image (top-5) into a label store;
4. **students**: two ResNet-18s with the same budget (epochs, crops per step, schedule) on the small set —
   one on hard labels, one with FKD on the stored crops and soft labels;
5. **report**: a table (teacher, hard student, FKD student; time of each phase; training crops/s), a PNG of
   the students' validation accuracy per epoch, and ``fkd-dali show``'s contact sheet of one image's crops.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

import labelstore
from pipelines import FKDLoader, StandardLoader

from .bench.machine import describe, one_line
from .dataset import Dataset, scan_image_folder, split_dir
from .generate import GenerateConfig, generate
from .show import show
from .synthetic import write_dataset
from .teachers import TeacherSpec
from .train import TrainConfig, train


@dataclasses.dataclass(frozen=True)
class DemoSize:
    classes: int = 10
    per_class: int = 60           # the students' labelled set
    teacher_per_class: int = 300  # the teacher's (larger) labelled set
    val_per_class: int = 30
    image_size: int = 64
    teacher_epochs: int = 12
    student_epochs: int = 30
    pool: int = 16
    num_crops: int = 1          # per image per step; 2 is ~10 % faster here but ~3 points lower (docs/benchmarks.md)
    batch: int = 64
    teacher_lr: float = 0.05
    lr: float = 0.025          # the students': 0.05 made the outcome seed-dependent (docs/benchmarks.md)
    warmup_epochs: int = 3


FULL = DemoSize()
QUICK = DemoSize(classes=4, per_class=12, teacher_per_class=16, val_per_class=4, image_size=32, teacher_epochs=2,
                 student_epochs=4, pool=8, num_crops=2, batch=16, warmup_epochs=1)


def _history(run: str) -> list[dict]:
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(x) for x in f]


def plot_students(histories: dict[str, list[dict]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"FKD (stored soft labels)": ("#76b900", "o"), "hard labels": ("#555555", "s")}
    for name, hist in histories.items():
        colour, marker = styles.get(name, (None, "o"))
        ax.plot([h["epochs"][1] for h in hist], [h["val_top1"] for h in hist], marker=marker, color=colour,
                label=name)
    ax.set_xlabel("epoch (an FKD pass of n crops per image counts n epochs)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loader_rates(data: str, store: str, ds: Dataset, z: DemoSize, device: str, threads: int) -> dict[str, float]:
    """Crops/s of the loaders alone (no model): one epoch of FKD replay and one of standard DALI, after a
    warm-up epoch each."""
    loaders = {
        "FKD replay": FKDLoader(data, store, batch_size=max(1, z.batch // z.num_crops), num_crops=z.num_crops,
                                crop_size=z.image_size, device=device, num_threads=threads),
        "standard DALI": StandardLoader(ds.root, ds.files, ds.targets, batch_size=z.batch, crop_size=z.image_size,
                                        device=device, num_threads=threads),
    }
    rates = {}
    for name, ld in loaders.items():
        for epoch in (0, 1):
            ld.set_epoch(epoch)
            t, crops = time.perf_counter(), 0
            for b in ld:
                crops += b["images"].shape[0]
            if device == "gpu":
                torch.cuda.synchronize()
        rates[name] = crops / (time.perf_counter() - t)
        ld.close()
    return rates


def run(workdir: str, quick: bool = False, device: str | None = None) -> dict:
    z = QUICK if quick else FULL
    t_all = time.perf_counter()
    threads = os.cpu_count() or 1
    print(f"fkd-dali demo in {workdir} ({'quick' if quick else 'full'}): {one_line(describe())}\n", flush=True)
    phases: dict[str, float] = {}

    t = time.perf_counter()
    data, teacher_data = os.path.join(workdir, "data"), os.path.join(workdir, "teacher-data")
    if not os.path.isdir(os.path.join(teacher_data, "val")):
        write_dataset(data, flavour="objects", classes=z.classes, per_class=z.per_class,
                      val_per_class=z.val_per_class, size=z.image_size, seed=0, workers=threads)
        write_dataset(teacher_data, flavour="objects", classes=z.classes, per_class=z.teacher_per_class,
                      val_per_class=0, size=z.image_size, seed=1, workers=threads)  # other images than data/
        os.symlink(os.path.join("..", "data", "val"), os.path.join(teacher_data, "val"))  # the same validation set
    ds = scan_image_folder(split_dir(data, "train"))
    phases["data"] = time.perf_counter() - t
    print(f"1/5 data: {len(ds)} student training images, {z.classes * z.teacher_per_class} other images for the "
          f"teacher, {z.classes * z.val_per_class} validation images; {z.classes} classes "
          f"({', '.join(ds.classes[:4])}, ...), {z.image_size} px  ({phases['data']:.0f} s)", flush=True)

    base = dict(arch="resnet18", batch_size=z.batch, input_size=z.image_size, device=device,
                workers=threads, show_progress=False, cos=True, overwrite=True)  # the demo's own folders
    t = time.perf_counter()
    teacher = train(TrainConfig(data=teacher_data, labels="hard", epochs=z.teacher_epochs, scale=(0.25, 1.0),
                                lr=z.teacher_lr, output=os.path.join(workdir, "teacher"), **base))
    phases["teacher"] = time.perf_counter() - t
    ckpt = os.path.join(workdir, "teacher", "checkpoint.pth.tar")
    print(f"2/5 teacher: resnet18, hard labels, {z.teacher_epochs} epochs on its {z.classes * z.teacher_per_class} "
          f"images: val top-1 {teacher['last']['val_top1']:.1f} %  ({phases['teacher']:.0f} s)", flush=True)

    t = time.perf_counter()
    store = os.path.join(workdir, "store")
    rep = generate(GenerateConfig(data=data, save_path=store, teachers=[TeacherSpec("resnet18", path=ckpt,
                                  input_size=z.image_size, interpolation="bilinear")], num_crops=z.pool,
                                  top_k=min(5, z.classes - 1), group_size=8, batch_size=8, device=device, threads=threads,
                                  show_progress=False, scale=(0.08, 1.0)))
    phases["generate"] = time.perf_counter() - t
    st = labelstore.open_store(store)
    agree = float((st.read_round(0, z.pool).topk_idx[:, :, 0] == st.targets[:, None]).mean())
    print(f"3/5 generate: {rep.images} images x {z.pool} crops labelled by the teacher ({rep.crops_per_s:,.0f} crops/s);"
          f" on {100 * (1 - agree):.0f} % of the crops the teacher's top class is not the image's class  "
          f"({phases['generate']:.0f} s)", flush=True)

    students = {}
    for name, labels, extra in (("hard labels", "hard", {}),
                                ("FKD (stored soft labels)", "fkd", dict(softlabel_path=store,
                                                                         num_crops=z.num_crops,
                                                                         soft_label_type=f"marginal_smoothing_k{st.top_k}"))):
        t = time.perf_counter()
        run_dir = os.path.join(workdir, f"student-{labels}")
        if os.path.exists(os.path.join(run_dir, "log.jsonl")):
            os.remove(os.path.join(run_dir, "log.jsonl"))
        res = train(TrainConfig(data=data, labels=labels, epochs=z.student_epochs, lr=z.lr,
                                warmup_epochs=z.warmup_epochs, output=run_dir, **base, **extra))
        phases[f"student ({labels})"] = time.perf_counter() - t
        students[name] = {"result": res, "history": _history(run_dir)}
    print(f"4/5 students: resnet18 on the {len(ds)} student images, {z.student_epochs} epochs, {z.batch} crops per "
          f"step, lr {z.lr} with {z.warmup_epochs} warm-up epochs then cosine, for both  "
          f"({phases['student (hard)']:.0f} s + {phases['student (fkd)']:.0f} s)", flush=True)

    hard = students["hard labels"]["result"]["last"]["val_top1"]
    fkd = students["FKD (stored soft labels)"]["result"]["last"]["val_top1"]
    png = os.path.join(workdir, "students.png")
    plot_students({k: v["history"] for k, v in students.items()}, png,
                  f"ResNet-18 students on the objects data ({len(ds)} images, {z.classes} classes)")
    t = time.perf_counter()
    sheet = show(store, data, "0", os.path.join(workdir, "show"), crop_size=max(96, z.image_size), columns=8)
    phases["show"] = time.perf_counter() - t
    rate = {k: sum(h["crops_per_s"] * h["seconds"] for h in v["history"]) / sum(h["seconds"] for h in v["history"])
            for k, v in students.items()}
    loader_device = device or ("gpu" if torch.cuda.is_available() else "cpu")
    loaders = loader_rates(data, store, ds, z, loader_device, threads)
    print("5/5 results:\n")
    print("| model | val top-1 | time | training crops/s |\n|---|---|---|---|")
    print(f"| teacher (resnet18, hard labels, {z.classes * z.teacher_per_class} images) | "
          f"{teacher['last']['val_top1']:.1f} % | "
          f"{phases['teacher']:.0f} s | - |")
    print(f"| student, hard labels ({z.student_epochs} epochs) | {hard:.1f} % | {phases['student (hard)']:.0f} s | "
          f"{rate['hard labels']:,.0f} |")
    print(f"| student, FKD ({z.student_epochs} epochs, {z.num_crops} crop{'s' if z.num_crops > 1 else ''} per image) | {fkd:.1f} % | "
          f"{phases['student (fkd)']:.0f} s | {rate['FKD (stored soft labels)']:,.0f} |")
    verdict = "beat" if fkd > hard else ("tied with" if fkd == hard else "did NOT beat")
    print(f"\nFKD {verdict} the hard-label student ({fkd:.1f} % vs {hard:.1f} %) at the same budget.")
    print(f"loaders alone ({loader_device}, {z.image_size} px, no model): "
          + ", ".join(f"{k} {v:,.0f} crops/s" for k, v in loaders.items())
          + " (the students' training crops/s above are bound by the model on this machine)")
    print(f"data {phases['data']:.0f} s, teacher {phases['teacher']:.0f} s, generate {phases['generate']:.0f} s, "
          f"students {phases['student (hard)'] + phases['student (fkd)']:.0f} s, show {phases['show']:.0f} s")
    print(f"\nplot of the students: {png}\ncontact sheet of {sheet['file']}'s stored crops: {sheet['sheet']}")
    print(f"demo finished in {time.perf_counter() - t_all:.0f} s")
    return {"teacher_top1": teacher["last"]["val_top1"], "hard_top1": hard, "fkd_top1": fkd, "phases": phases,
            "loader_crops_per_s": loaders,
            "plot": png, "sheet": sheet["sheet"], "store": store}
