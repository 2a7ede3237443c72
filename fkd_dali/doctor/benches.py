"""Short versions of ``fkd-dali bench loader / train / generate`` for the doctor: the same code and the same
ratios as the full benchmarks, on less data, judged against the project's GPU goals (on the CPU the ratios
are reported, not judged: the goals are for GPUs)."""

from __future__ import annotations

import shutil

from ..bench import generate as generate_bench
from ..bench import loader as loader_bench
from ..bench import train as train_bench
from ..bench import LOADERS
from .context import PHOTO_CLASSES, Context, Result

# The GPU goals (issue "GPU readiness"; docs/benchmarks.md).
GOALS = {"fkd_dali_vs_fkd_original_crops": 5.0, "fkd_dali_crops_vs_standard_samples": 2.5,
         "fkd_dali_crops_vs_decode_only_x_n": 0.8, "train_loader_vs_synthetic": 0.95,
         "generate_vs_forward_only": 0.9, "fkd_vs_online_kd": 2.0}


def _judge(ctx: Context, ratios: dict[str, float]) -> tuple[str, str]:
    if not ctx.gpu:
        return "info", ""
    below = [f"{k} {v:.2f} < {GOALS[k]}" for k, v in ratios.items() if k in GOALS and v < GOALS[k]]
    if not below:
        return "pass", ""
    return "below goal", "slower than the GPU goal: " + "; ".join(below)


def size(ctx: Context) -> dict:
    """Data and model sizes: ImageNet-like on the GPU, small on the CPU (the doctor's 3-minute budget)."""
    if ctx.gpu:
        return {"images": 512, "batch": 64, "epochs": 3, "arch": "resnet50", "input": 224, "train_batch": 256,
                "steps": 20, "teacher": "resnet152", "gen_arch": "resnet50", "gen_input": 224, "gen_batch": 16}
    return {"images": 64, "batch": 16, "epochs": 2, "arch": "resnet18", "input": 64, "train_batch": 64,
            "steps": 5, "teacher": "resnet50", "gen_arch": "resnet18", "gen_input": 112, "gen_batch": 4}


def bench_loader(ctx: Context) -> Result:
    z = size(ctx)
    p = ctx.photos(z["images"])
    r = loader_bench.benchmark(p, device=ctx.device, batch_size=z["batch"], num_crops=4, threads=ctx.threads,
                               epochs=z["epochs"], which=LOADERS, progress=lambda _msg: None)
    ratios = r["ratios"]
    status, meaning = _judge(ctx, ratios)
    by = {x["name"]: x["crops_per_s"] for x in r["results"]}
    figure = (f"FKD-DALI {by.get('FKD-DALI', 0):,.0f} crops/s: {ratios.get('fkd_dali_vs_fkd_original_crops', 0):.2f}x "
              f"FKD's loader, {ratios.get('fkd_dali_crops_vs_standard_samples', 0):.2f}x standard DALI, "
              f"{ratios.get('fkd_dali_crops_vs_decode_only_x_n', 0):.2f} of decode-only x 4 "
              f"({z['images']} photo-like JPEGs, 4 crops, {ctx.threads} threads)")
    return Result("bench loader", status, figure, meaning, r)


def bench_train(ctx: Context) -> Result:
    z = size(ctx)
    p = ctx.photos(z["images"])
    t = train_bench.loader_vs_synthetic(p, arch=z["arch"], size=z["input"], batch=z["train_batch"], num_crops=4,
                                        steps=z["steps"], device=ctx.device, threads=ctx.threads,
                                        workdir=ctx.folder("bench-train"))
    status, meaning = _judge(ctx, {"train_loader_vs_synthetic": t["ratio"]})
    figure = (f"{z['arch']} @{z['input']} px, {z['train_batch']} crops/step: fed by FKDLoader "
              f"{t['loader_crops_per_s']:,.0f} crops/s = {t['ratio']:.2f} of the same step on tensors already on "
              "the device")
    return Result("bench train", status, figure, meaning, t)


def bench_generate(ctx: Context) -> Result:
    from ..generate import GenerateConfig, generate
    from ..teachers import TeacherSpec
    z = size(ctx)
    p = ctx.photos(z["images"])
    classes = PHOTO_CLASSES
    ckpt = train_bench._random_checkpoint(z["gen_arch"], classes, ctx.path("teacher", f"{z['gen_arch']}-{classes}.pth"))
    group = 8
    fwd = generate_bench.forward_only(z["gen_arch"], ckpt, classes, z["gen_input"], z["gen_batch"] * group,
                                      ctx.device, iters=20 if ctx.gpu else 5)
    save = ctx.path("bench-gen", "store")
    shutil.rmtree(save, ignore_errors=True)
    rep = generate(GenerateConfig(data=p["data"], save_path=save, teachers=[
        TeacherSpec(z["gen_arch"], path=ckpt, input_size=z["gen_input"])], num_crops=group, top_k=5, group_size=group,
        batch_size=z["gen_batch"], device=ctx.device, threads=ctx.threads, show_progress=False))
    ratio = rep.crops_per_s / fwd
    status, meaning = _judge(ctx, {"generate_vs_forward_only": ratio})
    figure = (f"teacher {z['gen_arch']} @{z['gen_input']} px: generate {rep.crops_per_s:,.0f} crops/s = {ratio:.2f} "
              f"of its forward pass alone ({fwd:,.0f} crops/s)")
    return Result("bench generate", status, figure, meaning,
                  {"generate_crops_per_s": rep.crops_per_s, "forward_only_crops_per_s": fwd, "ratio": ratio})


def bench_online(ctx: Context) -> Result:
    z = size(ctx)
    p = ctx.photos(z["images"])
    o = train_bench.fkd_vs_online(p, arch=z["arch"], teacher_arch=z["teacher"], size=z["input"], batch=z["train_batch"],
                                  num_crops=4, device=ctx.device, threads=ctx.threads,
                                  workdir=ctx.folder("bench-online"), classes=PHOTO_CLASSES)
    status, meaning = _judge(ctx, {"fkd_vs_online_kd": o["fkd_speedup"]})
    figure = (f"student {z['arch']}, teacher {z['teacher']}: FKD {o['fkd']['seconds_per_epoch']:.1f} s/epoch vs online "
              f"KD {o['online']['seconds_per_epoch']:.1f} s/epoch = {o['fkd_speedup']:.2f}x faster")
    return Result("bench FKD vs online KD", status, figure, meaning, o)


BENCHES = {"bench-loader": bench_loader, "bench-train": bench_train, "bench-generate": bench_generate,
           "bench-online": bench_online}
COST = {"bench-loader": (40, 60), "bench-train": (25, 45), "bench-generate": (20, 30), "bench-online": (40, 60)}
