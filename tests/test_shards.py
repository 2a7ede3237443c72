"""Sharded inputs (issue 24): `fkd-dali pack` writes WebDataset tars that Python's tarfile and DALI's own
webdataset reader read; a store made from a folder loads on its packed shards (and the reverse) with crops equal
pixel for pixel; bad shard sets are refused by name."""

import io
import json
import os
import shutil
import tarfile
import zlib

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

import labelstore
from fkd_dali.cli import main
from fkd_dali.dataset import DatasetError, scan_image_folder
from fkd_dali.generate import generate
from fkd_dali.pack import index, pack
from pipelines import EvalLoader, FKDLoader, LoaderError
from pipelines.formats import FORMATS, ShardFormatError
from pipelines.formats import wds
from pipelines.shards import INDEX_JSON, ShardSetError, index_shards, open_shard_set
from tests.conftest import current_device
from tests.test_generate import config, make_world
from tests.test_loader import make_store

DEVICE = current_device()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The coded dataset (30 train, 10 val images), a store made from its folder, and the folder packed in shards of
    about 20 KB (several shards per split)."""
    root = str(tmp_path_factory.mktemp("shards"))
    w = make_world(root)
    store = os.path.join(root, "store")
    ds, sizes, boxes, flips = make_store(w["data"], store, pool=4)
    shards = os.path.join(root, "shards")
    assert main(["pack", w["data"], "--out", shards, "--shard-size", "20K"]) == 0
    return dict(w, store=store, ds=ds, shards=shards)


def batches(loader, passes=1):
    out = []
    for p in range(passes):
        loader.set_epoch(p) if hasattr(loader, "set_epoch") else None
        out += [{k: v.cpu().numpy().copy() for k, v in b.items() if hasattr(v, "cpu")} for b in loader]
    return out


def fkd(data, store, **kw):
    return FKDLoader(data, store, batch_size=4, num_crops=2, crop_size=24, device=DEVICE, num_threads=1,
                     normalize=False, seed=3, **kw)


def assert_same_batches(a, b):
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_pack_keeps_bytes_order_and_keys(packed):
    folder = scan_image_folder(os.path.join(packed["data"], "train"))
    shards = open_shard_set(os.path.join(packed["shards"], "train"))
    assert len(shards.names) > 1  # the size limit cut several shards
    assert list(shards.keys) == list(folder.files) and shards.classes == folder.classes
    assert shards.fingerprint == folder.fingerprint  # a store made from the folder pairs with the shards
    np.testing.assert_array_equal(shards.labels, folder.targets)
    assert shards.index.dtype.itemsize == 16
    for r in range(len(folder)):
        with open(folder.path(r), "rb") as f:
            data = f.read()
        assert shards.read(r) == data and int(shards.index[r]["crc32"]) == zlib.crc32(data)
    # Python's tarfile reads the shards: the members are the keys, their bytes the files'
    members = {}
    for name in shards.names:
        with tarfile.open(os.path.join(shards.root, name)) as tar:
            for m in tar:
                members[m.name] = tar.extractfile(m).read()
    for r, key in enumerate(folder.files):
        assert members[key] == shards.read(r)
        assert members[key.rsplit(".", 1)[0] + ".cls"] == str(folder.targets[r]).encode()
    with pytest.raises(DatasetError, match="exists: pack writes new shard sets only"):
        pack(packed["data"], packed["shards"])


def test_dali_webdataset_reader_reads_the_packed_shards(packed):
    shards = open_shard_set(os.path.join(packed["shards"], "train"))
    paths = [os.path.join(shards.root, n) for n in shards.names]

    @pipeline_def(batch_size=5, num_threads=1, device_id=None)
    def wds_pipe():
        img, cls = fn.readers.webdataset(paths=paths, index_paths=[p + ".idx" for p in paths], ext=["JPG;jpg", "cls"],
                                         dtypes=[types.UINT8, types.UINT8], missing_component_behavior="error")
        return img, cls, fn.get_property(img, key="source_info")

    pipe = wds_pipe()
    pipe.build()
    seen = []
    for _ in range(len(shards) // 5):
        imgs, classes, infos = pipe.run()
        for i in range(len(imgs)):
            seen.append((bytes(np.array(imgs[i])), int(bytes(np.array(classes[i])).decode()),
                         bytes(np.array(infos[i])).decode()))
    assert len(seen) == len(shards)
    for r, (data, label, info) in enumerate(seen):
        assert data == shards.read(r) and label == shards.labels[r]
        assert info.endswith(shards.keys[r])  # DALI 2.4's source_info: "<tar path>:<offset>:<member>"


def test_folder_store_loads_on_shards_with_the_same_crops(packed):
    a = fkd(packed["data"], packed["store"])
    b = fkd(packed["shards"], packed["store"])
    assert b.reader.serves_bytes and not a.reader.serves_bytes
    assert_same_batches(batches(a), batches(b))
    assert b.reader.paths.served_ahead >= len(b) - 1  # every batch after the first was read ahead
    val = scan_image_folder(os.path.join(packed["data"], "val"))
    val_shards = scan_image_folder(os.path.join(packed["shards"], "val"))
    assert val_shards.fingerprint == val.fingerprint
    e1 = EvalLoader(val.root, val.files, val.targets, batch_size=4, crop_size=24, device=DEVICE, num_threads=1)
    e2 = EvalLoader(val_shards.root, val_shards.files, val_shards.targets, batch_size=4, crop_size=24, device=DEVICE,
                    num_threads=1)
    assert_same_batches(batches(e1), batches(e2))


def test_store_generated_from_shards_equals_the_folders_and_loads_on_both(packed, tmp_path):
    from_shards, from_folder = str(tmp_path / "s1"), str(tmp_path / "s2")
    generate(config(packed, from_shards, data=packed["shards"]))
    generate(config(packed, from_folder))
    s1, s2 = labelstore.open_store(from_shards), labelstore.open_store(from_folder)
    for name in ("boxes", "flips", "sizes", "topk_idx", "topk_val"):
        np.testing.assert_array_equal(s1.array(name)[:], s2.array(name)[:], err_msg=name)
    shards = open_shard_set(os.path.join(packed["shards"], "train"))
    np.testing.assert_array_equal(s1.checksums(), shards.checksums())  # recorded: the bytes identify each sample
    assert s2.checksums() is None  # a folder's store: names and sizes (the fingerprint), as before
    assert_same_batches(batches(fkd(packed["data"], from_shards)), batches(fkd(packed["shards"], from_shards)))


def copy_set(packed, tmp_path, split="train") -> str:
    data = str(tmp_path / "copy")
    shutil.copytree(os.path.join(packed["shards"], split), os.path.join(data, split))
    return data


def test_changed_bytes_under_the_same_key_are_refused_before_training(packed, tmp_path):
    """The same names and byte sizes (the fingerprint matches) but one image's bytes changed, and the set indexed
    again (its CRCs agree with its bytes): the store's CRCs refuse it by name."""
    store = str(tmp_path / "store")
    generate(config(packed, store, data=packed["shards"]))
    data = copy_set(packed, tmp_path)
    root = os.path.join(data, "train")
    shards = open_shard_set(root)
    row = 7
    offset = int(shards.index[row]["offset"])
    with open(os.path.join(root, shards.names[0]), "r+b") as f:
        f.seek(offset + int(shards.index[row]["length"]) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x55]))
    assert main(["index", data, "--force"]) == 0
    with pytest.raises(labelstore.StoreMismatchError, match=f"other bytes.*{shards.keys[row]}"):
        fkd(data, store)


