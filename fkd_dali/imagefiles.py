"""Writers of the image files real datasets contain, ordinary and awkward: the JPEG encodings a decoder must
agree on (4:2:0, 4:4:4, progressive, grayscale, CMYK), files named .jpg that are something else, and files
no decoder can use. The reliability catalogue (docs/reliability.md, tests) and ``fkd-dali doctor`` (decode
parity on the GPU) write them.

Each writer takes a path and an RGB uint8 array (the picture to encode, where the format keeps one) and
writes the file under that name, whatever its extension says.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image


def _save(path: str, im: Image.Image, fmt: str, **kw) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im.save(path, fmt, **kw)


def jpeg_420(path: str, rgb: np.ndarray) -> None:
    """Baseline JPEG, chroma subsampled 2x2 (what cameras and ImageNet mostly hold)."""
    _save(path, Image.fromarray(rgb), "JPEG", quality=90, subsampling=2)


def jpeg_444(path: str, rgb: np.ndarray) -> None:
    _save(path, Image.fromarray(rgb), "JPEG", quality=95, subsampling=0)


def jpeg_422(path: str, rgb: np.ndarray) -> None:
    _save(path, Image.fromarray(rgb), "JPEG", quality=90, subsampling=1)


def progressive_jpeg(path: str, rgb: np.ndarray) -> None:
    _save(path, Image.fromarray(rgb), "JPEG", quality=90, progressive=True)


def zero_byte(path: str, rgb: np.ndarray) -> None:
    open(path, "wb").close()


def truncated_jpeg(path: str, rgb: np.ndarray) -> None:
    _save(path, Image.fromarray(rgb), "JPEG", quality=95)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # header intact, scan data cut in the middle


def random_bytes(path: str, rgb: np.ndarray) -> None:
    open(path, "wb").write(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())


def huge_header(path: str, rgb: np.ndarray) -> None:
    """A small valid JPEG whose frame header (SOF0) is patched to claim 30000 x 30000 pixels."""
    _save(path, Image.fromarray(rgb), "JPEG", quality=95)
    data = bytearray(open(path, "rb").read())
    sof = data.find(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", 30000, 30000)
    open(path, "wb").write(bytes(data))


def smaller_of_same_byte_size(path: str, rgb: np.ndarray) -> None:
    """Replace the image at ``path`` by ``rgb`` (smaller: fewer bytes) as a JPEG padded with a comment segment
    to the old file's byte size: what a dataset fingerprint of paths and byte sizes cannot tell apart."""
    size = os.path.getsize(path)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    small = buf.getvalue()
    pad = size - len(small) - 4  # a COM segment: FF FE, a 2-byte length (counting itself), the comment
    if not 0 <= pad <= 65533:
        raise ValueError(f"{path}: {size} bytes cannot hold a {len(small)}-byte JPEG plus a comment segment")
    with open(path, "wb") as f:
        f.write(small[:2] + b"\xff\xfe" + struct.pack(">H", pad + 2) + b"\0" * pad + small[2:])


def png_named_jpg(path: str, rgb: np.ndarray) -> None:
    _save(path, Image.fromarray(rgb), "PNG")


def bmp_named_jpg(path: str, rgb: np.ndarray) -> None:
    _save(path, Image.fromarray(rgb), "BMP")


def webp_named_jpg(path: str, rgb: np.ndarray) -> None:
    _save(path, Image.fromarray(rgb), "WEBP", lossless=True)


def grayscale_jpeg(path: str, rgb: np.ndarray) -> None:
    _save(path, Image.fromarray(rgb).convert("L"), "JPEG", quality=95)


def cmyk_jpeg(path: str, rgb: np.ndarray) -> None:
    _save(path, Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)


def png_16bit_rgb(path: str, rgb: np.ndarray) -> None:
    """48-bit RGB PNG (Pillow cannot write one: the chunks are written here), samples = 8-bit value * 257."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + (rgb[y].astype(np.uint16) * 257).astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def exif_rotated_jpeg(path: str, rgb: np.ndarray) -> None:
    """Stored pixels as given, with EXIF Orientation = 6 ("rotate 90 degrees clockwise to display")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(path, Image.fromarray(rgb), "JPEG", quality=95, exif=exif.tobytes())


#: JPEG encodings the GPU decoder must decode as the CPU decoder (and Pillow) do.
JPEG_KINDS = {"JPEG 4:2:0": jpeg_420, "JPEG 4:2:2": jpeg_422, "JPEG 4:4:4": jpeg_444,
              "progressive JPEG": progressive_jpeg, "grayscale JPEG": grayscale_jpeg, "CMYK JPEG": cmyk_jpeg,
              "EXIF-rotated JPEG": exif_rotated_jpeg}

#: Files no image decoder can use: every command names them and stops, or leaves them out under --skip-corrupt.
UNUSABLE = {"zero-byte": zero_byte, "truncated JPEG": truncated_jpeg, "random bytes": random_bytes,
            "header claims 30000x30000": huge_header}

#: Files that decode, by content rather than by extension, to the picture Pillow gives (``expected``).
DECODABLE = {"PNG named .jpg": png_named_jpg, "BMP named .jpg": bmp_named_jpg, "WebP named .jpg": webp_named_jpg,
             "grayscale JPEG": grayscale_jpeg, "CMYK JPEG": cmyk_jpeg, "16-bit PNG": png_16bit_rgb,
             "EXIF-rotated JPEG": exif_rotated_jpeg}


def expected_rgb(path: str) -> np.ndarray:
    """The (H, W, 3) picture every fkd-dali command decodes from ``path``: Pillow's, converted to RGB, with
    the EXIF orientation ignored (as torchvision's ImageFolder loader and FKD do)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
