"""Schema version 1 of the FKD label store: names, dtypes, metadata and the on-disk layout.

One Zarr v3 group. Its attributes hold a dict under :data:`ATTR_KEY`; its arrays are

=========  ===========  =================================  ==========================================
array      shape        dtype                              meaning
=========  ===========  =================================  ==========================================
files      (N,)         string                             image path relative to the train root
targets    (N,)         int32                              ground-truth class index
sizes      (N, 2)       int32                              (height, width) of the decoded image
boxes      (N, C, 4)    uint16 (int32 if a side > 65535)   (top, left, height, width) in pixels, exact
flips      (N, C)       bool                               horizontal flip after the crop
topk_idx   (N, C, k)    int16 (int32 if classes > 32767)   class ids, most probable first (kind topk)
topk_val   (N, C, k)    float16                            teacher probabilities (temperature softmax)
done       (N,)         bool                               the row is fully written (resume marker)
=========  ===========  =================================  ==========================================

``topk_idx`` and ``topk_val`` are the label arrays of the ``topk`` kind, every store's kind before kinds
existed; another kind (recorded as ``kind`` in the metadata) has its own (:mod:`labelstore.kinds`), laid out
like these.

Layout (why these chunks and codecs)
------------------------------------
Two access patterns decide everything:

* **generation writes blocks of whole rows** (R images x all C crops) and several ranks write at once;
* **training reads one round**: all N images x ``n`` consecutive crops, once per pass, into RAM.

So every per-crop array is *sharded by rows* (one shard file = R rows x all C crops: the unit a writer
owns and writes in one piece, so no two ranks ever touch one file) and *chunked by crops inside the shard*
(inner chunk = R rows x c crops, so a round reads only the byte ranges of its own crops). Per-row arrays
that generation writes (``sizes``, ``done``) are chunked with the same R rows, so a writer owns those
chunks too. ``files`` and ``targets`` are written once at creation.

R is chosen so that one shard holds about 2**20 crops (C=500 -> R=2048; C=64 -> R=8192, the cap):
zarr-python pays a fixed cost per shard and per inner chunk (index read, decode, checksum), so fewer,
larger pieces win everywhere. Measured on the 2-core development VM with 131,072 images x 500 crops x
top-5, R=2048 against R=512: read_round(n=4) of every row 0.24 s vs 1.2-2.7 s, of one rank's eighth 0.37 s
vs 1.0 s, verify 0.4-0.5 s vs 1.1-1.2 s per 4096 rows, writing 2x faster; on object storage it is 4x
fewer requests per pass (docs/object-storage.md). (At 2**18 crops ImageNet-1k was 2,503 shards and a
round took ~10-15 s at world 1.) Larger R coarsens resume (a crash loses at most one shard of work per
rank: 2048 images x 500 crops), hence the cap. c defaults to 4, FKD's num_crops: a round of n=4 reads
exactly one inner chunk per shard; n=8 reads two.

Codec: Blosc(zstd, clevel 5, bitshuffle) then CRC32C on every inner chunk (the sharding index has its
own CRC32C), so a damaged chunk is detected, never decoded into wrong labels. On simulated teacher
output (1000 classes, 500 crops, top-5) the options measured within ~0.5 B/crop of each other
(plain zstd 3 .. 19, blosc shuffle vs bitshuffle, transposed layouts, chunk heights 250..1000, even
pcodec): the float16 probabilities (~8 B/crop) and exact boxes (~4.2 B/crop) sit near their entropy,
so the layout is chosen for read speed and the codec for write speed (zstd 9 wrote 6x slower for 0.6 B).
``fkd-dali bench store`` re-measures all of this.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .kinds import kind_named

SCHEMA_VERSION = 1
ATTR_KEY = "fkd"

VIEW_ARRAYS = ("boxes", "flips")  # every kind's per-crop arrays; its label arrays follow (labelstore.kinds)
CROP_ARRAYS = VIEW_ARRAYS + ("topk_idx", "topk_val")  # a topk store's (``LabelStore.crop_arrays``: any store's)
ROW_ARRAYS = ("files", "targets", "sizes", "done")

# The dtypes each array may have (the table above; a kind's label arrays say theirs); anything else is refused
# when a store is opened.
DTYPES = {"files": ("string",), "targets": ("int32",), "sizes": ("int32",), "done": ("bool",),
          "boxes": ("uint16", "int32"), "flips": ("bool",), "checksums": ("uint32",)}
# Optional per-row array: the zlib CRC-32 of each image's bytes, recorded when the dataset's index gives them (a
# shard set: pipelines.shards); a dataset whose index disagrees is refused by name (LabelStore.check_dataset).
CHECKSUMS = "checksums"

TARGET_CROPS_PER_SHARD = 1 << 20
MIN_ROWS_PER_SHARD = 64
MAX_ROWS_PER_SHARD = 8192
DEFAULT_CROPS_PER_CHUNK = 4
FILES_CHUNK = 1 << 16
# Fill values are impossible values, so a chunk that is missing on disk reads as something the sanity
# checks reject instead of as plausible labels (zarr returns the fill value for absent chunks).
FILL = {"boxes": 0, "flips": False, "sizes": 0, "done": False}
# Every chunk is written, also one equal to the fill value (an all-False ``flips`` shard is real data):
# zarr skips such chunks by default, and a skipped chunk cannot be told from a lost file.
WRITE_CONFIG = {"write_empty_chunks": True}

EXIF_POLICY = "ignore"
"""Orientation policy shared by generate, train and import: EXIF orientation tags are *not* applied.

