"""The Zarr label store: layout, bulk reads, crash-safe writes, validation and corruption errors."""

import importlib.util
import json
import multiprocessing as mp
import os
import zipfile

import numpy as np
import pytest
import zarr

import labelstore
from labelstore import (StoreCorruptError, StoreFormatError, StoreIncompleteError, StoreMismatchError,
                        StoreNotFoundError, StoreWriteError, create_store, open_store)
from labelstore.schema import Layout

NUM_CLASSES = 7


def content(n, c, k, seed=0):
    rng = np.random.default_rng(seed)
    sizes = np.stack([rng.integers(20, 90, n), rng.integers(20, 90, n)], 1)
    h = rng.integers(1, sizes[:, None, 0] + 1, (n, c))
    w = rng.integers(1, sizes[:, None, 1] + 1, (n, c))
    top = (rng.random((n, c)) * (sizes[:, None, 0] - h + 1)).astype(int)
    left = (rng.random((n, c)) * (sizes[:, None, 1] - w + 1)).astype(int)
    boxes = np.stack([top, left, h, w], -1)
    flips = rng.random((n, c)) < 0.5
    idx = np.argsort(rng.random((n, c, NUM_CLASSES)), axis=-1)[..., :k]
    val = np.sort(rng.dirichlet(np.ones(NUM_CLASSES), (n, c))[..., :k], axis=-1)[..., ::-1]
    return {"sizes": sizes, "boxes": boxes, "flips": flips, "topk_idx": idx,
            "topk_val": val.astype(np.float16)}


def new_store(path, n=10, c=12, k=3, **kw):
    files = [f"class_{i % NUM_CLASSES}/img_{i:03d}.jpg" for i in range(n)]
    return create_store(path, files=files, targets=[i % NUM_CLASSES for i in range(n)],
                        classes=[f"class_{i}" for i in range(NUM_CLASSES)], fingerprint="sha256:abc",
                        dataset_root="train", num_crops=c, top_k=k, seed=0,
                        teachers=[{"name": "resnet18", "input_size": 224}], **kw)


def filled_store(path, n=10, c=12, k=3, **kw):
    store = new_store(path, n, c, k, **kw)
    data = content(n, c, k)
    for a, b in store.shard_ranges():
        store.write_block(a, **{name: v[a:b] for name, v in data.items()})
    store.finalize()
    return store, data


def test_layout_follows_the_measured_policy():
    assert Layout.choose(1_281_167, 500).rows_per_shard == 2048
    assert Layout.choose(100_000, 64).rows_per_shard == 8192
    assert Layout.choose(10, 64).rows_per_shard == 10
    lay = Layout.choose(1000, 10, crops_per_chunk=4)
    assert lay.shard_crops(10) == 12 and lay.crops_per_chunk == 4


def test_schema_v1_names_dtypes_and_metadata(tmp_path):
    store, _ = filled_store(str(tmp_path / "s"), rows_per_shard=4)
    g = zarr.open_group(str(tmp_path / "s"), mode="r")
    attrs = g.attrs["fkd"]
    for key in ("schema_version", "num_images", "num_crops", "top_k", "num_classes", "temperature",
                "teachers", "crop", "seed", "exif", "dataset", "complete"):
        assert key in attrs, key
    assert attrs["schema_version"] == 1 and attrs["complete"] is True and attrs["exif"] == "ignore"
    assert attrs["dataset"]["classes"][0] == "class_0" and attrs["dataset"]["fingerprint"] == "sha256:abc"
    dtypes = {name: str(g[name].dtype) for name in g.array_keys()}
    assert dtypes["boxes"] == "uint16" and dtypes["flips"] == "bool" and dtypes["topk_idx"] == "int16"
    assert dtypes["topk_val"] == "float16" and dtypes["targets"] == "int32" and dtypes["sizes"] == "int32"
    assert dtypes["done"] == "bool"
    assert g["boxes"].shards == (4, 12, 4) and g["boxes"].chunks == (4, 4, 4)
    assert g["done"].chunks == (4,) and g["sizes"].chunks == (4, 2)
    assert list(store.files[:2]) == ["class_0/img_000.jpg", "class_1/img_001.jpg"]


