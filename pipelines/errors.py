"""Errors of the loaders, and what a bad image file looks like to a person."""

from __future__ import annotations

from PIL import Image


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
