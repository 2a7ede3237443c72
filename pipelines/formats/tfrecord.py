"""TFRecord shards as TensorFlow writes them and DeepLearningExamples' DALI pipeline reads them.

A record is ``u64 length | masked crc32c(length) | data | masked crc32c(data)`` (little endian; crc32c is the
Castagnoli CRC, masked as TensorFlow does), and its data is a ``tf.train.Example`` protobuf. The features are the
ones of TensorFlow's ImageNet builder that NVIDIA DeepLearningExamples' ``utils/dali_utils.py`` reads:

- ``image/encoded``: the image file's bytes, unchanged (a protobuf ``bytes`` value is stored contiguously, so the
  image is a byte range of the shard file),
- ``image/class/label``: the class, **1-based** (1..N; the builder keeps 0 for "background" and DeepLearningExamples
  subtracts 1 after reading); an :class:`Entry`'s label is 0-based, so ``label = stored - 1``,
- ``image/filename``: the sample's key (the builder stores the image's file name there).

The four bounding-box features DeepLearningExamples lists are written empty: DALI 2.4's reader then gives them as
empty arrays (tested), while for a feature absent from a record it gave one float of arbitrary value (tried by
hand on the CPU backend: 0.0, -1.08e-19, -3.7e-27 across five records).
The protobuf wire format is written and parsed here by hand (a handful of tags), so neither TensorFlow nor protobuf
is needed; any field order, packed or unpacked int64 lists and unknown features are accepted when scanning.
The DALI index (``tfrecord2idx``'s format) is a text line ``offset size`` per record.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import google_crc32c  # crc32c in C; zarr depends on it too

from pipelines.formats import CLASS_LIMIT, Entry, ShardFormatError, file_size

NAME = "tfrecord"
SUFFIX = ".tfrecord"

IMAGE_FEATURE = "image/encoded"
LABEL_FEATURE = "image/class/label"
KEY_FEATURE = "image/filename"
#: Written as empty float lists (DeepLearningExamples' reader lists them; see the module's docstring).
BBOX_FEATURES = tuple(f"image/object/bbox/{side}" for side in ("xmin", "ymin", "xmax", "ymax"))
#: What a stored label adds to an Entry's (0-based) class.
LABEL_BASE = 1

#: Largest record accepted when scanning (an image file is far smaller); a length beyond it is corruption.
MAX_RECORD_BYTES = 1 << 30

_HEAD = struct.Struct("<QI")  # length, masked crc of the length
_CRC = struct.Struct("<I")
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc(data: bytes | memoryview) -> int:
    """TensorFlow's masked crc32c of `data` (rotate right by 15, add 0xa282ead8)."""
    return _mask(google_crc32c.value(bytes(data)))


# ---- writing -------------------------------------------------------------------------------------------------

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 as protobuf writes it: two's complement, 10 bytes
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _length_field(number: int, parts: list) -> list:
    """A length-delimited field holding `parts` (bytes objects, concatenated), as a list of parts."""
    return [_varint(number << 3 | _LEN), _varint(sum(len(p) for p in parts))] + parts


def _feature(name: str, kind: int, value: list) -> list:
    """One ``map<string, Feature>`` entry of ``Features.feature``."""
    return _length_field(1, _length_field(1, [name.encode()]) + _length_field(2, _length_field(kind, value)))


def example_parts(key: str, image: bytes, label: int) -> list:
    """The tf.train.Example of one sample as a list of byte strings, `image` one of them (not copied)."""
    label_list = _length_field(1, [_varint(label + LABEL_BASE)])  # Int64List.value, packed
    features = (_feature(IMAGE_FEATURE, 1, _length_field(1, [image]))  # Feature.bytes_list = 1
                + _feature(LABEL_FEATURE, 3, label_list)              # Feature.int64_list = 3
                + _feature(KEY_FEATURE, 1, _length_field(1, [key.encode()])))
    for name in BBOX_FEATURES:
        features += _feature(name, 2, [])                                      # Feature.float_list = 2, empty
    return _length_field(1, features)  # Example.features = 1


