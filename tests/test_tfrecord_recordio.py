"""TFRecord and MXNet RecordIO shards (pipelines/formats): what we write, DALI's own readers read byte for byte with
the index we write; what others wrote (other field orders, multi-part headers) scans; corrupt files are refused by
name and byte offset."""

import io
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipelines.formats import FORMATS, Entry, ShardFormatError, format_of_path
from pipelines.formats import recordio, tfrecord

def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = 24 + seed % 7, 30 + 3 * (seed % 5)  # lengths of every residue mod 4
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def samples():
    return [(str(100 + i), jpeg(i), (3 * i) % 7) for i in range(9)]


def write(tmp_path, module, samples, name="shard"):
    path = str(tmp_path / (name + module.SUFFIX))
    with open(path, "wb") as f:
        entries = module.write_shard(f, samples)
    return path, entries


def scan(module, path):
    with open(path, "rb") as f:
        return list(module.scan_shard(f, path))


def test_formats_are_registered():
    assert FORMATS["tfrecord"] is tfrecord and FORMATS["recordio"] is recordio
    assert format_of_path("a/train-0.tfrecord") is tfrecord and format_of_path("a/train.rec") is recordio


def test_crc32c_matches_published_vectors():
    """RFC 3720 (iSCSI) B.4 vectors and the classic check value, unmasked from TensorFlow's masking."""
    def unmask(m):
        r = (m - 0xA282EAD8) & 0xFFFFFFFF
        return ((r << 15) | (r >> 17)) & 0xFFFFFFFF
    assert unmask(tfrecord.masked_crc(b"123456789")) == 0xE3069283
    assert unmask(tfrecord.masked_crc(bytes(32))) == 0x8A9136AA
    assert unmask(tfrecord.masked_crc(b"\xff" * 32)) == 0x62A8AB43
    assert unmask(tfrecord.masked_crc(bytes(range(32)))) == 0x46DD794E


@pytest.mark.parametrize("module", [tfrecord, recordio], ids=["tfrecord", "recordio"])
def test_round_trip(tmp_path, samples, module):
    path, entries = write(tmp_path, module, samples)
    raw = open(path, "rb").read()
    assert [(e.key, e.label) for e in entries] == [(k, label) for k, _, label in samples]
    assert [raw[e.offset:e.offset + e.length] for e in entries] == [img for _, img, _ in samples]
    assert scan(module, path) == entries


def test_tfrecord_index_is_dalis_tfrecord2idx(tmp_path, samples):
    path, entries = write(tmp_path, tfrecord, samples)
    ours = open(tfrecord.write_dali_index(path, entries)).read()
    theirs = str(tmp_path / "theirs.idx")
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "tfrecord2idx"), path, theirs], check=True)
    assert ours == open(theirs).read() and len(ours.splitlines()) == len(samples)


def dali_outputs(pipe_fn, n):
    from nvidia.dali import pipeline_def
    pipe = pipeline_def(pipe_fn)(batch_size=n, num_threads=1, device_id=None)
    out = pipe.run()
    return [[np.array(o[i]) for i in range(n)] for o in out]


def test_dali_tfrecord_reader_reads_our_shard(tmp_path, samples):
    """DeepLearningExamples' feature spec on our records: images byte-identical, labels 1-based, the boxes empty;
    DALI 2.4's source_info is '<shard path> at index <record offset>'."""
    import nvidia.dali.fn as fn
    import nvidia.dali.tfrecord as tfrec
    path, entries = write(tmp_path, tfrecord, samples)
    index = tfrecord.write_dali_index(path, entries)
    features = {"image/encoded": tfrec.FixedLenFeature((), tfrec.string, ""),
                "image/class/label": tfrec.FixedLenFeature([1], tfrec.int64, -1),
                "image/class/text": tfrec.FixedLenFeature([], tfrec.string, ""),
                "image/filename": tfrec.FixedLenFeature((), tfrec.string, "")}
    for side in ("xmin", "ymin", "xmax", "ymax"):
        features[f"image/object/bbox/{side}"] = tfrec.VarLenFeature(tfrec.float32, 0.0)

    def pipe():
        r = fn.readers.tfrecord(path=[path], index_path=[index], features=features)
        return (r["image/encoded"], r["image/class/label"], fn.get_property(r["image/encoded"], key="source_info"),
                r["image/filename"], r["image/object/bbox/xmin"], r["image/object/bbox/ymax"])

    images, labels, info, names, xmin, ymax = dali_outputs(pipe, len(samples))
    offsets = [int(line.split()[0]) for line in open(index)]
    assert [a.tobytes() for a in images] == [img for _, img, _ in samples]
    assert [int(a[0]) for a in labels] == [label + 1 for _, _, label in samples]
    assert [a.tobytes().decode() for a in info] == [f"{path} at index {o}" for o in offsets]
    assert [a.tobytes().decode() for a in names] == [k for k, _, _ in samples]
    assert all(a.shape == (0,) for a in xmin + ymax)


