"""``fkd-dali bench meal``: Fast MEAL V2 on the demo's data — does distilling a teacher ensemble into an already
trained student improve it, with and without MEAL V2's discriminator, and against plain FKD from the same start?

1. the demo's data (``objects`` flavour; ``--size large`` the demo's sizes before issue 14, ``small`` (default)
   the same classes, student and validation images at 48 px with 1,200 teacher images): the students' small set, a larger set for
   the teachers, one validation set;
2. two teachers of different architectures (default ResNet-18 and ResNet-34; MobileNet-V2 trained three times
   slower per epoch than ResNet-18 on a 2-core CPU), hard labels on the larger set with the demo teacher's recipe;
3. an ensemble store: ``generate`` with both teachers averages their probabilities on identical crops;
4. the start: a hard-label ResNet-18 student with the demo's student recipe (seed 0);
5. from that start, per seed: the MEAL V2 recipe with the discriminator, without it, and plain FKD (the demo's
   FKD student recipe), all for the same epochs and crops per step.

Every phase is cached in ``--workdir`` (rerun to add seeds); the table gives each seed and mean/min/max.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

from pipelines import EvalLoader

from ..dataset import scan_image_folder, split_dir
from ..demo import QUICK, DemoSize, make_data
from ..evaluate import evaluate
from ..generate import GenerateConfig, generate
from ..teachers import TeacherSpec, build_teacher
from ..train import TrainConfig, recipe_config, train

# The sizes are spelled out here (not the demo's defaults, which change with the demo): large = the demo's data
# and recipes before issue 14 (64 px, 600 student images, 3,000 teacher images, 0-3 distractors: a ResNet-18
# teacher reaches ~96 %); small = the same at 48 px with 1,200 teacher images and 10 teacher / 20 start epochs, about a third of
# the compute, for a 2-core CPU shared with other work.
LARGE = DemoSize(classes=10, per_class=60, teacher_per_class=300, val_per_class=30, image_size=64, teacher_epochs=12,
                 student_epochs=30, pool=16, top_k=5, num_crops=1, batch=64, teacher_lr=0.05, lr=0.025,
                 warmup_epochs=3, distractors=3, distractor_scale=(0.18, 0.26))
SMALL = dataclasses.replace(LARGE, teacher_per_class=120, image_size=48, teacher_epochs=10, student_epochs=20,
                            warmup_epochs=2)
SIZES = {"large": LARGE, "small": SMALL, "quick": QUICK}
VARIANTS = ("meal-v2", "meal-v2-no-disc", "fkd")
LABELS = {"start": "start: hard-label student (seed 0; one start for every seed)",
          "meal-v2": "MEAL V2 recipe, discriminator on", "meal-v2-no-disc": "MEAL V2 recipe, no discriminator",
          "fkd": "plain FKD (the demo's FKD recipe) from the same start"}


class Ensemble(torch.nn.Module):
    """Log of the teachers' mean probabilities (what the store holds, before top-k): its argmax is the ensemble's
    prediction."""

    def __init__(self, teachers: list[torch.nn.Module]):
        super().__init__()
        self.teachers = torch.nn.ModuleList(teachers)

    def forward(self, x):
        return torch.stack([torch.softmax(t(x).float(), 1) for t in self.teachers]).mean(0).log()


def _last(run: str) -> dict:
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(x) for x in f][-1]


def _train_once(cfg: TrainConfig) -> dict:
    """Train unless ``cfg.output`` holds a finished run; its last log line."""
    done = os.path.join(cfg.output, "done.json")
    if not os.path.exists(done):
        t = time.perf_counter()
        res = train(cfg)
        if res["interrupted"] or res["stopped_early"]:
            raise SystemExit(f"{cfg.output}: stopped before the end; rerun the same command to redo that run")
        with open(done, "w") as f:
            json.dump({"seconds": time.perf_counter() - t}, f)
    rec = _last(cfg.output)
    rec["wall_s"] = json.load(open(done))["seconds"]
    return rec


def run(args) -> dict:
    z = SIZES[args.size]
    device = args.device or ("gpu" if torch.cuda.is_available() else "cpu")
    threads = args.threads or (os.cpu_count() or 1)
    work = args.workdir
    os.makedirs(work, exist_ok=True)
    data, teacher_data = make_data(work, z, 0, threads)  # as `fkd-dali demo --seed 0` writes them
    base = dict(batch_size=z.batch, input_size=z.image_size, device=device, workers=threads, show_progress=False,
                overwrite=True)
    out: dict = {"device": device, "size": args.size, "teachers": {}, "runs": {}}

    teachers = [a.strip() for a in args.teachers.split(",")]
    specs = []
    for arch in teachers:  # the demo teacher's recipe, for each architecture
        run_dir = os.path.join(work, f"teacher-{arch}")
        rec = _train_once(TrainConfig(data=teacher_data, arch=arch, labels="hard", epochs=z.teacher_epochs,
                                      scale=(0.25, 1.0), lr=z.teacher_lr, cos=True, output=run_dir, **base))
        out["teachers"][arch] = rec["val_top1"]
        print(f"teacher {arch}: val top-1 {rec['val_top1']:.1f} %", flush=True)
        specs.append(TeacherSpec(arch, path=os.path.join(run_dir, "checkpoint.pth.tar"), input_size=z.image_size,
                                 interpolation="bilinear"))

    store = os.path.join(work, "store-ensemble")
    generate(GenerateConfig(data=data, save_path=store, teachers=specs, num_crops=z.pool,
                            top_k=min(5, z.classes - 1), group_size=8, batch_size=8, device=device, threads=threads,
                            show_progress=False, scale=(0.08, 1.0)))  # resumes: nothing to do when complete
    out["teachers"]["ensemble"] = ensemble_top1(specs, data, z, device, threads)
    print(f"ensemble of {', '.join(teachers)}: val top-1 {out['teachers']['ensemble']:.1f} %", flush=True)

    student = dict(data=data, arch="resnet18", **base)
    start_dir = os.path.join(work, "start-hard")
    start = _train_once(TrainConfig(labels="hard", epochs=z.student_epochs, lr=z.lr, cos=True,
                                    warmup_epochs=z.warmup_epochs, seed=0, output=start_dir, **student))
    out["runs"]["start"] = {"0": start["val_top1"]}
    print(f"start (hard labels, {z.student_epochs} epochs): val top-1 {start['val_top1']:.1f} %", flush=True)
    init = os.path.join(start_dir, "checkpoint.pth.tar")

    E = args.epochs
    common = dict(softlabel_path=store, num_crops=args.num_crops, epochs=E, init_from=init,
                  soft_label_type=f"marginal_smoothing_k{min(5, z.classes - 1)}", **student)
    for seed in args.seeds:
        for variant in VARIANTS:
            run_dir = os.path.join(work, f"{variant}-seed{seed}")
            if variant == "fkd":
                cfg = TrainConfig(lr=z.lr, cos=True, warmup_epochs=z.warmup_epochs, seed=seed, output=run_dir,
                                  **common)
            else:  # MEAL V2's recipe; its milestones 100, 180 of 200 epochs scaled to E
                cfg = recipe_config("meal-v2", schedule=(round(E * 0.5), round(E * 0.9)), seed=seed, output=run_dir,
                                    use_discriminator_loss=variant == "meal-v2", **common)
            rec = _train_once(cfg)
            out["runs"].setdefault(variant, {})[str(seed)] = rec["val_top1"]
            print(f"{variant} seed {seed}: val top-1 {rec['val_top1']:.1f} %  ({rec['wall_s']:.0f} s)", flush=True)
    out["settings"] = {"epochs": E, "num_crops": args.num_crops, "seeds": list(args.seeds), "batch": z.batch,
                       "image_size": z.image_size, "classes": z.classes, "student_images": z.classes * z.per_class,
                       "teacher_images": z.classes * z.teacher_per_class, "val_images": z.classes * z.val_per_class,
                       "pool": z.pool, "teachers": teachers}
    return out


def ensemble_top1(specs: list[TeacherSpec], data: str, z, device: str, threads: int) -> float:
    """Val top-1 of the teachers' averaged probabilities (the ensemble the store holds)."""
    val = scan_image_folder(split_dir(data, "val"))
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    model = Ensemble([build_teacher(s, len(val.classes)) for s in specs]).to(dev)
    loader = EvalLoader(val.root, val.files, val.targets, batch_size=64, crop_size=z.image_size, device=device,
                        num_threads=threads)
    try:
        return evaluate(model, loader)["top1"]
    finally:
        loader.close()


def format_table(result: dict) -> str:
    seeds = result["settings"]["seeds"]
    lines = [f"| student | {' | '.join(f'seed {s}' for s in seeds)} | mean | min | max |",
             "|---|" + "---|" * (len(seeds) + 3)]
    for key in ("start", *VARIANTS):
        got = result["runs"].get(key, {})
        vals = [got.get(str(s)) for s in seeds]
        if key == "start":
            vals = [got.get("0")] * len(seeds)
        have = [v for v in vals if v is not None]
        stats = (f"{sum(have) / len(have):.1f} | {min(have):.1f} | {max(have):.1f}" if have else "- | - | -")
        lines.append(f"| {LABELS[key]} | {' | '.join('-' if v is None else f'{v:.1f}' for v in vals)} | {stats} |")
    t = result["teachers"]
    lines.append("")
    lines.append("teachers' val top-1: " + ", ".join(f"{k} {v:.1f} %" for k, v in t.items()))
    return "\n".join(lines)
