"""``fkd-dali bench WHAT``: its options and the dispatch to the measurement modules beside this one."""

from __future__ import annotations

import argparse
import json
import os

from labelstore.kinds import MAX_DIM

from ..options import POSITIVE, int_range
from . import LOADERS
from .machine import describe, one_line


def add_parser(sub, func) -> None:
    b = sub.add_parser("bench", help="measure the label store, the loader and the generator")
    bs = b.add_subparsers(dest="bench", required=True, metavar="WHAT")
    s = bs.add_parser("store", help="store size vs FKD's files; read_round and append throughput")
    s.add_argument("--size-images", type=POSITIVE, default=1000)
    s.add_argument("--size-crops", type=POSITIVE, default=500)
    s.add_argument("--images", type=POSITIVE, default=100_000)
    s.add_argument("--crops", type=POSITIVE, default=64)
    s.add_argument("--top-k", type=int_range(1, 999), default=5, help="of the simulated teacher's 1000 classes")
    s.add_argument("--round-crops", type=POSITIVE, default=4, help="crops per image read per round (<= --crops)")
    s.add_argument("--dim", type=int_range(0, MAX_DIM), default=128,
                   help="also measure an embedding store (self-supervised FKD) of this D (0: skip it)")
    s.add_argument("--ssl-images", type=POSITIVE, default=1000, help="images of the embedding store")
    s.add_argument("--ssl-crops", type=POSITIVE, default=64, help="crops per image of the embedding store")
    s.add_argument("--workdir", default=None, help="where temporary stores go (default: system temp)")
    s.add_argument("--out", default="bench-results/store.json")
    s.set_defaults(func=func)

    lo = bs.add_parser("loader", help="FKD-DALI vs FKD's loader, standard DALI and decode-only")
    lo.add_argument("--data", default=None, help="dataset root with train/ (default: synthesize photo-like JPEGs)")
    lo.add_argument("--images", type=int, default=1024, help="images to synthesize when --data is not given")
    lo.add_argument("--classes", type=int, default=16)
    lo.add_argument("--pool", type=int, default=16, help="crops per image in the bench label store")
    lo.add_argument("--num-crops", type=int, default=4)
    lo.add_argument("-b", "--batch-size", type=int, default=64, help="images per batch, every contender")
    lo.add_argument("--threads", type=int, default=None, help="DALI threads = DataLoader workers (default: all cores)")
    lo.add_argument("--epochs", type=int, default=5, help="measured epochs per contender (after one warm-up)")
    lo.add_argument("--device", choices=("cpu", "gpu"), default=None, help="default: gpu when there is one")
    lo.add_argument("--only", default=",".join(LOADERS), help=f"comma-separated subset of {','.join(LOADERS)}")
    lo.add_argument("--workdir", default="bench-data", help="where the synthetic data and stores are kept")
    lo.add_argument("--out", default="bench-results/loader.json", help="JSON result; a PNG chart goes beside it")
    lo.set_defaults(func=func)

    ge = bs.add_parser("generate", help="generation crops/s vs the teacher alone; label fidelity")
    ge.add_argument("--data", default=None, help="dataset root with train/ (default: synthesize photo-like JPEGs)")
    ge.add_argument("--images", type=int, default=512)
    ge.add_argument("--classes", type=int, default=16)
    ge.add_argument("-a", "--arch", default=None, help="default: resnet50 on a GPU, resnet18 on the CPU")
    ge.add_argument("--input-size", type=int, default=None, help="default: 224 on a GPU, 112 on the CPU")
    ge.add_argument("--num-crops", type=int, default=8)
    ge.add_argument("--num-seg", type=int, default=8, help="crops per decode")
    ge.add_argument("-b", "--batch-size", type=int, default=8, help="groups per batch (teacher batch = b x num-seg)")
    ge.add_argument("--train-epochs", type=int, default=4, help="epochs to train the benchmark teacher")
    ge.add_argument("--threads", type=int, default=None)
    ge.add_argument("--device", choices=("cpu", "gpu"), default=None)
    ge.add_argument("--workdir", default="bench-data")
    ge.add_argument("--out", default="bench-results/generate.json")
    ge.set_defaults(func=func)

    tr = bs.add_parser("train", help="FKDLoader vs synthetic data in the training step; FKD vs online KD; accuracy")
    tr.add_argument("--data", default=None, help="dataset root with train/ (default: synthesize photo-like JPEGs)")
    tr.add_argument("--images", type=int, default=1024)
    tr.add_argument("--classes", type=int, default=16)
    tr.add_argument("-a", "--arch", default=None, help="student (default: resnet50 on a GPU, resnet18 on the CPU)")
    tr.add_argument("--teacher-arch", default=None, help="online-KD teacher (default: resnet152 GPU, resnet50 CPU)")
    tr.add_argument("--input-size", type=int, default=None, help="default: 224 on a GPU, 64 on the CPU")
    tr.add_argument("-b", "--batch-size", type=int, default=None, help="crops per step (default: 256 GPU, 64 CPU)")
    tr.add_argument("--num-crops", type=int, default=4)
    tr.add_argument("--steps", type=int, default=30, help="timed steps per throughput measurement")
    tr.add_argument("--accuracy", action="store_true", help="also train FKD / hard / online students and compare")
    tr.add_argument("--accuracy-epochs", type=int, default=16)
    tr.add_argument("--threads", type=int, default=None)
    tr.add_argument("--device", choices=("cpu", "gpu"), default=None)
    tr.add_argument("--workdir", default="bench-data")
    tr.add_argument("--out", default="bench-results/train.json")
    tr.set_defaults(func=func)


    me = bs.add_parser("meal", help="Fast MEAL V2 on the demo data: an ensemble store, a hard-label start, MEAL V2 "
                       "with/without the discriminator vs plain FKD from that start, over seeds")
    me.add_argument("--workdir", default="bench-data/meal", help="data, teachers, store and runs (reused when rerun)")
    me.add_argument("--teachers", default="resnet18,resnet34", help="two (or more) teacher architectures")
    me.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                    help="comma-separated seeds of the distillation runs")
    me.add_argument("--epochs", type=int, default=4, help="epochs of each run from the start")
    me.add_argument("--num-crops", type=int, default=1, help="crops per image per step in each run")
    me.add_argument("--size", choices=("small", "large", "quick"), default="small",
                    help="small: the demo's data at 48 px, 1,200 teacher images, shorter teacher and start training "
                         "(default); large: 64 px, 3,000 teacher images (the demo's sizes before issue 14, strong "
                         "teachers); quick: a smoke test, not evidence")
    me.add_argument("--threads", type=int, default=None)
    me.add_argument("--device", choices=("cpu", "gpu"), default=None)
    me.add_argument("--out", default="bench-results/meal.json")
    me.set_defaults(func=func)

    ss = bs.add_parser("ssl", help="self-supervised FKD on the demo data: a MoCo v2 teacher trained without labels, "
                       "its embedding store, students (random init, online, FKD-SSL, a shuffled-store control) by "
                       "linear probe, over seeds")
    ss.add_argument("--seeds", type=POSITIVE, default=3, help="seeds 0..N-1 (each: new data, teacher, students)")
    ss.add_argument("--first-seed", type=int, default=0)
    ss.add_argument("--quick", action="store_true", help="one tiny seed: a smoke test of the flow, not evidence")
    ss.add_argument("--student-epochs", type=POSITIVE, default=None, help="the students' epochs and stored views "
                    "per image (default 16)")
    ss.add_argument("--probe-epochs", type=POSITIVE, default=None, help="the linear probes' epochs (default 15)")
    ss.add_argument("--device", choices=("cpu", "gpu"), default=None)
    ss.add_argument("--workdir", default="bench-data/ssl", help="data, teacher, stores, runs (a finished seed is "
                    "not run again)")
    ss.add_argument("--out", default="bench-results/ssl.json")
    ss.set_defaults(func=func)

    rl = bs.add_parser("relabel", help="dataset distillation: SRe2L's own relabel and trainer vs fkd-dali's on a "
                       "tiny distilled set of the demo's data; top-k vs full labels; bytes and wall time, over seeds")
    rl.add_argument("--sre2l", default=None, help="the SRe2L folder of a VILA-Lab/SRe2L checkout (default: "
                    "$FKD_DALI_SRE2L_DIR)")
    rl.add_argument("--workdir", default="bench-data/relabel", help="data, teacher, labels and runs (reused when "
                    "rerun)")
    rl.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                    help="comma-separated seeds of the students")
    rl.add_argument("--top-k", type=lambda s: [int(x) for x in s.split(",")], default=[5, 10, 50],
                    help="comma-separated k of the top-k copies of the imported store")
    rl.add_argument("--topk-seeds", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="seeds of the top-k students (default: --seeds); each trains after every seed's full-label "
                    "pair")
    rl.add_argument("-a", "--arch", default="shufflenet_v2_x0_5", help="the students (a torchvision model)")
    rl.add_argument("--teacher-arch", default="shufflenet_v2_x0_5", help="the teacher (a torchvision model)")
    rl.add_argument("--lr", type=float, default=0.004, help="the students' AdamW learning rate, both trainers "
                    "(SRe2L's default 0.001)")
    rl.add_argument("--epochs", type=POSITIVE, default=None, help="relabel and student epochs (default 8; SRe2L 300)")
    rl.add_argument("--classes", type=POSITIVE, default=None, help="classes of the demo's data (default 10, all of them)")
    rl.add_argument("--ipc", type=POSITIVE, default=None, help="distilled images per class (default 10)")
    rl.add_argument("--quick", action="store_true", help="a smoke test of the table (tiny; not evidence)")
    rl.add_argument("--threads", type=int, default=None)
    rl.add_argument("--out", default="bench-results/relabel.json")
    rl.set_defaults(func=func)

    sc = bs.add_parser("scale", help="ImageNet scale: scan, first batch, pass switch, per-rank memory at world 1 "
                       "and 8, baseline constructors, verify, a store on a local S3 server")
    sc.add_argument("--images", type=int, default=1_281_167, help="training files (hard links to one JPEG)")
    sc.add_argument("--crops", type=int, default=500, help="crops per image in the store")
    sc.add_argument("--num-crops", type=int, default=4, help="crops per image per pass (a round)")
    sc.add_argument("--input-size", type=int, default=224)
    sc.add_argument("-b", "--batch-size", type=int, default=128, help="train.py's -b (crops per step), world 1")
    sc.add_argument("--rank-batch", type=int, default=32, help="images per rank per batch at world 1 and 8")
    sc.add_argument("--sample", type=int, default=100, help="shards for the verify --sample row")
    sc.add_argument("--threads", type=int, default=None)
    sc.add_argument("--no-s3", action="store_true", help="skip the object-storage row (needs moto[server], s3fs)")
    sc.add_argument("--format", choices=("files", "wds"), default="files",
                    help="wds: the folder packed as WebDataset shards, and from them: the first batch, the index's "
                         "memory per rank at world 8, loader crops/s against the folder and from a local S3 server")
    sc.add_argument("--image-px", type=int, default=32,
                    help="--format wds: side of the one JPEG all files are (small, so the tars stay a few GB)")
    sc.add_argument("--reps", type=int, default=3, help="--format wds: alternating pairs per crops/s comparison")
    sc.add_argument("--batches", type=int, default=16,
                    help="--format wds: batches per crops/s measurement (rank 0 of a world that makes a pass this long)")
    sc.add_argument("--workdir", default=None, help="where the dataset and store are built (default: temp)")
    sc.add_argument("--keep", action="store_true", help="keep the dataset and store for the next run")
    sc.add_argument("--out", default="bench-results/scale.json")
    sc.set_defaults(func=func)


