"""``fkd-dali demo``: FKD's whole claim on generated data, on a laptop CPU, in a few minutes — a student as
accurate as one distilled from a teacher run on every crop (online KD), for far less, because the teacher ran
once.

1. **data**: the ``objects`` flavour of ``fkd-dali synth`` — a class object (shape and hue) at a random place
   on clutter, with smaller distractor objects of other classes — where many random-resized crops miss the
   object or show only a distractor, so the image's hard label is wrong for them. The students get a small
   labelled set; the teacher learned from a five times larger one (as FKD's and ReLabel's teachers were
   trained on far more data than the students see);
2. **teacher**: a ResNet-18 trained on hard labels on its larger set;
3. **generate** (the one-off labelling): the teacher labels stored crops of every student image (top-5);
4. **students**: three ResNet-18s with the same budget (epochs, crops per step, schedule) on the small set —
   hard labels; online KD (the same teacher run on every training crop, every step); FKD (the stored crops
   and soft labels, no teacher during training);
5. **report**: a table (accuracy and wall time of each), a verdict worded from this run's numbers, a PNG of
   the students' validation accuracy, and ``fkd-dali show``'s contact sheet of one image's crops.

``--seeds N`` repeats the demo for N seeds (each seed draws new data, a new teacher and new students) and
prints the spread: docs/benchmarks.md's "Accuracy on the demo data" comes from it. A seed whose folder holds a
finished run (``run.json``) is not run again, so sweeps over disjoint seeds can share a workdir and the
table is printed from all of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

import torch

import labelstore

from .bench.machine import describe, one_line
from .dataset import scan_image_folder, split_dir
from .generate import GenerateConfig, generate
from .show import show
from .synthetic import DISTRACTOR_SCALE, MAX_DISTRACTORS, write_dataset
from .teachers import TeacherSpec
from .train import TrainConfig, train


@dataclasses.dataclass(frozen=True)
class DemoSize:
    classes: int = 10
    per_class: int = 30           # the students' labelled set
    teacher_per_class: int = 200  # the teacher's (larger) labelled set
    val_per_class: int = 40
    image_size: int = 40
    teacher_epochs: int = 14
    teacher_batch: int = 32     # more steps for the same work: the teacher must be far better than the students
    teacher_warmup_epochs: int = 1
    teacher_scale: tuple[float, float] = (0.4, 1.0)  # its crops' area: with up to 5 distractors, smaller crops
    #                                                  often show only a distractor and slow the teacher down
    student_epochs: int = 30
    pool: int = 30              # stored crops per image: a fresh crop every epoch, as online KD has
    top_k: int = 5
    num_crops: int = 1          # per image per step (docs/benchmarks.md: more cost accuracy at 64 crops per step)
    batch: int = 64
    teacher_lr: float = 0.04
    lr: float = 0.025
    warmup_epochs: int = 3
    eval_every: int = 5         # validation after every 5th epoch (and the last): the plot's points
    distractors: int = MAX_DISTRACTORS  # per image at most (the objects flavour's)
    distractor_scale: tuple[float, float] = DISTRACTOR_SCALE


FULL = DemoSize()
QUICK = DemoSize(classes=4, per_class=12, teacher_per_class=16, val_per_class=4, image_size=32, teacher_epochs=2,
                 teacher_batch=16, student_epochs=4, pool=8, top_k=3, num_crops=2, batch=16, warmup_epochs=1,
                 eval_every=2)

STUDENTS = (("hard", "hard labels"), ("online", "online KD"), ("fkd", "FKD"))

# The spread over seeds of the full demo, measured by `fkd-dali demo --seeds 5` (docs/benchmarks.md, "Accuracy on
# the demo data"): the verdict puts one run's margins beside them.
SEED_SPREAD = {"seeds": 5, "fkd_minus_hard": (3.2, 5.8, 7.2), "fkd_minus_online": (-5.0, -0.1, 2.5)}  # (min, mean, max)
MATCH_POINTS = 1.5  # "as accurate as online KD": within this many points of it
RUN_FILE = "run.json"  # a finished demo run's numbers, in its workdir


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One demo run's measurements, all the verdict is worded from."""
    teacher: float
    hard: float
    online: float
    fkd: float
    seconds_hard: float
    seconds_online: float
    seconds_fkd: float
    seconds_labelling: float


def _pct_less(a: float, b: float) -> str:
    """'38 % less' / '12 % more': the time ``a`` against ``b``."""
    change = 1 - a / b
    return f"{abs(100 * change):.0f} % {'less' if change >= 0 else 'MORE'}"


