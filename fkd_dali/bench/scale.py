"""``fkd-dali bench scale``: what a user meets at ImageNet scale, step by step, with per-rank memory.

Data: N training files (default 1,281,167) in 1000 class folders plus 50 validation files per class,
all hard links to one 500x500 photo-like JPEG (so the file system holds N entries but one image), and a
label store of N images x C crops x top-5 written with ``create_store`` + ``write_block`` (simulated
teacher content, one shard's worth reused; the default layout). ``--workdir`` keeps both between runs.

Each measurement runs in a fresh Python process (its imports, its memory): dataset scan + fingerprint,
``train.py``'s path from process start to the first batch (scan, store check, model, FKDLoader, the
first pass's rows read), a later pass's first batch (its rows were read in the background), what the
reader holds and the process's resident memory at world 1 and world 8 (rank 0, the same per-rank batch),
the StandardLoader / EvalLoader constructors, ``verify`` of the whole store, and the same first batch
with the store on a local S3 server (moto), with the requests per pass that the layout implies.

``--format wds`` (:func:`run_shards`): the folder (one small JPEG, so the tars stay a few GB) packed as WebDataset
shards, and from them: train.py's first batch, the index's memory in 8 concurrent ranks (per mapping, from
/proc/self/smaps: Pss counts shared pages once per node), loader crops/s against the folder and against the same
tars on a moto S3 server (alternating fresh processes; the server's GETs counted).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

IMAGENET_TRAIN = 1_281_167
CLASSES = 1000
VAL_PER_CLASS = 50


def _rss() -> dict[str, float]:
    """Resident and peak resident memory of this process, MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"rss_mb": out.get("VmRSS", 0.0), "peak_mb": out.get("VmHWM", 0.0)}


# ---------------------------------------------------------------------------------------------- building
def build(workdir: str, images: int, crops: int, top_k: int = 5, px: int = 500, quality: int = 90) -> dict:
    """The hard-linked dataset (one ``px`` x ``px`` JPEG) and its label store under ``workdir`` (reused when
    already built)."""
    from PIL import Image

    import labelstore

    from ..dataset import scan_image_folder
    from ..synthetic import photo_like
    from .simulated import teacher_topk
    marker = os.path.join(workdir, "built.json")
    if os.path.exists(marker):
        with open(marker) as f:
            got = json.load(f)
        if got["images"] == images and got["crops"] == crops and got.get("px", 500) == px and \
                got.get("quality", 90) == quality and got.get("rows_per_shard") == \
                labelstore.Layout.choose(images, crops).rows_per_shard:
            return got
        os.remove(marker)
    os.makedirs(workdir, exist_ok=True)
    data = os.path.join(workdir, "data")
    src = os.path.join(workdir, "one.JPEG")
    t0 = time.perf_counter()
    per_class = np.full(CLASSES, images // CLASSES)
    per_class[:images % CLASSES] += 1
    val_per_class = max(1, round(VAL_PER_CLASS * images / IMAGENET_TRAIN))
    linked = os.path.join(workdir, "data.json")  # the links are reused when only the store is rebuilt
    made = {"images": images} if (px, quality) == (500, 90) else {"images": images, "px": px, "quality": quality}
    if os.path.exists(linked) and json.load(open(linked)) == made:
        per_class[:], val_per_class = 0, 0
    else:
        shutil.rmtree(data, ignore_errors=True)
        Image.fromarray(photo_like(np.random.default_rng(0), px, px)).save(src, "JPEG", quality=quality)
    for c in range(CLASSES):
        wnid = f"n{c:08d}"
        first = None  # one copy per class (a file system caps the links to one inode), the rest links to it
        for split, count in (("train", int(per_class[c])), ("val", val_per_class)):
            d = os.path.join(data, split, wnid)
            os.makedirs(d, exist_ok=True)
            for i in range(count):
                path = os.path.join(d, f"{wnid}_{i}.JPEG")
                if first is None:
                    shutil.copyfile(src, path)
                    first = path
                else:
                    os.link(first, path)
    link_s = time.perf_counter() - t0
    with open(linked, "w") as f:
        json.dump(made, f)
    val_per_class = max(1, round(VAL_PER_CLASS * images / IMAGENET_TRAIN))
    ds = scan_image_folder(os.path.join(data, "train"))
    store_path = os.path.join(workdir, "store")
    t0 = time.perf_counter()
    store = labelstore.create_store(store_path, files=ds.files, targets=ds.targets, classes=ds.classes,
                                    fingerprint=ds.fingerprint, dataset_root="train", num_crops=crops,
                                    top_k=top_k, num_classes=CLASSES, overwrite=True)
    R = store.layout.rows_per_shard
    from ..crops import sample_crops
    sizes = np.full((R, 2), px, np.int64)
    boxes, flips = sample_crops(0, range(R), sizes, crops, (0.08, 0.936))
    idx, val = teacher_topk(R, crops, top_k, CLASSES)
    from ..progress import progress
    ranges = store.shard_ranges()
    with progress(total=len(ranges), desc="bench store", unit="shard") as bar:
        for a, b in ranges:
            m = b - a
            store.write_block(a, sizes=sizes[:m], boxes=boxes[:m], flips=flips[:m], topk_idx=idx[:m],
                              topk_val=val[:m])
            bar.update(1)
    store.finalize()
    info = {"images": images, "crops": crops, "top_k": top_k, "px": px, "quality": quality,
            "jpeg_bytes": os.path.getsize(src), "data": data, "store": store_path,
            "val_images": val_per_class * CLASSES, "link_s": link_s, "store_write_s": time.perf_counter() - t0,
            "store_bytes": sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store_path) for f in fs),
            "shards": len(ranges), "rows_per_shard": R}
    with open(marker, "w") as f:
        json.dump(info, f)
    return info