def write_shard(f: BinaryIO, samples: Iterable[tuple[str, bytes, int]]) -> list[Entry]:
    """Writes one record per (key, image, label); returns where each image's bytes lie in the file."""
    entries = []
    position = f.tell()
    for key, image, label in samples:
        if label < 0:
            raise ValueError(f"sample {key!r}: class {label} is negative; classes are 0..N-1")
        if not len(image):
            raise ValueError(f"sample {key!r} has no image bytes (an empty file)")
        parts = example_parts(key, image, label)
        before_image = 0
        for part in parts:
            if part is image:
                break
            before_image += len(part)
        length = sum(len(p) for p in parts)
        crc = 0
        for part in parts:
            crc = google_crc32c.extend(crc, part)
        head = struct.pack("<Q", length)
        f.write(head + _CRC.pack(_mask(google_crc32c.value(head))))
        for part in parts:
            f.write(part)
        f.write(_CRC.pack(_mask(crc)))
        entries.append(Entry(key, position + _HEAD.size + before_image, len(image), label))
        position += _HEAD.size + length + _CRC.size
    return entries


# ---- reading -------------------------------------------------------------------------------------------------

class _Fault(Exception):
    """A protobuf fault at a position inside a record's data (turned into a ShardFormatError by the caller)."""

    def __init__(self, position: int, fault: str):
        super().__init__(fault)
        self.position, self.fault = position, fault


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    start = pos
    while pos < end and pos - start < 10:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & ((1 << 64) - 1), pos
        shift += 7
    raise _Fault(start, "a varint runs past its message or over 10 bytes")


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end or the varint's value) of a message in buf[pos:end]."""
    while pos < end:
        at = pos
        tag, pos = _read_varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos, end)
            yield number, wire, at, value
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos, end)
            if length > end - pos:
                raise _Fault(at, f"field {number} claims {length} bytes but its message has {end - pos} left")
            yield number, wire, pos, pos + length
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
            if pos > end:
                raise _Fault(at, f"fixed-size field {number} runs past its message")
        else:
            raise _Fault(at, f"field {number} has wire type {wire}, which tf.train.Example does not use")


def _one_value(buf: memoryview, start: int, end: int, name: str) -> tuple[int, int, int]:
    """(kind, value start, value end) of a Feature holding exactly one bytes or int64 value."""
    values = []
    for kind, wire, s, e in _fields(buf, start, end):
        if kind not in (1, 2, 3) or wire != _LEN:
            continue
        for number, vwire, vs, ve in _fields(buf, s, e):
            if number != 1:
                continue
            if kind == 3 and vwire == _LEN:  # packed int64s
                pos = vs
                while pos < ve:
                    value, pos = _read_varint(buf, pos, ve)
                    values.append((kind, value, value))
            elif kind == 3 and vwire == _VARINT:
                values.append((kind, ve, ve))  # an unpacked int64: ve is its value
            elif kind == 1 and vwire == _LEN:
                values.append((kind, vs, ve))
            elif kind == 2:
                raise _Fault(s, f"feature {name!r} is a float list")
            else:
                raise _Fault(s, f"feature {name!r} has a value of wire type {vwire}")
    if len(values) != 1:
        raise _Fault(start, f"feature {name!r} holds {len(values)} values, not one")
    return values[0]


def _parse_example(buf: memoryview, end: int) -> dict[str, tuple[int, int, int]]:
    """The wanted features of a tf.train.Example in buf[:end]: name -> (kind, start, end) or (3, value, value)."""
    wanted = {}
    for number, wire, s, e in _fields(buf, 0, end):
        if number != 1 or wire != _LEN:
            continue
        for entry, ewire, es, ee in _fields(buf, s, e):
            if entry != 1 or ewire != _LEN:
                continue
            name, value = None, None
            for part, pwire, ps, pe in _fields(buf, es, ee):
                if part == 1 and pwire == _LEN:
                    name = bytes(buf[ps:pe]).decode("utf-8", "replace")
                elif part == 2 and pwire == _LEN:
                    value = (ps, pe)
            if name in (IMAGE_FEATURE, LABEL_FEATURE, KEY_FEATURE) and value is not None:
                wanted[name] = _one_value(buf, value[0], value[1], name)
    return wanted



