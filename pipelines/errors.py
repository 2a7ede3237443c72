"""Errors of the loaders, and what a bad image file looks like to a person."""

from __future__ import annotations

import concurrent.futures
import os
import warnings
from collections.abc import Sequence

from PIL import Image

#: Largest image (pixels) any command decodes: Pillow's own refusal threshold (2 x Image.MAX_IMAGE_PIXELS).
#: A header claiming more is refused before decoding: DALI would allocate the claimed size (2.7 GB for
#: 30000 x 30000) and, when the data cannot fill it, return the uninitialised buffer without an error.
MAX_IMAGE_PIXELS = 178_956_970


class LoaderError(Exception):
    """A batch could not be produced; the message names the file and the fix."""


def probe_image(path: str) -> str | None:
    """Why an image file cannot be used, or None if Pillow decodes it."""
    try:
        with Image.open(path) as im:
            im.load()
    except FileNotFoundError:
        return "the file does not exist"
    except PermissionError:
        return "the file cannot be read (permission denied)"
    except Exception as e:  # noqa: BLE001 - any decode failure is the answer
        return f"it cannot be decoded ({type(e).__name__}: {e})"
    return None


#: A JPEG's end-of-image marker must lie within this many bytes of the end of the file (encoders may pad).
JPEG_TAIL = 4096


def jpeg_is_cut(path) -> bool:
    """True when a JPEG file (a path, or a binary file object: a shard's sample) lacks its end-of-image marker
    (FF D9) near its end: it was cut short. The GPU decoder (nvJPEG) decodes such a file without an error, into an
    image whose missing part is garbage."""
    if not isinstance(path, (str, os.PathLike)):
        path.seek(0, os.SEEK_END)
        path.seek(max(0, path.tell() - JPEG_TAIL))
        return b"\xff\xd9" not in path.read()
    with open(path, "rb") as f:
        return jpeg_is_cut(f)


def image_header(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[tuple[int, int] | None, str | None]:
    """((height, width), None) from the file header, or (None, why the file cannot be used). Reads the
    header and, for a JPEG, its last 4 KB (its end marker): cheap enough to check every file before a job
    starts."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                cut = im.format == "JPEG" and jpeg_is_cut(path)
    except Image.DecompressionBombError:
        return None, f"its header claims more than {max_pixels:,} pixels (refused, as a decompression bomb would be)"
    except FileNotFoundError:
        return None, "the file does not exist"
    except PermissionError:
        return None, "the file cannot be read (permission denied)"
    except Exception as e:  # noqa: BLE001 - any failure to parse the header is the answer
        return None, f"not a readable image ({type(e).__name__}: {e})"
    if h < 1 or w < 1:
        return None, f"its header claims {w}x{h} pixels"
    if cut:
        return None, (f"a JPEG without its end marker (FF D9) in its last {JPEG_TAIL} bytes: the file was cut short "
                      "(or has other data appended after the image)")
    if w * h > max_pixels:
        return None, (f"its header claims {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} "
                      "(refused, as a decompression bomb would be)")
    return (h, w), None


def read_headers(paths: Sequence[str], workers: int = 8,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[list[tuple[int, int] | None], dict[int, str]]:
    """Sizes of ``paths`` from their headers (threads), and {position: reason} for the unusable ones."""
    sizes: list[tuple[int, int] | None] = []
    bad: dict[int, str] = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for i, (size, why) in enumerate(pool.map(lambda p: image_header(p, max_pixels), paths)):
            sizes.append(size)
            if why:
                bad[i] = why
    return sizes, bad


def refuse_unusable(paths: Sequence[str], bad: dict[int, str], fix: str) -> None:
    """Raise one LoaderError naming the unusable files (the first five, and how many in all)."""
    if not bad:
        return
    shown = "; ".join(f"{paths[i]}: {why}" for i, why in list(bad.items())[:5])
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    raise LoaderError(f"{len(bad)} unusable image file(s): {shown}{more}. {fix}")