# ---------------------------------------------------------------------------------------------- probes
# Each probe runs in its own process: ``python -m fkd_dali.bench.scale PROBE JSON-ARGS``; ``t0`` is the
# parent's clock just before it started the process, so "from start" includes the interpreter and imports.

def probe_scan(a: dict) -> dict:
    from ..dataset import scan_image_folder
    runs = []
    for _ in range(2):
        t = time.perf_counter()
        ds = scan_image_folder(os.path.join(a["data"], "train"))
        fp = ds.fingerprint
        runs.append(time.perf_counter() - t)
    return {"scan_fingerprint_s": runs, "files": len(ds), "fingerprint": fp[:23], "paths_mb": ds.files.nbytes / 1e6,
            **_rss()}


def probe_train(a: dict) -> dict:
    """train.py's own path at world 1 (the CLI's: its parse, the scan started before torch is imported, the
    config, the Trainer), up to the first batch; then a later pass's first batch."""
    from ..options import prepare_train, train_parser
    argv = [a["data"], "--softlabel-path", a["store"], "-a", "resnet18", "--num-crops", str(a["n"]),
            "-b", str(a["batch"]), "--epochs", "300", "--input-size", str(a["size"]), "--device", "cpu",
            "--output", a["out"], "--quiet"] + (["-j", str(a["threads"])] if a.get("threads") else [])
    cfg, scan = prepare_train(train_parser().parse_args(argv))
    from ..train import Trainer, pass_index
    t_import = time.time() - a["t0"]
    trainer = Trainer(cfg, scan)
    t_trainer = time.time() - a["t0"]
    seg = trainer.segments[0]
    loader = trainer.loader(seg.crops)
    t_loader = time.time() - a["t0"]
    loader.set_epoch(pass_index(trainer.segments, seg))
    it = iter(loader)
    next(it)
    first = time.time() - a["t0"]
    out = {"imports_s": t_import, "trainer_s": t_trainer - t_import, "loader_s": t_loader - t_trainer,
           "first_batch_from_start_s": first, "after_first_batch": _rss()}
    t = time.perf_counter()
    loader.reader._read(loader.reader.current.epoch + 1).result()
    out["next_pass_read_waited_s"] = time.perf_counter() - t
    return out


def _two_rounds(loader) -> dict:
    """Holdings and memory once the next pass's rows are read too (what a rank holds while it trains)."""
    reader = loader.reader
    t = time.perf_counter()
    reader._read(reader.current.epoch + 1).result()
    return {"next_pass_read_waited_s": time.perf_counter() - t, "held_two_rounds": reader.held_bytes(),
            "with_two_rounds": _rss()}