def test_stale_index_is_caught_when_the_bytes_are_read(packed, tmp_path):
    data = copy_set(packed, tmp_path)
    root = os.path.join(data, "train")
    shards = open_shard_set(root)
    row = 3
    with open(os.path.join(root, shards.names[0]), "r+b") as f:
        f.seek(int(shards.index[row]["offset"]) + 100)
        f.write(b"\0\0\0\0")
    ld = fkd(data, packed["store"])  # same sizes: the index still opens; the bytes are checked when read
    with pytest.raises(Exception, match=f"{shards.keys[row]}.*CRC-32 mismatch.*stale index"):
        batches(ld)


def test_missing_shard_and_truncated_tar_are_named(packed, tmp_path):
    data = copy_set(packed, tmp_path)
    root = os.path.join(data, "train")
    shards = open_shard_set(root)
    gone = os.path.join(root, shards.names[1])
    os.remove(gone)
    with pytest.raises(DatasetError, match=f"shard {gone} is missing"):
        scan_image_folder(root)
    with pytest.raises(LoaderError, match="missing"):
        fkd(data, packed["store"])
    # a truncated tar: its index reports it changed; indexing it again names the shard and where it ends
    first = os.path.join(root, shards.names[0])
    last = int(shards.starts[1]) - 1  # the first shard's last sample: cut in its middle
    with open(first, "r+b") as f:
        f.truncate(int(shards.index[last]["offset"]) + int(shards.index[last]["length"]) // 2)
    with pytest.raises(DatasetError, match="train-000000.tar is \\d+ bytes, \\d+ when it was indexed"):
        scan_image_folder(root)
    os.remove(os.path.join(root, INDEX_JSON))
    with pytest.raises(ShardFormatError, match=f"shard {first} at byte .*truncated"):
        index_shards(root)


def tar_of(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("members, fault", [
    ([("a.jpg", b"x"), ("a.cls", b"1"), ("b.jpg", b"y"), ("b.cls", b"2"), ("a.txt", b"?")], "two samples with the key 'a'"),
    ([("a.jpg", b"x"), ("b.jpg", b"y"), ("b.cls", b"2")], "sample 'a' has no class member"),
    ([("a.cls", b"1"), ("b.jpg", b"y"), ("b.cls", b"2")], "sample 'a' has 0 image members"),
    ([("a.jpg", b"x"), ("a.png", b"y"), ("a.cls", b"2")], "sample 'a' has 2 image members"),
    ([("a.jpg", b"x"), ("a.cls", b"one")], "the class of sample 'a' is b'one', not an integer"),
])
def test_bad_samples_are_refused_by_name(members, fault):
    with pytest.raises(ShardFormatError, match=f"shard bad.tar at byte \\d+: {fault}"):
        list(wds.scan_shard(io.BytesIO(tar_of(members)), "bad.tar"))


def test_foreign_shards_are_indexed_and_a_key_seen_twice_in_the_set_refused(tmp_path, packed):
    root = str(tmp_path / "foreign" / "train")
    os.makedirs(root)
    with open(os.path.join(packed["data"], "train", packed["ds"].files[0]), "rb") as f:
        jpeg = f.read()
    with open(os.path.join(root, "part-0.tar"), "wb") as f:
        f.write(tar_of([("s1.jpg", jpeg), ("s1.cls", b"0"), ("s2.jpg", jpeg), ("s2.cls", b"1")]))
    with open(os.path.join(root, "part-1.tar"), "wb") as f:
        f.write(tar_of([("s3.jpg", jpeg), ("s3.cls", b"1")]))
    assert main(["index", str(tmp_path / "foreign")]) == 0
    ds = scan_image_folder(root)
    assert list(ds.files) == ["s1.jpg", "s2.jpg", "s3.jpg"] and ds.classes == ["0", "1"]
    assert list(ds.targets) == [0, 1, 1]
    with open(os.path.join(root, "part-1.tar"), "wb") as f:
        f.write(tar_of([("s2.jpg", jpeg), ("s2.cls", b"1")]))
    with pytest.raises(ShardFormatError, match="two samples with the key 's2.jpg' \\(the other in part-0.tar\\)"):
        index_shards(root)


def test_a_store_of_another_dataset_is_refused(packed, tmp_path):
    other = str(tmp_path / "other")
    shutil.copytree(packed["data"], other)
    os.remove(os.path.join(other, "train", packed["ds"].files[5]))
    pack(other, str(tmp_path / "other-shards"))
    with pytest.raises(labelstore.StoreMismatchError, match="labels 30 images"):
        fkd(str(tmp_path / "other-shards"), packed["store"])


def test_damaged_index_is_refused(packed, tmp_path):
    data = copy_set(packed, tmp_path)
    root = os.path.join(data, "train")
    meta_path = os.path.join(root, INDEX_JSON)
    meta = json.load(open(meta_path))
    meta["shards"][0]["name"] = "../../etc/passwd"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ShardSetError, match="not a file in"):
        open_shard_set(root)
    with open(os.path.join(root, "fkd-index.bin"), "ab") as f:
        f.write(b"\0" * 16)
    meta["shards"][0]["name"] = "train-000000.tar"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ShardSetError, match="holds 31 samples"):
        open_shard_set(root)


