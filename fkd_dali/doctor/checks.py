"""The doctor's correctness checks. Each one measures (the functions named ``measure_*`` return numbers that
the GPU tests assert on too) and judges against the promise the docs make, saying what a failure means for
training. All of them run on ``cpu`` and ``gpu``; on the CPU the comparisons that need a second device
compare against Pillow / torchvision instead."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import labelstore
from pipelines import DecoderOptions, FKDLoader, graphs, handoff
from pipelines.fkd_reader import FKDReader
from pipelines.image_reader import ImageReader

from .. import imagefiles
from .context import PHOTO_CLASSES, Context, Result, pillow_rgb

# Promises (README / docs): a replayed crop equals torchvision's resized_crop + hflip of the decoded image
# within 2 grey levels away from its 1-px border. CPU decoding equals Pillow's. GPU decoding (nvJPEG, fancy
# upsampling on) vs the CPU decoder: DALI's own test of the option allows a mean of 1 level; the maximum per
# kind is a first bound, to be set from the first GPU measurement (docs/benchmarks.md).
REPLAY_MAX = 2
DECODE_GPU_MAX, DECODE_GPU_MEAN = 8, 1.0
DECODE_CPU_MAX, DECODE_CPU_MEAN = 1, 0.05
#: Shares of each batch for the hardware JPEG decoder that the GPU checks try: 0 (CUDA decoder only), DALI's
#: default 0.65 (the batch is split between the two), 1 (hardware decoder for every JPEG it can take).
HW_LOADS = (0.0, 0.65, 1.0)


def planted_decoder(ctx: Context) -> DecoderOptions:
    if "decoder-option" in ctx.faults:
        return DecoderOptions(fancy_upsampling=False, fast_idct=True)
    return graphs.DEFAULT_DECODER


# ---------------------------------------------------------------------------------------------- decode
def decode_files(paths: list[str], device: str, decoder: DecoderOptions = graphs.DEFAULT_DECODER,
                 batch_size: int | None = None) -> list[np.ndarray]:
    """Each file decoded by DALI on ``device`` (HWC uint8 RGB), in order."""
    root = os.path.dirname(paths[0])
    files = [os.path.relpath(p, root) for p in paths]
    bs = batch_size or len(files)
    reader = ImageReader(root, files, [0] * len(files), batch_size=bs, shuffle=False)
    pipe = graphs.decode_pipeline(reader, device=device, decoder=decoder, images_out=True, batch_size=bs,
                                  num_threads=2, device_id=torch.cuda.current_device() if device == "gpu" else None,
                                  prefetch_queue_depth=1)
    pipe.build()
    out = []
    for _ in range(len(reader)):
        _, _, images = pipe.run()
        cpu = images.as_cpu()
        out += [np.array(cpu[i]) for i in range(len(cpu))]
    return out


def _diff(a: np.ndarray, b: np.ndarray) -> dict:
    if a.shape != b.shape:
        return {"max": 255, "mean": 255.0, "shapes": [list(a.shape), list(b.shape)]}
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max": int(d.max()), "mean": float(d.mean())}


def _position_max(paths: list[str], device: str, decoder: DecoderOptions) -> int:
    """The same file at positions 0-3 and 7 of a batch of 8 (other files between): largest pixel difference."""
    batch = decode_files([paths[0]] * 4 + paths[1:4] + [paths[0]], device, decoder, batch_size=8)
    return max(_diff(batch[i], batch[0])["max"] for i in (1, 2, 3, 7))


def measure_decode(ctx: Context) -> dict:
    """Per JPEG kind: |DALI on the device - Pillow| and |device - DALI's CPU decoder|; whether an image's pixels
    depend on its position in a batch. On a GPU, for each hardware-decoder share (HW_LOADS) separately, and
    whether the GPU decoder is really in use (without fancy upsampling its 4:2:0 pixels differ from the CPU's;
    if they do not, nvJPEG did not load and "mixed" fell back to the CPU)."""
    kinds = ctx.kinds()
    paths = [p for _, p in kinds]
    dec = planted_decoder(ctx)
    cpu = decode_files(paths, "cpu", dec)
    got = decode_files(paths, ctx.device, dec) if ctx.gpu else cpu
    rows = {kind: {"shape": list(a.shape), "vs_pillow": _diff(a, np.asarray(pillow_rgb(path))), "vs_cpu": _diff(a, c)}
            for (kind, path), a, c in zip(kinds, got, cpu)}
    out = {"kinds": rows, "position_max": _position_max(paths, ctx.device, dec)}
    if ctx.gpu:
        loads = {}
        for load in HW_LOADS:
            opts = dataclasses.replace(dec, hw_decoder_load=load)
            d = [_diff(a, c) for a, c in zip(decode_files(paths, "gpu", opts), cpu)]
            worst = max(range(len(d)), key=lambda i: (d[i]["max"], d[i]["mean"]))
            loads[str(load)] = {"max": d[worst]["max"], "worst_kind": kinds[worst][0],
                                "worst_mean": max(x["mean"] for x in d),
                                "position_max": _position_max(paths, "gpu", opts)}
        out["hw_loads"] = loads
        plain = decode_files([dict(kinds)["JPEG 4:2:0"]], "gpu", DecoderOptions(fancy_upsampling=False))[0]
        out["gpu_decoder_active"] = _diff(plain, cpu[list(dict(kinds)).index("JPEG 4:2:0")])["max"] > 0
    return out


def check_decode(ctx: Context) -> Result:
    m = measure_decode(ctx)
    if not ctx.gpu:
        worst = max(m["kinds"].items(), key=lambda kv: (kv[1]["vs_pillow"]["max"], kv[1]["vs_pillow"]["mean"]))
        wmax, wmean = worst[1]["vs_pillow"]["max"], max(v["vs_pillow"]["mean"] for v in m["kinds"].values())
        ok = wmax <= DECODE_CPU_MAX and wmean <= DECODE_CPU_MEAN and m["position_max"] == 0
        figure = (f"{len(m['kinds'])} kinds vs Pillow: max |Δ| {wmax} ({worst[0]}), worst mean {wmean:.3f}; same "
                  f"image across batch positions: max |Δ| {m['position_max']}")
        meaning = "" if ok else (
            f"decoded pixels differ from Pillow's (limit max {DECODE_CPU_MAX}, mean {DECODE_CPU_MEAN}), which torchvision "
            "and FKD decode with: every crop differs from the teacher's, i.e. label noise. Check DecoderOptions")
        return Result("decode parity", "pass" if ok else "fail", figure, meaning, m)
    loads = m["hw_loads"]
    parity = all(v["max"] <= DECODE_GPU_MAX and v["worst_mean"] <= DECODE_GPU_MEAN for v in loads.values())
    stable = loads["0.0"]["position_max"] == 0 and loads["1.0"]["position_max"] == 0
    ok = parity and stable and m["gpu_decoder_active"]
    figure = "; ".join(f"hw_decoder_load {k}: max |Δ| vs CPU decoder {v['max']} ({v['worst_kind']}), worst mean "
                       f"{v['worst_mean']:.3f}, across batch positions {v['position_max']}" for k, v in loads.items())
    figure += f"; GPU decoder in use: {'yes' if m['gpu_decoder_active'] else 'NO (fell back to the CPU)'}"
    meaning = ""
    if not m["gpu_decoder_active"]:
        meaning = ("the mixed decoder decodes on the CPU (nvJPEG did not load: see 'Failed to load nvjpeg' in the log): "
                   "the GPU path is not being tested, and it is slow")
    elif not ok:
        meaning = (f"GPU-decoded pixels differ from the CPU decode the labels were made from (limit max {DECODE_GPU_MAX}, "
                   f"mean {DECODE_GPU_MEAN}) or depend on the batch: every crop differs from the teacher's, i.e. label "
                   "noise. A position difference at load 0.65 alone means the hardware and CUDA decoders disagree: set "
                   "--hw-decoder-load 0 or 1")
    return Result("decode parity", "pass" if ok else "fail", figure, meaning, m)


# ---------------------------------------------------------------------------------------------- replay
def measure_replay(ctx: Context, images: int = 12) -> dict:
    """FKDLoader on the device vs torchvision's resized_crop + hflip of the same decoded image, per crop
    (interior = outside the 1-px border): the crop geometry alone. The reference image is Pillow's on the CPU;
    on a GPU it is the GPU decoder's own (CUDA decoder only, as the loader here), and the crops are also
    compared with FKDLoader on the CPU (ids, labels, and pixels, where decoder differences add up)."""
    p = ctx.photos(images)
    store = ctx.shifted_store(p) if "shifted-box" in ctx.faults else p["store"]
    truth = labelstore.open_store(p["store"])
    rows = truth.read_rows(range(truth.num_images))
    S, n = 96, 4
    dec = dataclasses.replace(planted_decoder(ctx), hw_decoder_load=0.0) if ctx.gpu else planted_decoder(ctx)

    def batches(device):
        ld = FKDLoader(p["data"], store, batch_size=4, num_crops=n, crop_size=S, device=device, normalize=False,
                       shuffle=False, verify_files=False, num_threads=ctx.threads, decoder=dec)
        out = [{k: v.cpu() for k, v in b.items()} for b in ld]
        ld.close()
        return out

    got = batches(ctx.device)
    paths = [os.path.join(p["root"], str(f)) for f in truth.files]
    decoded = decode_files(paths, "gpu", dec) if ctx.gpu else [np.asarray(pillow_rgb(x)) for x in paths]
    vs_ref_max = vs_ref_mean = 0.0
    crops = 0
    for b in got:
        for img, r, k in zip(b["images"], b["indices"].tolist(), b["crop_ids"].tolist()):
            t, l, h, w = (int(v) for v in rows["boxes"][r, k])
            ref = TF.resized_crop(Image.fromarray(decoded[r]), t, l, h, w, [S, S], TF.InterpolationMode.BILINEAR,
                                  antialias=True)
            ref = np.asarray(TF.hflip(ref) if rows["flips"][r, k] else ref).transpose(2, 0, 1).astype(np.int16)
            d = np.abs(img.numpy().astype(np.int16) - ref)[:, 1:-1, 1:-1]
            vs_ref_max = max(vs_ref_max, int(d.max()))
            vs_ref_mean = max(vs_ref_mean, float(d.mean()))
            crops += 1
    out = {"crops": crops, "vs_torchvision_max": int(vs_ref_max), "vs_torchvision_worst_mean": vs_ref_mean}
    if ctx.gpu:
        cpu = batches("cpu")
        same = all(torch.equal(a[k], c[k]) for a, c in zip(got, cpu)
                   for k in ("indices", "crop_ids", "targets", "topk_idx", "topk_val"))
        d = max(int((a["images"].int() - c["images"].int()).abs()[..., 1:-1, 1:-1].max()) for a, c in zip(got, cpu))
        out.update(ids_labels_equal_cpu=same and len(got) == len(cpu), vs_cpu_max=d)
    return out


def check_replay(ctx: Context) -> Result:
    m = measure_replay(ctx)
    ref = "the GPU-decoded image" if ctx.gpu else "the Pillow image"
    figure = (f"{m['crops']} crops vs torchvision resized_crop+hflip of {ref}: interior max |Δ| "
              f"{m['vs_torchvision_max']}, worst mean {m['vs_torchvision_worst_mean']:.3f}")
    ok = m["vs_torchvision_max"] <= REPLAY_MAX
    if ctx.gpu:
        figure += f"; vs CPU replay: ids/labels {'equal' if m['ids_labels_equal_cpu'] else 'DIFFER'}, " \
                  f"max |Δ| {m['vs_cpu_max']}"
        ok = ok and m["ids_labels_equal_cpu"] and m["vs_cpu_max"] <= REPLAY_MAX + DECODE_GPU_MAX
    meaning = "" if ok else (
        f"the crops the student sees are not the crops the teacher labelled (promise: within {REPLAY_MAX} levels "
        "inside the border; ids and labels identical on every device): every stored label is for another picture")
    return Result("replay parity", "pass" if ok else "fail", figure, meaning, m)


# ---------------------------------------------------------------------------------------------- hand-off
def measure_zero_copy(ctx: Context) -> dict:
    """The torch tensors of a batch are DALI's output memory (same address), on the device, with the dtype and
    layout asked for; on a GPU, taking a float32 batch allocates (almost) nothing in torch's allocator."""
    p = ctx.photos(12)
    reader = FKDReader(p["data"], p["store"], num_crops=2, batch_size=4, shuffle=False, verify_files=False)
    reader.start_epoch(0, reset=True)
    pipe = graphs.fkd_pipeline(reader, num_crops=2, size=64, device=ctx.device, batch_size=4, num_threads=ctx.threads,
                               device_id=ctx.device_id, prefetch_queue_depth=1, exec_dynamic=True)
    pipe.build()
    pipe.schedule_run()
    outs = handoff.take(pipe, ctx.device, ctx.device_id)
    same_address = []
    for tl in outs[:-1]:  # the last output, ``fits``, is a CPU flag the loader checks, not a tensor for torch
        t = handoff.to_torch(tl, ctx.device, ctx.device_id)
        same_address.append(t.data_ptr() == tl.as_tensor().data_ptr() and t.is_cuda == ctx.gpu)
    del outs, pipe
    reader.close()
    res = {"outputs": len(same_address), "zero_copy": all(same_address)}
    layouts = {}
    for dtype, cl in (("float32", False), ("float32", True), ("float16", False), ("bfloat16", True), ("uint8", False)):
        ld = FKDLoader(p["data"], p["store"], batch_size=4, num_crops=2, crop_size=64, device=ctx.device, dtype=dtype,
                       channels_last=cl, verify_files=False, num_threads=ctx.threads)
        it = iter(ld)
        next(it)  # pipeline built, first batch taken
        ctx.sync()
        before = torch.cuda.memory_allocated() if ctx.gpu else 0
        b = next(it)
        ctx.sync()
        grew = (torch.cuda.memory_allocated() - before) if ctx.gpu else 0
        x = b["images"]
        want = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "uint8": torch.uint8}
        layouts[f"{dtype}{' channels-last' if cl else ''}"] = {
            "device_ok": x.is_cuda == ctx.gpu and all(v.is_cuda == ctx.gpu for v in b.values()),
            "dtype_ok": x.dtype == want[dtype], "shape": list(x.shape),
            "layout_ok": x.is_contiguous(memory_format=torch.channels_last) if cl else x.is_contiguous(),
            "torch_alloc_bytes": int(grew), "image_bytes": x.numel() * x.element_size()}
        del b, x, it
        ld.close()
    res["layouts"] = layouts
    return res