def probe_switch(a: dict) -> dict:
    """A completed pass, then the next pass's first batch. Rank 0 of a world so large that a pass is ~8
    batches (the round's chunks are read as at any world size); the next pass's rows are waited for before
    the last batch, as a real pass (hours) would have them."""
    import labelstore
    from pipelines import FKDLoader

    from ..dataset import scan_image_folder
    ds = scan_image_folder(os.path.join(a["data"], "train"))
    store = labelstore.open_store(a["store"])
    store.check_dataset(files=ds.files, classes=ds.classes, fingerprint=ds.fingerprint, targets=ds.targets)
    world = max(1, len(ds) // (8 * a["batch"]))
    loader = FKDLoader(a["data"], store, batch_size=a["batch"], num_crops=a["n"], crop_size=a["size"], device="cpu",
                       rank=0, world_size=world, files=ds.files, num_threads=a.get("threads"))
    loader.set_epoch(0)
    times, t = [], time.perf_counter()
    for i, _ in enumerate(loader):
        times.append(time.perf_counter() - t)
        if i == 0:
            loader.reader._read(1).result()
        t = time.perf_counter()
    loader.set_epoch(1)
    t = time.perf_counter()
    next(iter(loader))
    switch = time.perf_counter() - t
    steady = float(np.median(times[1:])) if len(times) > 1 else 0.0
    return {"world": world, "batches_per_pass": len(times), "median_batch_s": steady,
            "later_pass_first_batch_s": switch, "stall_s": switch - steady}


def probe_rank(a: dict) -> dict:
    """Rank 0 of a world of ``world`` (the reader needs no process group): holdings and memory."""
    import labelstore
    from pipelines import FKDLoader

    from ..dataset import scan_image_folder
    base = _rss()
    ds = scan_image_folder(os.path.join(a["data"], "train"))
    store = labelstore.open_store(a["store"])
    store.check_dataset(files=ds.files, classes=ds.classes, fingerprint=ds.fingerprint, targets=ds.targets)
    t = time.perf_counter()
    loader = FKDLoader(a["data"], store, batch_size=a["batch"], num_crops=a["n"], crop_size=a["size"], device="cpu",
                       rank=0, world_size=a["world"], files=ds.files, num_threads=a.get("threads"))
    loader.set_epoch(0)
    next(iter(loader))
    first = time.perf_counter() - t
    held = loader.reader.held_bytes()
    out = {"world": a["world"], "loader_to_first_batch_s": first, "before": base, "after_first_batch": _rss(),
           "held_first_pass": held}
    out.update(_two_rounds(loader))
    return out


def probe_baselines(a: dict) -> dict:
    from pipelines import EvalLoader, StandardLoader

    from ..dataset import scan_image_folder
    out = {}
    for name, split, cls in (("StandardLoader", "train", StandardLoader), ("EvalLoader", "train", EvalLoader),
                             ("EvalLoader (val)", "val", EvalLoader)):
        ds = scan_image_folder(os.path.join(a["data"], split))
        before = _rss()["rss_mb"]
        t = time.perf_counter()
        ld = cls(ds.root, ds.files, ds.targets, batch_size=a["batch"], crop_size=a["size"], device="cpu",
                 num_threads=a.get("threads"))
        made = time.perf_counter() - t
        grown = _rss()["rss_mb"] - before
        t = time.perf_counter()
        next(iter(ld))
        out[name] = {"images": len(ds), "constructor_s": made, "constructor_rss_mb": grown,
                     "first_batch_s": time.perf_counter() - t}
        ld.close()
        del ld, ds
    return out


def probe_verify(a: dict) -> dict:
    import labelstore
    store = labelstore.open_store(a["store"])
    t = time.perf_counter()
    store.verify(sample=a["sample"])
    sample_s = time.perf_counter() - t
    t = time.perf_counter()
    full = store.verify()
    return {"sample": a["sample"], "sample_s": sample_s, "full_s": time.perf_counter() - t, "shards": full["shards"],
            "workers": os.cpu_count()}


# ---------------------------------------------------------------------------------------------- shards (--format wds)
def _split(data: str) -> str:
    from ..dataset import split_dir
    return split_dir(data, "train")


def probe_crops(a: dict) -> dict:
    """Loader crops/s of rank 0 of a world so large that a pass is ``batches`` batches (the round's rows are read as
    at any world size), from the first batch's end to the pass's end; the same for files and shards."""
    import labelstore
    from pipelines import FKDLoader

    from ..dataset import scan_image_folder
    ds = scan_image_folder(_split(a["data"]))
    store = labelstore.open_store(a["store"])
    store.check_dataset(files=ds.files, classes=ds.classes, fingerprint=ds.fingerprint, targets=ds.targets)
    world = max(1, len(ds) // (a["batches"] * a["batch"]))
    loader = FKDLoader(a["data"], store, batch_size=a["batch"], num_crops=a["n"], crop_size=a["size"], device="cpu",
                       rank=0, world_size=world, files=ds.files, num_threads=a.get("threads"))
    loader.set_epoch(0)
    it = iter(loader)
    next(it)
    before = ds.shards.requests if ds.shards is not None else 0
    t, crops, batches = time.perf_counter(), 0, 0
    for b in it:
        crops += int(b["images"].shape[0])
        batches += 1
    took = time.perf_counter() - t
    out = {"world": world, "batches": batches, "crops": crops, "crops_per_s": crops / took}
    if ds.shards is not None:
        out["requests_after_first_batch"] = ds.shards.requests - before  # range requests (a set at a URL)
        out["rank_images"] = -(-len(ds) // world)  # the pass's images: every one read once
    return out


def _smaps(path_part: str) -> dict:
    """The mappings of files whose path holds ``path_part``: KB of Rss, Pss, Private_Clean/Dirty, Shared_Clean,
    summed; and this process's totals (smaps_rollup: Rss, Pss, Private_Dirty, Anonymous), KB."""
    keys = ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean")
    mapped = dict.fromkeys(keys, 0)
    mine = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                mine = len(head) >= 6 and path_part in head[5]
            elif mine and head and head[0][:-1] in mapped:
                mapped[head[0][:-1]] += int(head[1])
    total = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            head = line.split()
            if head and head[0][:-1] in ("Rss", "Pss", "Private_Dirty", "Anonymous"):
                total[head[0][:-1]] = int(head[1])
    return {"mapped_kb": mapped, "process_kb": total}


def _barrier(folder: str, name: str, rank: int, world: int, timeout: float = 900) -> None:
    open(os.path.join(folder, f"{name}.{rank}"), "w").close()
    end = time.time() + timeout
    while sum(f.startswith(name + ".") for f in os.listdir(folder)) < world:
        if time.time() > end:
            raise RuntimeError(f"bench scale: the ranks did not all reach '{name}' in {timeout:.0f} s")
        time.sleep(0.05)


def probe_index(a: dict) -> dict:
    """One of ``world`` concurrent ranks of a node: opens the shard set as a rank does (the dataset scan: JSON,
    one stat per shard, the per-sample files mapped), checks the store against it, and reads the index records of
    its first pass's rows as the reader does (from the mapping); then, with every rank at that point, the memory of
    the index's mapping (``fkd-index.bin``; Pss: its pages shared by the ranks that map them), of all the set's
    mapped files (labels and keys too: the store check reads the labels), and of the process. Also what a rank
    would hold privately if it copied its pass's records out of the mapping (``N / world x 16 B``)."""
    import labelstore
    from pipelines.order import pass_rows

    from ..dataset import scan_image_folder
    before = _smaps("/fkd-index.bin")
    t = time.perf_counter()
    ds = scan_image_folder(_split(a["data"]))
    store = labelstore.open_store(a["store"])
    store.check_dataset(files=ds.files, classes=ds.classes, fingerprint=ds.fingerprint, targets=ds.targets)
    opened = time.perf_counter() - t
    rows = pass_rows(len(ds), 0, 0, a["rank"], a["world"])
    after_open = _smaps("/fkd-index.bin")
    index = ds.shards.index
    touched = 0
    for r in rows[:: max(1, len(rows) // 200_000)].tolist():  # record by record, as ShardSet.read reads them
        touched += int(index[r]["length"])
    _barrier(a["barrier"], "touched", a["rank"], a["world"])
    shared, every = _smaps("/fkd-index.bin"), _smaps("/fkd-")
    private = np.array(index[np.sort(rows)])  # the alternative: the pass's records copied out, 16 B each
    copied = _smaps("/fkd-index.bin")
    _barrier(a["barrier"], "measured", a["rank"], a["world"])
    return {"rank": a["rank"], "world": a["world"], "samples": len(ds), "rows": len(rows), "open_check_s": opened,
            "before": before, "after_open": after_open, "after_pass_records": shared, "all_set_files": every,
            "private_copy_bytes": int(private.nbytes),
            "after_private_copy": copied, "index_file_bytes": os.path.getsize(os.path.join(_split(a["data"]),
                                                                                           "fkd-index.bin"))}


PROBES = {"scan": probe_scan, "train": probe_train, "rank": probe_rank, "switch": probe_switch,
          "baselines": probe_baselines, "verify": probe_verify, "crops": probe_crops, "index": probe_index}


def _run_probe(name: str, args: dict, env: dict | None = None, timeout: float = 3600) -> dict:
    args = dict(args, t0=time.time())
    r = subprocess.run([sys.executable, "-m", "fkd_dali.bench.scale", name, json.dumps(args)], capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"bench scale probe '{name}' failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- object storage
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_server(spill_dir: str, log: str | None = None):
    """A moto S3 server on 127.0.0.1 in its own process (objects spilled to ``spill_dir``, not RAM); ``log``: a
    file for its access log (one line per request)."""
    port = _free_port()
    env = {**os.environ, "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": "1", "TMPDIR": spill_dir}
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.1)
    return proc, url


def s3_env(endpoint: str) -> dict:
    return {"FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1"}


def count_requests(log: str, start: int = 0) -> dict[str, int]:
    """Requests in a moto access log from byte ``start`` on, by method and store array ("GET boxes", "HEAD
    done", "GET list" for a listing, "GET meta" for zarr.json and other metadata)."""
    import collections
    import re
    with open(log, "rb") as f:
        f.seek(start)
        text = re.sub(r"\x1b\[[0-9;]*m", "", f.read().decode("utf-8", "replace"))
    got: collections.Counter = collections.Counter()
    for m in re.finditer(r'"(\w+) (\S+) HTTP/1\.1"', text):
        method, target = m.groups()
        path, _, query = target.partition("?")
        parts = path.strip("/").split("/")  # bench / store / <array> / c / ...
        if "list-type" in query or (method == "GET" and len(parts) <= 2):
            what = "list"
        elif len(parts) > 3 and parts[3] == "c":
            what = parts[2]
        else:
            what = "meta"
        got[f"{method} {what}"] += 1
    return dict(got)


def requests_per_pass(shards: int, crops_per_chunk: int, n: int) -> int:
    """Requests a rank makes to read its rows of one round of n crops: per crop array and shard, the shard
    index and the inner chunks the round covers (a rank's rows are spread over every shard), one ``sizes``
    chunk per shard (the box check), and one LIST per 1000 shard objects per crop array (the lost-file
    check). Once per loader: the ``done`` chunks (one per shard) and the ``targets`` chunks."""
    chunks = -(-n // crops_per_chunk)
    return 4 * shards * (1 + chunks) + shards + 4 * -(-shards // 1000)


# ---------------------------------------------------------------------------------------------- the run
def run(args) -> dict:
    workdir = args.workdir or os.path.join(tempfile.gettempdir(), "fkd-bench-scale")
    t = time.perf_counter()
    info = build(workdir, args.images, args.crops)
    print(f"data and store ready in {time.perf_counter() - t:.0f} s: {info['images']:,} images x {info['crops']} "
          f"crops, {info['store_bytes'] / 1e9:.2f} GB in {info['shards']} shards", flush=True)
    common = {"data": info["data"], "store": info["store"], "n": args.num_crops, "size": args.input_size,
              "threads": args.threads}
    res: dict = {"build": info, "num_crops": args.num_crops, "input_size": args.input_size,
                 "batch_size": args.batch_size, "rank_batch": args.rank_batch}
    out = tempfile.mkdtemp(prefix="fkd-bench-scale-out-")
    try:
        steps = [
            ("scan", "scan", {}),
            ("train", "train", {"batch": args.batch_size, "out": os.path.join(out, "run")}),
            ("rank_w1", "rank", {"batch": args.rank_batch, "world": 1}),
            ("rank_w8", "rank", {"batch": args.rank_batch, "world": 8}),
            ("switch", "switch", {"batch": args.rank_batch}),
            ("baselines", "baselines", {"batch": args.rank_batch}),
            ("verify", "verify", {"sample": args.sample}),
        ]
        for key, probe, extra in steps:
            t = time.perf_counter()
            res[key] = _run_probe(probe, {**common, **extra})
            print(f"  {key}: {time.perf_counter() - t:.0f} s", flush=True)
        if not args.no_s3:
            res["s3"] = _s3(info, common, args, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return res


@contextlib.contextmanager
def _bench_bucket(workdir: str):
    """A local S3 server (moto) with an empty bucket ``bench``: yields (s3fs filesystem, endpoint, its access log,
    a scratch folder), or None when moto / s3fs are not installed; the server and the folder go afterwards."""
    try:
        import moto  # noqa: F401
        import s3fs
    except ImportError:
        yield None
        return
    spill = tempfile.mkdtemp(prefix="fkd-bench-s3-", dir=workdir)
    log = os.path.join(spill, "moto-access.log")
    proc, endpoint = s3_server(spill, log)
    try:
        fs = s3fs.S3FileSystem(key="bench", secret="bench", endpoint_url=endpoint)
        fs.mkdir("bench")
        yield fs, endpoint, log, spill
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(spill, ignore_errors=True)


NO_S3 = {"skipped": "needs moto[server] and s3fs: pip install 'moto[server]' s3fs"}


def _s3(info: dict, common: dict, args, out: str) -> dict:
    with _bench_bucket(args.workdir) as bucket:
        if bucket is None:
            return NO_S3
        fs, endpoint, log, _ = bucket
        env = s3_env(endpoint)
        t = time.perf_counter()
        fs.put(info["store"], "bench/store", recursive=True)
        upload = time.perf_counter() - t
        url = "s3://bench/store"
        res = {"upload_s": upload, "endpoint": "moto server on 127.0.0.1"}
        start = os.path.getsize(log)
        res["train"] = _run_probe("train", {**common, "store": url, "batch": args.batch_size,
                                            "out": os.path.join(out, "run-s3")}, env=env)
        lay = json.load(open(os.path.join(info["store"], "zarr.json")))["attributes"]["fkd"]["layout"]
        res["requests_per_pass_per_rank"] = requests_per_pass(info["shards"], lay["crops_per_chunk"], args.num_crops)
        # Measured: the probe opened the store, read the done mask and targets, and read two passes (the first,
        # and the next one it waits for after the first batch).
        got = res["requests_measured"] = count_requests(log, start)
        per_pass = sum(v for k, v in got.items() if k.split()[1] in ("boxes", "flips", "topk_idx", "topk_val",
                                                                     "sizes", "list")) / 2
        res["requests_measured_per_pass"] = per_pass
        res["requests_measured_once"] = sum(got.values()) - 2 * per_pass
        return res


# ---------------------------------------------------------------------------------------------- the run, --format wds
SHARD_BYTES = 16 << 20  # images per tar (~13,000 samples of the small JPEG: ~100 shards at 1.28 M)


def build_shards(workdir: str, info: dict) -> dict:
    """``fkd-dali pack`` of the bench's folder (train and val) as WebDataset shards (reused when already packed)."""
    from ..pack import pack
    root = os.path.join(workdir, "shards-wds")
    marker = os.path.join(workdir, "shards.json")
    if os.path.exists(marker):
        got = json.load(open(marker))
        if got.get("images") == info["images"] and got.get("jpeg_bytes") == info["jpeg_bytes"]:
            return got
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    sets = pack(info["data"], root, "wds", SHARD_BYTES)
    train = os.path.join(root, "train")
    got = {"images": info["images"], "jpeg_bytes": info["jpeg_bytes"], "root": root, "pack_s": time.perf_counter() - t,
           "shards": len(sets["train"].names), "tar_bytes": sum(os.path.getsize(sets["train"].shard_path(i))
                                                                  for i in range(len(sets["train"].names))),
           "index_bytes": sum(os.path.getsize(os.path.join(train, f)) for f in os.listdir(train)
                              if f.startswith("fkd-"))}
    with open(marker, "w") as f:
        json.dump(got, f)
    return got


def _run_concurrent(name: str, args: list[dict], timeout: float = 1800) -> list[dict]:
    """The probe ``name`` in one process per args, all at once (the ranks of a node)."""
    procs = [subprocess.Popen([sys.executable, "-m", "fkd_dali.bench.scale", name, json.dumps(dict(x, t0=time.time()))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for x in args]
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"bench scale probe '{name}' failed:\n{e[-4000:]}")
        out.append(json.loads(o.strip().splitlines()[-1]))
    return out


def _spread(values: list[float]) -> dict:
    return {"runs": values, "median": float(np.median(values)), "min": min(values), "max": max(values)}


def run_shards(args) -> dict:
    """``bench scale --format wds``: the folder, its label store and its packed shards; from shards: the first
    batch, the index's memory per rank at world 8 (8 concurrent ranks), loader crops/s against the folder
    (alternating, fresh processes), and against the same shards on a local S3 server."""
    workdir = args.workdir or os.path.join(tempfile.gettempdir(), "fkd-bench-scale-wds")
    t = time.perf_counter()
    info = build(workdir, args.images, args.crops, px=args.image_px, quality=75)
    print(f"data and store ready in {time.perf_counter() - t:.0f} s: {info['images']:,} images "
          f"({info['jpeg_bytes']} B JPEG, {info['px']} px) x {info['crops']} crops", flush=True)
    sh = build_shards(workdir, info)
    print(f"packed in {sh['pack_s']:.0f} s: {sh['shards']} shards, {sh['tar_bytes'] / 1e9:.2f} GB, index "
          f"{sh['index_bytes'] / 1e6:.1f} MB", flush=True)
    common = {"store": info["store"], "n": args.num_crops, "size": args.input_size, "threads": args.threads}
    res: dict = {"format": "wds", "build": info, "shards": sh, "num_crops": args.num_crops,
                 "input_size": args.input_size, "batch_size": args.batch_size, "rank_batch": args.rank_batch}
    out = tempfile.mkdtemp(prefix="fkd-bench-scale-out-")
    try:
        t = time.perf_counter()
        res["train"] = [_run_probe("train", {**common, "data": sh["root"], "batch": args.batch_size,
                                             "out": os.path.join(out, f"run{i}")}) for i in range(2)]
        print(f"  train (shards, 2 runs): {time.perf_counter() - t:.0f} s", flush=True)
        t = time.perf_counter()
        barrier = tempfile.mkdtemp(prefix="barrier-", dir=out)
        res["index_w8"] = _run_concurrent("index", [{**common, "data": sh["root"], "rank": r, "world": 8,
                                                     "barrier": barrier} for r in range(8)])
        print(f"  index, 8 ranks: {time.perf_counter() - t:.0f} s", flush=True)
        crops = {**common, "batch": args.rank_batch, "batches": args.batches}
        runs: dict = {"files": [], "shards": []}
        t = time.perf_counter()
        for _ in range(args.reps):
            for name, data in (("files", info["data"]), ("shards", sh["root"])):
                runs[name].append(_run_probe("crops", {**crops, "data": data}))
        res["crops"] = runs
        res["crops_ratio"] = _spread([s["crops_per_s"] / f["crops_per_s"] for f, s in zip(runs["files"], runs["shards"])])
        print(f"  crops/s, files vs shards x {args.reps}: {time.perf_counter() - t:.0f} s", flush=True)
        if not args.no_s3:
            res["s3"] = _s3_shards(sh, crops, args, workdir)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return res


def _s3_shards(sh: dict, crops: dict, args, workdir: str) -> dict:
    with _bench_bucket(workdir) as bucket:
        if bucket is None:
            return NO_S3
        fs, endpoint, log, spill = bucket
        t = time.perf_counter()
        fs.put(os.path.join(sh["root"], "train"), "bench/shards/train", recursive=True)
        res: dict = {"upload_s": time.perf_counter() - t, "endpoint": "moto server on 127.0.0.1"}
        env = {**s3_env(endpoint), "FKD_DALI_SHARD_CACHE": os.path.join(spill, "cache")}
        runs: dict = {"local": [], "s3": []}
        for _ in range(args.reps):
            runs["local"].append(_run_probe("crops", {**crops, "data": sh["root"]}))
            start = os.path.getsize(log)
            got = _run_probe("crops", {**crops, "data": "s3://bench/shards"}, env=env)
            got["server_requests"] = count_requests(log, start)
            got["shard_gets"] = _shard_gets(log, start)
            runs["s3"].append(got)
        res["runs"] = runs
        res["ratio"] = _spread([s["crops_per_s"] / x["crops_per_s"] for x, s in zip(runs["local"], runs["s3"])])
        one = runs["s3"][0]
        res["requests_per_image"] = one["shard_gets"] / one["rank_images"]  # the server's log: GETs of tars
        res["requests_per_pass_w8"] = int(res["requests_per_image"] * -(-sh["images"] // 8))
        return res


def _shard_gets(log: str, start: int) -> int:
    """GET requests of tar objects in a moto access log from byte ``start`` on (one per sample's byte range)."""
    import re
    with open(log, "rb") as f:
        f.seek(start)
        text = re.sub(rb"\x1b\[[0-9;]*m", b"", f.read())  # the server colours its log
    return len(re.findall(rb'"GET /\S+\.tar\S* HTTP', text))


def format_shards_table(r: dict, scale_to: int = 14_000_000) -> str:
    """The table of docs/shards.md for ``bench scale --format wds``."""
    n = r["build"]["images"]
    f = scale_to / n
    firsts = [x["first_batch_from_start_s"] for x in r["train"]]
    first = min(firsts)
    best = r["train"][firsts.index(first)]
    idx = r["index_w8"]

    def med(key, sub="mapped_kb", part="after_pass_records"):
        return float(np.median([x[part][sub][key] for x in idx])) / 1024

    pss, rss = med("Pss"), med("Rss")
    priv = med("Private_Dirty", "process_kb") - float(np.median([x["after_open"]["process_kb"]["Private_Dirty"]
                                                                 for x in idx])) / 1024
    copy = idx[0]["private_copy_bytes"] / 1e6
    cr = r["crops_ratio"]
    fl = [x["crops_per_s"] for x in r["crops"]["files"]]
    sr = [x["crops_per_s"] for x in r["crops"]["shards"]]
    lines = [f"| step ({n:,} images as {r['shards']['shards']} WebDataset tars, {r['build']['jpeg_bytes']} B JPEG) | "
             f"measured | goal | {scale_to / 1e6:.0f} M images (O(N) part x{f:.1f}, not measured) |", "|---|---|---|---|",
             f"| `fkd-dali pack` of the folder (train + val) | {r['shards']['pack_s']:.0f} s, "
             f"{r['shards']['tar_bytes'] / 1e9:.2f} GB of tars, index {r['shards']['index_bytes'] / 1e6:.1f} MB | | |",
             f"| train.py start to first batch from shards, world 1 (2 runs) | "
             f"{' / '.join(f'{x:.1f}' for x in firsts)} s | ≤ 10 s | ≤ {best['imports_s'] + (first - best['imports_s']) * f:.0f} s "
             f"(all but imports x{f:.1f}) |",
             f"| of which: imports / Trainer (index opened, store check, model) / loader built / first batch | "
             f"{best['imports_s']:.1f} / {best['trainer_s']:.1f} / {best['loader_s']:.1f} / "
             f"{first - best['imports_s'] - best['trainer_s'] - best['loader_s']:.1f} s | | |",
             f"| index opened + store checked, per rank (8 ranks at once; median) | "
             f"{float(np.median([x['open_check_s'] for x in idx])):.2f} s | | {float(np.median([x['open_check_s'] for x in idx])) * f:.1f} s |",
             f"| index pages per rank after its pass's records were read, world 8: Pss (shared pages / ranks mapping them) "
             f"/ RSS | {pss:.1f} / {rss:.1f} MB | ≤ 32 MB at 14 M | {pss * f:.0f} / {rss * f:.0f} MB |",
             f"| private memory grown per rank while reading its pass's records (Private_Dirty) / a private copy of "
             f"them instead | "
             f"{priv:.1f} / {copy:.1f} MB | | {priv * f:.0f} / {copy * f:.0f} MB |",
             f"| loader crops/s, files vs shards ({len(fl)} alternating pairs, fresh processes) | "
             f"{' '.join(f'{x:.0f}' for x in fl)} vs {' '.join(f'{x:.0f}' for x in sr)} | | |",
             f"| shards / files, per pair: median (min-max) | {cr['median']:.2f}x ({cr['min']:.2f}-{cr['max']:.2f}) | "
             f"≥ 0.95x | |"]
    s3 = r.get("s3")
    if s3 and "ratio" in s3:
        lo = [x["crops_per_s"] for x in s3["runs"]["local"]]
        hi = [x["crops_per_s"] for x in s3["runs"]["s3"]]
        lines += [f"| loader crops/s, local shards vs the same on a local S3 server (moto) | "
                  f"{' '.join(f'{x:.0f}' for x in lo)} vs {' '.join(f'{x:.0f}' for x in hi)} | | |",
                  f"| S3 / local, per pair: median (min-max) | {s3['ratio']['median']:.2f}x ({s3['ratio']['min']:.2f}-"
                  f"{s3['ratio']['max']:.2f}) | ≥ 0.8x | |",
                  f"| range requests per image / per pass per rank at world 8 | {s3['requests_per_image']:.2f} / "
                  f"{s3['requests_per_pass_w8']:,} | | {s3['requests_per_pass_w8'] * f:,.0f} |"]
    elif s3:
        lines.append(f"| object storage | {s3.get('skipped')} | | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- report
def format_table(r: dict, scale_to: int = 14_000_000) -> str:
    """The table of docs/benchmarks.md; the last column scales the O(N) part of each figure linearly."""
    n = r["build"]["images"]
    f = scale_to / n
    tr, w1, w8, sw, b, v = r["train"], r["rank_w1"], r["rank_w8"], r["switch"], r["baselines"], r["verify"]

    def mb(h):
        return sum(h.values()) / 1e6
    scan = min(r["scan"]["scan_fingerprint_s"])
    first = tr["first_batch_from_start_s"]
    lines = [f"| step ({n:,} images x {r['build']['crops']} crops, top-{r['build']['top_k']}) | measured | goal | "
             f"{scale_to / 1e6:.0f} M images (O(N) part x{f:.1f}, not measured) |", "|---|---|---|---|",
             f"| scan + fingerprint (warm; 2 runs) | {' / '.join(f'{x:.1f}' for x in r['scan']['scan_fingerprint_s'])} s "
             f"| ≤ 10 s | {scan * f:.0f} s |",
             f"| train.py start to first batch, world 1 | {first:.1f} s | ≤ 10 s | "
             f"{tr['imports_s'] + (first - tr['imports_s']) * f:.0f} s |",
             f"| of which: imports / Trainer (scan, store check, model) / loader built / first pass's rows read + "
             f"pipeline + first batch | {tr['imports_s']:.1f} / {tr['trainer_s']:.1f} / {tr['loader_s']:.1f} / "
             f"{first - tr['imports_s'] - tr['trainer_s'] - tr['loader_s']:.1f} s | | |",
             f"| next pass's rows: read in the background, still to wait after the first batch | "
             f"{tr['next_pass_read_waited_s']:.1f} s | (hidden by a pass of hours) | {tr['next_pass_read_waited_s'] * f:.0f} s |",
             f"| later pass: first batch after a completed pass (rank 0 of {sw['world']:,}, steady batch "
             f"{sw['median_batch_s']:.2f} s) | {sw['later_pass_first_batch_s']:.2f} s (stall {sw['stall_s']:+.2f} s) | "
             f"≤ 1.5 s | same |",
             f"| reader holds (paths + this and next pass's rows), world 1 | {mb(w1['held_two_rounds']):.0f} MB | | "
             f"{mb(w1['held_two_rounds']) * f:.0f} MB |",
             f"| reader holds (paths + this and next pass's rows), world 8 | {mb(w8['held_two_rounds']):.0f} MB | ≤ 80 MB | "
             f"{mb(w8['held_two_rounds']) * f:.0f} MB |",
             f"| of which paths (all rows, compact) / labels+boxes of 2 passes, world 8 | "
             f"{w8['held_two_rounds']['paths'] / 1e6:.0f} / {w8['held_two_rounds']['rounds'] / 1e6:.0f} MB | | |",
             f"| process RSS with two passes' rows, world 1 vs 8 (same {r.get('rank_batch', '')} images/rank batch; "
             f"DALI, torch included) | {w1['with_two_rounds']['rss_mb']:.0f} vs {w8['with_two_rounds']['rss_mb']:.0f} MB "
             f"(peak {w1['with_two_rounds']['peak_mb']:.0f} vs {w8['with_two_rounds']['peak_mb']:.0f}) | | |"]
    for name, x in b.items():
        lin = x["constructor_s"] * scale_to / n if x["images"] == n else x["constructor_s"]
        lines.append(f"| {name} constructor ({x['images']:,} files) | {x['constructor_s']:.2f} s, "
                     f"{x['constructor_rss_mb']:.0f} MB (first batch {x['first_batch_s']:.1f} s) | ≤ 5 s, ≤ 300 MB | "
                     f"{lin:.1f} s |")
    lines.append(f"| verify, {v['shards']:,} shards, {v['workers']} processes | {v['full_s']:.0f} s | ≤ 180 s | "
                 f"{v['full_s'] * f:.0f} s |")
    lines.append(f"| inspect --sample {v['sample']} | {v['sample_s']:.1f} s | | same |")
    s3 = r.get("s3")
    if s3 and "train" in s3:
        got = s3["train"]["first_batch_from_start_s"]
        lines.append(f"| the same train start to first batch, store on a local S3 server (moto) | {got:.1f} s = "
                     f"{got / first:.2f}x local | ≤ 3x | |")
        lines.append(f"| requests per pass per rank (layout: GET ranges + LIST) | {s3['requests_per_pass_per_rank']:,} | | "
                     f"{s3['requests_per_pass_per_rank'] * f:,.0f} |")
        if "requests_measured" in s3:
            heads = sum(v for k, v in s3["requests_measured"].items() if k.startswith("HEAD"))
            lines.append(f"| requests measured (server log): per pass / once per loader (HEADs among all) | "
                         f"{s3['requests_measured_per_pass']:,.0f} / {s3['requests_measured_once']:,.0f} ({heads:,}) | | |")
    elif s3:
        lines.append(f"| object storage | {s3.get('skipped')} | | |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    name, args = argv[0], json.loads(argv[1])
    print(json.dumps(PROBES[name](args)), flush=True)
    os._exit(0)  # DALI/zarr threads need not be joined


if __name__ == "__main__":
    main(sys.argv[1:])
