"""``fkd-dali bench``: side-by-side measurements that report ratios, with the machine named."""

from __future__ import annotations

import argparse
import json
import os

from .machine import describe, one_line


def add_parser(sub, func) -> None:
    b = sub.add_parser("bench", help="measure the label store, the loader and the generator")
    bs = b.add_subparsers(dest="bench", required=True, metavar="WHAT")
    s = bs.add_parser("store", help="store size vs FKD's files; read_round and append throughput")
    s.add_argument("--size-images", type=int, default=1000)
    s.add_argument("--size-crops", type=int, default=500)
    s.add_argument("--images", type=int, default=100_000)
    s.add_argument("--crops", type=int, default=64)
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--round-crops", type=int, default=4)
    s.add_argument("--workdir", default=None, help="where temporary stores go (default: system temp)")
    s.add_argument("--out", default="bench-results/store.json")
    s.set_defaults(func=func)


def run(args: argparse.Namespace) -> int:
    machine = describe()
    if args.bench == "store":
        from .store import size_vs_fkd, throughput
        size = size_vs_fkd(args.size_images, args.size_crops, args.top_k, args.workdir)
        speed = throughput(args.images, args.crops, args.top_k, args.round_crops, workdir=args.workdir)
        result = {"machine": machine, "size": size, "speed": speed}
        print(format_store(result))
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(args.bench)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0


def format_store(r: dict) -> str:
    s, p = r["size"], r["speed"]
    lines = [f"Machine: {one_line(r['machine'])}", "",
             f"Store size, {s['images']} images x {s['crops']} crops x top-{s['top_k']}, {s['content']}:", "",
             "| format | B/crop apparent | B/crop allocated | ours ÷ it (apparent) | ours ÷ it (allocated) |",
             "|---|---|---|---|---|",
             f"| fkd-dali store | {s['ours_bytes_per_crop']['apparent']:.2f} | "
             f"{s['ours_bytes_per_crop']['allocated']:.2f} | 1 | 1 |",
             f"| FKD files, float16 | {s['fkd_fp16_bytes_per_crop']['apparent']:.2f} | "
             f"{s['fkd_fp16_bytes_per_crop']['allocated']:.2f} | {s['ratio_vs_fp16']['apparent']:.3f} | "
             f"{s['ratio_vs_fp16']['allocated']:.3f} |",
             f"| FKD files, float32 | {s['fkd_fp32_bytes_per_crop']['apparent']:.2f} | "
             f"{s['fkd_fp32_bytes_per_crop']['allocated']:.2f} | {s['ratio_vs_fp32']['apparent']:.3f} | "
             f"{s['ratio_vs_fp32']['allocated']:.3f} |", "",
             "Our bytes per crop by array: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                       s["ours_bytes_per_crop_by_array"].items()), "",
             f"Store speed, {p['images']:,} images x {p['crops']} crops x top-{p['top_k']} "
             f"({p['layout']['rows_per_shard']} rows/shard, {p['layout']['crops_per_chunk']} crops/chunk):", "",
             "| operation | crops/s |", "|---|---|",
             f"| append (write_block, whole shards) | {p['append_crops_per_s'] / 1e6:.2f} M |",
             f"| read_round (n={p['round_crops']}, into RAM) | {p['read_round_crops_per_s'] / 1e6:.2f} M |",
             "", f"A round of n={p['round_crops']} holds {p['round_mib_in_ram']:.1f} MiB in RAM; read_rows of "
             f"1000 random rows took {p['read_rows_1000_random_s']:.2f} s."]
    return "\n".join(lines)