def check_zero_copy(ctx: Context) -> Result:
    m = measure_zero_copy(ctx)
    lay = m["layouts"]
    ok = m["zero_copy"] and all(v["device_ok"] and v["dtype_ok"] and v["layout_ok"] for v in lay.values())
    if ctx.gpu:  # float32 images are views of DALI's memory: torch allocates only the small label tensors
        ok = ok and all(v["torch_alloc_bytes"] < 0.25 * v["image_bytes"]
                        for k, v in lay.items() if k.startswith("float32"))
    f32 = lay["float32"]
    figure = (f"{m['outputs']} outputs share DALI's memory: {'yes' if m['zero_copy'] else 'NO'}; "
              f"5 dtype/layouts {'as asked' if ok else 'WRONG'}; torch allocated {f32['torch_alloc_bytes']:,} B for a "
              f"{f32['image_bytes']:,} B float32 batch")
    meaning = "" if ok else ("batches are copied (or land on the wrong device, dtype or layout) between DALI and the "
                             "model: slower training, and on the wrong layout, slower kernels")
    return Result("zero copy", "pass" if ok else "fail", figure, meaning, m)


def _checksums(batch: dict) -> torch.Tensor:
    return torch.stack([batch["images"].double().sum(), batch["topk_val"].double().sum(),
                        batch["indices"].double().sum()])