def test_dali_mxnet_reader_reads_our_shard(tmp_path, samples):
    """fn.readers.mxnet with our .idx: images byte-identical, labels as floats; source_info '<path> at index
    <record offset>'."""
    import nvidia.dali.fn as fn
    path, entries = write(tmp_path, recordio, samples)
    index = recordio.write_dali_index(path, entries)
    lines = [line.split("\t") for line in open(index).read().splitlines()]
    assert [k for k, _ in lines] == [k for k, _, _ in samples]

    def pipe():
        jpegs, labels = fn.readers.mxnet(path=[path], index_path=[index])
        return jpegs, labels, fn.get_property(jpegs, key="source_info")

    images, labels, info = dali_outputs(pipe, len(samples))
    assert [a.tobytes() for a in images] == [img for _, img, _ in samples]
    assert [a.tolist() for a in labels] == [[float(label)] for _, _, label in samples]
    assert [a.tobytes().decode() for a in info] == [f"{path} at index {o}" for _, o in lines]


# ---- files written by another code path -----------------------------------------------------------------------

def pb_varint(v):
    out = b""
    while v > 0x7F:
        out += bytes([v & 0x7F | 0x80])
        v >>= 7
    return out + bytes([v])


def pb_len(num, payload):
    return pb_varint(num << 3 | 2) + pb_varint(len(payload)) + payload


def foreign_tfrecord(path, records):
    """TensorFlow-ImageNet-builder-like records: other field order, unpacked label, extra features, boxes."""
    with open(path, "wb") as f:
        for name, image, label in records:
            feats = []
            if name is not None:
                feats.append((b"image/filename", pb_len(1, pb_len(1, name.encode()))))
            feats.append((b"image/height", pb_len(3, pb_len(1, pb_varint(30)))))
            if label is not None:
                feats.append((b"image/class/label", pb_len(3, pb_varint(1 << 3 | 0) + pb_varint(label))))
            feats.append((b"image/object/bbox/xmin", pb_len(2, pb_len(1, struct.pack("<2f", 0.1, 0.5)))))
            if image is not None:
                feats.append((b"image/encoded", pb_len(1, pb_len(1, image))))
            feats.append((b"image/class/text", pb_len(1, pb_len(1, b"tench"))))
            data = pb_len(1, b"".join(pb_len(1, pb_len(1, k) + pb_len(2, v)) for k, v in feats))
            head = struct.pack("<Q", len(data))
            f.write(head + struct.pack("<I", tfrecord.masked_crc(head)) + data
                    + struct.pack("<I", tfrecord.masked_crc(data)))


def test_foreign_tfrecord_scans(tmp_path, samples):
    path = str(tmp_path / "train-00000-of-00001")
    foreign_tfrecord(path, [("n01440764_1.JPEG", samples[0][1], 1), (None, samples[1][1], 1000)])
    entries = scan(tfrecord, path)
    raw = open(path, "rb").read()
    assert [(e.key, e.label) for e in entries] == [("n01440764_1.JPEG", 0), ("train-00000-of-00001:1", 999)]
    assert [raw[e.offset:e.offset + e.length] for e in entries] == [samples[0][1], samples[1][1]]


