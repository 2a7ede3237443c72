"""``fkd-dali bench relabel``: issue 25's evidence at a size a CPU can run — SRe2L's own relabel and trainer against
fkd-dali's, on one tiny distilled set, over seeds.

1. **data**: the demo's ``objects`` images (``fkd-dali synth``): a distilled set of ``--ipc`` images per class
   (with the validation images) and a larger teacher set of other images of the same classes;
2. **teacher**: ``fkd-dali train --labels hard`` on the teacher set with 1,000 outputs (SRe2L's trainer builds
   1,000-class students; the outputs beyond the demo's classes are never a target);
3. **labels**, same epochs, step (``-b``), CutMix, fp16, input size: SRe2L's ``relabel/generate_soft_label.py``
   (run unchanged by ``tests/sre2l_run.py``, the teacher's weights loaded) and ``fkd-dali relabel``;
   ``import-sre2l`` of SRe2L's folder, and copies of it holding only the top-k logits (same crops, same mixing);
4. **students**, per seed: SRe2L's ``validate/train_FKD.py`` on SRe2L's files, and ``fkd-dali train --labels
   relabel`` on the imported store and on each top-k copy, with SRe2L's recipe (KL at T = 3, AdamW with weight
   decay 0.01, linear decay, its step as the batch) at one ``--lr`` for both (SRe2L's 1e-3 moves a student little
   in a few epochs); every final student is evaluated by one evaluator (ours: resize to
   input * 256 / 224, centre crop) on the distilled set's validation images;
5. **report**: top-1 per seed and its spread, store bytes against SRe2L's fp16 files, generation and training wall
   time side by side (each tool run as its own process, start-up included).

SRe2L's trainer hard-codes 224 px crops; ``tests/sre2l_run.py``'s ``SRE2L_INPUT_SIZE`` makes them ``--input-size``
(a 2-core CPU cannot train at 224). Every phase is cached in ``--workdir`` (rerun to add seeds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from labelstore.relabel import create_relabel_store, open_relabel

from ..dataset import scan_image_folder, split_dir
from ..models import create_model
from ..synthetic import write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WRAPPER = os.path.join(REPO, "tests", "sre2l_run.py")
NUM_OUTPUTS = 1000  # SRe2L's train_FKD.py builds torchvision's 1,000-class students


@dataclasses.dataclass(frozen=True)
class Size:
    classes: int = 10          # the objects flavour's shapes: all of them
    ipc: int = 10              # distilled images per class
    teacher_per_class: int = 50
    val_per_class: int = 20
    image_size: int = 32       # the images' side and the crops' (--input-size)
    teacher_epochs: int = 6
    teacher_lr: float = 0.004
    epochs: int = 8            # relabel and student epochs (SRe2L: 300): what a shared 2-core CPU allowed
    batch: int = 20            # SRe2L's step at relabel = every student's batch


FULL = Size()
QUICK = Size(classes=5, ipc=4, teacher_per_class=6, val_per_class=2, image_size=32, teacher_epochs=1, epochs=2,
             batch=10)


def sre2l_dir(given: str | None) -> str:
    """The SRe2L folder of a VILA-Lab/SRe2L checkout (--sre2l, else $FKD_DALI_SRE2L_DIR), checked."""
    d = given or os.environ.get("FKD_DALI_SRE2L_DIR")
    if not d:
        raise SystemExit("bench relabel runs SRe2L's own code: pass --sre2l DIR (the SRe2L folder of a "
                         "VILA-Lab/SRe2L checkout, holding relabel/ and validate/) or set FKD_DALI_SRE2L_DIR")
    for rel in ("relabel/generate_soft_label.py", "validate/train_FKD.py"):
        if not os.path.isfile(os.path.join(d, rel)):
            raise SystemExit(f"{d} has no {rel}: give the SRe2L folder of a VILA-Lab/SRe2L checkout")
    if not os.path.isfile(WRAPPER):
        raise SystemExit(f"{WRAPPER} is missing: bench relabel runs SRe2L's scripts through it (a source checkout "
                         "of fkd-dali has it)")
    return os.path.abspath(d)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _timed(cmd: list[str], env: dict | None = None, log: str | None = None) -> float:
    """Run ``cmd`` (its output to ``log``); its wall seconds. A failure names the command and the log's tail."""
    t = time.perf_counter()
    with open(log or os.devnull, "w") as f:
        run = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - t
    if run.returncode:
        tail = open(log).read()[-3000:] if log else ""
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed (exit {run.returncode}):\n{tail}")
    return seconds


