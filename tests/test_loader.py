"""The DALI FKD loader on the CPU backend: pixel fidelity, alignment, sharding, rounds, bad files."""

import concurrent.futures
import os
import threading
import time

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from nvidia.dali.types import BatchInfo
from PIL import Image

import labelstore
from fkd_dali.crops import sample_crops
from fkd_dali.dataset import scan_image_folder
from fkd_dali.schedule import fkd_segments
from fkd_dali.train import pass_index
from pipelines import EvalLoader, FKDLoader, LoaderError, RoundReads, StandardLoader
from pipelines.fkd_reader import READ_AHEAD_AT
from pipelines.graphs import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import current_device, textured

DEVICE = current_device()  # FKD_TEST_DEVICE: the loaders' device in these tests

NUM_CLASSES = 10


def write_coded_dataset(root: str, n: int, seed: int = 0) -> None:
    """Image r: red = 16 + 8*(r % 28) everywhere (its row code), green = x ramp, blue = y ramp."""
    rng = np.random.default_rng(seed)
    for r in range(n):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        img = np.zeros((h, w, 3), np.uint8)
        img[..., 0] = 16 + 8 * (r % 28)
        img[..., 1] = np.linspace(0, 255, w)[None, :]
        img[..., 2] = np.linspace(0, 255, h)[:, None]
        d = os.path.join(root, "train", f"class_{r * NUM_CLASSES // n}")  # ImageFolder order == r
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img).save(os.path.join(d, f"img_{r:03d}.jpg"), quality=98, subsampling=0)


