"""A shard set: the shard files of one split (WebDataset tars, TFRecord, RecordIO; ``pipelines.formats``) and its
index, and :class:`ShardImages`, the byte-range reader the pipelines' external sources serve images from.

On disk, in the split's folder (``SHARDS/train``):

- ``fkd-index.json`` (small): the format, per shard its file name, byte size and first row (O(shards)), the
  classes, the number of samples and the dataset fingerprint (``labelstore.fingerprint_of`` over the keys and
  byte lengths: for a packed ImageFolder, the folder's own fingerprint, so a store made from the folder pairs
  with its shards and the reverse).
- ``fkd-index.bin``: per sample 16 bytes, in row order: offset (u64) and length (u32) of its image bytes in its
  shard, and the zlib CRC-32 (u32) of those bytes. Memory-mapped: the ranks of a node share it through the page
  cache (a rank's rows, in a random order, fall on nearly every page).
- ``fkd-labels.npy`` (int16/int32 per sample) and the keys, ``fkd-key-names.npy`` (uint8 blob) +
  ``fkd-key-ends.npy`` (end offsets; their folders in the JSON), a :class:`labelstore.PathTable` memory-mapped:
  what the store check and the messages need, never loaded whole per rank.

A set may live at an fsspec URL (``s3://bucket/shards/train``): its JSON is read from there, the per-sample
files are copied once into a local cache (``$FKD_DALI_SHARD_CACHE``, default ``~/.cache/fkd-dali/shards``; one
copy per node, named by the URL and the JSON's digest, so the ranks of a node share it) and mapped from there, and
each sample is one range request (a batch's made at once, ``fs.cat_ranges``; ``ShardSet.requests`` counts them).

Rows are the set's order: for ``fkd-dali pack`` the folder's ImageFolder order (= a store's row order); for
``fkd-dali index`` of foreign shards, shard by shard (sorted names), in file order.
"""

from __future__ import annotations

import io
import json
import os
import hashlib
import threading
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

from labelstore import PathTable, fingerprint_of

from .errors import LoaderError
from .formats import Entry, ShardFormatError, format_named

INDEX_JSON = "fkd-index.json"
INDEX_BIN = "fkd-index.bin"
LABELS = "fkd-labels.npy"
KEY_NAMES = "fkd-key-names.npy"
KEY_ENDS = "fkd-key-ends.npy"
SHARD_IDS = "fkd-shard-ids.npy"  # only in a set whose rows follow a store's order, not the shards' (a key map)
INDEX_VERSION = 1
RECORD = np.dtype([("offset", "<u8"), ("length", "<u4"), ("crc32", "<u4")])  # 16 B per sample
MAX_SAMPLE_BYTES = 2**32 - 1
MAX_OPEN_SHARDS = 64  # shard files a set holds open at once (a rank reads 1,200+ shards of ImageNet-21k)
MAX_CLASSES_UNNAMED = 1 << 20  # without a class list, the largest class number makes the list: bounded
PER_SAMPLE_FILES = (INDEX_BIN, LABELS, KEY_NAMES, KEY_ENDS, SHARD_IDS)  # sized and digested in the JSON
MAX_JSON_BYTES = 256 << 20  # the JSON holds O(shards + classes + key folders): larger is not an index of ours


class ShardSetError(ValueError):
    """A shard set or its index is missing, damaged or does not match its shards; the message names the file."""


def is_url(root: str) -> bool:
    return "://" in str(root)


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_url(root) else os.path.join(root, name)


def _filesystem(root: str):
    import fsspec  # noqa: PLC0415 - only URLs need it
    return fsspec.core.url_to_fs(root)


def is_shard_set(root: str) -> bool:
    root = os.fspath(root)
    if not is_url(root):
        return os.path.isfile(os.path.join(root, INDEX_JSON))
    try:
        fs, base = _filesystem(root)
        return fs.isfile(f"{base.rstrip('/')}/{INDEX_JSON}")
    except Exception:  # noqa: BLE001 - unreachable or unknown: not a shard set (the caller says what it expected)
        return False


def cache_root() -> str:
    return os.environ.get("FKD_DALI_SHARD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fkd-dali",
                                                                   "shards")


class ShardKeys(PathTable):
    """The keys of a shard set, in row order (a PathTable, memory-mapped), that know their shard set: the readers
    serve the images of a dataset whose ``files`` are ShardKeys from its shards (:func:`image_source`)."""

    shards: "ShardSet"