def _cached(path: str, make) -> dict:
    """``make()``'s dict, saved to ``path``; read back when the phase already ran in this workdir."""
    if os.path.exists(path):
        return json.load(open(path))
    rec = make()
    with open(path, "w") as f:
        json.dump(rec, f)
    return rec


def topk_copy(src: str, dst: str, k: int) -> None:
    """A relabel store holding only the top-``k`` logits of ``src``'s full labels: same images, steps, crops and
    mixing (the labels' dtype kept)."""
    rs = open_relabel(src)
    if rs.label_format != "full" or not 1 <= k <= rs.top_k:
        raise SystemExit(f"{src} holds {rs.label_format} labels of {rs.top_k} values per crop: top-{k} copies "
                         "are made of full labels, with k from 1 to the classes")
    st = rs.store
    out = create_relabel_store(
        dst, files=list(st.files), targets=st.targets, sizes=st.sizes(), classes=st.classes,
        fingerprint=st.meta.fingerprint, dataset_root=st.meta.dataset_root, epochs=rs.epochs, batch_size=rs.batch_size, mix=rs.mix,
        label_format="topk", top_k=k, values=rs.values, label_dtype=rs.label_dtype.name, input_size=rs.input_size,
        drop_last=rs.drop_last, kept=rs.step_index, plan=rs.plan, num_classes=rs.store.num_classes,
        source={"kind": "bench-relabel-topk", "from": os.path.basename(src)})
    for a, b in out.shard_rows():
        blk = rs.read_steps(a, b)
        logits = torch.from_numpy(blk.labels.astype(np.float32))
        val, idx = logits.topk(k, dim=-1)
        out.write_steps(a, images=blk.images, boxes=blk.boxes, flips=blk.flips, mix_partner=blk.mix_partner,
                        mix_lam=blk.mix_lam, mix_box=blk.mix_box,
                        label_idx=idx.numpy().astype(out.store.array("label_idx").dtype),
                        label_val=val.numpy().astype(rs.label_dtype))
    if not out.finalize():
        raise SystemExit(f"{dst}: the top-{k} copy did not complete")