def measure_buffer_lifetime(ctx: Context) -> dict:
    """Checksums of every batch of one epoch read synchronously, against the same epoch's batches (a) kept
    alive across the whole epoch, (b) consumed by kernels queued late on torch's stream after the Python
    references were dropped, (c) consumed on a side stream ordered back before the references go."""
    p = ctx.photos(32)
    ld = FKDLoader(p["data"], p["store"], batch_size=4, num_crops=2, crop_size=64, device=ctx.device,
                   verify_files=False, num_threads=ctx.threads, prefetch_queue_depth=3)
    try:
        ld.set_epoch(0)
        ref = []
        for b in ld:
            ref.append(_checksums(b).cpu())
        ld.set_epoch(0)
        kept = list(ld)
        for b in ld:  # more batches through the same pipeline while the first epoch's are still held
            pass
        kept_ok = all(torch.equal(_checksums(b).cpu(), r) for b, r in zip(kept, ref))
        del kept
        res = {"batches": len(ref), "kept_unchanged": kept_ok}
        if ctx.gpu:
            delay = int(2e7)  # ~10 ms of GPU time per batch: DALI runs ahead of the kernels reading its buffers
            for mode in ("late on torch's stream", "side stream"):
                ld.set_epoch(0)
                sums = []
                side = torch.cuda.Stream()
                for b in ld:
                    if mode == "side stream":
                        side.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(side):
                            torch.cuda._sleep(delay)
                            sums.append(_checksums(b))
                        torch.cuda.current_stream().wait_stream(side)  # the documented rule
                    else:
                        torch.cuda._sleep(delay)
                        sums.append(_checksums(b))
                    del b  # the last reference goes before the kernels above have run
                torch.cuda.synchronize()
                res[mode] = all(torch.equal(s.cpu(), r) for s, r in zip(sums, ref)) and len(sums) == len(ref)
    finally:
        ld.close()
    return res