def spread_note(key: str, spread: dict) -> str:
    """'over 5 seeds: mean +6.1, range +3.2 to +9.0 points' for a margin of ``SEED_SPREAD``."""
    lo, mean, hi = spread[key]
    if not spread["seeds"]:
        return "no seed sweep recorded"
    return f"over {spread['seeds']} seeds: mean {mean:+.1f}, range {lo:+.1f} to {hi:+.1f} points"


def verdict(o: Outcome, spread: dict = SEED_SPREAD, match: float = MATCH_POINTS) -> list[str]:
    """The demo's conclusion, worded from the measured numbers: FKD against online KD (accuracy and time, with
    and without the one-off labelling) and against hard labels (the margin, beside the seed-to-seed spread)."""
    d_online = o.fkd - o.online
    if abs(d_online) <= match:
        acc = "FKD matched online KD's accuracy"
    elif d_online > 0:
        acc = f"FKD beat online KD by {d_online:.1f} points"
    else:
        acc = f"FKD fell {-d_online:.1f} points short of online KD"
    acc += (f": {o.fkd:.1f} % vs {o.online:.1f} % ({d_online:+.1f}; FKD − online KD "
            f"{spread_note('fkd_minus_online', spread)}).")
    with_labels = o.seconds_fkd + o.seconds_labelling
    took = (f"It took {o.seconds_fkd:.0f} s against online KD's {o.seconds_online:.0f} s: "
            f"{_pct_less(o.seconds_fkd, o.seconds_online)} time; {_pct_less(with_labels, o.seconds_online)} with the "
            f"one-off labelling ({o.seconds_labelling:.0f} s), whose labels serve every further student.")
    margin = o.fkd - o.hard
    smallest = max(1.0, spread["fkd_minus_hard"][0]) if spread["seeds"] else 1.0
    noise = f"(FKD − hard {spread_note('fkd_minus_hard', spread)})"
    if margin <= 0:
        hard = f"FKD did NOT beat the hard-label student: {margin:+.1f} points ({o.fkd:.1f} % vs {o.hard:.1f} %)"
    elif margin < smallest:
        hard = (f"FKD beat the hard-label student by only {margin:.1f} points ({o.fkd:.1f} % vs {o.hard:.1f} %), "
                f"less than on any seed of the sweep, within one run's noise")
    else:
        hard = f"FKD beat the hard-label student by {margin:.1f} points ({o.fkd:.1f} % vs {o.hard:.1f} %)"
    return [acc, took, f"{hard} {noise}; docs/benchmarks.md has the seeds."]