def _write(result: dict, out: str | None) -> None:
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {out}")


def run(args: argparse.Namespace) -> int:
    machine = describe()
    print(f"Machine: {one_line(machine)}\n")
    if args.bench == "store":
        from .store import format_store, size_vs_fkd, throughput
        if args.round_crops > args.crops:
            raise ValueError(f"--round-crops {args.round_crops} is more than --crops {args.crops}: a round reads that "
                             "many of each image's crops")
        size = size_vs_fkd(args.size_images, args.size_crops, args.top_k, args.workdir)
        speed = throughput(args.images, args.crops, args.top_k, args.round_crops, workdir=args.workdir)
        result = {"machine": machine, "size": size, "speed": speed}
        if args.dim:
            from .store import embedding_bench
            result["embedding"] = embedding_bench(args.ssl_images, args.ssl_crops, args.dim, args.round_crops,
                                                  args.workdir)
        print(format_store(result))
        _write(result, args.out)
    elif args.bench == "loader":
        import torch

        from .loader import benchmark, format_table, plot, prepare_data
        device = args.device or ("gpu" if torch.cuda.is_available() else "cpu")
        threads = args.threads or (os.cpu_count() or 1)
        which = [w.strip() for w in args.only.split(",") if w.strip()]
        bad = set(which) - set(LOADERS)
        if bad:
            raise ValueError(f"unknown loader(s) {', '.join(sorted(bad))}; choose from {', '.join(LOADERS)}")
        p = prepare_data(args.workdir, args.data, args.images, args.classes, args.pool)
        if p["synthetic"]:
            s = p["synthetic"]
            print(f"Data: {p['images']} synthetic photo-like JPEGs, mean {s['mean_bytes'] / 1e3:.0f} KB and "
                  f"{s['mean_pixels'] / 1e3:.0f} kpx per image (quality {s['quality']}, 4:2:0)")
        else:
            print(f"Data: {p['images']} images from {p['data']}")
        print(f"{args.num_crops} crops/image, {args.batch_size} images/batch, {threads} threads/workers, "
              f"device {device}\n")
        result = benchmark(p, device=device, batch_size=args.batch_size, num_crops=args.num_crops,
                           threads=threads, epochs=args.epochs, which=which)
        result["machine"] = machine
        print()
        print(format_table(result))
        _write(result, args.out)
        if args.out:
            png = os.path.splitext(args.out)[0] + ".png"
            plot(result, png)
            print(f"wrote {png}")
    elif args.bench == "generate":
        import torch

        from .generate import format_table as gen_table
        from .generate import run as gen_run
        device = args.device or ("gpu" if torch.cuda.is_available() else "cpu")
        result = gen_run(args.workdir, args.data, args.images, args.classes, args.arch, args.input_size,
                         args.num_crops, args.num_seg, args.batch_size, device, args.threads or (os.cpu_count() or 1),
                         args.train_epochs)
        result["machine"] = machine
        print(gen_table(result))
        _write(result, args.out)
    elif args.bench == "train":
        import torch

        from .train import format_table as train_table
        from .train import run as train_run
        device = args.device or ("gpu" if torch.cuda.is_available() else "cpu")
        if args.batch_size is None:
            args.batch_size = 256 if device == "gpu" else 64
        result = train_run(args, device, args.threads or (os.cpu_count() or 1))
        result["machine"] = machine
        print(train_table(result))
        _write(result, args.out)
    elif args.bench == "meal":
        from .meal import format_table as meal_table
        from .meal import run as meal_run
        result = meal_run(args)
        result["machine"] = machine
        print()
        print(meal_table(result))
        _write(result, args.out)
    elif args.bench == "ssl":
        from .ssl import run_seeds
        seeds = 1 if args.quick else args.seeds
        sizes = {k: v for k, v in (("student_epochs", args.student_epochs), ("probe_epochs", args.probe_epochs))
                 if v is not None}
        result = run_seeds(args.workdir, seeds, first=args.first_seed, quick=args.quick, device=args.device, **sizes)
        result["machine"] = machine
        _write(result, args.out)
    elif args.bench == "relabel":
        from .relabel import format_table as relabel_table
        from .relabel import run as relabel_run
        result = relabel_run(args)
        result["machine"] = machine
        print()
        print(relabel_table(result))
        _write(result, args.out)
    elif args.bench == "scale":
        from . import scale
        wds = args.format == "wds"
        result = (scale.run_shards if wds else scale.run)(args)
        result["machine"] = machine
        print((scale.format_shards_table if wds else scale.format_table)(result))
        _write(result, args.out.replace("scale.json", "scale-wds.json") if wds else args.out)
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(args.bench)
    return 0
