"""WebDataset shards: POSIX tar files (GNU format, which every DALI build reads) whose consecutive members of one
stem form a sample, ``STEM.<image extension>`` (the image bytes, unchanged) and ``STEM.cls`` (the class, ASCII
decimal). A sample's key is its image member's name: for a packed ImageFolder, the image's relative path.

DALI's ``fn.readers.webdataset`` splits a member name at the first dot of its base name (stem, extension), so a
key whose base name holds a dot before its extension, or any white space (DALI's index is space separated), is
refused when writing.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator

from . import CLASS_LIMIT, Entry, ShardFormatError, file_size

NAME = "wds"
SUFFIX = ".tar"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp")
CLASS_EXTENSION = "cls"
MAX_CLASS_BYTES = 32  # a ".cls" member is a decimal integer: anything longer is not one
BLOCK = 512


def split_name(name: str) -> tuple[str, str]:
    """(stem, extension) as WebDataset and DALI split a member name: at the first dot of its base name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info


def check_key(key: str) -> None:
    """Raises ValueError for a key this format cannot record (``pack`` asks before it writes anything)."""
    ext = split_name(key)[1]
    if ext.lower() not in IMAGE_EXTENSIONS or any(c.isspace() for c in key):
        raise ValueError(f"{key!r} cannot be a WebDataset key: its base name must be STEM.EXT with one "
                         f"dot and EXT an image extension ({', '.join(IMAGE_EXTENSIONS)}), and no white "
                         "space. Rename the file, or pack with another --format")


def write_shard(f, samples: Iterable[tuple[str, bytes, int]]) -> list[Entry]:
    """Write ``(key, image bytes, label)`` samples as one tar shard to the binary file ``f``; one Entry each."""
    entries = []
    with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, image, label in samples:
            check_key(key)
            stem = split_name(key)[0]
            tar.addfile(_member(key, len(image)), io.BytesIO(image))
            offset = tar.offset - _padded(len(image))
            tar.addfile(_member(f"{stem}.{CLASS_EXTENSION}", len(str(int(label)))),
                        io.BytesIO(str(int(label)).encode()))
            entries.append(Entry(key, offset, len(image), int(label)))
    return entries


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def scan_shard(f, name: str) -> Iterator[Entry]:
    """The samples of a tar shard, in file order; ShardFormatError on a truncated tar, a member cut short, a
    sample without an image or a class, two images in one sample, a class that is not an integer, or two samples
    with one key."""
    size = file_size(f)
    f.seek(0)
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except tarfile.TarError as e:
        raise ShardFormatError(name, 0, f"not a tar file ({e})") from None
    seen: set[str] = set()
    stem, parts, first = None, {}, 0
    while True:
        at = tar.offset
        try:
            member = tar.next()
        except tarfile.TarError as e:
            raise ShardFormatError(name, at, f"a tar header is cut short or damaged ({e}): the shard is truncated "
                                   "or corrupt; copy it again from its source") from None
        if member is not None and member.offset_data + member.size > size:
            raise ShardFormatError(name, member.offset_data, f"member {member.name} needs {member.size} bytes but "
                                   f"the file ends at byte {size}: the shard is truncated; copy it again")
        s = split_name(member.name)[0] if member is not None and member.isfile() else None
        if member is not None and not member.isfile():
            continue
        if s != stem and stem is not None:
            yield _sample(f, name, stem, parts, first)
        if member is None:
            _check_end(f, name, at, size)
            return
        if s != stem:
            if s in seen:
                raise ShardFormatError(name, member.offset, f"two samples with the key {s!r}: a key must name "
                                       "one sample in a shard")
            seen.add(s)
            stem, parts, first = s, {}, member.offset
        ext = split_name(member.name)[1]
        if ext in parts:
            raise ShardFormatError(name, member.offset, f"sample {stem!r} has two {ext!r} members")
        parts[ext] = member


def _check_end(f, name: str, at: int, size: int) -> None:
    """tarfile ends its listing (no error) at a header past byte 0 that is cut short, damaged or not a header:
    only zero blocks (the end-of-archive marker, at least one) may follow the last member, else the shard is
    refused, so no sample after a damaged header is lost without a word."""
    if size - at < BLOCK:
        raise ShardFormatError(name, at, "the tar ends without its end-of-archive blocks (it is cut short after a "
                               "member, or a header is cut): the shard is truncated; copy it again from its source")
    f.seek(at)
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            return
        if chunk.count(0) != len(chunk):
            raise ShardFormatError(name, at, "the bytes here are neither a tar header nor the end-of-archive "
                                   "blocks (a damaged header, or data that is not tar): the shard is corrupt; copy "
                                   "it again from its source")


def _sample(f, name: str, stem: str, parts: dict[str, tarfile.TarInfo], first: int) -> Entry:
    images = [m for ext, m in parts.items() if ext.lower() in IMAGE_EXTENSIONS]
    if len(images) != 1:
        raise ShardFormatError(name, first, f"sample {stem!r} has {len(images)} image members "
                               f"({', '.join(parts) or 'none'}): each sample needs exactly one "
                               f"({', '.join(IMAGE_EXTENSIONS)})")
    cls = parts.get(CLASS_EXTENSION)
    if cls is None:
        raise ShardFormatError(name, first, f"sample {stem!r} has no class member ({stem}.{CLASS_EXTENSION}); "
                               f"its members: {', '.join(parts)}")
    if cls.size > MAX_CLASS_BYTES:
        raise ShardFormatError(name, cls.offset, f"the class of sample {stem!r} is {cls.size} bytes long, "
                               "not an integer")
    f.seek(cls.offset_data)
    text = f.read(cls.size)
    try:
        label = int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ShardFormatError(name, cls.offset_data, f"the class of sample {stem!r} is {text!r}, not an "
                               "integer") from None
    if not 0 <= label < CLASS_LIMIT:
        raise ShardFormatError(name, cls.offset_data, f"the class of sample {stem!r} is {label}, outside "
                               f"0..{CLASS_LIMIT - 1}")
    image = images[0]
    return Entry(image.name, image.offset_data, image.size, label)


def write_dali_index(shard_path: str, entries: Iterable[Entry] | None = None) -> str:
    """DALI's WebDataset index (``wds2idx`` v1.2) of a tar shard: one line per sample, each member as
    ``ext offset size name``; returns its path (the shard's path + ``.idx``). The tar's headers are read (not its
    data): the offsets of members ``entries`` do not hold (the classes, GNU long-name blocks) come from the file.
    ``entries`` (the shard's samples, from write_shard or scan_shard) is checked against what the file holds."""
    lines: list[list[str]] = []
    last = None
    with open(shard_path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            stem, ext = split_name(m.name)
            if stem != last:
                lines.append([])
                last = stem
            lines[-1].append(f"{ext} {m.offset_data} {m.size} {m.name}")
    if entries is not None and len(lines) != sum(1 for _ in entries):
        raise ShardFormatError(shard_path, None, "the shard holds another number of samples than its entries: it "
                               "changed while being indexed")
    path = shard_path + ".idx"
    with open(path, "w", encoding="utf-8") as out:
        out.write(f"v1.2 {len(lines)}\n")
        out.write("".join(" ".join(parts) + "\n" for parts in lines))
    return path
