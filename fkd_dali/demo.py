"""``fkd-dali demo``: the end-to-end flow that exists today, on generated data, in a couple of minutes.

1. writes a small photo-like JPEG dataset (ImageFolder layout);
2. builds a label store for it: exact RandomResizedCrop boxes and flips from the real image sizes, and
   top-5 labels from a *simulated* teacher (teacher labelling is `fkd-dali generate`, not yet available);
3. replays the stored crops through the DALI loader and FKD's own loader side by side, prints the table
   and writes a chart, then summarises the store.

It grows into the full demo (teacher, generate, two students) as those commands land.
"""

from __future__ import annotations

import os

import labelstore

from .bench.loader import benchmark, format_table, plot, prepare_data
from .bench.machine import describe, one_line


def run(workdir: str, quick: bool = False) -> dict:
    images = 64 if quick else 256
    print(f"fkd-dali demo in {workdir} ({'quick' if quick else 'full'}): {one_line(describe())}\n")
    print(f"1/3 writing {images} photo-like JPEGs and a label store (boxes from the real image sizes, "
          "simulated top-5 labels) ...")
    p = prepare_data(workdir, None, images, classes=8, pool=8)
    s = p["synthetic"]
    print(f"    {p['images']} images, mean {s['mean_bytes'] / 1e3:.0f} KB, {s['mean_pixels'] / 1e3:.0f} kpx\n")
    print("2/3 replaying the stored crops: FKD-DALI vs FKD's own loader vs standard DALI vs the decoder ...")
    threads = os.cpu_count() or 1
    result = benchmark(p, device="cpu", batch_size=16, num_crops=4, threads=threads, epochs=1 if quick else 2,
                       which=("fkd-original", "fkd-dali", "standard", "decode"), progress=lambda m: None)
    print(format_table(result))
    png = os.path.join(workdir, "loader.png")
    plot(result, png)
    print(f"\n    chart: {png}\n")
    print("3/3 the label store:")
    print(labelstore.format_summary(labelstore.summarize(labelstore.open_store(p["store"]))))
    return result