def foreign_recordio(path, records):
    """im2rec-like records: a label array (flag 1) before the image, id2 set, as MXNet's pack writes them."""
    with open(path, "wb") as f:
        for id_, image, label in records:
            data = struct.pack("<IfQQ", 1, 0.0, id_, 7) + struct.pack("<f", label) + image
            f.write(struct.pack("<II", recordio.MAGIC, len(data)) + data + bytes(-len(data) % 4))


def test_foreign_recordio_scans_and_dali_agrees(tmp_path, samples):
    import nvidia.dali.fn as fn
    path = str(tmp_path / "val.rec")
    foreign_recordio(path, [(5, samples[2][1], 4.0), (6, samples[3][1], 0.0)])
    entries = scan(recordio, path)
    raw = open(path, "rb").read()
    assert [(e.key, e.label) for e in entries] == [("5", 4), ("6", 0)]
    assert [raw[e.offset:e.offset + e.length] for e in entries] == [samples[2][1], samples[3][1]]
    index = recordio.write_dali_index(path, entries)

    def pipe():
        return tuple(fn.readers.mxnet(path=[path], index_path=[index]))
    images, labels = dali_outputs(pipe, 2)
    assert [a.tobytes() for a in images] == [samples[2][1], samples[3][1]]
    assert [a.tolist() for a in labels] == [[4.0], [0.0]]


# ---- refused ---------------------------------------------------------------------------------------------------

def refused(module, path, *words):
    with pytest.raises(ShardFormatError) as e:
        scan(module, path)
    message = str(e.value)
    assert path in message and all(w in message for w in words), message
    return e.value


def corrupt(path, offset, data):
    raw = bytearray(open(path, "rb").read())
    raw[offset:offset + len(data)] = data
    open(path, "wb").write(bytes(raw))


def test_tfrecord_corruption_refused(tmp_path, samples):
    path, entries = write(tmp_path, tfrecord, samples[:3])
    second = int(open(tfrecord.write_dali_index(path, entries)).read().splitlines()[1].split()[0])
    good = open(path, "rb").read()

    open(path, "wb").write(good[:-10])  # truncated last record
    assert refused(tfrecord, path, "truncated").offset == int(open(tfrecord.index_path(path)).read().split()[-2])
    open(path, "wb").write(good[:second + 5])  # cut inside a header
    assert refused(tfrecord, path, "truncated record header").offset == second

    open(path, "wb").write(good)
    corrupt(path, entries[1].offset + 20, bytes([good[entries[1].offset + 20] ^ 1]))  # one image bit flipped
    assert refused(tfrecord, path, "data's crc").offset == second

    open(path, "wb").write(good)
    corrupt(path, second + 8, b"\0\0\0\0")  # the length's crc
    assert refused(tfrecord, path, "length's crc").offset == second

    open(path, "wb").write(good)
    head = struct.pack("<Q", 1 << 40)
    corrupt(path, second, head + struct.pack("<I", tfrecord.masked_crc(head)))  # absurd length, valid crc
    refused(tfrecord, path, "claims 1099511627776 bytes", f"at byte {second}")

    open(path, "wb").write(b"GIF89a" + good)  # not a TFRecord at all
    refused(tfrecord, path, "at byte 0")


@pytest.mark.parametrize("has_image,label,words", [
    (False, 1, ["record 0 has no 'image/encoded'"]),
    ("", 1, ["record 0 has an empty 'image/encoded'"]),
    (True, None, ["record 0 has no 'image/class/label'"]),
    (True, 0, ["class 0", "1-based"]),
])
def test_tfrecord_sample_without_image_or_class_refused(tmp_path, samples, has_image, label, words):
    path = str(tmp_path / "x.tfrecord")
    image = samples[0][1] if has_image is True else b"" if has_image == "" else None
    foreign_tfrecord(path, [("k", image, label)])
    refused(tfrecord, path, *words)