class ShardSet:
    """An indexed shard set, opened read-only (see the module doc); cheap: O(shards) work, the rest mapped."""

    def __init__(self, root: str):
        self.root = root = os.fspath(root)
        self.fs, self.base = _filesystem(root) if is_url(root) else (None, root)
        self.requests = 0  # range requests made (a set at a URL)
        meta_path = join(root, INDEX_JSON)
        try:
            size = self.fs.size(self._remote(INDEX_JSON)) if self.fs else os.path.getsize(meta_path)
            if size > MAX_JSON_BYTES:
                raise ShardSetError(f"{meta_path} is larger than {MAX_JSON_BYTES} bytes: not an fkd-dali index")
            if self.fs:
                raw = self.fs.cat_file(self._remote(INDEX_JSON))
            else:
                with open(meta_path, "rb") as f:
                    raw = f.read()
            meta = json.loads(raw)
            self._local = self._cache_dir(raw) if self.fs else root
        except FileNotFoundError:
            raise ShardSetError(f"{root} has no {INDEX_JSON}: index the shards first (fkd-dali index {root}), or "
                                "pack a folder into shards (fkd-dali pack DATA --out SHARDS)") from None
        except (OSError, ValueError) as e:
            raise ShardSetError(f"{meta_path} cannot be read ({e}): index the shards again "
                                f"(fkd-dali index {root})") from None
        self.meta = meta
        try:
            if meta["version"] != INDEX_VERSION:
                raise ShardSetError(f"{meta_path} is index version {meta['version']}; this fkd-dali reads "
                                    f"version {INDEX_VERSION}: index the shards again")
            self.format = format_named(meta["format"])
            self.names = [str(s["name"]) for s in meta["shards"]]
            self.sizes = np.asarray([int(s["size"]) for s in meta["shards"]], np.int64)
            self.starts = np.asarray([int(s["start"]) for s in meta["shards"]] + [int(meta["num_samples"])],
                                     np.int64)
            self.classes = [str(c) for c in meta["classes"]]
            self.fingerprint = str(meta["fingerprint"])
            # per-sample file -> (bytes, SHA-256): every one the set has must be recorded (the JSON is untrusted
            # too: an index that drops an entry must not switch its checks off)
            self.file_sums = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in meta["files"].items()}
            wanted = [f for f in PER_SAMPLE_FILES if f != SHARD_IDS or meta.get("store_order")]
            missing = [f for f in wanted if f not in self.file_sums]
            if missing:
                raise ValueError(f"no size and SHA-256 recorded for {', '.join(missing)}")
            key_dirs = [str(d) for d in meta["key_dirs"]]
            key_dir_starts = np.asarray(meta["key_dir_starts"], np.int64)
            if len(key_dirs) != len(key_dir_starts):
                raise ValueError(f"{len(key_dirs)} key folders but {len(key_dir_starts)} first rows of them")
        except (KeyError, TypeError, ValueError) as e:
            raise ShardSetError(f"{meta_path} is not a shard-set index ({type(e).__name__}: {e}): index the shards "
                                "again") from None
        n = int(self.starts[-1])
        for name in self.names:
            if not name or name != os.path.basename(name) or name in (".", ".."):
                raise ShardSetError(f"{meta_path} names the shard {name!r}, which is not a file in {root}: an "
                                    "index names shard files of its own folder only")
        if np.any(np.diff(self.starts) < 0) or self.starts[0] != 0:
            raise ShardSetError(f"{meta_path}: the shards' first rows are not increasing from 0")
        self.index = self._mapped(INDEX_BIN, n, lambda p: np.memmap(p, RECORD, mode="r") if n else
                                  np.zeros(0, RECORD))
        self.labels = self._mapped(LABELS, n, lambda p: np.load(p, mmap_mode="r", allow_pickle=False))
        if self.labels.dtype.kind not in "iu":
            raise ShardSetError(f"{os.path.join(root, LABELS)} holds {self.labels.dtype}, not integer classes")
        ends = self._mapped(KEY_ENDS, n, lambda p: np.load(p, mmap_mode="r", allow_pickle=False))
        blob = self._mapped(KEY_NAMES, None, lambda p: np.load(p, mmap_mode="r", allow_pickle=False))
        if blob.dtype != np.uint8 or blob.ndim != 1 or ends.dtype.kind not in "iu" or (n and int(ends[-1]) != len(blob)):
            raise ShardSetError(f"{os.path.join(root, KEY_NAMES)} and {KEY_ENDS} do not hold {n} keys: index the "
                                "shards again")
        self.keys = ShardKeys(key_dirs, key_dir_starts, blob, ends)
        self.keys.shards = self
        self.shard_ids = None  # rows in a store's order (a key map): each row's shard
        if meta.get("store_order"):
            self.shard_ids = self._mapped(SHARD_IDS, n, lambda p: np.load(p, mmap_mode="r", allow_pickle=False))
            if self.shard_ids.dtype.kind != "u" or (n and int(self.shard_ids.max()) >= len(self.names)):
                raise ShardSetError(f"{join(root, SHARD_IDS)} names shards the index does not list: index the "
                                    "shards again")
        self._fds: dict[int, int] = {}  # shard -> open file, least recently used first (MAX_OPEN_SHARDS kept)
        self._users: dict[int, int] = {}  # open file -> reads using it now (it is closed only when none)
        self._orphans: set[int] = set()  # files dropped from _fds while in use: closed by their last user
        self._lock = threading.Lock()

    def _remote(self, name: str) -> str:
        return f"{self.base.rstrip('/')}/{name}"

    def _cache_dir(self, meta: bytes) -> str:
        digest = hashlib.sha256(self.root.encode() + b"\0" + meta).hexdigest()[:24]
        return os.path.join(cache_root(), digest)

    def _local_copy(self, name: str) -> str:
        """A per-sample index file: the set's own (a local set), or its copy in the node's cache (a set at a URL),
        fetched once (to a temporary name, then renamed: ranks fetching at once each end with a whole file)."""
        if self.fs is None:
            return os.path.join(self.root, name)
        path = os.path.join(self._local, name)
        if not os.path.exists(path):
            os.makedirs(self._local, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            self.fs.get_file(self._remote(name), tmp)
            try:
                self._check_digest(name, tmp)
            except ShardSetError:
                os.remove(tmp)
                raise
            os.replace(tmp, path)
        return path

    def _check_size(self, name: str, path: str) -> None:
        """O(1): the file has the byte size the index recorded."""
        if name in self.file_sums and os.path.getsize(path) != self.file_sums[name][0]:
            raise ShardSetError(f"{join(self.root, name)} is {os.path.getsize(path)} bytes, {INDEX_JSON} recorded "
                                f"{self.file_sums[name][0]}: it does not belong to this index; index the shards "
                                f"again (fkd-dali index {self.root})")

    def _check_digest(self, name: str, path: str) -> None:
        """The file's bytes are those the index recorded (its SHA-256): read whole, so only where it is read anyway
        (a cache being filled, ``inspect --verify``)."""
        self._check_size(name, path)
        if name in self.file_sums and file_digest(path) != self.file_sums[name][1]:
            raise ShardSetError(f"{join(self.root, name)} holds other bytes than {INDEX_JSON} recorded (SHA-256 "
                                f"mismatch): it does not belong to this index; index the shards again "
                                f"(fkd-dali index {self.root})")

    def verify_index_files(self) -> None:
        """Every per-sample index file holds the bytes the JSON recorded (SHA-256)."""
        for name in self.file_sums:
            self._check_digest(name, self._local_copy(name))

    def _mapped(self, name: str, n: int | None, load) -> np.ndarray:
        path = join(self.root, name)
        try:
            local = self._local_copy(name)
            arr = load(local)
        except ShardSetError:
            raise
        except (OSError, ValueError) as e:
            raise ShardSetError(f"{path} cannot be read ({e}): index the shards again") from None
        if n is not None and arr.shape != (n,):
            raise ShardSetError(f"{path} holds {arr.shape[0] if arr.ndim else 0} samples, the index "
                                f"{INDEX_JSON} says {n}: the index is damaged; index the shards again")
        self._check_size(name, local)
        return arr

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard_path(self, shard: int) -> str:
        return join(self.root, self.names[shard])

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        if self.shard_ids is not None:
            return np.asarray(self.shard_ids[rows], np.int64)
        return np.searchsorted(self.starts, rows, side="right") - 1

    def check_files(self) -> None:
        """Every shard exists with the byte size it was indexed at (one stat per shard, not per sample):
        a missing shard, or one replaced since, is named before any batch is read."""
        listed = None
        if self.fs is not None:  # one listing, not a request per shard
            listed = {os.path.basename(e["name"].rstrip("/")): int(e["size"])
                      for e in self.fs.ls(self.base, detail=True) if e.get("type") == "file"}
        for name, size in zip(self.names, self.sizes.tolist()):
            path = join(self.root, name)
            try:
                got = os.path.getsize(path) if listed is None else listed[name]
            except (FileNotFoundError, KeyError):
                raise ShardSetError(f"shard {path} is missing from the set (its index {INDEX_JSON} lists it): "
                                    "restore it, or index the shards that exist again") from None
            if got != size:
                raise ShardSetError(f"shard {path} is {got} bytes, {size} when it was indexed: it changed since; "
                                    f"index the set again (fkd-dali index {self.root}) and regenerate labels made "
                                    "from the old one")

    def _acquire(self, shard: int) -> int:
        """An open file of ``shard`` for one read (give it back with :meth:`_release`); at most MAX_OPEN_SHARDS
        files stay open: the least recently used one not being read is closed."""
        with self._lock:
            fd = self._fds.pop(shard, None)
            if fd is None:
                try:
                    fd = os.open(self.shard_path(shard), os.O_RDONLY)
                except FileNotFoundError:
                    raise LoaderError(f"shard {self.shard_path(shard)} is missing from the set: restore "
                                      "it, or index the shards that exist again") from None
            self._fds[shard] = fd
            self._users[fd] = self._users.get(fd, 0) + 1
            self._trim(MAX_OPEN_SHARDS)
        return fd

    def _release(self, fd: int) -> None:
        with self._lock:
            self._users[fd] -= 1
            if not self._users[fd]:
                del self._users[fd]
                if fd in self._orphans:
                    self._orphans.discard(fd)
                    os.close(fd)

    def _trim(self, keep: int) -> None:
        for shard in list(self._fds):
            if len(self._fds) <= keep:
                break
            fd = self._fds.pop(shard)
            if fd in self._users:
                self._orphans.add(fd)
            else:
                os.close(fd)

    def _bounded(self, row: int, shard: int, offset: int, length: int) -> None:
        """The index's range of ``row`` lies inside its shard (O(1)): a damaged index is named, not read."""
        if offset + length > int(self.sizes[shard]):
            raise LoaderError(f"{join(self.root, INDEX_BIN)}: row {row} says {length} bytes at byte {offset} of "
                              f"shard {self.shard_path(shard)}, which is {int(self.sizes[shard])} bytes: the index is "
                              f"damaged; index the set again (fkd-dali index {self.root})")

    def read(self, row: int) -> bytes:
        row = int(row)
        shard = int(self.shard_of(np.asarray([row]))[0])
        rec = self.index[row]
        offset, length = int(rec["offset"]), int(rec["length"])
        self._bounded(row, shard, offset, length)
        if self.fs is None:
            fd = self._acquire(shard)
            try:
                data = os.pread(fd, length, offset)
            finally:
                self._release(fd)
        else:
            try:
                data = self.fs.cat_file(self._remote(self.names[shard]), start=offset, end=offset + length)
            except FileNotFoundError:
                raise LoaderError(f"shard {self.shard_path(shard)} is missing from the set: restore it, or index "
                                  "the shards that exist again") from None
            with self._lock:
                self.requests += 1
        return self._checked(row, shard, rec, data)

    def _checked(self, row: int, shard: int, rec, data: bytes) -> bytes:
        offset, length, crc = int(rec["offset"]), int(rec["length"]), int(rec["crc32"])
        if len(data) != length or zlib.crc32(data) != crc:
            why = "ends first" if len(data) != length else "holds other bytes there (CRC-32 mismatch)"
            raise LoaderError(f"shard {self.shard_path(shard)}, sample {self.keys[row]!r} (row {row}): the "
                              f"index says {length} bytes at byte {offset}, the shard {why}: the shard changed "
                              f"after it was indexed (a stale index). Restore the shard, or index the set again "
                              f"(fkd-dali index {self.root}) and regenerate labels made from the old bytes")
        return data

    def read_remote(self, rows: Sequence[int]) -> list[bytes]:
        """The samples of ``rows`` of a set at a URL, CRC-checked: their range requests made at once (fsspec's
        ``cat_ranges``: concurrent on its event loop), not one blocking request per thread. Neighbouring ranges
        are not merged: a pass's rows are in random order, so a batch's samples are almost never adjacent."""
        rows = [int(r) for r in rows]
        shards = self.shard_of(np.asarray(rows, np.int64)).tolist()
        recs = [self.index[r] for r in rows]
        starts = [int(x["offset"]) for x in recs]
        ends = [a + int(x["length"]) for a, x in zip(starts, recs)]
        for row, shard, a, b in zip(rows, shards, starts, ends):
            self._bounded(row, shard, a, b - a)
        got = self.fs.cat_ranges([self._remote(self.names[s]) for s in shards], starts, ends, on_error="return")
        with self._lock:
            self.requests += len(rows)
        out = []
        for row, shard, rec, data in zip(rows, shards, recs, got):
            if isinstance(data, FileNotFoundError):
                raise LoaderError(f"shard {self.shard_path(shard)} is missing from the set: restore it, or index "
                                  "the shards that exist again")
            if isinstance(data, BaseException):
                raise LoaderError(f"shard {self.shard_path(shard)}, sample {self.keys[row]!r} (row {row}) could not "
                                  f"be read ({type(data).__name__}: {data})") from data
            out.append(self._checked(row, shard, rec, data))
        return out

    def open_sample(self, row: int) -> io.BufferedReader | io.BytesIO:
        """Sample ``row`` as a read-only binary file (what ``errors.image_header`` takes): reads only the parts
        asked for (a header, the JPEG's last 4 KB), not CRC-checked: the whole sample is, when a batch reads it.
        A set at a URL: the sample's bytes, read whole."""
        row = int(row)
        if self.fs is not None:
            return io.BytesIO(self.read(row))
        shard = int(self.shard_of(np.asarray([row]))[0])
        rec = self.index[row]
        self._bounded(row, shard, int(rec["offset"]), int(rec["length"]))
        return io.BufferedReader(_Range(self, shard, int(rec["offset"]), int(rec["length"])), 16384)

    def close(self) -> None:
        """Closes the set's open shard files (those being read, when their read ends); a later read opens again."""
        with self._lock:
            self._trim(0)

    def verify_bytes(self, workers: int = 8, progress=None) -> int:
        """Read every sample and check its CRC-32 against the index (:meth:`read` raises naming the first that
        differs), after the per-sample index files' SHA-256; returns the number of samples checked.
        ``progress(n)`` is called per shard."""
        import concurrent.futures
        self.verify_index_files()
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            for shard in range(len(self.names)):  # blocks of rows as many as shards (in shard order unless key-mapped)
                a, b = len(self) * shard // len(self.names), len(self) * (shard + 1) // len(self.names)
                for _ in pool.map(self.read, range(a, b)):
                    pass
                if progress is not None:
                    progress(1)
        return len(self)

    def checksums(self) -> np.ndarray:
        return self.index["crc32"]

    def byte_sizes(self) -> np.ndarray:
        return self.index["length"]


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def open_shard_set(root: str, check_files: bool = True) -> ShardSet:
    s = ShardSet(root)
    if check_files:
        s.check_files()
    return s


class _Range(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file, as a seekable read-only file (``os.pread``: no shared
    file position, so threads may each hold one)."""

    def __init__(self, shards: ShardSet, shard: int, offset: int, length: int):
        super().__init__()
        self.shards, self.fd = shards, shards._acquire(shard)  # held (not closed by the LRU) until closed
        self.offset, self.length, self.pos = offset, length, 0

    def close(self) -> None:
        if not self.closed:
            self.shards._release(self.fd)
        super().close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.length - self.pos))
        data = os.pread(self.fd, n, self.offset + self.pos) if n else b""
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


# ---------------------------------------------------------------------------------------------------- writing
class ShardSetWriter:
    """Writes a shard set's index as its shards are written or scanned: :meth:`add` per shard (its entries in
    row order and their CRCs), then :meth:`close`. Refuses a key seen in an earlier shard (two samples, one key)."""

    def __init__(self, root: str, fmt: str, classes: Sequence[str] | None = None,
                 key_map: dict[str, str] | None = None):
        self.root, self.fmt = root, format_named(fmt)
        self.key_map = key_map  # a shard's key -> the key the set records (a store's file name)
        self.shard_ids: list[np.ndarray] = []
        self.classes = None if classes is None else list(classes)
        self.shards: list[dict] = []
        self.records: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.keys: list[str] = []
        self._where: dict[str, str] = {}
        self.n = 0

    def add(self, name: str, entries: Sequence[Entry], crcs: Sequence[int]) -> None:
        path = os.path.join(self.root, name)
        if self.key_map is not None:
            entries = [e._replace(key=self._mapped_key(path, e)) for e in entries]
        for e in entries:
            if e.key in self._where:
                raise ShardFormatError(path, e.offset, f"two samples with the key {e.key!r} (the other in "
                                       f"{self._where[e.key]}): a key must name one sample of the set")
            if e.length > MAX_SAMPLE_BYTES:
                raise ShardFormatError(path, e.offset, f"sample {e.key!r} is {e.length} bytes, more than "
                                       f"{MAX_SAMPLE_BYTES}")
            self._where[e.key] = name
        rec = np.zeros(len(entries), RECORD)
        rec["offset"] = [e.offset for e in entries]
        rec["length"] = [e.length for e in entries]
        rec["crc32"] = np.asarray(crcs, np.uint32)
        self.records.append(rec)
        self.labels.append(np.asarray([e.label for e in entries], np.int64))
        self.keys.extend(e.key for e in entries)
        self.shard_ids.append(np.full(len(entries), len(self.shards), np.int64))
        self.shards.append({"name": name, "size": os.path.getsize(path), "start": self.n})
        self.n += len(entries)

    def _mapped_key(self, path: str, e: Entry) -> str:
        try:
            return self.key_map[e.key]
        except KeyError:
            raise ShardSetError(f"the key map names no sample {e.key!r} (shard {path}, byte {e.offset}): it was made "
                                "for another dataset, or misses samples. Give a key map listing every sample of "
                                "the shards") from None

    def _in_order(self, order: Sequence[str], rec, labels, shard_ids):
        """The rows rearranged into ``order`` (a store's files): every key of the order must be a sample and
        every sample a key of the order, else the first few of each are named."""
        row_of = {k: i for i, k in enumerate(self.keys)}
        rows = np.fromiter((row_of.get(k, -1) for k in order), np.int64, len(order))
        missing = [order[int(i)] for i in np.flatnonzero(rows < 0)[:5]]
        extra = sorted(set(self.keys) - set(order))[:5] if len(row_of) != len(order) or missing else []
        if missing or extra:
            raise ShardSetError(f"{self.root}: the shards do not hold the store's images: "
                                + (f"missing {', '.join(missing)}" if missing else "")
                                + ("; " if missing and extra else "")
                                + (f"not in the store: {', '.join(extra)}" if extra else "")
                                + ". Index the shards of the dataset the store was made from, with its key map")
        self.keys = list(order)
        return rec[rows], labels[rows], shard_ids[rows]

    def close(self, order: Sequence[str] | None = None) -> ShardSet:
        """Write the index; with ``order`` (a store's files, after the key map) its rows follow that order, and
        each row's shard is recorded (``fkd-shard-ids.npy``)."""
        rec = np.concatenate(self.records) if self.records else np.zeros(0, RECORD)
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64)
        shard_ids = np.concatenate(self.shard_ids) if self.shard_ids else np.zeros(0, np.int64)
        if order is not None:  # checked before anything is written
            rec, labels, shard_ids = self._in_order(order, rec, labels, shard_ids)
        top = int(labels.max()) if labels.size else 0
        if self.classes is None and top >= MAX_CLASSES_UNNAMED:
            raise ShardSetError(f"{self.root}: a sample has class {top}; without a class list the set may have at "
                                f"most {MAX_CLASSES_UNNAMED} classes. Give the class names (--classes FILE), or "
                                "check the shards' labels")
        classes = self.classes if self.classes is not None else [str(i) for i in range(top + 1)]
        if top >= len(classes):
            raise ShardSetError(f"{self.root}: a sample has class {top}, but the set has {len(classes)} classes")
        if os.path.exists(os.path.join(self.root, INDEX_JSON)):  # indexed again: no old JSON over new arrays
            os.remove(os.path.join(self.root, INDEX_JSON))
        if order is not None:
            np.save(os.path.join(self.root, SHARD_IDS),
                    shard_ids.astype(np.uint16 if len(self.shards) < 2**16 else np.uint32))
        elif os.path.exists(os.path.join(self.root, SHARD_IDS)):
            os.remove(os.path.join(self.root, SHARD_IDS))
        keys = PathTable.from_paths(self.keys)
        rec.tofile(os.path.join(self.root, INDEX_BIN))
        np.save(os.path.join(self.root, LABELS), labels.astype(np.int16 if top < 2**15 else np.int32))
        np.save(os.path.join(self.root, KEY_NAMES), np.asarray(keys.names, np.uint8))
        np.save(os.path.join(self.root, KEY_ENDS), np.asarray(keys.ends))
        files = {name: {"size": os.path.getsize(os.path.join(self.root, name)),
                        "sha256": file_digest(os.path.join(self.root, name))}
                 for name in PER_SAMPLE_FILES if name != SHARD_IDS or order is not None}
        meta = {"version": INDEX_VERSION, "format": self.fmt.NAME, "num_samples": self.n, "shards": self.shards,
                "files": files,
                "classes": classes, "fingerprint": fingerprint_of(keys, rec["length"]),
                "key_dirs": keys.dirs, "key_dir_starts": keys.dir_starts.tolist(), "store_order": order is not None}
        tmp = os.path.join(self.root, INDEX_JSON + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f)
        os.replace(tmp, os.path.join(self.root, INDEX_JSON))  # the set is indexed once this file exists
        return open_shard_set(self.root)


def crcs_of(path: str, entries: Sequence[Entry]) -> list[int]:
    """The CRC-32 of each entry's bytes in the shard file ``path``."""
    out = []
    with open(path, "rb") as f:
        for e in entries:
            data = os.pread(f.fileno(), e.length, e.offset)
            if len(data) != e.length:
                raise ShardFormatError(path, e.offset, f"sample {e.key!r} needs {e.length} bytes, the file ends "
                                       "first: the shard is truncated")
            out.append(zlib.crc32(data))
    return out


def is_ours(name: str) -> bool:
    """A file of a shard set's folder that is not a shard: our index files, DALI/MXNet index files, hidden files."""
    return name.startswith(("fkd-", ".")) or name.endswith(".idx")


def shard_files(root: str) -> list[str]:
    """The shard files of ``root`` when the format is given: every regular file that is not ours, whatever its
    name (DeepLearningExamples' TFRecord shards have none: ``train-00000-of-01024``), sorted; a file that is not
    of the format is refused by name when it is scanned."""
    return sorted(e.name for e in os.scandir(root) if e.is_file() and not is_ours(e.name))


def index_shards(root: str, fmt: str | None = None, classes: Sequence[str] | None = None,
                 dali_index: bool = True, key_map: dict[str, str] | None = None,
                 order: Sequence[str] | None = None) -> ShardSet:
    """Index the shards already in ``root`` (foreign ones too): every shard of the format (with ``fmt`` given: every
    file of :func:`shard_files`, without: the files named ``*<suffix>``) is scanned (sorted by name), its samples' bytes checksummed, and the set's index written; with ``dali_index`` also DALI's own
    index file per shard. ``key_map`` renames each shard key (to a store's file name); ``order`` (a store's files)
    makes the rows follow the store's rows."""
    from .formats import FORMATS
    if fmt is None:
        found = {m.NAME for m in FORMATS.values() for n in os.listdir(root) if n.endswith(m.SUFFIX)}
        if len(found) != 1:
            raise ShardSetError(f"{root} holds shards of {len(found)} formats ({', '.join(sorted(found)) or 'none'}): "
                                "give --format")
        fmt = found.pop()
        names = sorted(n for n in os.listdir(root) if n.endswith(format_named(fmt).SUFFIX))
    else:
        names = shard_files(root)
    module = format_named(fmt)
    if not names:
        raise ShardSetError(f"{root} holds no {module.SUFFIX} shard" if fmt is None else
                            f"{root} holds no shard file (every regular file but ours, fkd-* and *.idx, is taken "
                            f"for a {module.NAME} shard when the format is given)")
    w = ShardSetWriter(root, fmt, classes, key_map)
    for name in names:
        path = os.path.join(root, name)
        with open(path, "rb") as f:
            entries = list(module.scan_shard(f, path))
        w.add(name, entries, crcs_of(path, entries))
        if dali_index:
            module.write_dali_index(path, entries)
    return w.close(order)


def write_shards(root: str, fmt: str, samples: Iterable[tuple[str, bytes, int]], *, shard_bytes: int,
                 classes: Sequence[str], prefix: str, dali_index: bool = True) -> ShardSet:
    """Write ``samples`` (key, bytes, label) in order as shards ``PREFIX-000000<suffix>`` ..., each closed once it
    holds ``shard_bytes`` of images (one sample at least), with the set's index; the bytes are copied unchanged.
    One sample's bytes are held at a time. The index is written last: a run stopped midway leaves no index, and
    the half-written folder is never taken for a shard set."""
    module = format_named(fmt)
    w = ShardSetWriter(root, fmt, classes)
    it = iter(samples)
    pending = next(it, None)
    while pending is not None:
        crcs: list[int] = []

        def take():
            nonlocal pending
            held = 0
            while pending is not None and (held < shard_bytes or not crcs):
                key, data, label = pending
                crcs.append(zlib.crc32(data))
                held += len(data)
                yield key, data, label
                pending = next(it, None)

        name = f"{prefix}-{len(w.shards):06d}{module.SUFFIX}"
        path = os.path.join(root, name)
        with open(path, "xb") as f:
            entries = module.write_shard(f, take())
        w.add(name, entries, crcs)
        if dali_index:
            module.write_dali_index(path, entries)
    return w.close()


# ---------------------------------------------------------------------------------------------------- reading
class ShardImages:
    """The image bytes of a shard set's rows, for the readers (in place of :class:`ImagePaths`, whose paths DALI
    reads): per batch, one ``pread`` per sample in a pool of threads (zlib.crc32 and pread release the GIL), each
    sample's bytes checked against its CRC in the index; a mismatch (the shard changed after it was indexed: a stale
    index) stops the batch with the shard, the key and the byte offset."""

    serves_bytes = True
    AHEAD = 2  # batches read ahead at most

    def __init__(self, shards: ShardSet, workers: int = 8):
        import concurrent.futures
        self.shards = shards
        self.files = shards.keys
        self.root = shards.root
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="fkd-shard-read")
        self._ahead_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fkd-shard-ahead")
        self._ahead_lock = threading.Lock()
        self._ahead: dict[bytes, concurrent.futures.Future] = {}  # rows -> their reads, for the next batches
        self.served_ahead = 0  # batches whose bytes were read ahead (while DALI decoded the batch before)

    def __len__(self) -> int:
        return len(self.shards)

    def read(self, row: int) -> bytes:
        return self.shards.read(row)

    def _read_all(self, rows: np.ndarray) -> list[np.ndarray]:
        if self.shards.fs is not None:  # a set at a URL: the batch's range requests at once
            return [np.frombuffer(b, np.uint8) for b in self.shards.read_remote(np.asarray(rows).tolist())]
        return [np.frombuffer(b, np.uint8) for b in self._pool.map(self.read, np.asarray(rows).tolist())]

    def prefetch(self, rows: np.ndarray) -> None:
        """Start reading the batch of ``rows`` that will be asked for next (the reader knows its plan), so its
        reads overlap DALI's decoding of the batch before it."""
        rows = np.ascontiguousarray(rows, np.int64)
        with self._ahead_lock:
            while len(self._ahead) >= self.AHEAD:  # a plan abandoned midway leaves reads nobody takes
                self._ahead.pop(next(iter(self._ahead)))
            key = rows.tobytes()
            if key not in self._ahead:
                self._ahead[key] = self._ahead_pool.submit(self._read_all, rows)

    def encoded(self, rows: np.ndarray) -> list[np.ndarray]:
        """The image bytes of ``rows`` (CRC-checked), from the read :meth:`prefetch` started when it was for
        these rows."""
        with self._ahead_lock:
            ahead = self._ahead.pop(np.ascontiguousarray(rows, np.int64).tobytes(), None)
        if ahead is None:
            return self._read_all(rows)
        self.served_ahead += 1
        return ahead.result()

    def path_of(self, row: int) -> str:
        return f"{self.files[int(row)]} (in {self.shards.shard_path(int(self.shards.shard_of(np.asarray([row]))[0]))})"

    def header_source(self, row: int):
        return self.shards.open_sample(row)

    def close(self) -> None:
        self._ahead.clear()
        self._ahead_pool.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.shards.close()

