"""``fkd-dali doctor``: is this machine ready for a week-long job? The environment, then the checks that matter
most (decode parity, replay parity, zero copy, buffer lifetime, a training step with resume, generation
parity, DDP, memory per rank), then short benchmarks with their ratios, most important first; it stops
cleanly at ``--deadline`` and writes ``doctor.json`` and ``doctor.md`` to ``--out``.

``--plant FAULT`` runs the same checks with a known fault introduced (a shifted box, a decoder option
changed): the checks that guard against it must fail, which is how the doctor shows it can.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
import traceback

from ..options import POSITIVE, real
from .faults import FAULTS

ORDER = ("decode", "replay", "zero-copy", "buffers", "train", "generate", "ddp", "memory",
         "bench-loader", "bench-train", "bench-generate", "bench-online")


def add_parser(sub, func) -> None:
    d = sub.add_parser("doctor", help="check this machine (GPU, DALI, torch) end to end and time the data path",
                       description=__doc__.split("\n\n")[0])
    d.add_argument("--device", choices=("cpu", "gpu"), default=None, help="default: the GPU when there is one")
    d.add_argument("--out", default="doctor-out", help="folder for doctor.json and doctor.md (default doctor-out)")
    d.add_argument("--deadline", type=real(0.0, above=True), default=None,
                   help="seconds: checks that would not finish by then are skipped (default 360 on a GPU, 180 on "
                        "the CPU)")
    d.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(ORDER)}")
    d.add_argument("--plant", choices=sorted(FAULTS), action="append", default=[],
                   help="introduce a known fault to see the checks catch it (repeatable)")
    d.add_argument("-j", "--threads", type=POSITIVE, default=None, help="DALI threads (default: all cores)")
    d.add_argument("--workdir", default=None, help="where its test images and stores go (default: a temp folder, "
                   "removed afterwards)")
    d.set_defaults(func=func)


def environment(device: str) -> dict:
    import numpy
    import torch
    import zarr

    from pipelines.dali_install import describe as dali_describe

    from ..bench.machine import describe
    env = describe()
    env.update(dali_describe())
    env.update({"numpy": numpy.__version__, "zarr": zarr.__version__, "platform": platform.platform(),
                "device": device, "torch_cuda": torch.version.cuda,
                "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None})
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update({"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                    "gpu_capability": f"{p.major}.{p.minor}", "gpus": torch.cuda.device_count(),
                    "cudnn": torch.backends.cudnn.version()})
    return env


def _one_line_env(env: dict) -> str:
    gpu = (f"{env.get('gpu')} ({env.get('gpu_memory_gib')} GiB, sm {env.get('gpu_capability')}), driver CUDA "
           f"{env.get('driver_cuda')}" if env.get("gpu") else "no GPU")
    builds = ", ".join(f"{k} {v}" for k, v in (env.get("dali_builds") or {}).items()) or "no DALI wheel metadata"
    return (f"{gpu}; {env.get('cpu')} x{env.get('cores')}; python {env.get('python')}, torch {env.get('torch')} "
            f"(CUDA {env.get('torch_cuda')}), DALI {env.get('dali')} [{builds}], zarr {env.get('zarr')}, numpy "
            f"{env.get('numpy')}")


def _cost(name: str, device: str) -> float:
    from .benches import COST as BENCH_COST
    from .checks import COST
    c = {**COST, **BENCH_COST}[name]
    return c[1] if device == "gpu" else c[0]


def run(device: str | None = None, out: str = "doctor-out", deadline: float | None = None,
        only: list[str] | None = None, plant: list[str] | None = None, threads: int | None = None,
        workdir: str | None = None, echo=print) -> dict:
    import torch

    from .benches import BENCHES
    from .checks import CHECKS
    from .context import Context, Result
    device = device or ("gpu" if torch.cuda.is_available() else "cpu")
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("--device gpu but torch sees no CUDA device; run `fkd-dali doctor --device cpu`")
    deadline = deadline if deadline is not None else (360.0 if device == "gpu" else 180.0)
    names = list(ORDER) if not only else [n.strip() for n in only]
    unknown = set(names) - set(ORDER)
    if unknown:
        raise ValueError(f"unknown doctor item(s) {', '.join(sorted(unknown))}; choose from {', '.join(ORDER)}")
    temp = workdir is None
    work = workdir or tempfile.mkdtemp(prefix="fkd-doctor-")
    ctx = Context(device=device, workdir=work, threads=threads or (len(os.sched_getaffinity(0))
                                                                   if hasattr(os, "sched_getaffinity") else 2),
                  deadline=deadline, faults=frozenset(plant or ()))
    env = environment(device)
    echo(f"fkd-dali doctor on {device}: {_one_line_env(env)}")
    if ctx.faults:
        echo("planted faults: " + "; ".join(f"{f} ({FAULTS[f]})" for f in sorted(ctx.faults)))
    results: list = []
    items = {**CHECKS, **BENCHES}
    try:
        for name in (n for n in ORDER if n in names):
            cost = _cost(name, device)
            if ctx.remaining() < cost:
                results.append(Result(name, "skip", f"not started: {ctx.remaining():.0f} s left of the "
                                      f"{deadline:.0f} s deadline, it takes about {cost:.0f} s"))
                echo(f"  {name}: skipped (deadline)")
                continue
            t = time.perf_counter()
            try:
                r = items[name](ctx)
            except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
                r = Result(name, "error", f"{type(e).__name__}: {str(e)[:400]}",
                           "the check itself could not run: see doctor.json for the traceback",
                           {"traceback": traceback.format_exc()[-4000:]})
            r.seconds = time.perf_counter() - t
            results.append(r)
            echo(f"  {r.name}: {r.status.upper()} ({r.seconds:.0f} s) {r.figure}")
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)
    report = {"device": device, "deadline_s": deadline, "seconds": round(ctx.elapsed(), 1),
              "planted": sorted(ctx.faults), "environment": env,
              "results": [dict(r.__dict__) for r in results],
              "failed": [r.name for r in results if r.bad]}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "doctor.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    md = format_markdown(report)
    with open(os.path.join(out, "doctor.md"), "w") as f:
        f.write(md)
    echo("")
    echo(md)
    return report


def format_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# fkd-dali doctor ({report['device']}, {report['seconds']:.0f} s of a {report['deadline_s']:.0f} s "
             "deadline)", "", _one_line_env(env), ""]
    if report["planted"]:
        lines += [f"Planted faults: {', '.join(report['planted'])} (these checks are expected to fail).", ""]
    lines += ["| check | result | figure | what it means |", "|---|---|---|---|"]
    for r in report["results"]:
        cells = (r["name"], r["status"], r["figure"], r["meaning"] or "")
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", verdict(report)]
    return "\n".join(lines) + "\n"


def _skipped(report: dict) -> list[str]:
    return [r["name"] for r in report["results"] if r["status"] == "skip"]


def verdict(report: dict) -> str:
    """The report's last line: what passed is said only of the checks that ran."""
    bad, skipped = report["failed"], _skipped(report)
    ran = len(report["results"]) - len(skipped)
    if bad:
        return f"FAILED: {', '.join(bad)}."
    if not ran:
        return (f"No check ran: none of the {len(skipped)} asked for fits in the {report['deadline_s']:.0f} s deadline "
                "(all skipped). Give a longer --deadline")
    if skipped:
        return (f"The {ran} check(s) that ran passed; {len(skipped)} skipped (deadline): {', '.join(skipped)}. Give a "
                "longer --deadline to run them")
    return "All checks passed."


def main(args: argparse.Namespace) -> int:
    only = args.only.split(",") if args.only else None
    report = run(args.device, args.out, args.deadline, only, args.plant, args.threads, args.workdir)
    print(f"wrote {os.path.join(args.out, 'doctor.json')} and doctor.md")
    ran = len(report["results"]) > len(_skipped(report))
    return 1 if (report["failed"] and not args.plant) or not ran else 0
