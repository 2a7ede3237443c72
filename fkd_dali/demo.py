"""``fkd-dali demo``: the end-to-end flow that exists today, on generated data, in a few minutes on a CPU.

1. writes a small photo-like JPEG dataset (ImageFolder layout, train/ and val/);
2. trains a small teacher on it for a few epochs (hard labels, the standard DALI pipeline);
3. ``generate``: labels every image's stored RandomResizedCrop crops with that teacher into a label store;
4. replays the stored crops through the DALI loader and through FKD's own loader side by side;
5. summarises the store.

Student training (``fkd-dali train``) joins when it lands.
"""

from __future__ import annotations

import json
import os
import time

import labelstore

from .bench.generate import train_teacher
from .bench.loader import benchmark, format_table, plot
from .bench.machine import describe, one_line
from .dataset import scan_image_folder
from .fkd_format import export_fkd
from .generate import GenerateConfig, generate
from .synthetic import write_dataset
from .teachers import TeacherSpec


def run(workdir: str, quick: bool = False) -> dict:
    t0 = time.perf_counter()
    per_class = 8 if quick else 32
    print(f"fkd-dali demo in {workdir} ({'quick' if quick else 'full'}): {one_line(describe())}\n")
    data = os.path.join(workdir, "data")
    info_path = os.path.join(workdir, "data.json")
    phases = {}
    t = time.perf_counter()
    if not os.path.exists(info_path):
        info = write_dataset(data, classes=8, per_class=per_class, val_per_class=4, seed=0, workers=os.cpu_count() or 1)
        with open(info_path, "w") as f:
            json.dump(info, f)
    with open(info_path) as f:
        info = json.load(f)
    phases["data"] = time.perf_counter() - t
    print(f"1/5 data: {info['images']} photo-like JPEGs in 8 classes, mean {info['mean_bytes'] / 1e3:.0f} KB, "
          f"{info['mean_pixels'] / 1e3:.0f} kpx  ({phases['data']:.0f} s)")

    ds = scan_image_folder(os.path.join(data, "train"))
    threads = os.cpu_count() or 1
    t = time.perf_counter()
    ckpt = train_teacher(ds.root, ds.files, ds.targets.tolist(), len(ds.classes), "resnet18", 64, 4 if quick else 15,
                         "cpu", threads, os.path.join(workdir, "teacher-resnet18-64.pth"))
    phases["teacher"] = time.perf_counter() - t
    print(f"2/5 teacher: resnet18 at 64 px trained on hard labels -> {ckpt}  ({phases['teacher']:.0f} s)")

    store = os.path.join(workdir, "store")
    t = time.perf_counter()
    cfg = GenerateConfig(data=data, save_path=store, teachers=[TeacherSpec("resnet18", path=ckpt, input_size=64)],
                         num_crops=16, top_k=5, group_size=8, batch_size=8, device="cpu", threads=threads,
                         show_progress=False, scale=(0.08, 1.0))
    rep = generate(cfg)
    generate(GenerateConfig(**{**cfg.__dict__, "save_path": store, "evaluate": True}))
    phases["generate"] = time.perf_counter() - t
    print(f"3/5 generate: {rep.images} images x 16 crops labelled ({rep.crops_per_s:,.0f} crops/s) -> {store}  "
          f"({phases['generate']:.0f} s)")

    t = time.perf_counter()
    fkd_dir = store + "-fkd"
    if not os.path.exists(os.path.join(fkd_dir, ".complete")):
        export_fkd(store, fkd_dir, fp16=True, show_progress=False)
        open(os.path.join(fkd_dir, ".complete"), "w").close()
    p = {"data": data, "root": ds.root, "files": ds.files, "targets": ds.targets.tolist(), "store": store,
         "fkd_labels": os.path.join(fkd_dir, "train"), "synthetic": info, "images": len(ds)}
    result = benchmark(p, device="cpu", batch_size=16, num_crops=4, threads=threads, epochs=1 if quick else 2,
                       which=("fkd-original", "fkd-dali", "standard", "decode"), progress=lambda m: None)
    phases["replay"] = time.perf_counter() - t
    print(f"4/5 replay of the stored crops, 4 per image, 224 px  ({phases['replay']:.0f} s):\n")
    print(format_table(result))
    png = os.path.join(workdir, "loader.png")
    plot(result, png)
    print(f"\n    chart: {png}\n")
    print("5/5 the label store:")
    print(labelstore.format_summary(labelstore.summarize(labelstore.open_store(store))))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return {"loader": result, "phases": phases, "generate": rep}