def _history(run: str) -> list[dict]:
    with open(os.path.join(run, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "val_top1" in r]


def plot_students(histories: dict[str, list[dict]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"FKD": ("#76b900", "o"), "online KD": ("#1f77b4", "^"), "hard labels": ("#555555", "s")}
    for name, hist in histories.items():
        colour, marker = styles.get(name, (None, "o"))
        ax.plot([h["epochs"][1] for h in hist], [h["val_top1"] for h in hist], marker=marker, color=colour,
                label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_data(workdir: str, z: DemoSize, seed: int, threads: int) -> tuple[str, str]:
    """The students' set (with the validation images) and the teacher's larger set of other images, which
    shares the validation images; both drawn from ``seed``."""
    data, teacher_data = os.path.join(workdir, "data"), os.path.join(workdir, "teacher-data")
    if not os.path.isdir(os.path.join(teacher_data, "val")):
        objects = dict(flavour="objects", classes=z.classes, size=z.image_size, workers=threads,
                       distractors=z.distractors, distractor_scale=z.distractor_scale)
        write_dataset(data, per_class=z.per_class, val_per_class=z.val_per_class, seed=2 * seed, **objects)
        write_dataset(teacher_data, per_class=z.teacher_per_class, val_per_class=0, seed=2 * seed + 1,
                      **objects)  # other images
        os.symlink(os.path.join("..", "data", "val"), os.path.join(teacher_data, "val"))  # the same validation set
    return data, teacher_data


def _fresh(run_dir: str) -> str:
    log = os.path.join(run_dir, "log.jsonl")
    if os.path.exists(log):  # a rerun in the same workdir: the plot shows this run only
        os.remove(log)
    return run_dir


def results_table(z: DemoSize, o: Outcome, rates: dict[str, float], images: int) -> str:
    epochs = f"{z.student_epochs} epochs"
    rows = [
        f"| teacher (resnet18, hard labels, {z.classes * z.teacher_per_class} images; trained once) | "
        f"{o.teacher:.1f} % "
        f"| - | - |",
        f"| one-off labelling: the teacher on {z.pool} crops x {images} images (generate) | - | "
        f"{o.seconds_labelling:.0f} s | - |",
        f"| student, hard labels ({epochs}) | {o.hard:.1f} % | {o.seconds_hard:.0f} s | {rates['hard']:,.0f} |",
        f"| student, online KD (teacher on every crop, {epochs}) | {o.online:.1f} % | {o.seconds_online:.0f} s | "
        f"{rates['online']:,.0f} |",
        f"| student, FKD (stored crops and labels, {epochs}) | **{o.fkd:.1f} %** | **{o.seconds_fkd:.0f} s** | "
        f"{rates['fkd']:,.0f} |",
    ]
    return "| model | val top-1 | wall time | training crops/s |\n|---|---|---|---|\n" + "\n".join(rows)


def run(workdir: str, quick: bool = False, device: str | None = None, seed: int = 0,
        size: DemoSize | None = None) -> dict:
    z = size or (QUICK if quick else FULL)
    t_all = time.perf_counter()
    threads = torch.get_num_threads()  # all cores, or OMP_NUM_THREADS (1 is faster on a machine that is busy)
    print(f"fkd-dali demo in {workdir} ({'quick' if quick else 'full'}, seed {seed}): {one_line(describe())}\n",
          flush=True)
    phases: dict[str, float] = {}

    t = time.perf_counter()
    data, teacher_data = make_data(workdir, z, seed, threads)
    ds = scan_image_folder(split_dir(data, "train"))
    phases["data"] = time.perf_counter() - t
    print(f"1/5 data: {len(ds)} student training images, {z.classes * z.teacher_per_class} other images for the "
          f"teacher, {z.classes * z.val_per_class} validation images; {z.classes} classes "
          f"({', '.join(ds.classes[:4])}, ...), {z.image_size} px  ({phases['data']:.0f} s)", flush=True)

    base = dict(arch="resnet18", input_size=z.image_size, device=device, workers=threads,
                cos=True, overwrite=True, seed=seed, progress_style="run", eval_every=z.eval_every,
                checkpoint_epochs=10)  # epochs of 1-3 s: a checkpoint per epoch cost ~10 % of a student's time
    t = time.perf_counter()
    teacher = train(TrainConfig(data=teacher_data, labels="hard", epochs=z.teacher_epochs, scale=z.teacher_scale,
                                batch_size=z.teacher_batch, lr=z.teacher_lr, warmup_epochs=z.teacher_warmup_epochs,
                                output=_fresh(os.path.join(workdir, "teacher")),
                                progress_label="2/5 teacher", **base))
    phases["teacher"] = time.perf_counter() - t
    ckpt = os.path.join(workdir, "teacher", "checkpoint.pth.tar")
    print(f"2/5 teacher: resnet18, hard labels, {z.teacher_epochs} epochs on its {z.classes * z.teacher_per_class} "
          f"images: val top-1 {teacher['last']['val_top1']:.1f} %  ({phases['teacher']:.0f} s)", flush=True)

    t = time.perf_counter()
    store = os.path.join(workdir, "store")
    spec = TeacherSpec("resnet18", path=ckpt, input_size=z.image_size, interpolation="bilinear")
    rep = generate(GenerateConfig(data=data, save_path=store, teachers=[spec], num_crops=z.pool, top_k=z.top_k,
                                  group_size=8, batch_size=8, device=device, threads=threads, seed=seed,
                                  scale=(0.08, 1.0)))
    phases["generate"] = time.perf_counter() - t
    st = labelstore.open_store(store)
    agree = float((st.read_round(0, z.pool).topk_idx[:, :, 0] == st.targets[:, None]).mean())
    print(f"3/5 generate (one-off labelling): {rep.images} images x {z.pool} crops labelled by the teacher; on "
          f"{100 * (1 - agree):.0f} % of the crops the teacher's top class is not the image's class  "
          f"({phases['generate']:.0f} s)", flush=True)

    extra = {"hard": {},
             "online": dict(teacher_arch="resnet18", teacher_path=ckpt, teacher_input_size=z.image_size),
             "fkd": dict(softlabel_path=store, num_crops=z.num_crops, soft_label_type=f"marginal_smoothing_k{z.top_k}")}
    students = {}
    for i, (labels, name) in enumerate(STUDENTS):
        t = time.perf_counter()
        run_dir = _fresh(os.path.join(workdir, f"student-{labels}"))
        res = train(TrainConfig(data=data, labels=labels, epochs=z.student_epochs, batch_size=z.batch, lr=z.lr,
                                output=run_dir,
                                warmup_epochs=z.warmup_epochs, progress_label=f"4/5 {name}", **base, **extra[labels]))
        phases[f"student ({labels})"] = time.perf_counter() - t
        students[labels] = {"result": res, "history": _history(run_dir)}
    times = " + ".join(f"{phases[f'student ({k})']:.0f} s" for k, _ in STUDENTS)
    print(f"4/5 students: resnet18 on the {len(ds)} student images, {z.student_epochs} epochs, {z.batch} crops per "
          f"step, lr {z.lr} with {z.warmup_epochs} warm-up epochs then cosine, for all three  ({times})", flush=True)

    o = Outcome(teacher=teacher["last"]["val_top1"],
                **{k: students[k]["result"]["last"]["val_top1"] for k, _ in STUDENTS},
                **{f"seconds_{k}": phases[f"student ({k})"] for k, _ in STUDENTS},
                seconds_labelling=phases["generate"])
    rates = {k: sum(h["crops_per_s"] * h["seconds"] for h in v["history"]) / sum(h["seconds"] for h in v["history"])
             for k, v in students.items()}
    t = time.perf_counter()
    png = os.path.join(workdir, "students.png")
    plot_students({name: students[k]["history"] for k, name in STUDENTS}, png,
                  f"ResNet-18 students on the objects data ({len(ds)} images, {z.classes} classes)")
    sheet = show(store, data, "0", os.path.join(workdir, "show"), crop_size=max(96, z.image_size), columns=8)
    phases["report"] = time.perf_counter() - t
    table = results_table(z, o, rates, rep.images)
    lines = verdict(o)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n\n" + "\n".join(lines) + "\n")
    print("5/5 results:\n")
    print(table + "\n")
    print("\n".join(lines))
    print(f"\nplot of the students: {png}\ncontact sheet of {sheet['file']}'s stored crops: {sheet['sheet']}")
    print(f"demo finished in {time.perf_counter() - t_all:.0f} s", flush=True)
    result = {"seed": seed, "outcome": dataclasses.asdict(o), "phases": phases, "rates": rates,
              "seconds": time.perf_counter() - t_all, "plot": png, "sheet": sheet["sheet"], "store": store}
    with open(os.path.join(workdir, RUN_FILE), "w") as f:
        json.dump(result, f, indent=1)
    return result


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.fmean(values), max(values)


def sweep_table(runs: list[dict]) -> str:
    """Per seed: each student's top-1, the teacher's, the margins and the times; then min / mean / max."""
    head = ("| seed | hard | online KD | FKD | teacher | FKD − hard | FKD − online | time hard / online / FKD / "
            "labelling (s) | demo (s) |\n|---|---|---|---|---|---|---|---|---|")
    rows, cols = [], {k: [] for k in ("hard", "online", "fkd", "teacher", "m_hard", "m_online")}
    for r in runs:
        o = r["outcome"]
        vals = {"hard": o["hard"], "online": o["online"], "fkd": o["fkd"], "teacher": o["teacher"],
                "m_hard": o["fkd"] - o["hard"], "m_online": o["fkd"] - o["online"]}
        for k, v in vals.items():
            cols[k].append(v)
        rows.append(f"| {r['seed']} | {o['hard']:.1f} | {o['online']:.1f} | {o['fkd']:.1f} | {o['teacher']:.1f} | "
                    f"{vals['m_hard']:+.1f} | {vals['m_online']:+.1f} | {o['seconds_hard']:.0f} / "
                    f"{o['seconds_online']:.0f} / {o['seconds_fkd']:.0f} / {o['seconds_labelling']:.0f} | "
                    f"{r['seconds']:.0f} |")
    for i, label in enumerate(("min", "mean", "max")):
        s = {k: spread(v)[i] for k, v in cols.items()}
        rows.append(f"| **{label}** | {s['hard']:.1f} | {s['online']:.1f} | {s['fkd']:.1f} | {s['teacher']:.1f} | "
                    f"{s['m_hard']:+.1f} | {s['m_online']:+.1f} | | |")
    return head + "\n" + "\n".join(rows)


def run_seeds(workdir: str, seeds: int, first: int = 0, quick: bool = False, device: str | None = None) -> dict:
    """The demo once per seed (each in ``workdir/seed-S``), then the spread table (also in ``workdir/seeds.md``)."""
    runs = []
    for s in range(first, first + seeds):
        done = os.path.join(workdir, f"seed-{s}", RUN_FILE)
        if os.path.exists(done):  # a finished seed (an earlier or a parallel sweep in the same workdir)
            with open(done) as f:
                runs.append(json.load(f))
            print(f"seed {s}: finished before, results from {done}", flush=True)
            continue
        runs.append(run(os.path.join(workdir, f"seed-{s}"), quick=quick, device=device, seed=s))
        print(flush=True)
    table = sweep_table(runs)
    with open(os.path.join(workdir, "seeds.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(workdir, "seeds.json"), "w") as f:
        json.dump(runs, f, indent=1)
    print(f"{seeds} seeds of the demo ({'quick' if quick else 'full'}), val top-1 % of the last epoch:\n\n{table}")
    return {"runs": runs, "table": table}