def test_every_registered_format_is_packable():
    assert "wds" in FORMATS and FORMATS["wds"].SUFFIX == ".tar"


def test_inspect_checks_the_data_against_the_store(packed, tmp_path, capsys):
    store = str(tmp_path / "store")
    generate(config(packed, store, data=packed["shards"]))
    assert main(["inspect", store, "--data", packed["shards"], "--verify", "-j", "1"]) == 0
    assert "all 30 samples read, each matching its index's CRC-32" in capsys.readouterr().out
    assert main(["inspect", store, "--data", packed["data"]]) == 0  # the folder it was packed from
    data = copy_set(packed, tmp_path)
    shards = open_shard_set(os.path.join(data, "train"))
    with open(os.path.join(data, "train", shards.names[-1]), "r+b") as f:
        f.seek(int(shards.index[len(shards) - 1]["offset"]) + 10)
        f.write(b"\1\2\3")
    assert main(["inspect", store, "--data", data]) == 0  # names, sizes and index CRCs agree: only a read tells
    assert main(["inspect", store, "--data", data, "--verify", "-j", "1"]) == 1
    assert f"{shards.keys[len(shards) - 1]!r} (row 29)" in capsys.readouterr().err


def test_a_shard_set_on_object_storage_gives_the_same_crops(packed, tmp_path, monkeypatch):
    """A real S3-compatible server (moto, 127.0.0.1): the packed set uploaded, its index copied once into the
    local cache, each sample one range request."""
    fsspec = pytest.importorskip("fsspec")
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        opts = {"endpoint_url": f"http://{host}:{port}", "key": "test", "secret": "test"}
        monkeypatch.setitem(fsspec.config.conf, "s3", opts)
        monkeypatch.setenv("FKD_DALI_SHARD_CACHE", str(tmp_path / "cache"))
        fs = s3fs.S3FileSystem(**opts)
        fs.mkdir("data")
        fs.put(packed["shards"] + "/", "data/shards", recursive=True)
        url = "s3://data/shards"
        ds = scan_image_folder(url + "/train")
        assert ds.fingerprint == packed["ds"].fingerprint and list(ds.files) == list(packed["ds"].files)
        remote = fkd(url, packed["store"])
        assert_same_batches(batches(fkd(packed["shards"], packed["store"])), batches(remote))
        assert remote.reader.paths.shards.requests == len(ds)  # one range request per sample of the pass
        assert sorted(os.listdir(next((tmp_path / "cache").iterdir()))) == sorted(
            ["fkd-index.bin", "fkd-labels.npy", "fkd-key-names.npy", "fkd-key-ends.npy"])
        first = "data/shards/train/" + ds.shards.names[0]  # a sample's bytes changed on the server: refused by name
        at = int(ds.shards.index[1]["offset"]) + 20
        raw = bytearray(fs.cat_file(first))
        raw[at] ^= 0xFF
        fs.pipe_file(first, bytes(raw))
        with pytest.raises(LoaderError, match=f"shard {url}/train/{ds.shards.names[0]}, sample .* \\(row 1\\).*CRC-32"):
            ds.shards.read_remote([0, 1, 2])
        fs.rm("data/shards/train/" + ds.shards.names[1])
        with pytest.raises(DatasetError, match=f"shard {url}/train/{ds.shards.names[1]} is missing"):
            scan_image_folder(url + "/train")
    finally:
        server.stop()