def test_recordio_corruption_refused(tmp_path, samples):
    path, entries = write(tmp_path, recordio, samples[:3])
    second = entries[1].offset - 32
    good = open(path, "rb").read()

    open(path, "wb").write(good[:-10])
    refused(recordio, path, "truncated", f"at byte {entries[2].offset - 32}")
    open(path, "wb").write(good[:second + 5])
    refused(recordio, path, "truncated record header", f"at byte {second}")

    open(path, "wb").write(good)
    corrupt(path, second, b"\0\0\0\0")
    refused(recordio, path, "magic", f"at byte {second}")

    open(path, "wb").write(good)
    corrupt(path, second + 4, struct.pack("<I", (1 << 29) - 1))  # absurd length
    refused(recordio, path, "claims 536870911 bytes", f"at byte {second}")

    open(path, "wb").write(good)
    corrupt(path, second + 32 - 24, struct.pack("<I", 2))  # flag 2: a label vector, not a class
    refused(recordio, path, "holds 2 labels", f"at byte {second}")

    foreign_recordio(path, [(1, samples[0][1], 1.0), (2, b"", 1.0)])  # a record of a header and no image
    refused(recordio, path, "record 2 holds no image bytes")


def test_split_recordio_record_refused(tmp_path, samples):
    """A record as dmlc's writer splits it around an aligned magic number: refused, naming the split."""
    image = samples[0][1][:16] + struct.pack("<I", recordio.MAGIC) + samples[0][1][16:]
    data = struct.pack("<IfQQ", 0, 1.0, 3, 0) + image
    cut = 24 + 16
    first, rest = data[:cut], data[cut + 4:]
    path = str(tmp_path / "split.rec")
    with open(path, "wb") as f:
        f.write(struct.pack("<II", recordio.MAGIC, 1 << 29 | len(first)) + first)
        f.write(struct.pack("<II", recordio.MAGIC, 3 << 29 | len(rest)) + rest + bytes(-len(rest) % 4))
    refused(recordio, path, "split record (cflag 1)", "--format tfrecord or wds", "at byte 0")


def test_recordio_write_refuses_what_it_cannot_keep_whole(tmp_path, samples):
    key, image, label = samples[0]
    with pytest.raises(ValueError, match=r"'100'.*magic number 0xced7230a at byte 16"):
        recordio.write_shard(io.BytesIO(), [(key, image[:16] + struct.pack("<I", recordio.MAGIC) + image, label)])
    # unaligned: dmlc would not split it, so it is written whole
    entries = recordio.write_shard(io.BytesIO(), [(key, image[:15] + struct.pack("<I", recordio.MAGIC) + image, 1)])
    assert entries[0].length == len(image) + 19
    with pytest.raises(ValueError, match=r"'n01440764_1.JPEG'.*numeric id"):
        recordio.write_shard(io.BytesIO(), [("n01440764_1.JPEG", image, label)])
    for module in (recordio, tfrecord):
        with pytest.raises(ValueError, match=r"'7' has no image bytes"):
            module.write_shard(io.BytesIO(), [("7", b"", label)])


@pytest.mark.parametrize("module", [tfrecord, recordio], ids=["tfrecord", "recordio"])
def test_index_refuses_entries_of_another_shard(tmp_path, samples, module):
    path, entries = write(tmp_path, module, samples[:4])
    _, other = write(tmp_path, module, samples[4:8], name="other")
    with pytest.raises(ShardFormatError, match="is not the sample the entries list"):
        module.write_dali_index(path, other)
    with pytest.raises(ShardFormatError, match="holds 4 records but 3 entries"):
        module.write_dali_index(path, entries[:3])
    assert isinstance(entries[0], Entry)


@pytest.mark.parametrize("module", [tfrecord, recordio], ids=["tfrecord", "recordio"])
def test_two_samples_with_one_key_refused(tmp_path, samples, module):
    path, entries = write(tmp_path, module, [samples[0], samples[1], (samples[0][0], samples[2][1], 1)])
    error = refused(module, path, "two samples with one key", "record at byte 0")
    assert error.offset == (entries[2].offset - 32 if module is recordio else
                            int(open(tfrecord.write_dali_index(path, entries)).read().split()[-2]))


# ---- through pack / index ---------------------------------------------------------------------------------------