@pytest.mark.parametrize("n_round", [4, 3, 5])
def test_read_round_returns_exactly_the_round_crops(tmp_path, n_round):
    store, data = filled_store(str(tmp_path / "s"), n=10, c=12, rows_per_shard=4)
    reader = open_store(str(tmp_path / "s"))
    assert reader.num_rounds(n_round) == 12 // n_round
    for r in range(reader.num_rounds(n_round)):
        rnd = reader.read_round(r, n_round)
        cs = slice(r * n_round, (r + 1) * n_round)
        np.testing.assert_array_equal(rnd.boxes, data["boxes"][:, cs])
        np.testing.assert_array_equal(rnd.flips, data["flips"][:, cs])
        np.testing.assert_array_equal(rnd.topk_idx, data["topk_idx"][:, cs])
        np.testing.assert_array_equal(rnd.topk_val, data["topk_val"][:, cs])
        assert rnd.crop_start == r * n_round
    with pytest.raises(ValueError, match="rounds of"):
        reader.read_round(12 // n_round, n_round)


def test_read_rows_any_order_with_repeats(tmp_path):
    store, data = filled_store(str(tmp_path / "s"), n=10, c=6, rows_per_shard=3)
    rows = [9, 0, 4, 4, 7]
    got = open_store(str(tmp_path / "s")).read_rows(rows)
    for name in ("sizes", "boxes", "flips", "topk_idx", "topk_val"):
        np.testing.assert_array_equal(got[name], data[name][rows])
    assert got["done"].all()


def test_writes_must_cover_whole_shards_and_never_replace_silently(tmp_path):
    store = new_store(str(tmp_path / "s"), n=10, c=4, rows_per_shard=4)
    data = content(10, 4, 3)
    with pytest.raises(StoreWriteError, match="whole shards"):
        store.write_block(2, **{k: v[2:6] for k, v in data.items()})
    with pytest.raises(StoreWriteError, match="whole shards"):
        store.write_block(0, **{k: v[0:3] for k, v in data.items()})
    store.write_block(8, **{k: v[8:10] for k, v in data.items()})  # the short last shard is whole
    with pytest.raises(StoreWriteError, match="already done"):
        store.write_block(8, **{k: v[8:10] for k, v in data.items()})
    store.write_block(8, **{k: v[8:10] for k, v in data.items()}, overwrite=True)
    with pytest.raises(StoreWriteError, match="shape"):
        store.write_block(4, **{k: v[0:4] for k, v in data.items() if k != "boxes"}, boxes=data["boxes"][0:3])
    assert store.done().tolist() == [False] * 8 + [True] * 2
    with pytest.raises(StoreWriteError, match="read-only"):
        open_store(str(tmp_path / "s")).write_block(0, **{k: v[0:4] for k, v in data.items()})


def test_rows_not_done_in_a_block_stay_not_done(tmp_path):
    store = new_store(str(tmp_path / "s"), n=4, c=4, rows_per_shard=4)
    data = content(4, 4, 3)
    data["boxes"][1] = 0  # garbage where the row is skipped: not checked, not marked done
    store.write_block(0, **data, rows_done=np.array([True, False, True, True]))
    assert store.done().tolist() == [True, False, True, True]
    assert not store.finalize()


def test_invalid_labels_are_refused_naming_the_row(tmp_path):
    store = new_store(str(tmp_path / "s"), n=4, c=4, rows_per_shard=4)
    data = content(4, 4, 3)
    bad = dict(data, boxes=data["boxes"].copy())
    bad["boxes"][2, 1] = [0, 0, data["sizes"][2, 0] + 1, 1]
    with pytest.raises(labelstore.StoreError, match=r"row 2 \(class_2/img_002.jpg\).*outside its image"):
        store.write_block(0, **bad)
    bad = dict(data, topk_idx=data["topk_idx"].copy())
    bad["topk_idx"][3, 0, 0] = NUM_CLASSES
    with pytest.raises(labelstore.StoreError, match="row 3.*class id"):
        store.write_block(0, **bad)
    bad = dict(data, topk_val=data["topk_val"].copy())
    bad["topk_val"][0, 0, 0] = np.nan
    with pytest.raises(labelstore.StoreError, match="row 0.*probability"):
        store.write_block(0, **bad)
    assert not store.done().any()


def test_a_failed_write_leaves_the_rows_not_done(tmp_path, monkeypatch):
    store = new_store(str(tmp_path / "s"), n=8, c=4, rows_per_shard=4)
    data = content(8, 4, 3)
    store.write_block(0, **{k: v[:4] for k, v in data.items()})
    arr = store.array("topk_val")
    cls = type(arr)
    real = cls.__setitem__

    def failing(self, key, value):
        if self.basename == "topk_val":
            raise OSError(28, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(cls, "__setitem__", failing)
    with pytest.raises(StoreWriteError, match="No space left.*resume"):
        store.write_block(4, **{k: v[4:] for k, v in data.items()})
    monkeypatch.setattr(cls, "__setitem__", real)
    assert store.done().tolist() == [True] * 4 + [False] * 4
    store.write_block(4, **{k: v[4:] for k, v in data.items()})  # the resume
    assert store.finalize()


def _shard_of(path, name, i):
    arr = zarr.open_group(path, mode="r")[name]
    return os.path.join(path, name, "c", str(i), *(["0"] * (arr.ndim - 1)))


def test_truncated_chunk_names_array_and_chunk(tmp_path):
    path = str(tmp_path / "s")
    filled_store(path, n=12, c=8, rows_per_shard=4)
    f = _shard_of(path, "topk_val", 1)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(StoreCorruptError, match=r"'topk_val', chunk file topk_val/c/1/0/0 \(rows 4..7\)"):
        open_store(path).read_round(0, 4)


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    path = str(tmp_path / "s")
    filled_store(path, n=12, c=8, rows_per_shard=4)
    f = _shard_of(path, "boxes", 2)
    raw = bytearray(open(f, "rb").read())
    raw[20] ^= 0xFF
    open(f, "wb").write(bytes(raw))
    open_store(path).read_round(1, 4)  # byte 20 lies in the inner chunk of crops 0..3, not read here
    with pytest.raises(StoreCorruptError, match="'boxes'.*boxes/c/2/0/0"):
        open_store(path).read_round(0, 4)
    with pytest.raises(StoreCorruptError, match="'boxes'.*boxes/c/2/0/0"):
        open_store(path).verify()


def test_verify_reads_every_chunk_of_a_sound_store(tmp_path):
    store, _ = filled_store(str(tmp_path / "s"), n=12, c=8, rows_per_shard=4)
    assert open_store(str(tmp_path / "s")).verify() == {"rows_done": 12, "rows_checked": 12, "shards": 3,
                                                         "shards_total": 3}


def test_missing_chunk_file_of_done_rows_is_an_error(tmp_path):
    path = str(tmp_path / "s")
    filled_store(path, n=12, c=8, rows_per_shard=4)
    os.remove(_shard_of(path, "topk_idx", 0))
    with pytest.raises(StoreCorruptError, match="no chunk file topk_idx/c/0/0/0.*rows 0..3"):
        open_store(path).read_round(0, 4)
    with pytest.raises(StoreCorruptError, match="topk_idx"):
        open_store(path).read_rows([1])


def test_a_read_that_reuses_the_listing_still_finds_a_lost_file_and_blocks_read_the_same(tmp_path):
    """``listed=True`` (a batch's own read) trusts the last listing only for shards it found; a shard it did not
    find is listed again and reported. A read in blocks (``pause``) returns what one bulk read returns."""
    path = str(tmp_path / "s")
    filled_store(path, n=12, c=8, rows_per_shard=4)
    store = open_store(path)
    whole = store.read_round(1, 4)  # lists every crop array once
    rows = np.array([1, 6, 11])
    part = store.read_round(1, 4, rows=rows, listed=True)
    assert np.array_equal(part.topk_idx, whole.topk_idx[rows]) and np.array_equal(part.rows, rows)
    os.remove(_shard_of(path, "boxes", 2))
    store._seen_shards["boxes"].discard(2)  # as a listing made after the loss would have it
    with pytest.raises(StoreCorruptError, match="no chunk file boxes/c/2/0/0"):
        store.read_round(1, 4, rows=rows, listed=True)
    paused = []
    other = filled_store(str(tmp_path / "t"), n=100, c=8, rows_per_shard=2)[0]
    import labelstore.reading as S
    blocks = -(-50 // S.READ_BLOCK_SHARDS)
    for sel in (None, np.arange(3, 100, 7)):
        bulk = other.read_round(0, 4, rows=sel)
        got = other.read_round(0, 4, rows=sel, pause=lambda: paused.append(1))
        for name in ("boxes", "flips", "topk_idx", "topk_val"):
            assert np.array_equal(getattr(bulk, name), getattr(got, name)), name
    assert len(paused) == 2 * blocks


def test_an_all_false_flips_shard_is_data_not_a_lost_file(tmp_path):
    """zarr skips a chunk equal to the fill value by default; an all-False flips shard must still be written."""
    path = str(tmp_path / "s")
    store = new_store(path, n=12, c=8, rows_per_shard=4)
    data = content(12, 8, 3)
    data["flips"][4:8] = False
    for a, b in store.shard_ranges():
        store.write_block(a, **{name: v[a:b] for name, v in data.items()})
    store.finalize()
    assert os.path.isfile(_shard_of(path, "flips", 1))
    assert not open_store(path).read_round(0, 4).flips[4:8].any()
    open_store(path).verify(workers=1)
    os.remove(_shard_of(path, "flips", 1))  # a real loss is still found
    with pytest.raises(StoreCorruptError, match="no chunk file flips/c/1/0 "):
        open_store(path).read_round(0, 4)


def test_verify_runs_in_processes_on_a_sample_with_progress(tmp_path):
    path = str(tmp_path / "s")
    filled_store(path, n=40, c=8, rows_per_shard=4)
    seen = []
    v = open_store(path).verify(sample=3, workers=2, progress=seen.append)
    assert v["shards"] == 3 and sum(seen) == 3 and v["shards_total"] == 10 and v["rows_checked"] == 12
    f = _shard_of(path, "topk_val", 7)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(StoreCorruptError, match=r"topk_val/c/7/0/0 \(rows 28..31\)"):
        open_store(path).verify(workers=2)


def test_zip_and_file_url_stores_read_as_the_folder(tmp_path):
    path = str(tmp_path / "s")
    filled_store(path, n=12, c=8, rows_per_shard=4)
    zpath = str(tmp_path / "s.zip")
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as z:  # what `cd s && zip -r0 ../s.zip .` makes
        for d, _, fs in os.walk(path):
            for f in fs:
                z.write(os.path.join(d, f), os.path.relpath(os.path.join(d, f), path))
    want = open_store(path).read_round(1, 4)
    for where in (zpath, "file://" + path):
        got = open_store(where).read_round(1, 4)
        assert all(np.array_equal(getattr(got, a), getattr(want, a)) for a in labelstore.CROP_ARRAYS)
    z = open_store(zpath)
    assert z.verify(workers=2)["rows_checked"] == 12  # the worker processes reopen the zip
    assert labelstore.summarize(z)["bytes_total"] == labelstore.summarize(open_store(path))["bytes_total"]
    with pytest.raises(StoreWriteError, match="read-only"):
        open_store(zpath, mode="r+")


def test_a_url_whose_backend_is_missing_names_the_package():
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(StoreNotFoundError, match=r"gs:// label stores need the gcsfs package.*pip install gcsfs"):
        open_store("gs://bucket/store")


def test_incomplete_store_reports_missing_rows(tmp_path):
    store = new_store(str(tmp_path / "s"), n=10, c=4, rows_per_shard=4)
    data = content(10, 4, 3)
    store.write_block(4, **{k: v[4:8] for k, v in data.items()})
    reader = open_store(str(tmp_path / "s"))
    with pytest.raises(StoreIncompleteError, match="6 of 10 rows have no labels.*--allow-incomplete"):
        reader.require_complete()
    assert reader.require_complete(allow_incomplete=True).tolist() == [False] * 4 + [True] * 4 + [False] * 2
    assert reader.pending_shards() == [0, 2]
    rnd = reader.read_round(0, 4)  # done rows are exact; the others are fill values
    np.testing.assert_array_equal(rnd.topk_idx[4:8], data["topk_idx"][4:8, :4])
    assert (rnd.topk_idx[:4] == -1).all()


def test_check_dataset_names_the_first_mismatch(tmp_path):
    store, _ = filled_store(str(tmp_path / "s"), n=10, c=4)
    files = list(store.files)
    classes = list(store.classes)
    store.check_dataset(files=files, classes=classes, fingerprint="sha256:abc", targets=store.targets)
    with pytest.raises(StoreMismatchError, match="7 classes.*has 6.*extra entries from 'class_6'"):
        store.check_dataset(files=files, classes=classes[:6], fingerprint="sha256:abc")
    with pytest.raises(StoreMismatchError, match="labels 10 images.*has 9"):
        store.check_dataset(files=files[:9], classes=classes, fingerprint="sha256:abc")
    renamed = files[:3] + ["class_3/other.jpg"] + files[4:]  # a rename changes the fingerprint (it hashes names)
    with pytest.raises(StoreMismatchError, match="image 3 is 'class_3/img_003.jpg' in the store but "
                                                 "'class_3/other.jpg'"):
        store.check_dataset(files=renamed, classes=classes, fingerprint="sha256:renamed")
    with pytest.raises(StoreMismatchError, match="sizes differ"):
        store.check_dataset(files=files, classes=classes, fingerprint="sha256:def")
    with pytest.raises(StoreMismatchError, match="has class"):
        store.check_dataset(files=files, classes=classes, fingerprint="sha256:abc",
                            targets=np.roll(store.targets, 1))


def test_open_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        open_store(str(tmp_path / "nothing"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreNotFoundError, match="not a Zarr v3 group"):
        open_store(str(tmp_path / "plain"))
    zarr.open_group(str(tmp_path / "other"), mode="w")
    with pytest.raises(StoreFormatError, match="without the 'fkd' attributes"):
        open_store(str(tmp_path / "other"))
    filled_store(str(tmp_path / "s"))
    meta = tmp_path / "s" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["fkd"]["schema_version"] = 2
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreFormatError, match="schema version 2"):
        open_store(str(tmp_path / "s"))


def test_create_refuses_bad_arguments(tmp_path):
    with pytest.raises(StoreWriteError, match="top_k=9"):
        new_store(str(tmp_path / "a"), k=9)
    new_store(str(tmp_path / "b"))
    with pytest.raises(StoreWriteError, match="already exists"):
        new_store(str(tmp_path / "b"))
    assert new_store(str(tmp_path / "b"), overwrite=True).num_images == 10


def _write_shards(args):
    path, shards = args
    store = open_store(path, mode="r+")
    data = content(24, 6, 3)
    ranges = store.shard_ranges()
    for i in shards:
        a, b = ranges[i]
        store.write_block(a, **{k: v[a:b] for k, v in data.items()})


def test_two_processes_writing_their_own_shards(tmp_path):
    path = str(tmp_path / "s")
    new_store(path, n=24, c=6, rows_per_shard=4)
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_write_shards, [(path, [0, 2, 4]), (path, [1, 3, 5])])
    store = open_store(path, mode="r+")
    assert store.finalize()
    data = content(24, 6, 3)
    rows = store.read_rows(np.arange(24))
    for name in ("boxes", "flips", "topk_idx", "topk_val", "sizes"):
        np.testing.assert_array_equal(rows[name], data[name])


def test_summary_reports_layout_and_bytes(tmp_path):
    store, _ = filled_store(str(tmp_path / "s"), n=10, c=12, rows_per_shard=4)
    s = labelstore.summarize(open_store(str(tmp_path / "s")))
    assert s["num_images"] == 10 and s["complete"] and s["rows_done"] == 10
    assert s["layout"] == {"rows_per_shard": 4, "crops_per_chunk": 4}
    assert s["arrays"]["boxes"]["shards"] == [4, 12, 4] and s["bytes_per_crop"] > 0
    text = labelstore.format_summary(s)
    assert "10  x  12 crops  x  top-3 of 7 classes" in text and "teacher    name=resnet18" in text


def test_a_lock_file_is_never_opened_through_a_link_and_staging_is_never_found(tmp_path, monkeypatch):
    """Issue 23, item 1: the lock file is opened with O_NOFOLLOW and must be a file of its own (not a hard link
    to another name); the staging folder of a new store is made by the run, never built into if present."""
    from labelstore.locking import LockFileError, acquire, create_atomically
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "out").mkdir()
    os.symlink(victim, tmp_path / "out" / "train.lock")
    with pytest.raises(LockFileError, match=r"train.lock is a symbolic link \(to .*victim.txt\)"):
        acquire(str(tmp_path / "out" / "train.lock"), "output folder out")
    os.remove(tmp_path / "out" / "train.lock")
    os.link(victim, tmp_path / "out" / "train.lock")
    with pytest.raises(LockFileError, match="a file with 2 names"):
        acquire(str(tmp_path / "out" / "train.lock"), "output folder out")
    assert victim.read_text() == "precious"
    os.remove(tmp_path / "out" / "train.lock")
    with acquire(str(tmp_path / "out" / "train.lock"), "output folder out") as lock:
        assert lock.held

    import labelstore.locking as L
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(L.os, "getpid", lambda: 424242)  # a staging name someone predicted and linked
    os.symlink(elsewhere, L._staging_path(str(tmp_path / "s"), "creating"))
    with pytest.raises(labelstore.StoreError, match=r"\.s\.creating-.*-424242 already exists \(a symbolic link"):
        create_atomically(str(tmp_path / "s"), lambda tmp: new_store(tmp))
    assert os.listdir(elsewhere) == [] and not (tmp_path / "s").exists()
    monkeypatch.undo()
    assert create_atomically(str(tmp_path / "s"), lambda tmp: new_store(tmp)) and open_store(str(tmp_path / "s"))


def test_a_store_with_a_short_relative_path_lists_its_own_files(tmp_path, monkeypatch):
    """zarr's LocalStore lists keys by deleting every "ROOT/" in the paths it finds: a store opened as "s" saw
    "s/boxes/c/0/0/0" as "boxec/0/0/0" and reported its files lost."""
    filled_store(str(tmp_path / "s"), n=12, c=8, rows_per_shard=4)
    monkeypatch.chdir(tmp_path)
    assert open_store("s").verify(workers=1)["rows_checked"] == 12
    assert open_store("s").read_round(0, 4).boxes.shape == (12, 4, 4)