def _record_heads(f: BinaryIO, name: str) -> Iterator[tuple[int, int]]:
    """(record start, data length) of every record, lengths checked against the file and their crc."""
    size = file_size(f)
    position = f.seek(0)
    while position < size:
        head = f.read(_HEAD.size)
        if len(head) < _HEAD.size:
            raise ShardFormatError(name, position, f"truncated record header ({len(head)} of 12 bytes)")
        length, crc = _HEAD.unpack(head)
        if crc != masked_crc(head[:8]):
            raise ShardFormatError(name, position, "the record length's crc does not match: not a TFRecord file, "
                                                   "or a corrupt one")
        left = size - position - _HEAD.size - _CRC.size
        if length > min(left, MAX_RECORD_BYTES):
            raise ShardFormatError(name, position, f"record claims {length} bytes but the file has {max(left, 0)} "
                                                   "after its header: truncated")
        yield position, length
        position += _HEAD.size + length + _CRC.size
        f.seek(position)


def scan_shard(f: BinaryIO, name: str) -> Iterator[Entry]:
    """The samples of a TFRecord shard, crcs verified; a record without an image or a class is refused.

    A record without ``image/filename`` is keyed ``<shard file name>:<record number>``; two records with one key
    are refused."""
    seen: dict[str, int] = {}
    for number, (position, length) in enumerate(_record_heads(f, name)):
        data_start = position + _HEAD.size
        f.seek(data_start)
        data = f.read(length + _CRC.size)
        buf = memoryview(data)
        if _CRC.unpack(data[length:])[0] != masked_crc(buf[:length]):
            raise ShardFormatError(name, position, "the record data's crc does not match: the record is corrupt")
        try:
            features = _parse_example(buf, length)
        except _Fault as e:
            raise ShardFormatError(name, data_start + e.position, f"not a tf.train.Example: {e.fault}") from None
        for needed, kind in ((IMAGE_FEATURE, 1), (LABEL_FEATURE, 3)):
            if needed not in features or features[needed][0] != kind:
                raise ShardFormatError(name, position, f"record {number} has no {needed!r} "
                                                       f"({'bytes' if kind == 1 else 'int64'} feature)")
        _, image_start, image_end = features[IMAGE_FEATURE]
        if image_end == image_start:
            raise ShardFormatError(name, position, f"record {number} has an empty {IMAGE_FEATURE!r}")
        stored = features[LABEL_FEATURE][1]
        stored = stored - (1 << 64) if stored >= 1 << 63 else stored
        if stored < LABEL_BASE:
            raise ShardFormatError(name, position, f"record {number} has class {stored}; {LABEL_FEATURE} is 1-based "
                                                   "(1..N, 0 is the ImageNet builder's background), as "
                                                   "DeepLearningExamples reads it")
        if stored - LABEL_BASE >= CLASS_LIMIT:
            raise ShardFormatError(name, position, f"record {number} has class {stored}, more than "
                                                   f"{CLASS_LIMIT - 1 + LABEL_BASE}")
        if KEY_FEATURE in features and features[KEY_FEATURE][0] == 1:
            key = bytes(buf[features[KEY_FEATURE][1]:features[KEY_FEATURE][2]]).decode("utf-8", "replace")
        else:
            key = f"{os.path.basename(name)}:{number}"
        if key in seen:
            raise ShardFormatError(name, position, f"record {number} has the key {key!r} of the record at byte "
                                                   f"{seen[key]}: two samples with one key")
        seen[key] = position
        yield Entry(key, data_start + image_start, image_end - image_start, stored - LABEL_BASE)


def index_path(shard_path: str) -> str:
    """Where the DALI index of a shard goes: ``x.tfrecord`` -> ``x.idx``."""
    stem = shard_path[: -len(SUFFIX)] if shard_path.endswith(SUFFIX) else shard_path
    return stem + ".idx"


def write_dali_index(shard_path: str, entries: list[Entry]) -> str:
    """Writes DALI's ``tfrecord2idx`` index (``offset size`` per record) and returns its path.

    The record boundaries are read from the shard's headers (no data is read); each entry's image must lie
    inside its record, so an index cannot be written for a shard that `entries` do not describe."""
    with open(shard_path, "rb") as f:
        records = list(_record_heads(f, shard_path))
    if len(records) != len(entries):
        raise ShardFormatError(shard_path, None, f"holds {len(records)} records but {len(entries)} entries were given")
    lines = []
    for i, ((position, length), entry) in enumerate(zip(records, entries)):
        end = position + _HEAD.size + length
        if not position < entry.offset <= end - entry.length:
            raise ShardFormatError(shard_path, position, f"record {i} is not the sample the entries list ({entry.key})")
        lines.append(f"{position} {end + _CRC.size - position}\n")
    path = index_path(shard_path)
    with open(path, "w") as out:
        out.writelines(lines)
    return path