def code_of(row: int, crop: int) -> list[int]:
    return [row % 10, (row // 10) % 10, crop % 10]


def make_store(data: str, path: str, pool: int, seed: int = 0, boxes=None, flips=None, k: int = 3,
               rows_per_shard: int = 8):
    ds = scan_image_folder(os.path.join(data, "train"))
    sizes = np.array([Image.open(ds.path(i)).size[::-1] for i in range(len(ds))])
    if boxes is None:
        boxes, flips = sample_crops(seed, range(len(ds)), sizes, pool)
    idx = np.array([[code_of(r, c) + [9] * (k - 3) for c in range(pool)] for r in range(len(ds))])
    val = np.full(idx.shape, 0.25, np.float16)
    store = labelstore.create_store(path, files=ds.files, targets=ds.targets, classes=ds.classes,
                                    fingerprint=ds.fingerprint, dataset_root="train", num_crops=pool, num_classes=NUM_CLASSES,
                                    top_k=k, rows_per_shard=rows_per_shard, overwrite=True)
    for a, b in store.shard_ranges():
        store.write_block(a, sizes=sizes[a:b], boxes=boxes[a:b], flips=flips[a:b], topk_idx=idx[a:b],
                          topk_val=val[a:b])
    store.finalize()
    return ds, sizes, boxes, flips


def partial_copy(src: str, path: str, done: int) -> str:
    """A copy of store ``src`` at ``path`` with only its first ``done`` rows written (one shard of ``done``
    rows): an incomplete store, as a killed generation leaves it."""
    store = labelstore.open_store(src)
    part = labelstore.create_store(path, files=list(store.files), targets=store.targets, classes=store.classes,
                                   fingerprint=store.meta.fingerprint, dataset_root="train",
                                   num_crops=store.num_crops, top_k=store.top_k, rows_per_shard=done)
    rows = store.read_rows(range(done))
    part.write_block(0, **{k: rows[k] for k in ("sizes", "boxes", "flips", "topk_idx", "topk_val")})
    return path


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coded"))
    data = os.path.join(root, "data")
    write_coded_dataset(data, 30)
    store = os.path.join(root, "store")
    ds, sizes, boxes, flips = make_store(data, store, pool=6)
    return {"data": data, "store": store, "ds": ds, "sizes": sizes, "boxes": boxes, "flips": flips}


def loader(c, **kw):
    args = dict(batch_size=4, num_crops=2, crop_size=24, device=DEVICE, num_threads=2, normalize=False)
    args.update(kw)
    return FKDLoader(c["data"], c["store"], **args)


def check_batch(c, b, n):
    """Every crop carries its own image's pixels, labels, target and crop id; the box and flip show."""
    imgs = b["images"].cpu().numpy().astype(np.float64)
    assert b["images"].dtype == torch.uint8 and imgs.shape[1:] == (3, 24, 24)
    rows, crops = b["indices"].cpu().numpy(), b["crop_ids"].cpu().numpy()
    assert (rows.reshape(-1, n) == rows.reshape(-1, n)[:, :1]).all()  # crops of one image are adjacent
    for i, (r, k) in enumerate(zip(rows, crops)):
        red = imgs[i, 0, 2:-2, 2:-2].mean()
        assert abs(red - (16 + 8 * (r % 28))) < 3, (r, red)
        assert b["topk_idx"][i].tolist() == code_of(r, k)
        assert b["targets"][i] == c["ds"].targets[r]
        t, l, h, w = c["boxes"][r, k]
        H, W = c["sizes"][r]
        green = imgs[i, 1]
        assert abs(green.mean() - 255 * (l + w / 2) / W) < 6, (r, k)
        assert abs(imgs[i, 2].mean() - 255 * (t + h / 2) / H) < 6, (r, k)
        if w > 4:  # the x ramp runs right-to-left exactly when the crop is flipped
            assert (green[:, -3].mean() < green[:, 2].mean()) == bool(c["flips"][r, k]), (r, k)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_alignment_sharding_and_rounds_over_epochs(coded, world):
    n, N = 2, 30
    loaders = [loader(coded, rank=r, world_size=world, seed=5) for r in range(world)]
    assert len({len(x) for x in loaders}) == 1  # every rank runs the same number of steps
    per_rank = -(-N // world)
    orders, rounds = [], []
    for e in range(4):
        seen = []
        for ld in loaders:
            ld.set_epoch(e)
            steps = 0
            for b in ld:
                check_batch(coded, b, n)
                seen += b["indices"][::n].tolist()
                rounds.append((e, set(b["crop_ids"].tolist())))
                steps += 1
            assert steps == len(ld)
        assert len(seen) == per_rank * world
        assert set(seen) == set(range(N))  # every image, every epoch
        assert len(seen) - len(set(seen)) == per_rank * world - N  # duplicates = documented padding only
        orders.append(seen)
    crops_by_epoch = {e: set().union(*[s for ee, s in rounds if ee == e]) for e in range(4)}
    assert all(len(v) == n for v in crops_by_epoch.values())  # one round per epoch
    assert len({frozenset(crops_by_epoch[e]) for e in range(3)}) == 3  # 3 rounds: each once per cycle
    assert orders[0] != orders[1] != orders[2]


def test_a_300_epoch_plan_uses_every_round_once_and_reads_each_pass_ahead(tmp_path):
    """train.py numbers epochs 0, 4, 8, ...; the loader gets pass indices, so the round of the next pass is the
    one read in the background, and no round repeats before the pool (75 rounds of 4) is used up."""
    data = str(tmp_path / "data")
    write_coded_dataset(data, 6)
    make_store(data, str(tmp_path / "s"), pool=300)
    reader = loader({"data": data, "store": str(tmp_path / "s")}, num_crops=4, batch_size=2).reader
    reads = []
    real = reader.store.read_round
    reader.store.read_round = lambda r, n, **kw: reads.append(r) or real(r, n, **kw)
    segments = fkd_segments(300, 4)
    used = []
    for seg in (s for s in segments if s.crops == 4):
        p = pass_index(segments, seg)
        ahead = p in reader._reads  # submitted while the previous pass trained
        reader.start_epoch(p, reset=True)
        rnd = reader.current_round()
        assert rnd.index == reader.current.round_index and (ahead or p == 0)
        used.append(rnd.index)
        for i in range(reader.current.num_batches):  # the pass's batches, as the pipeline asks for them
            reader(BatchInfo(i, 0))
            assert (p + 1 in reader._reads) == (i >= READ_AHEAD_AT)  # not before the pass's first batch was taken
    reader._reads[len(used)].result()
    assert len(used) == 74 and len(set(used)) == 74  # 74 passes, 74 different rounds
    assert reads == used + [reader.round_of(len(used))]  # every read was used, the last one is the next pass's
    reader.close()


@pytest.mark.parametrize("world", [1, 3])
def test_each_rank_reads_and_holds_only_the_rows_it_serves(coded, world):
    whole = labelstore.open_store(coded["store"])
    held = []
    for rank in range(world):
        ld = loader(coded, rank=rank, world_size=world, seed=2)
        ld.set_epoch(1)
        batches = list(ld)
        rnd = ld.reader.current_round()  # the pass's read (the first batches may have been served before it)
        rows = np.arange(30) if rnd.rows is None else rnd.rows  # None: every row (world 1)
        served = np.concatenate([b["indices"][::2].numpy() for b in batches])
        assert np.array_equal(rows, np.unique(served))  # this pass's rows of this rank, nothing else
        want = whole.read_round(rnd.index, 2)
        assert np.array_equal(rnd.topk_idx, want.topk_idx[rows]) and np.array_equal(rnd.boxes, want.boxes[rows])
        assert rnd.boxes.dtype == whole.array("boxes").dtype  # stored dtypes, no int64/float32 copies
        held.append(rnd.nbytes)
        for b in batches:
            check_batch(coded, b, 2)
        ld.close()
    assert max(held) <= -(-30 // world) / 30 * want.nbytes + 1


def test_round_reads_started_before_the_loader_serve_the_same_rows(coded):
    """A RoundReads started before the loader exists (train.py starts it before the dataset scan) reads the rows
    the loader serves in that pass; a loader refuses one started for another store or other settings."""
    store = labelstore.open_store(coded["store"])
    for world in (1, 3):
        reads = RoundReads(store, num_crops=2, seed=4, rank=world - 1, world_size=world)
        early = reads.read(2).result()
        ld = FKDLoader(coded["data"], store, batch_size=4, num_crops=2, crop_size=24, device=DEVICE, num_threads=2,
                       normalize=False, seed=4, rank=world - 1, world_size=world, reads=reads)
        ld.set_epoch(2)
        batches = list(ld)
        assert ld.reader.round is early  # served from the early read
        served = np.unique(np.concatenate([b["indices"].numpy() for b in batches]))
        rows = np.arange(30) if early.rows is None else early.rows
        assert np.array_equal(rows, served)
        for b in batches:
            check_batch(coded, b, 2)
        ld.close()
    other = RoundReads(store, num_crops=2, seed=5)
    with pytest.raises(ValueError, match="other settings"):
        FKDLoader(coded["data"], store, batch_size=4, num_crops=2, device=DEVICE, reads=other)
    with pytest.raises(ValueError, match="another store"):
        FKDLoader(coded["data"], coded["store"], batch_size=4, num_crops=2, device=DEVICE,
                  reads=RoundReads(store, num_crops=2))
    other.close()


@pytest.mark.parametrize("rows_per_shard, batch, bridged", [(1, 4, 7), (1, 1, 8), (8, 4, 0)])
def test_batches_do_not_wait_for_their_pass_read(coded, tmp_path, rows_per_shard, batch, bridged):
    """While a pass's read is under way (held here), its batches are served from reads of their own rows (and
    the next batches', while they fall in at most a quarter of the shards; else they wait): the same images,
    crops and labels as once the pass's read is done."""
    path = str(tmp_path / "store")
    make_store(coded["data"], path, pool=6, rows_per_shard=rows_per_shard)
    store = labelstore.open_store(path)
    release = threading.Event()
    real = store.read_round

    def held_pass_read(r, n, **kw):  # the pass's read (the one that gives way: pause=) waits for the test
        if kw.get("pause") is not None:
            release.wait(60)
        return real(r, n, **kw)
    store.read_round = held_pass_read
    ld = FKDLoader(coded["data"], store, batch_size=batch, num_crops=2, crop_size=24, device=DEVICE,
                   num_threads=2, normalize=False, seed=3)
    if not bridged:  # every batch waits for the pass's read
        threading.Timer(1.0, release.set).start()
    try:
        ld.set_epoch(1)
        early = list(ld)
        # 30 shards: 4 batches of 4 rows fall in more than 7 (a quarter), so each batch is read alone (the last,
        # short one with the one before), and batches of 1 four at a time; 4 shards: a batch of 4 rows falls in
        # more than 1, so it waits
        assert ld.reader._reads[1].done() != bool(bridged) and ld.reader.bridged == bridged
    finally:
        release.set()
    ld.reader._reads[1].result(timeout=60)
    ld.set_epoch(1)
    late = list(ld)
    assert ld.reader.round is ld.reader._reads[1].result() and ld.reader.bridged == bridged
    assert len(early) == len(late) == 30 // batch + (30 % batch > 0)
    for a, b in zip(early, late):
        check_batch(coded, a, 2)
        for key in ("images", "topk_idx", "topk_val", "targets", "indices", "crop_ids"):
            assert torch.equal(a[key].cpu(), b[key].cpu()), key
    ld.close()


def hold_batch_read(reads: RoundReads, rows: np.ndarray) -> tuple[threading.Thread, threading.Event]:
    """A batch's own read of ``rows`` of pass 0 (``RoundReads.read_rows``), started in a thread and kept under way
    until the returned event is set."""
    reads.done()
    entered, release = threading.Event(), threading.Event()
    real = reads.store.read_round

    def held_batch_read(r, n, **kw):
        if kw.get("listed"):  # the batch's own read: under way until the test releases it
            entered.set()
            release.wait(60)
        return real(r, n, **kw)
    reads.store.read_round = held_batch_read
    batch = threading.Thread(target=reads.read_rows, args=(0, rows))
    batch.start()
    assert entered.wait(30)
    return batch, release


def test_the_pass_read_gives_way_to_a_batch_read(coded):
    """The background read of a pass pauses (before its next block of shards) while a batch's own read is under
    way: on a busy object store its requests would otherwise queue ahead of the batch's."""
    store = labelstore.open_store(coded["store"])
    reads = RoundReads(store, num_crops=2)
    batch, release = hold_batch_read(reads, np.array([1, 9, 17]))
    whole = reads.read(0)
    time.sleep(1.0)
    assert not whole.done()  # a 30-row read takes milliseconds: it is waiting for the batch's read
    release.set()
    batch.join(30)
    assert whole.result(timeout=60).topk_idx.shape == (30, 2, 3)
    reads.close()


def test_a_dropped_pass_read_stops_at_its_next_block(tmp_path):
    """A pass read whose pass the loader dropped (keep) stops before its next block instead of reading on and
    delaying the next pass's read."""
    from tests.test_labelstore import filled_store
    store = filled_store(str(tmp_path / "s"), n=100, c=8, rows_per_shard=1)[0]  # 100 shards: 4 blocks of 32
    reads = RoundReads(store, num_crops=2)
    batch, release = hold_batch_read(reads, np.array([5]))
    dropped = reads.read(0)  # starts, then waits before its first block for the batch read
    time.sleep(0.5)
    reads.keep(1)  # the loader moved on to pass 1
    release.set()
    batch.join(30)
    with pytest.raises(concurrent.futures.CancelledError):
        dropped.result(timeout=60)
    assert reads.read(1).result(timeout=60).topk_idx.shape == (100, 2, 3)
    reads.close()


def test_start_batch_resumes_inside_an_epoch(coded):
    ld = loader(coded, seed=8)
    ld.set_epoch(3)
    full = [b["indices"] for b in ld]
    ld.set_epoch(3, start_batch=5)
    rest = [b["indices"] for b in ld]
    assert len(rest) == len(full) - 5 and all(torch.equal(a, b) for a, b in zip(full[5:], rest))
    ld.set_epoch(3)  # start_batch applies once
    assert len([b for b in ld]) == len(full)


def test_last_partial_batch_is_delivered_or_dropped_on_request(coded):
    ld = loader(coded, batch_size=8)
    sizes = [b["images"].shape[0] for b in ld]
    assert len(ld) == 4 and sizes == [16, 16, 16, 12]
    ld = loader(coded, batch_size=8, drop_last=True)
    assert len(ld) == 3 and [b["images"].shape[0] for b in ld] == [16, 16, 16]


def test_same_epoch_is_reproducible_and_breaking_out_is_safe(coded):
    ld = loader(coded, seed=3)
    ld.set_epoch(2)
    first = [b["indices"].clone() for b in ld]
    ld.set_epoch(7)
    next(iter(ld))  # abandon an epoch half way
    ld.set_epoch(2)
    again = [b["indices"] for b in ld]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == len(again)
    third = [b["indices"] for b in ld]  # the same epoch again, straight after a complete one
    assert all(torch.equal(a, b) for a, b in zip(first, third)) and len(first) == len(third)


def fidelity(tmp_path, shapes, S, pool=24):
    """Max |diff| per crop against torchvision's resized_crop (bilinear, antialias) + hflip on PIL, outside
    (a) the 1-px border and (b) a border of ceil(upscale / 2) px, plus the crop's upscale factor."""
    data = str(tmp_path / "data")
    rng = np.random.default_rng(1)
    for r, (h, w) in enumerate(shapes):
        p = os.path.join(data, "train", "c0", f"{r}.jpg")
        os.makedirs(os.path.dirname(p), exist_ok=True)
        Image.fromarray(textured(rng, h, w)).save(p, quality=95)
    sizes = np.array(shapes)
    boxes, flips = sample_crops(3, range(len(shapes)), sizes, pool)
    boxes[:, 0] = [[0, 0, h, w] for h, w in shapes]  # whole image, flipped and not
    flips[:, 0] = [i % 2 == 0 for i in range(len(shapes))]
    ds, _, _, _ = make_store(data, str(tmp_path / "s"), pool=pool, boxes=boxes, flips=flips)
    ld = FKDLoader(data, str(tmp_path / "s"), batch_size=2, num_crops=pool, crop_size=S, device=DEVICE,
                   normalize=False, shuffle=False, num_threads=2)
    out = []
    for b in ld:
        for i, (r, k) in enumerate(zip(b["indices"].tolist(), b["crop_ids"].tolist())):
            img = Image.open(ds.path(r)).convert("RGB")
            t, l, h, w = (int(v) for v in boxes[r, k])
            ref = TF.resized_crop(img, t, l, h, w, [S, S], TF.InterpolationMode.BILINEAR, antialias=True)
            if flips[r, k]:
                ref = TF.hflip(ref)
            d = np.abs(b["images"][i].cpu().numpy().astype(int) - np.asarray(ref).astype(int).transpose(2, 0, 1))
            by, bx = int(np.ceil(max(1, S / h) / 2)), int(np.ceil(max(1, S / w) / 2))
            out.append((d[:, 1:-1, 1:-1].max(), d[:, by:S - by, bx:S - bx].max(), d.mean(), S / min(h, w)))
    return np.array(out)


def test_fidelity_against_torchvision_resized_crop(tmp_path):
    """ImageNet-like images and RandomResizedCrop boxes at 224 px: within 2 grey levels (measured 1)
    everywhere but the outermost pixel, where DALI's ROI resize reads pixels outside the box."""
    res = fidelity(tmp_path, [(375, 500), (500, 333), (333, 500), (240, 320)], S=224)
    assert len(res) == 96 and res[:, 3].max() < 3
    assert res[:, 0].max() <= 2, res[:, 0].max()
    assert res[:, 2].mean() < 0.5


def test_fidelity_of_strongly_upscaled_crops(tmp_path):
    """Tiny images blown up to 224 px (up to ~7x): the band that differs at the edges widens to
    ceil(upscale / 2) px; inside it the crops still agree within 2 grey levels."""
    res = fidelity(tmp_path, [(90, 120), (64, 48)], S=224, pool=16)
    assert res[:, 3].max() > 3
    assert res[:, 1].max() <= 2, res[:, 1].max()


def test_normalisation_dtypes_and_channels_last(coded):
    raw = next(iter(loader(coded, shuffle=False)))
    f32 = next(iter(loader(coded, shuffle=False, normalize=True)))
    mean = torch.tensor(IMAGENET_MEAN, device=raw["images"].device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=raw["images"].device).view(1, 3, 1, 1)
    torch.testing.assert_close(f32["images"], (raw["images"].float() / 255 - mean) / std, atol=1e-5, rtol=0)
    f16 = next(iter(loader(coded, shuffle=False, normalize=True, dtype="float16")))
    assert f16["images"].dtype == torch.float16
    torch.testing.assert_close(f16["images"].float(), f32["images"], atol=2e-2, rtol=0)
    bf = next(iter(loader(coded, shuffle=False, normalize=True, dtype="bfloat16", channels_last=True)))
    assert bf["images"].dtype == torch.bfloat16 and bf["images"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(bf["images"].float(), f32["images"], atol=5e-2, rtol=0)
    cl = next(iter(loader(coded, shuffle=False, channels_last=True)))
    assert cl["images"].shape == raw["images"].shape and torch.equal(cl["images"], raw["images"])
    assert cl["images"].is_contiguous(memory_format=torch.channels_last)
    assert raw["topk_idx"].dtype == torch.int64 and raw["topk_val"].dtype == torch.float32


def test_bad_requests_are_refused_with_the_fix(coded, tmp_path):
    with pytest.raises(LoaderError, match="num_crops=7 but .* stores 6 crops"):
        loader(coded, num_crops=7)
    with pytest.raises(LoaderError, match="device='gpu'.*no CUDA"):
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        loader(coded, device="gpu")
    with pytest.raises(ValueError, match="rank 2 is outside"):
        loader(coded, rank=2, world_size=2)


def test_incomplete_store_needs_allow_incomplete(coded, tmp_path):
    path = partial_copy(coded["store"], str(tmp_path / "partial"), done=8)
    with pytest.raises(labelstore.StoreIncompleteError, match="22 of 30 rows"):
        FKDLoader(coded["data"], path, batch_size=4, num_crops=2, device=DEVICE)
    ld = FKDLoader(coded["data"], path, batch_size=4, num_crops=2, crop_size=24, device=DEVICE,
                   allow_incomplete=True)
    served = {i for b in ld for i in b["indices"].tolist()}
    assert served == set(range(8))


@pytest.mark.parametrize("damage", ["truncate", "random", "png-as-jpg", "empty"])
def test_corrupt_files_are_named(coded, tmp_path, damage):
    import shutil
    data = str(tmp_path / "data")
    shutil.copytree(coded["data"], data)
    victim = os.path.join(data, "train", "class_4", "img_013.jpg")
    raw = open(victim, "rb").read()
    if damage == "truncate":
        open(victim, "wb").write(raw[: len(raw) // 3])
    elif damage == "random":
        open(victim, "wb").write(np.random.default_rng(0).bytes(len(raw)))
    elif damage == "empty":
        open(victim, "wb").close()
    else:
        Image.open(victim).save(victim, format="PNG")
    if os.path.getsize(victim) != len(raw):
        # A file of another size no longer matches the store's fingerprint: refused up front.
        with pytest.raises(labelstore.StoreMismatchError, match="differ from those the labels were made from"):
            FKDLoader(data, coded["store"], batch_size=4, num_crops=2, device=DEVICE)
    ld = FKDLoader(data, coded["store"], batch_size=4, num_crops=2, crop_size=24, device=DEVICE,
                   verify_files=False)
    if damage == "png-as-jpg":  # a valid image under a wrong name is decoded by content
        assert sum(b["images"].shape[0] for b in ld) == 60
        return
    with pytest.raises(LoaderError, match=r"class_4/img_013.jpg: .*(decoded|read)"):
        for _ in ld:
            pass
    # The loader recovers for the next epoch once the file is fixed.
    open(victim, "wb").write(raw)
    ld.set_epoch(1)
    assert sum(b["images"].shape[0] for b in ld) == 60


def test_eval_loader_matches_torchvision_resize_center_crop(tmp_path):
    data = str(tmp_path / "val")
    rng = np.random.default_rng(2)
    files = []
    for r, (h, w) in enumerate([(70, 90), (96, 64), (80, 80)]):
        rel = f"c{r}/{r}.jpg"
        p = os.path.join(data, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        Image.fromarray(textured(rng, h, w)).save(p, quality=95)
        files.append(rel)
    ld = EvalLoader(data, files, [0, 1, 2], batch_size=2, crop_size=32, device=DEVICE, normalize=False)
    assert ld.resize_size == round(32 * 256 / 224) and len(ld) == 2
    got = [b for b in ld]
    assert torch.cat([b["targets"] for b in got]).tolist() == [0, 1, 2]
    images = torch.cat([b["images"] for b in got])
    for i, rel in enumerate(files):
        img = Image.open(os.path.join(data, rel)).convert("RGB")
        ref = TF.center_crop(TF.resize(img, ld.resize_size, TF.InterpolationMode.BILINEAR, antialias=True), 32)
        diff = np.abs(images[i].cpu().numpy().astype(int) - np.asarray(ref).astype(int).transpose(2, 0, 1))
        assert diff[:, 1:-1, 1:-1].max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_standard_loader_pairs_images_with_hard_labels(coded):
    ds = coded["ds"]
    ld = StandardLoader(ds.root, ds.files, ds.targets, batch_size=8, crop_size=24, device=DEVICE,
                        normalize=False, seed=1)
    total = 0
    for b in ld:
        for img, r, t in zip(b["images"], b["indices"].tolist(), b["targets"].tolist()):
            assert abs(img[0].float().mean().item() - (16 + 8 * (r % 28))) < 3
            assert t == ds.targets[r]
        total += len(b["indices"])
    assert total == 30 and len(ld) == 4


def test_data_may_name_the_train_folder_itself(coded):
    ld = FKDLoader(os.path.join(coded["data"], "train"), coded["store"], batch_size=8, num_crops=2, crop_size=24,
                   device=DEVICE, normalize=False)
    assert sum(b["images"].shape[0] for b in ld) == 60


def test_generation_crops_at_the_teacher_size(coded):
    """Teacher inputs: each decode cut into a group of stored crops at every teacher's size (bicubic, like
    FKD's generator) with its normalisation; a short last group is padded with crop id -1."""
    from pipelines import GenerationReader, generation_pipeline
    ds = coded["ds"]
    reader = GenerationReader(ds.root, ds.files, group_size=4, batch_size=5)
    rows = np.arange(5, 12)
    nb = reader.start_job(rows, coded["boxes"][rows], coded["flips"][rows], coded["sizes"][rows])  # 6 crops -> groups of 4 + 2(+2 pad)
    assert nb == 3
    views = [(40, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), (24, "bilinear", (0.485, 0.456, 0.406),
                                                                   (0.229, 0.224, 0.225))]
    pipe = generation_pipeline(reader, num_crops=4, views=views, device=DEVICE, batch_size=5, num_threads=1,
                               device_id=0 if DEVICE == "gpu" else None)
    seen = []
    for _ in range(nb):
        big, small, index, crop_ids, shapes = (np.array(x.as_cpu().as_tensor()) for x in pipe.run())
        assert big.shape[1:] == (4, 3, 40, 40) and small.shape[1:] == (4, 3, 24, 24)
        for i, r in enumerate(index):
            assert shapes[i][:2].tolist() == coded["sizes"][r].tolist()
            img = Image.open(ds.path(r)).convert("RGB")
            for j, k in enumerate(crop_ids[i]):
                seen.append((int(r), int(k)))
                if k < 0:
                    continue
                t, l, h, w = (int(v) for v in coded["boxes"][r, k])
                ref = TF.resized_crop(img, t, l, h, w, [40, 40], TF.InterpolationMode.BICUBIC, antialias=True)
                if coded["flips"][r, k]:
                    ref = TF.hflip(ref)
                ref = (np.asarray(ref).astype(np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5
                diff = np.abs(big[i, j] - ref)[:, 2:-2, 2:-2] * 0.5 * 255  # in grey levels
                assert diff.mean() < 1.0 and diff.max() <= 12, (r, k, diff.mean(), diff.max())
    assert sorted(x for x in seen if x[1] >= 0) == [(r, k) for r in rows for k in range(6)]
    assert sum(1 for x in seen if x[1] < 0) == 2 * len(rows)


def test_show_writes_the_crops_the_loader_delivers(coded, tmp_path):
    """`fkd-dali show`: crop_<k>.png is store column k, pixel for pixel what FKDLoader gives for that crop."""
    from fkd_dali.show import ShowError, show
    row = 5
    r = show(coded["store"], coded["data"], str(row), str(tmp_path / "show"), crop_size=24, columns=3, device=DEVICE)
    assert r["crops"] == 6 and r["file"] == coded["ds"].files[row]
    served = {}
    for b in loader(coded, num_crops=6, shuffle=False):
        for img, i, k in zip(b["images"], b["indices"].tolist(), b["crop_ids"].tolist()):
            if i == row:
                served[k] = img.permute(1, 2, 0).cpu().numpy()
    assert sorted(served) == list(range(6))
    for k in range(6):
        png = np.asarray(Image.open(tmp_path / "show" / f"crop_{k}.png"))
        assert png.dtype == np.uint8 and png.shape == (24, 24, 3)
        assert np.array_equal(png, served[k]), k
    with Image.open(r["sheet"]) as im:
        assert im.size[0] > 300
    by_name = show(coded["store"], coded["data"], coded["ds"].files[row], str(tmp_path / "again"), crop_size=24)
    assert by_name["row"] == row
    with pytest.raises(ShowError, match="rows 0..29"):
        show(coded["store"], coded["data"], "30", str(tmp_path / "x"))
    with pytest.raises(ShowError, match="neither a row number nor a file"):
        show(coded["store"], coded["data"], "nope.jpg", str(tmp_path / "x"))