def evaluate_checkpoint(path: str, arch: str, val_root: str, input_size: int, threads: int) -> float:
    """Top-1 (%) of the student in ``path`` (ours or SRe2L's ``checkpoint.pth.tar``: its ``state_dict``) on the
    images of ``val_root``: one evaluator for every student."""
    from pipelines import EvalLoader

    from ..checkpoint import read_untrusted
    from ..evaluate import evaluate
    ckpt = read_untrusted(path, SystemExit, "rerun that student", allow=(np.dtype,))
    state = ckpt["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = create_model(arch, NUM_OUTPUTS, image_size=input_size)
    model.load_state_dict(state)
    val = scan_image_folder(val_root)
    loader = EvalLoader(val.root, val.files, val.targets, batch_size=64, crop_size=input_size, device="cpu",
                        num_threads=threads)
    try:
        return float(evaluate(model, loader)["top1"])
    finally:
        loader.close()


def run(args) -> dict:
    z = QUICK if args.quick else FULL
    z = dataclasses.replace(z, **{k: getattr(args, k) for k in ("epochs", "classes", "ipc")
                                  if getattr(args, k, None) is not None})
    sre2l = sre2l_dir(args.sre2l)
    threads = args.threads or (os.cpu_count() or 1)
    py = sys.executable
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    N, B, E = z.image_size, z.batch, z.epochs
    data, teacher_data = os.path.join(work, "distilled"), os.path.join(work, "teacher-data")
    if not os.path.isdir(os.path.join(teacher_data, "train")):
        objects = dict(flavour="objects", classes=z.classes, size=N, workers=threads)
        write_dataset(data, per_class=z.ipc, val_per_class=z.val_per_class, seed=0, **objects)
        write_dataset(teacher_data, per_class=z.teacher_per_class, val_per_class=0, seed=1, **objects)
        os.symlink(os.path.join("..", "distilled", "val"), os.path.join(teacher_data, "val"))
    train_dir, val_dir = split_dir(data, "train"), split_dir(data, "val")
    out: dict = {"size": dataclasses.asdict(z), "lr": args.lr, "arch": args.arch, "teacher_arch": args.teacher_arch,
                 "seeds": list(args.seeds), "top_k": list(args.top_k), "threads": threads}

    # the teacher: hard labels on the larger set, 1,000 outputs
    teacher_run = os.path.join(work, "teacher")
    ckpt = os.path.join(teacher_run, "checkpoint.pth.tar")
    teacher_cmd = [py, "-m", "fkd_dali", "train", teacher_data, "--labels", "hard", "-a", args.teacher_arch,
                   "--num-classes", str(NUM_OUTPUTS), "--epochs", str(z.teacher_epochs), "-b", "32", "--input-size",
                   str(N), "--opt", "adamw", "--lr", str(z.teacher_lr), "--wd", "0.05", "--cos", "--warmup-epochs",
                   "1", "--output", teacher_run, "--overwrite", "-q", "-j", str(threads)]
    out["teacher"] = _cached(os.path.join(work, "teacher.json"), lambda: {
        "wall_s": _timed(teacher_cmd, log=os.path.join(work, "teacher.log"))})
    out["teacher"]["val_top1"] = evaluate_checkpoint(ckpt, args.teacher_arch, val_dir, N, threads)
    print(f"teacher {args.teacher_arch}: val top-1 {out['teacher']['val_top1']:.1f} %", flush=True)
    weights = os.path.join(work, "teacher-state.pt")
    if not os.path.exists(weights):
        from ..checkpoint import read_untrusted
        torch.save(read_untrusted(ckpt, SystemExit, "retrain the teacher")["state_dict"], weights)

    # the labels: SRe2L's generate_soft_label.py and fkd-dali relabel, same settings
    sre2l_labels = os.path.join(work, "sre2l-labels")
    gen_sre2l = [py, WRAPPER, sre2l, "--script", "relabel/generate_soft_label.py", "-a", args.teacher_arch, "-b",
                 str(B), "-j", "0", "--epochs", str(E), "--input-size", str(N), "--use-fp16", "--fkd-path",
                 sre2l_labels, "--mode", "fkd_save", "--mix-type", "cutmix", "--data", train_dir]
    ours_store = os.path.join(work, "ours-store")
    gen_ours = [py, "-m", "fkd_dali", "relabel", data, "--save-path", ours_store, "-a", args.teacher_arch,
                "--teacher-path", ckpt, "--num-classes", str(NUM_OUTPUTS), "--epochs", str(E), "-b", str(B),
                "--input-size", str(N), "--mix-type", "cutmix", "--use-fp16", "-q", "-j", str(threads)]
    out["generate"] = _cached(os.path.join(work, "generate.json"), lambda: {
        "sre2l_s": _timed(gen_sre2l, {"SRE2L_TEACHER": weights}, os.path.join(work, "generate-sre2l.log")),
        "ours_s": _timed(gen_ours, log=os.path.join(work, "generate-ours.log"))})
    print(f"labels: SRe2L's generate_soft_label.py {out['generate']['sre2l_s']:.0f} s, fkd-dali relabel "
          f"{out['generate']['ours_s']:.0f} s", flush=True)

    imported = os.path.join(work, "imported")
    if not os.path.exists(os.path.join(work, "import.json")):
        from ..sre2l_format import import_sre2l
        t = time.perf_counter()
        import_sre2l(sre2l_labels, data, imported, input_size=N, num_classes=NUM_OUTPUTS, overwrite=True,
                     show_progress=False)
        json.dump({"s": time.perf_counter() - t}, open(os.path.join(work, "import.json"), "w"))
    stores = {"full": imported}
    for k in args.top_k:
        stores[f"top{k}"] = os.path.join(work, f"imported-top{k}")
        if not os.path.exists(os.path.join(stores[f"top{k}"], ".done-copy")):
            topk_copy(imported, stores[f"top{k}"], k)
            open(os.path.join(stores[f"top{k}"], ".done-copy"), "w").close()
    out["bytes"] = {"sre2l_files": folder_bytes(sre2l_labels), "ours_generated": folder_bytes(ours_store),
                    **{name: folder_bytes(p) for name, p in stores.items()}}

    # the students: SRe2L's and ours on the same full labels for every seed first, then the top-k copies
    out["runs"] = {}
    topk_seeds = args.seeds if args.topk_seeds is None else args.topk_seeds
    jobs = [(seed, name) for seed in args.seeds for name in ("sre2l", "full")]
    jobs += [(seed, name) for seed in topk_seeds for name in stores if name != "full"]
    for seed, name in jobs:
        if name == "sre2l":
            rec = _sre2l_student(py, sre2l, work, seed, B, E, N, train_dir, val_dir, sre2l_labels, args)
        else:
            rec = _our_student(py, work, seed, name, stores[name], B, E, N, data, threads, args)
        rec["top1"] = evaluate_checkpoint(os.path.join(rec.pop("dir"), "checkpoint.pth.tar"), args.arch, val_dir, N,
                                          threads)
        key = "sre2l" if name == "sre2l" else f"ours-{name}"
        out["runs"].setdefault(key, {})[str(seed)] = rec
        print(f"{key} seed {seed}: top-1 {rec['top1']:.1f} % ({rec['wall_s']:.0f} s)", flush=True)
    out["verdict"] = verdict(out)
    return out


def _sre2l_student(py, sre2l, work, seed, B, E, N, train_dir, val_dir, labels, args) -> dict:
    """SRe2L's validate/train_FKD.py on its own files (seeded through tests/sre2l_run.py); its run's record."""
    student = os.path.join(work, f"sre2l-seed{seed}")
    log = student + ".log"
    cmd = [py, WRAPPER, sre2l, "--batch-size", str(B), "--epochs", str(E), "-j", "0", "--train-dir", train_dir,
           "--val-dir", val_dir, "--output-dir", student, "--fkd-path", labels + "/", "--mix-type", "cutmix",
           "--model", args.arch, "--adamw-lr", str(args.lr)]
    rec = _cached(student + ".json", lambda: {"wall_s": _timed(cmd, {"SRE2L_SEED": str(seed),
                                                                      "SRE2L_INPUT_SIZE": str(N)}, log)})
    return {**rec, "dir": student, "own_top1": _sre2l_last_top1(log), "train_loss": _sre2l_last_loss(log),
            "loop_s": sum(_sre2l_values(log, "train_time = "))}


def _our_student(py, work, seed, name, store, B, E, N, data, threads, args) -> dict:
    """``fkd-dali train --labels relabel`` on ``store`` with SRe2L's recipe; its run's record."""
    run_dir = os.path.join(work, f"ours-{name}-seed{seed}")
    cmd = [py, "-m", "fkd_dali", "train", data, "--labels", "relabel", "--softlabel-path", store, "-a", args.arch,
           "--epochs", str(E), "-b", str(B), "--input-size", str(N), "--temp", "3", "--opt", "adamw", "--lr",
           str(args.lr), "--wd", "0.01", "--sched", "linear", "--warmup-epochs", "0", "--seed", str(seed),
           "--output", run_dir, "--overwrite", "-q", "-j", str(threads)]
    rec = _cached(run_dir + ".json", lambda: {"wall_s": _timed(cmd, log=run_dir + ".log")})
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        history = [json.loads(line) for line in f if line.strip()]
    return {**rec, "dir": run_dir, "train_loss": history[-1].get("train_loss"),
            "loop_s": sum(h["seconds"] for h in history)}


def _sre2l_last_top1(log: str) -> float | None:
    """The top-1 SRe2L's own validation printed last ('TEST Iter E: ... Top-1 err = X')."""
    last = None
    for line in open(log):
        if line.startswith("TEST Iter") and "Top-1 err = " in line:
            last = 100 - float(line.split("Top-1 err = ")[1].split(",")[0])
    return last


def _sre2l_values(log: str, field: str) -> list[float]:
    """A field of each epoch's 'TRAIN Iter E: lr = ..., loss = X, ..., train_time = T' line of train_FKD.py."""
    with open(log) as f:
        return [float(line.split(field)[1].split(",")[0]) for line in f
                if line.startswith("TRAIN Iter") and field in line]


def _sre2l_last_loss(log: str) -> float | None:
    """The training loss (SRe2L's KL) train_FKD.py printed for its last epoch."""
    losses = _sre2l_values(log, "loss = ")
    return losses[-1] if losses else None


def _stats(runs: dict) -> tuple[float, float, float]:
    v = [r["top1"] for r in runs.values()]
    return statistics.mean(v), min(v), max(v)


def verdict(out: dict) -> dict:
    """The comparisons issue 25 asks for, from this run's numbers."""
    runs = out["runs"]
    s_mean, s_lo, s_hi = _stats(runs["sre2l"])
    o_mean, o_lo, o_hi = _stats(runs["ours-full"])
    full = o_mean
    cheapest = None
    for k in sorted(out["top_k"]):
        if f"ours-top{k}" in runs and _stats(runs[f"ours-top{k}"])[0] >= full - 0.5:
            cheapest = k
            break
    ratio = out["bytes"]["sre2l_files"] / out["bytes"][f"top{cheapest}"] if cheapest else None
    mean_s = statistics.mean(r["wall_s"] for r in runs["sre2l"].values())
    mean_o = statistics.mean(r["wall_s"] for r in runs["ours-full"].values())
    return {"same_top1_within_spread": bool(o_lo <= s_hi and s_lo <= o_hi),
            "top1_difference": o_mean - s_mean,
            "smallest_k_within_half_point": cheapest, "bytes_ratio_at_that_k": ratio,
            "generate_speedup": out["generate"]["sre2l_s"] / out["generate"]["ours_s"],
            "train_speedup": mean_s / mean_o}


def format_table(out: dict) -> str:
    seeds = [str(s) for s in out["seeds"]]
    b = out["bytes"]
    rows = [("sre2l", "SRe2L's train_FKD.py on SRe2L's files (full logits, fp16)", b["sre2l_files"]),
            ("ours-full", "fkd-dali train on the imported store (full logits, fp16)", b["full"])]
    rows += [(f"ours-top{k}", f"fkd-dali train on the imported store, top-{k} logits", b[f"top{k}"])
             for k in out["top_k"]]
    lines = [f"| student | label bytes | x smaller | {' | '.join(f'seed {s}' for s in seeds)} | mean | min | max | "
             "wall s (mean) | training loop s (mean) | last-epoch KL (mean) |",
             "|---|---|---|" + "---|" * (len(seeds) + 6)]
    for key, label, nbytes in rows:
        got = out["runs"].get(key, {})
        vals = [got[s]["top1"] if s in got else None for s in seeds]
        have = [v for v in vals if v is not None]
        stats = f"{statistics.mean(have):.1f} | {min(have):.1f} | {max(have):.1f}" if have else "- | - | -"
        wall = f"{statistics.mean(got[s]['wall_s'] for s in seeds if s in got):.0f}" if have else "-"
        losses = [got[s]["train_loss"] for s in seeds if got.get(s, {}).get("train_loss") is not None]
        loss = f"{statistics.mean(losses):.4f}" if losses else "-"
        loops = [got[s]["loop_s"] for s in seeds if got.get(s, {}).get("loop_s") is not None]
        loop = f"{statistics.mean(loops):.0f}" if loops else "-"
        lines.append(f"| {label} | {nbytes:,} | {b['sre2l_files'] / nbytes:.1f} | "
                     f"{' | '.join('-' if v is None else f'{v:.1f}' for v in vals)} | {stats} | {wall} | {loop} | {loss} |")
    g, v = out["generate"], out.get("verdict", {})
    lines += ["", f"labels ({out['size']['epochs']} epochs, step {out['size']['batch']}, CutMix, fp16): SRe2L's "
              f"generate_soft_label.py {g['sre2l_s']:.1f} s, fkd-dali relabel {g['ours_s']:.1f} s "
              f"(x{g['sre2l_s'] / g['ours_s']:.2f}); fkd-dali's own store {b['ours_generated']:,} bytes",
              f"teacher {out['teacher_arch']}: val top-1 {out['teacher']['val_top1']:.1f} %; students "
              f"{out.get('arch', '?')}, {out['size']['epochs']} epochs, batch {out['size']['batch']}, KL at T 3, "
              f"AdamW lr {out.get('lr', '?')}"]
    own = [r.get("own_top1") for r in out["runs"]["sre2l"].values()]
    if all(x is not None for x in own):
        lines.append("SRe2L's own validation of its students (last epoch): "
                     + ", ".join(f"{x:.1f}" for x in own) + " %")
    if v:
        k = v["smallest_k_within_half_point"]
        lines.append(f"same top-1 within the seed spread: {'yes' if v['same_top1_within_spread'] else 'NO'} "
                     f"(fkd-dali - SRe2L: {v['top1_difference']:+.1f} points); smallest k within 0.5 points of full: "
                     + (f"{k} ({v['bytes_ratio_at_that_k']:.0f}x smaller than SRe2L's files)" if k else "none")
                     + f"; SRe2L's wall time / fkd-dali's: training x{v['train_speedup']:.2f}, labelling "
                     f"x{v['generate_speedup']:.2f}")
    return "\n".join(lines)
