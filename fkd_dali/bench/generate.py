"""``fkd-dali bench generate``: how close generation gets to the teacher's own speed, and label fidelity.

* **Throughput**: crops/s of ``generate`` (DALI decode + crops + teacher + top-k + store) ÷ crops/s of the
  same teacher's forward pass alone on random tensors of the same batch (B x num_seg crops), same device
  and precision. 1.0 means the data path costs nothing.
* **Label fidelity**: the teacher is run on the crops the *training* loader (``FKDLoader``, same boxes and
  flips) produces, and its top-1 is compared with the stored top-1 — once for a store generated with the
  loader's geometry (bilinear at the student's size: the same pixels up to the decoder) and once for FKD's
  default (bicubic at the teacher's size), where the teacher saw a slightly different resampling.

The teacher is a torchvision model trained for a few epochs on the benchmark images (hard labels, the
standard DALI pipeline) so that its predictions depend on the crop; random weights would give a constant
argmax and a meaningless agreement.
"""

from __future__ import annotations

import os
import time

import torch
import torchvision

import labelstore
from pipelines import FKDLoader, StandardLoader

from ..dataset import scan_image_folder, split_dir
from ..generate import GenerateConfig, generate
from ..teachers import TeacherSpec
from .loader import prepare_data


def train_teacher(root: str, files: list[str], targets: list[int], num_classes: int, arch: str, size: int,
                  epochs: int, device: str, threads: int, path: str) -> str:
    """A quickly trained teacher checkpoint (cached at ``path``)."""
    if os.path.exists(path):
        return path
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=num_classes)
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    model.to(dev).train()
    loader = StandardLoader(root, files, targets, batch_size=64, crop_size=size, device=device, num_threads=threads,
                            scale=(0.35, 1.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = epochs * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    for e in range(epochs):
        loader.set_epoch(e)
        for b in loader:
            loss = torch.nn.functional.cross_entropy(model(b["images"]), b["targets"].to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    torch.save(model.state_dict(), path)
    return path


def forward_only(arch: str, ckpt: str, num_classes: int, size: int, batch: int, device: str, iters: int) -> float:
    """Crops/s of the teacher alone on random tensors (the generator's precision and layout)."""
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    model = torchvision.models.get_model(arch, num_classes=num_classes)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    model.to(dev).eval()
    x = torch.randn(batch, 3, size, size, device=dev)
    if device == "gpu":
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "gpu"):
        for _ in range(2):
            torch.softmax(model(x).float(), 1).topk(min(5, num_classes), 1)
        if device == "gpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.softmax(model(x).float(), 1).topk(min(5, num_classes), 1)
        if device == "gpu":
            torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t0)


@torch.no_grad()
def fidelity(data: str, store: str, arch: str, ckpt: str, num_classes: int, size: int, device: str,
             threads: int) -> dict:
    """Teacher on FKDLoader's crops vs the stored labels of the same crops."""
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    model = torchvision.models.get_model(arch, num_classes=num_classes)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    model.to(dev).eval()
    s = labelstore.open_store(store)
    loader = FKDLoader(data, s, batch_size=32, num_crops=min(4, s.num_crops), crop_size=size, device=device,
                       num_threads=threads, shuffle=False)
    same = total = 0
    for b in loader:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "gpu"):
            pred = model(b["images"]).float().argmax(1)
        same += int((pred.cpu() == b["topk_idx"][:, 0].cpu()).sum())
        total += len(pred)
    return {"crops": total, "top1_agreement": same / total}


def run(workdir: str, data: str | None, images: int, classes: int, arch: str | None, size: int | None,
        num_crops: int, num_seg: int, batch: int, device: str, threads: int, train_epochs: int) -> dict:
    arch = arch or ("resnet50" if device == "gpu" else "resnet18")
    size = size or (224 if device == "gpu" else 112)
    p = prepare_data(workdir, data, images, classes, pool=8)
    ds = scan_image_folder(split_dir(p["data"], "train"))
    ckpt = train_teacher(ds.root, ds.files, ds.targets.tolist(), len(ds.classes), arch, size, train_epochs, device,
                         threads, os.path.join(workdir, f"teacher-{arch}-{size}-{ds.fingerprint[7:19]}.pth"))
    iters = 50 if device == "gpu" else 20
    fwd_runs = [forward_only(arch, ckpt, len(ds.classes), size, batch * num_seg, device, iters)]
    out = {"arch": arch, "input_size": size, "device": device, "images": len(ds), "num_crops": num_crops,
           "num_seg": num_seg, "batch_groups": batch, "teacher_batch": batch * num_seg, "threads": threads,
           "data": p["data"], "synthetic": p["synthetic"]}
    runs = {}
    for name, interp in (("fkd-default", "bicubic"), ("loader-geometry", "bilinear")):
        store = os.path.join(workdir, f"gen-{name}-{arch}-{size}")
        spec = TeacherSpec(arch, path=ckpt, input_size=size, interpolation=interp)
        cfg = GenerateConfig(data=p["data"], save_path=store, teachers=[spec], num_crops=num_crops,
                             top_k=min(5, len(ds.classes)), group_size=num_seg, batch_size=batch, device=device,
                             threads=threads, show_progress=False, scale=(0.08, 1.0))
        if os.path.exists(store):
            import shutil
            shutil.rmtree(store)
        rep = generate(cfg)
        fwd_runs.append(forward_only(arch, ckpt, len(ds.classes), size, batch * num_seg, device, iters))
        fid = fidelity(p["data"], store, arch, ckpt, len(ds.classes), size, device, threads)
        st = labelstore.open_store(store)
        top1 = st.read_round(0, 1).topk_idx[:, 0, 0]
        runs[name] = {"interpolation": interp, "crops": rep.crops, "seconds": rep.seconds,
                      "crops_per_s": rep.crops_per_s, "teacher_top1_is_image_class": float((top1 == st.targets).mean()),
                      **fid}
    fwd = max(fwd_runs)  # the teacher's best alone, measured before and after each generation run
    for x in runs.values():
        x["ratio_to_forward_only"] = x["crops_per_s"] / fwd
    out["forward_only_crops_per_s"] = fwd
    out["forward_only_runs"] = fwd_runs
    out["runs"] = runs
    return out


def format_table(r: dict) -> str:
    lines = [f"Teacher {r['arch']} at {r['input_size']} px on {r['device']}, teacher batch {r['teacher_batch']} crops "
             f"({r['batch_groups']} groups x {r['num_seg']} crops per decode), {r['images']} images x "
             f"{r['num_crops']} crops", "",
             "| run | crops/s | ÷ forward-only | stored top-1 = teacher on FKDLoader's crops |", "|---|---|---|---|",
             f"| teacher forward only (random tensors, best of {len(r['forward_only_runs'])}) | "
             f"{r['forward_only_crops_per_s']:,.0f} | 1.00 | - |"]
    for name, x in r["runs"].items():
        label = {"fkd-default": "generate, bicubic at teacher size (FKD default)",
                 "loader-geometry": "generate, bilinear (the loader's geometry)"}[name]
        lines.append(f"| {label} | {x['crops_per_s']:,.0f} | {x['ratio_to_forward_only']:.2f} | "
                     f"{100 * x['top1_agreement']:.2f} % of {x['crops']:,} |")
    x = next(iter(r["runs"].values()))
    lines += ["", f"The benchmark teacher's stored top-1 is the image's class for "
              f"{100 * x['teacher_top1_is_image_class']:.1f} % of the first crops (it learned something)."]
    return "\n".join(lines)