def test_train_and_generate_commands_take_a_shard_set(packed, tmp_path, capsys):
    """The CLI end to end on shards: generate, then train a tiny student one pass, validated on the val shards."""
    store = str(tmp_path / "store")
    assert main(["generate", packed["shards"], "--save-path", store, "-a", "torchscript", "--teacher-path",
                 packed["teachers"][0], "--input-size", "24", "--num-crops", "4", "--top-k", "5", "-b", "4",
                 "--device", DEVICE]) == 0
    assert labelstore.open_store(store).checksums() is not None
    assert main(["train", packed["shards"], "--softlabel-path", store, "-a", "tiny_cnn", "--num-crops", "2", "-b",
                 "8", "--epochs", "2", "--input-size", "32", "--device", DEVICE,
                 "--output", str(tmp_path / "run"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "not validated" not in out and "top-1" in out, out


def foreign_shards(packed, root: str, perm: np.ndarray) -> dict[str, str]:
    """The coded dataset's train images as foreign WebDataset shards: keys s<i>.jpg in the order ``perm`` (not
    the store's), two shards; returns the key map (shard key -> the store's file name)."""
    ds = packed["ds"]
    os.makedirs(root)
    key_map, members = {}, []
    for i, r in enumerate(perm.tolist()):
        with open(ds.path(r), "rb") as f:
            members.append((f"s{i:03d}.jpg", f.read()))
        members.append((f"s{i:03d}.cls", str(ds.targets[r]).encode()))
        key_map[f"s{i:03d}.jpg"] = ds.files[r]
    half = len(members) // 2 // 2 * 2
    for n, part in enumerate((members[:half], members[half:])):
        with open(os.path.join(root, f"part-{n}.tar"), "wb") as f:
            f.write(tar_of(part))
    return key_map


def write_key_map(path, key_map) -> str:
    with open(path, "w") as f:
        f.write("".join(f"{k}\t{v}\n" for k, v in key_map.items()))
    return str(path)


def test_foreign_shards_with_a_key_map_follow_the_store_rows(packed, tmp_path):
    perm = np.random.default_rng(0).permutation(len(packed["ds"]))
    data = str(tmp_path / "foreign")
    key_map = foreign_shards(packed, os.path.join(data, "train"), perm)
    kmap = write_key_map(tmp_path / "keys.tsv", key_map)
    assert main(["index", data, "--store", packed["store"], "--key-map", kmap]) == 0
    shards = open_shard_set(os.path.join(data, "train"))
    assert list(shards.keys) == list(packed["ds"].files) and shards.fingerprint == packed["ds"].fingerprint
    assert shards.shard_ids is not None and len(np.unique(shards.shard_of(np.arange(len(shards))))) == 2
    assert_same_batches(batches(fkd(packed["data"], packed["store"])), batches(fkd(data, packed["store"])))
    # a key map of another dataset: its names are not the store's images
    other = dict(key_map)
    other["s005.jpg"] = "class_9/not_in_the_store.jpg"
    with pytest.raises(DatasetError, match=f"missing {key_map['s005.jpg']}; not in the store: "
                                           "class_9/not_in_the_store.jpg"):
        index(data, store=packed["store"], key_map=write_key_map(tmp_path / "other.tsv", other), force=True)
    del key_map["s007.jpg"]  # a key map that misses a sample
    with pytest.raises(DatasetError, match="the key map names no sample 's007.jpg' \\(shard .*part-0.tar"):
        index(data, store=packed["store"], key_map=write_key_map(tmp_path / "short.tsv", key_map), force=True)


def test_show_replays_the_same_crops_from_shards(packed, tmp_path):
    from fkd_dali.show import show
    row = 11
    a = show(packed["store"], packed["data"], str(row), str(tmp_path / "a"), crop_size=24, columns=2, device=DEVICE)
    b = show(packed["store"], packed["shards"], str(row), str(tmp_path / "b"), crop_size=24, columns=2,
             device=DEVICE)
    assert a["crops"] == b["crops"] == 4
    for k in range(4):
        x, y = (np.asarray(Image.open(tmp_path / d / f"crop_{k}.png")) for d in "ab")
        np.testing.assert_array_equal(x, y)


def test_unusable_images_in_shards_are_named_and_skipped_on_request(packed, tmp_path):
    """Bytes packed unchanged, bad ones too: generate reads each sample's header from its shard (a ranged read)
    and names a cut JPEG and a non-image by key and shard; --skip-corrupt leaves them out, as on a folder."""
    from fkd_dali.generate import GenerateError
    data = str(tmp_path / "data")
    shutil.copytree(packed["data"], data)
    cut = os.path.join(data, "train", "class_3", "img_010.jpg")
    whole = open(cut, "rb").read()
    open(cut, "wb").write(whole[:len(whole) * 2 // 3])  # its header is whole, its end marker gone
    open(os.path.join(data, "train", "class_6", "img_020.jpg"), "wb").write(b"not an image at all")
    pack(data, str(tmp_path / "shards"))
    with pytest.raises(GenerateError, match=r"class_3/img_010.jpg \(in .*train-000000.tar\): .*cut short"
                                            r".*--skip-corrupt"):
        generate(config(packed, str(tmp_path / "s"), data=str(tmp_path / "shards")))
    rep = generate(config(packed, str(tmp_path / "s2"), data=str(tmp_path / "shards"), skip_corrupt=True))
    assert [r for r, _ in rep.skipped] == [10, 20]  # rows of class_3/img_010.jpg, class_6/img_020.jpg


def three_sample_tar() -> tuple[bytes, int]:
    """A 3-sample tar and the byte offset of sample 1's (b's) first header."""
    data = tar_of([("a.jpg", b"x"), ("a.cls", b"0"), ("b.jpg", b"y"), ("b.cls", b"1"), ("c.jpg", b"z"),
                   ("c.cls", b"2")])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return data, next(m.offset for m in tar if m.name == "b.jpg")


def _damaged_checksum(data: bytes, at: int) -> bytes:
    return data[:at + 148] + b"99999999" + data[at + 156:]


@pytest.mark.parametrize("cut", [
    lambda d, at: d[:at + 100],  # cut in the middle of sample 1's header
    _damaged_checksum,  # sample 1's header damaged
    lambda d, at: d[:at] + b"not a tar header " * 64,  # garbage after sample 0
    lambda d, at: d[:at],  # cut right after sample 0's last member (no end-of-archive blocks)
])
def test_a_cut_or_damaged_tar_loses_no_sample_silently(cut):
    data, at = three_sample_tar()
    assert [e.key for e in wds.scan_shard(io.BytesIO(data), "ok.tar")] == ["a.jpg", "b.jpg", "c.jpg"]
    with pytest.raises(ShardFormatError, match=f"shard cut.tar at byte {at}: .*(truncated|corrupt)"):
        list(wds.scan_shard(io.BytesIO(cut(data, at)), "cut.tar"))


def test_an_untrusted_class_number_is_bounded(tmp_path):
    with pytest.raises(ShardFormatError, match="shard big.tar at byte \\d+: the class of sample 'a' is "
                                               "1000000000000, outside 0..2147483647"):
        list(wds.scan_shard(io.BytesIO(tar_of([("a.jpg", b"x"), ("a.cls", b"1000000000000")])), "big.tar"))
    tfr = FORMATS["tfrecord"]
    buf = io.BytesIO()
    tfr.write_shard(buf, [("a.jpg", b"x", 2**40)])
    buf.seek(0)
    with pytest.raises(ShardFormatError, match="shard big.tfrecord at byte 0: record 0 has class 1099511627777"):
        list(tfr.scan_shard(buf, "big.tfrecord"))
    # below the formats' cap, a set without a class list refuses a class list it would have to make up
    root = str(tmp_path / "set")
    os.makedirs(root)
    with open(os.path.join(root, "p.tar"), "wb") as f:
        f.write(tar_of([("a.jpg", b"x"), ("a.cls", b"0")]))
    index_shards(root, dali_index=False)
    with open(os.path.join(root, "p.tar"), "wb") as f:
        f.write(tar_of([("a.jpg", b"x"), ("a.cls", str(2**31 - 1).encode())]))
    with pytest.raises(ShardSetError, match="class 2147483647; without a class list the set may have at most "
                                            "1048576 classes. Give the class names"):
        index_shards(root, dali_index=False)
    # every check runs before the old index is removed (index --force)
    assert os.path.exists(os.path.join(root, INDEX_JSON))
    with open(os.path.join(root, "p.tar"), "wb") as f:
        f.write(tar_of([("a.jpg", b"x"), ("a.cls", b"5")]))
    with pytest.raises(ShardSetError, match="a sample has class 5, but the set has 2 classes"):
        index_shards(root, classes=["x", "y"], dali_index=False)
    assert os.path.exists(os.path.join(root, INDEX_JSON))


def test_an_index_range_past_its_shard_is_named(packed, tmp_path):
    root = os.path.join(copy_set(packed, tmp_path), "train")
    rec = np.fromfile(os.path.join(root, "fkd-index.bin"), np.dtype([("offset", "<u8"), ("length", "<u4"),
                                                                    ("crc32", "<u4")]))
    rec["length"][3] = 2**32 - 1
    rec.tofile(os.path.join(root, "fkd-index.bin"))
    shards = open_shard_set(root)
    for read in (shards.read, shards.open_sample):
        with pytest.raises(LoaderError, match="fkd-index.bin: row 3 says 4294967295 bytes at byte \\d+ of shard "
                                              ".*the index is damaged"):
            read(3)


def test_pack_wds_refuses_a_bad_key_before_writing(tmp_path):
    data = tmp_path / "data" / "train" / "c"
    data.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "a.jpg")
    Image.new("RGB", (8, 8)).save(data / "b.v2.jpg")
    with pytest.raises(ValueError, match="'c/b.v2.jpg' cannot be a WebDataset key"):
        pack(str(tmp_path / "data"), str(tmp_path / "out"), fmt="wds")
    assert not os.path.exists(tmp_path / "out" / "train")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_open_shard_files_are_bounded_and_closed(tmp_path):
    from pipelines.shards import MAX_OPEN_SHARDS, ShardImages
    root = str(tmp_path / "many")
    os.makedirs(root)
    for i in range(MAX_OPEN_SHARDS + 16):
        with open(os.path.join(root, f"p{i:03d}.tar"), "wb") as f:
            f.write(tar_of([(f"s{i}.jpg", bytes([i])), (f"s{i}.cls", b"0")]))
    shards = index_shards(root, dali_index=False)
    before = open_fds()
    images = ShardImages(shards, workers=2)
    got = images.encoded(np.arange(len(shards)))
    assert [bytes(g) for g in got] == [bytes([i]) for i in range(MAX_OPEN_SHARDS + 16)]
    assert open_fds() - before <= MAX_OPEN_SHARDS + 4  # the pool's threads hold no files
    held = [shards.open_sample(r) for r in range(MAX_OPEN_SHARDS + 16)]  # open samples keep their files
    assert [h.read() for h in held] == [bytes([i]) for i in range(MAX_OPEN_SHARDS + 16)]
    del held
    images.close()
    assert open_fds() <= before


def test_key_folders_and_their_rows_must_match(packed, tmp_path):
    root = os.path.join(copy_set(packed, tmp_path), "train")
    meta_path = os.path.join(root, INDEX_JSON)
    meta = json.load(open(meta_path))
    meta["key_dir_starts"].append(99)
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ShardSetError, match=f"{meta_path} is not a shard-set index .*key folders but"):
        open_shard_set(root)


def test_index_files_are_checked_against_the_sizes_and_digests_the_json_recorded(packed, tmp_path, monkeypatch):
    root = os.path.join(copy_set(packed, tmp_path), "train")
    monkeypatch.setenv("FKD_DALI_SHARD_CACHE", str(tmp_path / "cache"))
    url = "file://" + root
    shards = open_shard_set(url)
    row = 4
    offset, length = int(shards.index[row]["offset"]), int(shards.index[row]["length"])
    path = shards.shard_path(int(shards.shard_of(np.asarray([row]))[0]))[len("file://"):]
    # a sample's bytes change (not its size) and the set is indexed again: the node's cache is not stale
    with open(path, "r+b") as f:
        f.seek(offset + length // 2)
        byte = f.read(1)
        f.seek(offset + length // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    index_shards(root, classes=shards.classes, dali_index=False)
    with open(path, "rb") as f:
        f.seek(offset)
        assert open_shard_set(url).read(row) == f.read(length)
    # a per-sample file of another size than recorded is refused on open (O(1))
    labels_path = os.path.join(root, "fkd-labels.npy")
    labels = np.load(labels_path)
    np.save(labels_path, labels.astype(np.int32 if labels.dtype != np.int32 else np.int64))
    with pytest.raises(ShardSetError, match="fkd-labels.npy is \\d+ bytes, fkd-index.json recorded \\d+"):
        open_shard_set(root)
    np.save(labels_path, labels)
    # the same size, other bytes: caught by inspect --verify, and when a cache is filled
    rec = np.fromfile(os.path.join(root, "fkd-index.bin"), shards.index.dtype)
    rec["crc32"][0] ^= 1
    rec.tofile(os.path.join(root, "fkd-index.bin"))
    with pytest.raises(ShardSetError, match="fkd-index.bin holds other bytes than fkd-index.json recorded"):
        open_shard_set(root).verify_bytes(workers=1)
    monkeypatch.setenv("FKD_DALI_SHARD_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(ShardSetError, match="fkd-index.bin holds other bytes than fkd-index.json recorded"):
        open_shard_set(url)
    assert not [n for n in os.listdir(next((tmp_path / "cache2").iterdir())) if n.startswith("fkd-index.bin")]


def test_an_index_json_that_drops_a_digest_is_refused(packed, tmp_path):
    """The JSON is untrusted too: removing a per-sample file's size and SHA-256 must not switch its checks off."""
    root = os.path.join(copy_set(packed, tmp_path), "train")
    meta_path = os.path.join(root, "fkd-index.json")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    del meta["files"]["fkd-index.bin"]
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    with pytest.raises(ShardSetError, match="no size and SHA-256 recorded for fkd-index.bin"):
        open_shard_set(root)
