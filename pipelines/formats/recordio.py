"""MXNet RecordIO shards (``.rec`` + ``.idx``), as dmlc-core writes them and DALI's ``fn.readers.mxnet`` reads them.

A record is ``magic 0xced7230a | lrecord | data | zero padding to 4 bytes`` (u32 little endian; ``lrecord`` =
``cflag << 29 | length``), and an image record's data is MXNet's ``IRHeader`` (flag u32, label f32, id u64,
id2 u64) followed by the image file's bytes (after ``flag`` extra float labels when flag > 0).

**Keys.** A record carries only numbers: its key here is the decimal ``id`` (im2rec writes the image's line number
in its ``.lst`` there, so a ``.lst`` file maps keys to the images' paths). `write_shard` therefore takes keys that
are decimal integers and refuses others by name: an ImageFolder (keyed by its paths) is packed as TFRecord or
WebDataset, whose records keep the key.

**Split records.** dmlc's writer splits a record whose data holds the magic number at a 4-byte aligned offset:
the parts (cflag 1 = first, 2 = middle, 3 = last) are separate records and the magic words between them are not
stored, so the image is not one byte range. `scan_shard` refuses such records by name (repack with
``--format tfrecord`` or ``wds``, which keep every image contiguous). `write_shard` refuses an image with the magic
at an aligned offset instead of writing it whole with cflag 0: DALI would read such a record, but dmlc's chunked
readers re-synchronise on the magic number and would take the image's inner word for a record head. (For random
JPEG bytes the chance is about 2^-32 per aligned word: a few images of ImageNet-1k's 1.28 M.)

The index is MXNet's ``.idx``: ``id<TAB>offset`` per record. DALI sorts the offsets and takes each record's size
as the distance to the next, so the records of one ``.rec`` must all be indexed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import numpy as np

from pipelines.formats import Entry, ShardFormatError, file_size

NAME = "recordio"
SUFFIX = ".rec"

MAGIC = 0xCED7230A
_HEAD = struct.Struct("<II")  # magic, lrecord
_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
#: The longest record data dmlc's length field can hold (29 bits).
MAX_LENGTH = (1 << 29) - 1
#: Classes a float32 label holds exactly.
MAX_LABEL = 1 << 24
_SPLIT = {1: "the first part", 2: "a middle part", 3: "the last part"}


def _padded(length: int) -> int:
    return (length + 3) & ~3


def record_id(key: str) -> int:
    """The numeric id a key stands for (RecordIO records carry no names)."""
    if not key.isdigit() or int(key) >= 1 << 64:
        raise ValueError(f"sample {key!r}: a RecordIO record carries only a numeric id (0..2^64-1), so its key must "
                         "be a decimal number, not a name: write this set with --format tfrecord or wds, whose "
                         "records keep the key")
    return int(key)


def check_key(key: str) -> None:
    """Raises ValueError for a key this format cannot record (``pack`` asks before it writes anything)."""
    record_id(key)


def aligned_magic(data: bytes) -> int | None:
    """The first 4-byte aligned offset of the magic number in `data` (where dmlc's writer would split), or None."""
    words = np.frombuffer(data, dtype="<u4", count=len(data) // 4)
    hits = np.flatnonzero(words == MAGIC)
    return int(hits[0]) * 4 if hits.size else None


def write_shard(f: BinaryIO, samples: Iterable[tuple[str, bytes, int]]) -> list[Entry]:
    """Writes one unsplit record per (key, image, label); returns where each image's bytes lie in the file."""
    entries = []
    position = f.tell()
    for key, image, label in samples:
        if not 0 <= label < MAX_LABEL:
            raise ValueError(f"sample {key!r}: class {label} is outside 0..{MAX_LABEL - 1} (a RecordIO label is a "
                             "float32)")
        if not len(image):
            raise ValueError(f"sample {key!r} has no image bytes (an empty file)")
        data = _IR_HEADER.pack(0, float(label), record_id(key), 0) + image
        if len(data) > MAX_LENGTH:
            raise ValueError(f"sample {key!r}: {len(image)} bytes is more than a RecordIO record holds "
                             f"({MAX_LENGTH - _IR_HEADER.size})")
        split_at = aligned_magic(data)
        if split_at is not None:
            raise ValueError(f"sample {key!r}: its image holds RecordIO's magic number 0xced7230a at byte "
                             f"{split_at - _IR_HEADER.size}, 4-byte aligned, where MXNet's writer would split the "
                             "record and the image would no longer be one byte range: pack this set with "
                             "--format tfrecord or wds")
        f.write(_HEAD.pack(MAGIC, len(data)) + data + b"\0" * (_padded(len(data)) - len(data)))
        entries.append(Entry(key, position + _HEAD.size + _IR_HEADER.size, len(image), label))
        position += _HEAD.size + _padded(len(data))
    return entries



def _records(f: BinaryIO, name: str) -> Iterator[tuple[int, int, bytes]]:
    """(record start, data length, IRHeader bytes) of every record; split, cut or foreign records refused."""
    size = file_size(f)
    position = f.seek(0)
    while position < size:
        head = f.read(_HEAD.size + _IR_HEADER.size)
        if len(head) < _HEAD.size:
            raise ShardFormatError(name, position, f"truncated record header ({len(head)} of 8 bytes)")
        magic, lrecord = _HEAD.unpack(head[:_HEAD.size])
        if magic != MAGIC:
            raise ShardFormatError(name, position, f"no RecordIO magic number (found {magic:#010x}, expected "
                                                   f"{MAGIC:#010x}): not a .rec file, or a corrupt one")
        cflag, length = lrecord >> 29, lrecord & MAX_LENGTH
        if cflag:
            raise ShardFormatError(name, position, f"{_SPLIT.get(cflag, 'a part')} of a split record (cflag "
                                                   f"{cflag}): MXNet's writer split it where its data holds the "
                                                   "magic number, so its image is not one byte range; repack this "
                                                   "set with --format tfrecord or wds")
        left = size - position - _HEAD.size
        if length > left:
            raise ShardFormatError(name, position, f"record claims {length} bytes but the file has {left} after its "
                                                   "header: truncated")
        if length < _IR_HEADER.size:
            raise ShardFormatError(name, position, f"record of {length} bytes has no image header (IRHeader, "
                                                   f"{_IR_HEADER.size} bytes)")
        yield position, length, head[_HEAD.size:]
        position += _HEAD.size + _padded(length)
        f.seek(position)


def scan_shard(f: BinaryIO, name: str) -> Iterator[Entry]:
    """The samples of a ``.rec`` file: key = the record's id, label = its class (a whole float >= 0); two records
    with one id are refused."""
    seen: dict[int, int] = {}
    for position, length, header in _records(f, name):
        flag, label, id_, _ = _IR_HEADER.unpack(header)
        image_start = _HEAD.size + _IR_HEADER.size + 4 * flag
        if flag > 1 or image_start - _HEAD.size > length:
            raise ShardFormatError(name, position, f"record {id_} holds {flag} labels; one class per image is "
                                                   "expected")
        if image_start - _HEAD.size == length:
            raise ShardFormatError(name, position, f"record {id_} holds no image bytes")
        if flag == 1:
            f.seek(position + _HEAD.size + _IR_HEADER.size)
            label = struct.unpack("<f", f.read(4))[0]
        if not (0 <= label < MAX_LABEL and label == int(label)):
            raise ShardFormatError(name, position, f"record {id_} has label {label}, not a class number")
        if id_ in seen:
            raise ShardFormatError(name, position, f"record id {id_} is also the id of the record at byte "
                                                   f"{seen[id_]}: two samples with one key")
        seen[id_] = position
        yield Entry(str(id_), position + image_start, length - (image_start - _HEAD.size), int(label))


def index_path(shard_path: str) -> str:
    """Where MXNet's index of a record file goes: ``x.rec`` -> ``x.idx``."""
    stem = shard_path[: -len(SUFFIX)] if shard_path.endswith(SUFFIX) else shard_path
    return stem + ".idx"


def write_dali_index(shard_path: str, entries: list[Entry]) -> str:
    """Writes MXNet's ``.idx`` (``id<TAB>offset`` per record) and returns its path.

    The records are walked by their headers (no image is read); each must be the entry's sample (its id the
    entry's key, the image inside it), so an index cannot be written for a file that `entries` do not describe."""
    with open(shard_path, "rb") as f:
        records = list(_records(f, shard_path))
    if len(records) != len(entries):
        raise ShardFormatError(shard_path, None, f"holds {len(records)} records but {len(entries)} entries were given")
    lines = []
    for i, ((position, length, header), entry) in enumerate(zip(records, entries)):
        id_ = _IR_HEADER.unpack(header)[2]
        if entry.key != str(id_) or not position < entry.offset <= position + _HEAD.size + length - entry.length:
            raise ShardFormatError(shard_path, position, f"record {i} (id {id_}) is not the sample the entries "
                                                         f"list ({entry.key})")
        lines.append(f"{id_}\t{position}\n")
    path = index_path(shard_path)
    with open(path, "w") as out:
        out.writelines(lines)
    return path