def check_buffer_lifetime(ctx: Context) -> Result:
    m = measure_buffer_lifetime(ctx)
    modes = [k for k in ("late on torch's stream", "side stream") if k in m]
    ok = m["kept_unchanged"] and all(m[k] for k in modes)
    figure = f"{m['batches']} batches: kept across an epoch {'unchanged' if m['kept_unchanged'] else 'CHANGED'}" + \
        "".join(f"; {k}: {'same checksums' if m[k] else 'CHANGED'}" for k in modes)
    meaning = "" if ok else ("DALI reused a batch's memory while the model could still read it: a step may train on "
                             "another batch's pixels (silent corruption)")
    return Result("buffer lifetime", "pass" if ok else "fail", figure, meaning, m)


# ---------------------------------------------------------------------------------------------- training
def measure_train_steps(ctx: Context, arch: str, steps: int = 2) -> dict:
    """A few real training steps of ``arch`` from the store (bf16 autocast and channels-last on a GPU), then
    a resume: the losses are finite and the resumed run trains on the same crops in the same order."""
    from ..train import TrainConfig, Trainer
    p = ctx.photos(32)
    size = 64 if ctx.gpu else 32

    def run(out, max_steps, resume=None):
        folder = os.path.join(ctx.workdir, "train", arch, out)
        if resume is None:
            shutil.rmtree(folder, ignore_errors=True)  # a fresh run each time the doctor runs
        cfg = TrainConfig(data=p["data"], arch=arch, softlabel_path=p["store"], num_crops=2, batch_size=16, epochs=4,
                          input_size=size, device=ctx.device, output=folder, max_steps=max_steps,
                          show_progress=False, lr=0.01, workers=ctx.threads, resume=resume, warmup_epochs=0)
        trainer = Trainer(cfg)
        seen, losses = [], []
        step = trainer.step

        def recording(batch, lr):
            seen.append((batch["indices"].tolist(), batch["crop_ids"].tolist()))
            loss, top1 = step(batch, lr)
            losses.append(float(loss))
            return loss, top1

        trainer.step = recording
        trainer.run()
        return seen, losses, trainer

    full, losses, trainer = run("full", steps + 2)
    first, _, _ = run("part", steps)
    rest, _, _ = run("part", steps + 2, resume=os.path.join(ctx.workdir, "train", arch, "part", "checkpoint.pth.tar"))
    x = next(iter(trainer.loader(2)))["images"]
    return {"arch": arch, "steps": len(losses), "losses": losses, "finite": all(math.isfinite(v) for v in losses),
            "amp_bf16": trainer.amp, "channels_last": trainer.channels_last,
            "input_dtype": str(x.dtype),
            "input_channels_last": bool(x.is_contiguous(memory_format=torch.channels_last)),
            "resume_same_order": first + rest == full}