Boxes refer to the pixel grid as stored in the file, which is what PIL/torchvision ImageFolder (and so
FKD's official labels) use; every DALI decoder in this project runs with ``adjust_orientation=False``.
"""


def dtype_name(dtype: Any) -> str:
    """A numpy dtype's name as :data:`DTYPES` spells it ("string" for any text dtype)."""
    dtype = np.dtype(dtype)
    return "string" if dtype.kind in "OSTU" else dtype.name


def box_dtype(max_side: int) -> np.dtype:
    return np.dtype(np.uint16) if max_side <= np.iinfo(np.uint16).max else np.dtype(np.int32)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Rows per shard (the write unit) and crops per inner chunk (the read unit of a round)."""

    rows_per_shard: int
    crops_per_chunk: int

    @classmethod
    def choose(cls, num_images: int, num_crops: int, rows_per_shard: int | None = None,
               crops_per_chunk: int | None = None) -> "Layout":
        c = crops_per_chunk or DEFAULT_CROPS_PER_CHUNK
        c = max(1, min(c, num_crops))
        if rows_per_shard is None:
            r = TARGET_CROPS_PER_SHARD // max(1, num_crops)
            r = 1 << max(0, int(math.log2(max(1, r))))  # a power of two
            rows_per_shard = min(MAX_ROWS_PER_SHARD, max(MIN_ROWS_PER_SHARD, r))
        rows_per_shard = max(1, min(rows_per_shard, max(1, num_images)))
        return cls(rows_per_shard=int(rows_per_shard), crops_per_chunk=int(c))

    def shard_crops(self, num_crops: int) -> int:
        """Crop extent of one shard: C rounded up to a multiple of the inner chunk."""
        return -(-num_crops // self.crops_per_chunk) * self.crops_per_chunk

    def shard_ranges(self, num_images: int) -> list[tuple[int, int]]:
        r = self.rows_per_shard
        return [(s, min(num_images, s + r)) for s in range(0, num_images, r)]


@dataclasses.dataclass
class StoreMeta:
    """Everything under the group attribute ``fkd``; see DESIGN.md "Label store"."""

    num_images: int
    num_crops: int
    top_k: int
    num_classes: int
    classes: list[str]
    dataset_root: str
    fingerprint: str
    temperature: float = 1.0
    teachers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    crop: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int | None = None
    exif: str = EXIF_POLICY
    complete: bool = False
    schema_version: int = SCHEMA_VERSION
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: list[list] = dataclasses.field(default_factory=list)  # [[row, reason], ...] left out on purpose
    kind: str = "topk"  # the store kind (labelstore.kinds); stores without one are topk
    kind_fields: dict[str, Any] = dataclasses.field(default_factory=dict)  # the kind's own metadata

    def label_kind(self, where: str):
        """The store's :class:`~labelstore.kinds.StoreKind` and its fields (checked), or StoreFormatError."""
        kind = kind_named(self.kind, where)
        return kind, kind.read_fields({"top_k": self.top_k, "num_classes": self.num_classes,
                                       "kind_fields": self.kind_fields}, where)

    def to_attrs(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "num_images": self.num_images,
            "num_crops": self.num_crops,
            "top_k": self.top_k,
            "num_classes": self.num_classes,
            "temperature": self.temperature,
            "teachers": self.teachers,
            "crop": self.crop,
            "seed": self.seed,
            "exif": self.exif,
            "dataset": {"root": self.dataset_root, "fingerprint": self.fingerprint,
                        "classes": list(self.classes)},
            "complete": self.complete,
            "source": self.source,
            "skipped": self.skipped,
        } | ({} if self.kind == "topk" else {"kind": self.kind, "kind_fields": self.kind_fields})

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str) -> "StoreMeta":
        kind = attrs.get("kind", "topk")
        missing = [k for k in ("schema_version", "num_images", "num_crops", "top_k", "num_classes",
                               "dataset") if k not in attrs and not (k == "top_k" and kind != "topk")]
        if missing:
            from .errors import StoreFormatError
            raise StoreFormatError(f"{where}: the '{ATTR_KEY}' attributes lack {', '.join(missing)}; "
                                   "this is not a complete fkd-dali label store")
        f = _Fields(attrs, where)
        ds = f.get("dataset", _dict, "an object {root, fingerprint, classes}")
        d = _Fields(ds, where, "dataset.")
        n = f.get("num_images", _int, "a whole number")
        return cls(
            schema_version=f.get("schema_version", _int, "a whole number"),
            num_images=n,
            num_crops=f.get("num_crops", _int, "a whole number"),
            top_k=f.get("top_k", _int, "a whole number", 0),
            num_classes=f.get("num_classes", _int, "a whole number"),
            classes=d.get("classes", _strings, "a list of class names", []),
            dataset_root=d.get("root", _str, "a folder name", ""),
            fingerprint=d.get("fingerprint", _str, "a string", ""),
            temperature=float(f.get("temperature", _number, "a number", 1.0)),
            teachers=f.get("teachers", _dicts, "a list of objects", []),
            crop=f.get("crop", _dict, "an object", {}),
            seed=f.get("seed", lambda v: v if v is None else _int(v), "a whole number or null", None),
            exif=f.get("exif", _str, "a string", EXIF_POLICY),
            complete=f.get("complete", _bool, "true or false", False),
            source=f.get("source", _dict, "an object", {}),
            skipped=f.get("skipped", lambda v: _skipped(v, n), f"a list of [row, reason] pairs, rows in 0..{n - 1}",
                          []),
            kind=f.get("kind", _str, "a store kind's name", "topk"),
            kind_fields=f.get("kind_fields", _dict, "an object", {}),
        )


