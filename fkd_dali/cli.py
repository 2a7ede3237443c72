"""``fkd-dali`` command line: one subcommand per job; each one's work lives in its own module."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import labelstore

from .interrupt import exit_code, terminate_like_ctrl_c
from .options import (NON_NEGATIVE, POSITIVE, Parser, add_generate_args, add_linear_eval_args, add_train_args,
                      int_range, prepare_train, train_config)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from labelstore.locking import store_writer_lock
    store = labelstore.open_store(args.store, mode="r+" if args.clear_rows else "r")
    if args.clear_rows:
        start, stop = args.clear_rows
        with store_writer_lock(args.store):  # not while a generate run writes the store
            store.clear_done(start, stop)
        print(f"rows {start}..{stop - 1} of {args.store} marked not done; rerun generation to relabel them")
    if args.verify or args.sample:
        from .fkd_format import stem_collisions
        from .progress import progress
        total = min(args.sample, len(store.shard_ranges())) if args.sample else len(store.shard_ranges())
        with progress(total=total, desc="verify", unit="shard") as bar:
            v = store.verify(sample=args.sample, workers=args.workers, progress=bar.update)
        what = f"{v['shards']} of {v['shards_total']} shards (random sample)" if args.sample else f"{v['shards']} shards"
        print(f"verified {what}: every chunk decodes, {v['rows_checked']} done rows hold valid labels, all "
              f"{store.num_images:,} file names stay inside the dataset folder")
        clashes = stem_collisions(store.files) if store.kind.exportable else []  # only export-fkd minds them
        if clashes:
            print(f"note: {len(clashes)} file name(s) share an FKD label-file name with another (FKD keys images by "
                  "class and name up to the first dot), so `export-fkd` refuses this store: "
                  + "; ".join(f"{a} and {b} -> {stem}.tar" for stem, a, b in clashes[:5]))
    summary = labelstore.summarize(store)
    print(json.dumps(summary, indent=2) if args.json else labelstore.format_summary(summary))
    return 0


def _row_range(text: str) -> tuple[int, int]:
    """``--clear-rows A:B`` (rows A..B-1) or ``A`` (one row), as (A, B); the store checks B <= its rows."""
    a, colon, b = text.partition(":")
    try:
        start, stop = int(a), int(b) if colon else int(a) + 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give the rows as A:B (rows A..B-1, e.g. 0:8) or one row "
                                         "A") from None
    if not 0 <= start < stop:
        raise argparse.ArgumentTypeError(f"{text!r} holds no row: A:B clears rows A..B-1, so it needs 0 <= A < B "
                                         "(e.g. 0:8)")
    return start, stop


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give at least 1")
    return value


def _cmd_import_fkd(args: argparse.Namespace) -> int:
    from .fkd_format import import_fkd
    rep = import_fkd(args.src, args.data, args.save_path, allow_missing=args.allow_missing,
                     workers=args.workers, overwrite=args.overwrite)
    print(f"imported {rep.imported} images ({rep.label_type}, coords {rep.coord_dtype}, largest box "
          f"rounding {rep.max_rounding_px:.4f} px) into {rep.store}"
          + (f"; {len(rep.missing)} images had no label file and are not done" if rep.missing else ""))
    return 0


def _cmd_export_fkd(args: argparse.Namespace) -> int:
    from .fkd_format import export_fkd
    rep = export_fkd(args.store, args.out, fp16=args.fp16, label_type=args.label_type, arrays="numpy" if args.numpy
                     else "torch", dataset_folder=args.dataset_folder, overwrite=args.overwrite)
    if args.dataset_folder is None:
        readers = (f"FKD's trainer reads them with --softlabel_path {args.out} --soft_label_type {rep.fkd_label_type}. "
                   "MEAL V2's FKD_train.py reads one folder deeper, SOFTLABEL_PATH/<last folder of its "
                   "--imagenet>/train/...: for it, export with --dataset-folder NAME")
    else:
        inner = os.path.join(args.out, args.dataset_folder)
        readers = (f"MEAL V2's FKD_train.py reads them with --softlabel_path {args.out} --imagenet "
                   f".../{args.dataset_folder} --soft_label_type {rep.fkd_label_type} (FKD's trainer with "
                   f"--softlabel_path {inner})")
    print(f"wrote {rep.written} FKD label files ({rep.layout} layout) under {args.out}; {readers}"
          + ("; float16 files need FKD's loss patched (see docs/reliability.md)" if args.fp16 else ""))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate
    from .options import generate_config
    if not args.save_path and not args.evaluate:
        raise ValueError("--save-path STORE is required (the label store to write or resume)")
    rep = generate(generate_config(args))
    if args.evaluate:
        return 0
    tag = f"rank {rep.rank}/{rep.world_size}: " if rep.world_size > 1 else ""
    if rep.shards:
        print(f"{tag}labelled {rep.images:,} images, {rep.crops:,} crops in {rep.seconds:.1f} s "
              f"({rep.crops_per_s:,.0f} crops/s) in {rep.shards} shard(s) -> {rep.store}")
    else:
        print(f"{tag}nothing to label: every shard {'of this rank ' if tag else ''}in {rep.store} was already done")
    if rep.skipped:
        print(f"{tag}left out {len(rep.skipped)} unreadable image(s) (--skip-corrupt; recorded in the store, never "
              "trained on): " + "; ".join(why for _, why in rep.skipped[:5]) + (" ..." if len(rep.skipped) > 5 else ""))
    print(f"{tag}store {'complete' if rep.complete else 'not complete yet (other ranks, or rerun to resume)'}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.command import run
    return run(args)


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synthetic import write_dataset
    info = write_dataset(args.out, flavour=args.flavour, classes=args.classes, per_class=args.per_class,
                         val_per_class=args.val_per_class, size=args.size, quality=args.quality,
                         seed=args.seed, workers=args.workers,
                         **({"distractors": args.distractors} if args.distractors is not None else {}))
    print(json.dumps(info, indent=2))
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from .pack import DEFAULT_SHARD_BYTES, pack, parse_bytes
    size = parse_bytes(args.shard_size) if args.shard_size else DEFAULT_SHARD_BYTES
    for split, s in pack(args.data, args.out, args.format, size).items():
        print(f"{split}: {len(s):,} images in {len(s.names)} {args.format} shard(s) -> {s.root}")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from .pack import index
    for split, s in index(args.shards, args.format, args.classes, args.dali_index, args.force).items():
        print(f"{split}: {len(s):,} samples of {len(s.classes)} classes in {len(s.names)} {s.format.NAME} shard(s) "
              f"indexed -> {s.root}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .show import show
    r = show(args.store, args.data, args.image, args.out, crop_size=args.crop_size, columns=args.columns,
             max_crops=args.max_crops, device=args.device)
    print(f"{r['file']} (row {r['row']}): {r['crops']} crops -> {r['sheet']} and crop_<k>.png in {args.out}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import main as doctor_main
    return doctor_main(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run, run_seeds
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: give 1 or more seeds")
    if args.seeds > 1:
        run_seeds(args.workdir, args.seeds, first=args.seed, quick=args.quick, device=args.device)
    else:
        run(args.workdir, quick=args.quick, device=args.device, seed=args.seed)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    cfg, scan = prepare_train(args)
    from .train import train
    result = train(cfg, scan)
    if not args.evaluate and "best_top1" in result:
        if result.get("interrupted"):
            return exit_code(signal.Signals[result["interrupted"]])
        last = result["last"]
        val = (f"best val top-1 {result['best_top1']:.2f}%, last {last['val_top1']:.2f}%" if last and "val_top1" in last
               else f"last train loss {last['train_loss']:.4f}" if last else
               "not validated yet (validation runs at the end of each segment)")
        print(f"done: {result['arch']} ({result['labels']} labels), {val}, {result['global_step']} steps in "
              f"{result['seconds']:.0f} s; checkpoints in {result['output']}"
              + (" (stopped by --max-steps)" if result["stopped_early"] else ""))
    return 0


def _cmd_linear_eval(args: argparse.Namespace) -> int:
    from .options import prepare_linear_eval
    cfg, scan = prepare_linear_eval(args)
    from .linear_eval import linear_eval
    rep = linear_eval(cfg, scan)
    probe = rep.get("probe")
    if probe is None:
        return 0
    if probe.get("interrupted"):
        return exit_code(signal.Signals[probe["interrupted"]])
    last = probe["last"]
    if last is None or "val_top1" not in last:
        val = "not validated yet (validation runs at the end of each epoch)"
    else:
        val = (f"top-1 {last['val_top1']:.2f}%  top-5 {last['val_top5']:.2f}% on {os.path.join(cfg.data, 'val')} "
               f"(best top-1 {probe['best_top1']:.2f}%)")
    print(f"linear probe of {cfg.checkpoint} ({rep['source']}): {val} after {probe['global_step']} steps in "
          f"{probe['seconds']:.0f} s; the frozen backbone is bit for bit the checkpoint's; checkpoints in "
          f"{probe['output']}" + (" (stopped by --max-steps: not the final accuracy)" if probe["stopped_early"]
                                  else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="fkd-dali", description=(
        "Fast Knowledge Distillation on NVIDIA DALI: label every image's random crops with a teacher once "
        "(generate), then train students that replay those exact crops on the GPU (train)."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="label a dataset's crops with one or several teachers",
                       description="Label every training image's RandomResizedCrop crops with one or several "
                       "teachers into a label store. Rerun the same command to resume; launch with torchrun (or "
                       "--rank/--world-size) to shard the work. FKD's option spellings are accepted.")
    add_generate_args(g)
    g.set_defaults(func=_cmd_generate)

    t = sub.add_parser("train", help="train a student from a label store (or a hard-label / online-KD baseline)",
                       description="FKD training: replay the stored crops with their soft labels (DALI), DDP via "
                       "torchrun, exact resume. FKD's train_FKD.py / train_ViT_FKD.py flags are accepted.")
    add_train_args(t)
    t.set_defaults(func=_cmd_train)

    le = sub.add_parser("linear-eval", help="a network's frozen features by linear probe (MoCo's protocol) and kNN",
                        description="Linear evaluation as MoCo's and S2-BNN's main_lincls.py: CHECKPOINT's backbone "
                        "frozen (in eval mode), a new linear classifier trained with cross-entropy on DATA/train "
                        "(SGD, lr 30, 100 epochs, x0.1 at 60 and 80, batch 256), top-1/top-5 on DATA/val; DDP via "
                        "torchrun and exact --resume as train. --knn K adds a weighted kNN on the frozen features.")
    add_linear_eval_args(le)
    le.set_defaults(func=_cmd_linear_eval)

    i = sub.add_parser("inspect", help="summarise a label store (shape, chunking, bytes per crop, teachers)")
    i.add_argument("store", metavar="STORE", help="the label store folder")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--verify", action="store_true",
                   help="decode every chunk and check every label (in parallel over shards, with progress)")
    i.add_argument("--sample", type=_at_least_one, metavar="K", help="verify K random shards only (a quick check)")
    i.add_argument("-j", "--workers", type=_at_least_one, help="processes for --verify (default: the cores)")
    i.add_argument("--clear-rows", metavar="A:B", type=_row_range,
                   help="mark rows A..B-1 not done so generation relabels them")
    i.set_defaults(func=_cmd_inspect)

    im = sub.add_parser("import-fkd", help="convert FKD's per-image soft-label files into a label store")
    im.add_argument("src", metavar="SRC", help="FKD label folder (SRC/<class>/<stem>.tar, or one level above)")
    im.add_argument("--data", required=True, help="dataset root holding train/")
    im.add_argument("--save-path", "--save_path", dest="save_path", required=True, help="store to create")
    im.add_argument("--allow-missing", action="store_true",
                    help="import what exists; images without a label file stay not done")
    im.add_argument("-j", "--workers", type=int, default=0, help="processes reading label files")
    im.add_argument("--overwrite", action="store_true", help="replace an existing store at --save-path")
    im.set_defaults(func=_cmd_import_fkd)

    ex = sub.add_parser("export-fkd", help="write a label store as FKD's per-image soft-label files")
    ex.add_argument("store", metavar="STORE", help="the label store to export")
    ex.add_argument("--out", required=True, help="output folder (written as OUT/<split>/<class>/<stem>.tar)")
    ex.add_argument("--label-type", dest="label_type", choices=("auto", "hard", "smoothing", "marginal"),
                    default="auto", help="FKD's layout of the labels: hard (C,) class ids, smoothing (C, 2), marginal "
                    "(C, 2, k); auto: the store's recorded label type (hard for --label-type hard stores)")
    ex.add_argument("--fp16", action="store_true",
                    help="float16 coords and probabilities, as FKD's --use_fp16 (FKD's trainer cannot read them "
                         "unpatched: see docs/reliability.md)")
    ex.add_argument("--numpy", action="store_true",
                    help="numpy arrays, as FKD's generator writes them (torch >= 2.6 then needs weights_only=False "
                         "to load them); default: torch tensors, which any torch loads safely")
    ex.add_argument("--dataset-folder", metavar="NAME",
                    help="write OUT/NAME/train/<class>/<stem>.tar, the layout MEAL V2's FKD_train.py reads (NAME: the "
                         "last folder of the --imagenet path it is given; it reads one folder deeper than FKD)")
    ex.add_argument("--overwrite", action="store_true", help="replace label files already in OUT")
    ex.set_defaults(func=_cmd_export_fkd)

    s = sub.add_parser("synth", help="write a synthetic ImageFolder dataset of real JPEGs")
    s.add_argument("--out", required=True, help="dataset root to write (OUT/train/<class>/, OUT/val/<class>/)")
    s.add_argument("--flavour", choices=("objects", "photo"), default="objects",
                   help="objects: a class object on clutter with distractors, where per-crop soft labels matter "
                        "(the demo's); photo: ImageNet-like size and JPEG quality, for throughput work")
    s.add_argument("--classes", type=POSITIVE, default=10, help="number of classes")
    s.add_argument("--per-class", type=NON_NEGATIVE, default=50, help="training images per class")
    s.add_argument("--val-per-class", type=NON_NEGATIVE, default=10, help="validation images per class")
    s.add_argument("--size", type=int, default=0,
                   help="side in px, at most 8192 (objects: default 128; photo: default an ImageNet-like 250..500 "
                        "mix)")
    s.add_argument("--quality", type=int_range(1, 95), default=90, help="JPEG quality (1-95)")
    s.add_argument("--distractors", type=int,
                   help="objects: at most this many smaller objects of other classes per image (default 5, the "
                        "demo's)")
    s.add_argument("--seed", type=int, default=0, help="the same seed writes the same files")
    s.add_argument("-j", "--workers", type=NON_NEGATIVE, default=0, help="processes writing images (0: this one)")
    s.set_defaults(func=_cmd_synth)

    pk = sub.add_parser("pack", help="write an ImageFolder dataset as shards (WebDataset tars, ...) with their index")
    pk.add_argument("data", metavar="DATA", help="dataset root holding train/ and val/ in ImageFolder layout")
    pk.add_argument("--out", required=True, metavar="SHARDS", help="where to write SHARDS/train and SHARDS/val "
                    "(new folders: nothing is overwritten); give SHARDS as DATA to generate, train, show")
    pk.add_argument("--format", default="wds", help="shard format (default wds: WebDataset tars)")
    pk.add_argument("--shard-size", metavar="BYTES", help="images per shard, in bytes (default 1G; e.g. 256M)")
    pk.set_defaults(func=_cmd_pack)

    ix = sub.add_parser("index", help="index shards made elsewhere (WebDataset tars, ...) so fkd-dali can read them")
    ix.add_argument("shards", metavar="SHARDS", help="folder holding train/ and val/ shard folders, or one of them")
    ix.add_argument("--format", help="shard format (default: the one whose files SHARDS holds)")
    ix.add_argument("--classes", metavar="FILE", help="class names, one a line, in class-number order "
                    "(default: the numbers)")
    ix.add_argument("--dali-index", action="store_true", help="also write DALI's index file beside each shard")
    ix.add_argument("--force", action="store_true", help="index a set that has an index again")
    ix.set_defaults(func=_cmd_index)

    sh = sub.add_parser("show", help="an image's stored crops as the loader replays them, with their labels")
    sh.add_argument("store", metavar="STORE", help="the label store")
    sh.add_argument("data", metavar="DATA", help="dataset root holding train/")
    sh.add_argument("--image", required=True, help="store row number, or the file's path relative to train/")
    sh.add_argument("--out", required=True, help="folder for sheet.png and crop_<k>.png")
    sh.add_argument("--crop-size", type=int, default=224, help="side of each crop in px, as the loader's --input-size")
    sh.add_argument("--columns", type=int, default=8, help="crops per row of the contact sheet")
    sh.add_argument("--max-crops", type=int, default=64, help="crops on the sheet (every crop gets its PNG)")
    sh.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                    help="decode and cut the crops on the CPU (default) or the GPU, as a GPU training run sees them")
    sh.set_defaults(func=_cmd_show)

    d = sub.add_parser("demo", help="the end-to-end flow on generated data (what `make demo` runs)")
    d.add_argument("--workdir", default="demo-out", help="folder for the demo's data, stores, runs and report")
    d.add_argument("--quick", action="store_true", help="fewer images and epochs (for tests)")
    d.add_argument("--device", choices=("cpu", "gpu"), help="default: the GPU when there is one")
    d.add_argument("--seed", type=int, default=0, help="draws the data, the teacher and the students (default 0)")
    d.add_argument("--seeds", type=int, default=1,
                   help="run the demo for N seeds (--seed, --seed+1, ...; each in WORKDIR/seed-S) and print the "
                        "spread of the accuracies (docs/benchmarks.md's table)")
    d.set_defaults(func=_cmd_demo)

    from .bench.command import add_parser as add_bench_parser
    add_bench_parser(sub, _cmd_bench)
    from .doctor import add_parser as add_doctor_parser
    add_doctor_parser(sub, _cmd_doctor)
    return p


def _resume_hint(args: argparse.Namespace) -> str:
    """What to do after a command was stopped at once."""
    if args.command == "generate":
        return "finished shards are kept: rerun the same command to resume (nothing is labelled twice)"
    if args.command == "train" and not args.evaluate:
        from .train_config import TrainError
        try:  # the run's output folder, as the run itself resolved it (its recipe decides the default labels)
            output = train_config(args).resolved().output
        except (ValueError, TrainError):  # stopped before its options were taken: nothing was written
            return "rerun the same command to start again"
        last = os.path.join(output, "checkpoint.pth.tar")
        if not os.path.exists(last):
            return (f"no checkpoint was written yet ({last} is written at the end of a segment, and every "
                    "--checkpoint-every steps): rerun the same command to start again")
        from .checkpoint import describe
        return f"the last checkpoint written is {describe(last)}: rerun the same command with --resume {last} to " \
               "continue from it"
    if args.command == "import-fkd":
        return "no store was left behind: rerun the same command"
    return ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with terminate_like_ctrl_c():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        hint = _resume_hint(args)
        print(f"fkd-dali {args.command}: stopped by {signal.Signals(signum).name}" + (f"; {hint}" if hint else ""),
              file=sys.stderr)
        return exit_code(signum)
    except BrokenPipeError:  # e.g. `fkd-dali inspect STORE | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (labelstore.StoreError, FileNotFoundError, ValueError) as e:
        print(f"fkd-dali {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # permissions, a file where a folder belongs, a full disk ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"fkd-dali {args.command}: error: {where}{e.strerror or e}. Check that path and its permissions "
              "(a read-only folder or store cannot be written)", file=sys.stderr)
        return 1
    except Exception as e:  # errors of our own modules carry their fix in the message
        if type(e).__module__.startswith(("fkd_dali", "pipelines", "labelstore")):
            print(f"fkd-dali {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