def check_training(ctx: Context) -> Result:
    rows = [measure_train_steps(ctx, a) for a in ("resnet18", "deit_tiny")]
    ok = all(r["finite"] and r["resume_same_order"] for r in rows)
    mode = "bf16 autocast, channels-last" if ctx.gpu else "float32 (CPU)"
    figure = "; ".join(f"{r['arch']}: {r['steps']} steps, loss {r['losses'][0]:.3f}->{r['losses'][-1]:.3f}, resume "
                       f"{'same order' if r['resume_same_order'] else 'OTHER ORDER'}" for r in rows) + f" ({mode})"
    meaning = "" if ok else "training steps give non-finite losses, or a resumed run sees other crops than the original"
    return Result("training step + resume", "pass" if ok else "fail", figure, meaning, {"runs": rows})


# ---------------------------------------------------------------------------------------------- generation
GEN_INPUT = 48  # the doctor's teacher input size


class PooledColour(torch.nn.Module):
    """A teacher whose class depends on the crop's content: a fixed linear map of its 4x4 mean colours."""

    def __init__(self, classes: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(48, classes, generator=g) * 3)

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1) @ self.w


def _teacher(ctx: Context, classes: int) -> str:
    path = ctx.path("teacher", f"pooled-{classes}-{GEN_INPUT}.pt2")
    if not os.path.exists(path):
        ep = torch.export.export(PooledColour(classes), (torch.randn(2, 3, GEN_INPUT, GEN_INPUT),),
                                 dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(ep, path)
    return path


def measure_generation(ctx: Context) -> dict:
    """Labels generated on the device vs on the CPU (same crops), and a run sharded over 2 ranks vs one run."""
    from ..generate import GenerateConfig, generate
    from ..teachers import TeacherSpec
    p = ctx.photos(32)
    spec = TeacherSpec("export", path=_teacher(ctx, PHOTO_CLASSES), input_size=GEN_INPUT, interpolation="bilinear")

    def run(name, device, keep=False, **kw):
        path = ctx.path("gen", name)
        if os.path.exists(path) and not keep:
            shutil.rmtree(path)
        cfg = GenerateConfig(data=p["data"], save_path=path, teachers=[spec], num_crops=8, top_k=3, group_size=4,
                             batch_size=4, device=device, show_progress=False, rows_per_shard=8, threads=ctx.threads,
                             decoder=planted_decoder(ctx), **kw)
        return path, cfg

    a, cfg = run("device", ctx.device)
    generate(cfg)
    _, cfg0 = run("sharded", ctx.device, rank=0, world_size=2)
    generate(cfg0)
    b, cfg1 = run("sharded", ctx.device, rank=1, world_size=2, keep=True)
    generate(cfg1)
    ra = labelstore.open_store(a).read_rows(range(p["images"]))
    out = {"crops": int(ra["topk_idx"][..., 0].size),
           **_compare_labels("sharded", ra, labelstore.open_store(b).read_rows(range(p["images"])))}
    if ctx.gpu:
        c, cfgc = run("cpu", "cpu")
        generate(cfgc)
        out.update(_compare_labels("cpu", ra, labelstore.open_store(c).read_rows(range(p["images"]))))
    return out


def _compare_labels(name: str, a: dict, b: dict) -> dict:
    """Two stores' rows: geometry equal?, top-1 agreement, largest probability difference."""
    return {f"{name}_geometry_equal": all(np.array_equal(a[k], b[k]) for k in ("sizes", "boxes", "flips", "done")),
            f"{name}_top1_agreement": float((a["topk_idx"][..., 0] == b["topk_idx"][..., 0]).mean()),
            f"{name}_max_prob_diff": float(np.abs(a["topk_val"].astype(np.float32)
                                                  - b["topk_val"].astype(np.float32)).max())}


def check_generation(ctx: Context) -> Result:
    m = measure_generation(ctx)
    exact = m["sharded_top1_agreement"] == 1.0 and m["sharded_max_prob_diff"] == 0.0
    ok = m["sharded_geometry_equal"] and (exact if not ctx.gpu else
                                           m["sharded_top1_agreement"] >= 0.99 and m["sharded_max_prob_diff"] <= 0.01)
    geometry = "equal" if m["sharded_geometry_equal"] else "DIFFERS"
    figure = (f"{m['crops']} crops; 2 ranks vs 1 run: geometry {geometry}, "
              f"top-1 {100 * m['sharded_top1_agreement']:.2f} %, max |Δp| {m['sharded_max_prob_diff']:.4f}")
    if ctx.gpu:
        ok = ok and m["cpu_geometry_equal"] and m["cpu_top1_agreement"] >= 0.97
        figure += (f"; GPU vs CPU: geometry {'equal' if m['cpu_geometry_equal'] else 'DIFFERS'}, top-1 "
                   f"{100 * m['cpu_top1_agreement']:.2f} %, max |Δp| {m['cpu_max_prob_diff']:.4f}")
    meaning = "" if ok else ("stores made on this device (or sharded) are not the labels of the same crops: a store "
                             "from one machine would not match another's")
    return Result("generation parity", "pass" if ok else "fail", figure, meaning, m)


# ---------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(ctx: Context, ranks: int, backend: str | None) -> dict:
    """``ranks`` processes under torchrun train 3 steps with a pipeline each (:mod:`.ddp_worker`); each
    reports the rows it saw per step and a checksum of its weights."""
    p = ctx.photos(32)
    out = ctx.folder("ddp", f"{ranks}-{backend or 'auto'}")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([_source_root()] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
    # One host: gloo and NCCL talk over loopback (a container's hostname may not resolve).
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(_free_port()), "-m", "fkd_dali.doctor.ddp_worker", p["data"], p["store"], out, ctx.device,
           backend or ""]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(60, int(ctx.remaining())))
    if r.returncode != 0:
        raise RuntimeError(f"torchrun with {ranks} rank(s) failed (exit {r.returncode}): {r.stderr[-1500:]}")
    reports = [json.load(open(os.path.join(out, f"rank{k}.json"))) for k in range(ranks)]
    disjoint = all(not set(a) & set(b) for i in range(ranks) for j in range(i + 1, ranks)
                   for a, b in zip(reports[i]["rows"], reports[j]["rows"]))
    return {"ranks": ranks, "backend": reports[0]["backend"], "steps": len(reports[0]["rows"]),
            "disjoint_shards": disjoint, "same_weights": len({r["weights"] for r in reports}) == 1,
            "devices": [r["device"] for r in reports], "cpus": [r["cpus"] for r in reports]}


