"""``fkd-dali`` command line: one subcommand per job; each one's work lives in its own module."""

from __future__ import annotations

import argparse
import json
import sys

import labelstore


def _cmd_inspect(args: argparse.Namespace) -> int:
    store = labelstore.open_store(args.store, mode="r+" if args.clear_rows else "r")
    if args.clear_rows:
        a, _, b = args.clear_rows.partition(":")
        start, stop = int(a), int(b or int(a) + 1)
        store.clear_done(slice(start, stop))
        print(f"rows {start}..{stop - 1} of {args.store} marked not done; rerun generation to relabel them")
    if args.verify:
        v = store.verify()
        print(f"verified {v['shards']} shards: every chunk decodes, {v['rows_done']} done rows hold valid labels")
    summary = labelstore.summarize(store)
    print(json.dumps(summary, indent=2) if args.json else labelstore.format_summary(summary))
    return 0


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
    n = export_fkd(args.store, args.out, fp16=args.fp16)
    print(f"wrote {n} FKD label files under {args.out} (use --softlabel_path {args.out} with FKD)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench
    return bench.run(args)


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synthetic import write_dataset
    info = write_dataset(args.out, flavour=args.flavour, classes=args.classes, per_class=args.per_class,
                         val_per_class=args.val_per_class, size=args.size, quality=args.quality,
                         seed=args.seed, workers=args.workers)
    print(json.dumps(info, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run
    run(args.workdir, quick=args.quick)
    return 0


def _not_yet(name: str, issue: str):
    def run(args: argparse.Namespace) -> int:
        print(f"fkd-dali {name} is not yet available ({issue}).", file=sys.stderr)
        return 2
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fkd-dali", description=(
        "Fast Knowledge Distillation on NVIDIA DALI: label every image's random crops with a teacher once "
        "(generate), then train students that replay those exact crops on the GPU (train)."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="label a dataset's crops with one or several teachers")
    g.add_argument("data", metavar="DATA", help="dataset root holding train/ and val/")
    g.set_defaults(func=_not_yet("generate", "the generate issue"))

    t = sub.add_parser("train", help="train a student from a label store")
    t.add_argument("data", metavar="DATA", help="dataset root holding train/ and val/")
    t.set_defaults(func=_not_yet("train", "the train issue"))

    i = sub.add_parser("inspect", help="summarise a label store (shape, chunking, bytes per crop, teachers)")
    i.add_argument("store", metavar="STORE")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.add_argument("--verify", action="store_true", help="decode every chunk and check every label")
    i.add_argument("--clear-rows", metavar="A:B", help="mark rows A..B-1 not done so generation relabels them")
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
    ex.add_argument("store", metavar="STORE")
    ex.add_argument("--out", required=True, help="output folder (written as OUT/<split>/<class>/<stem>.tar)")
    ex.add_argument("--fp16", action="store_true", help="float16 coords and labels, as FKD's --use_fp16")
    ex.set_defaults(func=_cmd_export_fkd)

    s = sub.add_parser("synth", help="write a synthetic ImageFolder dataset of real JPEGs")
    s.add_argument("--out", required=True)
    s.add_argument("--flavour", choices=("photo",), default="photo",
                   help="photo: ImageNet-like size and JPEG quality, for throughput work")
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--per-class", type=int, default=50)
    s.add_argument("--val-per-class", type=int, default=10)
    s.add_argument("--size", type=int, default=0, help="longer side in px (0: ImageNet-like 300..500 mix)")
    s.add_argument("--quality", type=int, default=90)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-j", "--workers", type=int, default=0)
    s.set_defaults(func=_cmd_synth)

    d = sub.add_parser("demo", help="the end-to-end flow on generated data (what `make demo` runs)")
    d.add_argument("--workdir", default="demo-out")
    d.add_argument("--quick", action="store_true", help="fewer images and epochs (for tests)")
    d.set_defaults(func=_cmd_demo)

    from .bench import add_parser as add_bench_parser
    add_bench_parser(sub, _cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (labelstore.StoreError, FileNotFoundError, ValueError) as e:
        print(f"fkd-dali {args.command}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # errors of our own modules carry their fix in the message
        if type(e).__module__.startswith(("fkd_dali", "pipelines", "labelstore")):
            print(f"fkd-dali {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