class _Fields:
    """Typed reads of a metadata object: a value of the wrong type is refused naming the attribute, the value
    found and the type expected (never a raw TypeError)."""

    def __init__(self, attrs: Any, where: str, prefix: str = ""):
        self.attrs, self.where, self.prefix = attrs, where, prefix

    def get(self, key: str, convert, expected: str, default: Any = ...) -> Any:
        value = self.attrs.get(key, default)
        if value is ...:
            value = self.attrs[key]
        try:
            return convert(value)
        except (TypeError, ValueError, OverflowError):
            from .errors import StoreFormatError
            shown = json.dumps(value, default=repr)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise StoreFormatError(f"{self.where}: the metadata attribute '{self.prefix}{key}' is {shown} "
                                   f"({type(value).__name__}); expected {expected}. The store's metadata "
                                   "(zarr.json) is damaged or was crafted; regenerate or re-import the store") from None


def _instance(kind: type) -> Callable[[Any], Any]:
    """A converter that returns a value of ``kind`` as it is and raises TypeError for anything else."""
    def check(v: Any) -> Any:
        if not isinstance(v, kind):
            raise TypeError(v)
        return v
    return check


_bool, _list, _str, _dict = _instance(bool), _instance(list), _instance(str), _instance(dict)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(v)
    return v


def _strings(v: Any) -> list[str]:
    if not all(isinstance(x, str) for x in _list(v)):
        raise TypeError(v)
    return list(v)


def _dicts(v: Any) -> list[dict]:
    if not all(isinstance(x, dict) for x in _list(v)):
        raise TypeError(v)
    return list(v)


def _skipped(v: Any, num_images: int) -> list[list]:
    out = []
    for x in _list(v):
        if not (isinstance(x, list) and len(x) == 2 and isinstance(x[1], str)):
            raise TypeError(v)
        if not 0 <= _int(x[0]) < num_images:
            raise ValueError(v)
        out.append([_int(x[0]), x[1]])
    return out


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(v)
    return v