def _source_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_ddp(ctx: Context) -> Result:
    runs = [run_ddp(ctx, 2, "gloo")]
    if ctx.gpu:
        runs.append(run_ddp(ctx, 1, "nccl"))
    ok = all(r["steps"] >= 3 and r["disjoint_shards"] and r["same_weights"] for r in runs)
    figure = "; ".join(f"{r['ranks']} rank(s) {r['backend']}: {r['steps']} steps, shards "
                       f"{'disjoint' if r['disjoint_shards'] else 'OVERLAP'}, weights "
                       f"{'identical' if r['same_weights'] else 'DIFFER'}, devices {r['devices']}" for r in runs)
    meaning = "" if ok else "DDP ranks train on overlapping data or drift apart: multi-GPU runs are wrong"
    return Result("DDP smoke", "pass" if ok else "fail", figure, meaning, {"runs": runs})


# ---------------------------------------------------------------------------------------------- memory
def _rss_mb() -> float:
    """Resident memory of this process after glibc has returned its free pages (so freed = not counted)."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _threads() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def measure_memory(ctx: Context) -> dict:
    """What one rank holds with its n-crop, 1-crop and validation pipelines alive, and after releasing the two
    not in use (``Trainer.release_loaders``): resident memory, and on a GPU the device memory in use."""
    from pipelines import EvalLoader
    from ..dataset import scan_image_folder, split_dir
    p = ctx.photos(32)

    def used():
        ctx.sync()
        gpu = (torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]) / 2**20 if ctx.gpu else 0.0
        return {"rss_mb": round(_rss_mb(), 1), "gpu_used_mb": round(gpu, 1), "threads": _threads()}

    base = used()
    val = scan_image_folder(split_dir(p["data"], "val"))
    loaders = {"n": FKDLoader(p["data"], p["store"], batch_size=8, num_crops=4, crop_size=224, device=ctx.device,
                              verify_files=False, num_threads=ctx.threads),
               "1": FKDLoader(p["data"], p["store"], batch_size=32, num_crops=1, crop_size=224, device=ctx.device,
                              verify_files=False, num_threads=ctx.threads),
               "val": EvalLoader(val.root, val.files, val.targets, batch_size=32, crop_size=224, device=ctx.device,
                                 num_threads=ctx.threads)}
    for ld in loaders.values():
        for _ in ld:
            pass
    alive = used()
    for k in ("1", "val"):
        loaders[k].release()
    released = used()
    for ld in loaders.values():
        ld.close()
    return {"before": base, "three_pipelines": alive, "one_pipeline": released}


def check_memory(ctx: Context) -> Result:
    m = measure_memory(ctx)
    b, a, r = m["before"], m["three_pipelines"], m["one_pipeline"]
    figure = (f"with n-crop + 1-crop + val pipelines: RSS {a['rss_mb'] - b['rss_mb']:+.0f} MB, "
              f"{a['threads'] - b['threads']:+d} threads; after releasing two: {r['rss_mb'] - b['rss_mb']:+.0f} MB, "
              f"{r['threads'] - b['threads']:+d} threads")
    if ctx.gpu:
        figure += (f"; GPU memory +{a['gpu_used_mb'] - b['gpu_used_mb']:.0f} MB -> "
                   f"+{r['gpu_used_mb'] - b['gpu_used_mb']:.0f} MB")
    return Result("memory per rank", "info", figure, "", m)


CHECKS = {
    "decode": check_decode,
    "replay": check_replay,
    "zero-copy": check_zero_copy,
    "buffers": check_buffer_lifetime,
    "train": check_training,
    "generate": check_generation,
    "ddp": check_ddp,
    "memory": check_memory,
}

# Seconds each check takes (estimates, to stop cleanly at the deadline): (cpu, gpu).
COST = {"decode": (5, 15), "replay": (25, 15), "zero-copy": (8, 10), "buffers": (8, 15), "train": (30, 25),
        "generate": (15, 20), "ddp": (30, 40), "memory": (10, 10)}

__all__ = ["CHECKS", "COST", "imagefiles"]