def test_pack_tfrecord_then_index_again_gives_the_same_set(tmp_path):
    """`fkd-dali pack --format tfrecord` of an ImageFolder, then `fkd-dali index --force --dali-index` of the same
    shards (the path foreign shards take: every record scanned): the same keys, classes, byte ranges, CRCs and
    DALI index files; the fingerprint is the folder's, so a store made from the folder pairs with the shards."""
    from fkd_dali.dataset import scan_image_folder
    from fkd_dali.pack import index, pack
    from tests.conftest import make_image_folder
    data = str(tmp_path / "data")
    make_image_folder(data, classes=3, per_class=4)
    packed = pack(data, str(tmp_path / "shards"), "tfrecord", shard_bytes=4000)["train"]
    assert len(packed.names) > 1
    dali_idx = {n: open(tfrecord.index_path(packed.shard_path(i))).read() for i, n in enumerate(packed.names)}
    again = index(str(tmp_path / "shards"), force=True, dali_index=True)["train"]
    folder = scan_image_folder(os.path.join(data, "train"))
    assert list(again.keys) == list(packed.keys) == list(folder.files)
    assert again.classes == folder.classes == ["class_0", "class_1", "class_2"]
    assert again.labels.tolist() == folder.targets.tolist()
    assert np.array_equal(np.asarray(again.index), np.asarray(packed.index))
    assert again.fingerprint == packed.fingerprint == folder.fingerprint
    assert {n: open(tfrecord.index_path(again.shard_path(i))).read() for i, n in enumerate(again.names)} == dali_idx


def test_pack_recordio_refuses_named_keys(tmp_path):
    """RecordIO records carry numbers only: packing an ImageFolder (keys are its paths) is refused by name."""
    from fkd_dali.pack import pack
    from tests.conftest import make_image_folder
    data = str(tmp_path / "data")
    make_image_folder(data, classes=2, per_class=2)
    with pytest.raises(ValueError, match="numeric id.*not a name.*--format tfrecord or wds"):
        pack(data, str(tmp_path / "shards"), "recordio")


def test_index_takes_suffixless_tfrecord_shards(tmp_path, samples):
    """DeepLearningExamples names its TFRecord shards ``train-00000-of-01024`` (no suffix): with ``--format
    tfrecord`` every file that is not ours is a shard; a file that is not TFRecord is refused by name; DALI index
    files already there (``train-00000-of-00002.idx``) are not overwritten unasked."""
    from fkd_dali.dataset import DatasetError
    from fkd_dali.pack import index
    root = tmp_path / "train"
    root.mkdir()
    foreign_tfrecord(str(root / "train-00000-of-00002"), [("a_1.JPEG", samples[0][1], 1), ("a_2.JPEG", samples[1][1], 2)])
    foreign_tfrecord(str(root / "train-00001-of-00002"), [("a_3.JPEG", samples[2][1], 1)])
    got = index(str(root), fmt="tfrecord", dali_index=True)["train"]
    assert got.names == ["train-00000-of-00002", "train-00001-of-00002"]
    assert list(got.keys) == ["a_1.JPEG", "a_2.JPEG", "a_3.JPEG"] and got.labels.tolist() == [0, 1, 0]
    assert [got.read(i) for i in range(3)] == [samples[0][1], samples[1][1], samples[2][1]]
    assert os.path.isfile(root / "train-00000-of-00002.idx")
    os.remove(root / "fkd-index.json")  # the DALI index files stay
    with pytest.raises(DatasetError, match="DALI index files .train-0000"):
        index(str(root), fmt="tfrecord", dali_index=True)
    (root / "README").write_bytes(b"not a shard\n")
    with pytest.raises(ShardFormatError, match="README at byte 0.*not a TFRecord"):
        index(str(root), fmt="tfrecord", force=True)


def test_pack_recordio_writes_nothing_before_refusing(tmp_path):
    """The refusal comes before OUT/train or any .rec is created."""
    from fkd_dali.pack import pack
    from tests.conftest import make_image_folder
    data = str(tmp_path / "data")
    make_image_folder(data, classes=2, per_class=2)
    with pytest.raises(ValueError, match="numeric id"):
        pack(data, str(tmp_path / "shards"), "recordio")
    assert not os.path.exists(tmp_path / "shards")
