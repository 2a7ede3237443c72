"""The Zarr label store of fkd-dali (schema v1). numpy + zarr only: no torch, no DALI."""

from .errors import (StoreCorruptError, StoreError, StoreFormatError, StoreIncompleteError, StoreKindError,
                     StoreMismatchError, StoreNotFoundError, StoreWriteError)
from .fingerprint import file_sizes, fingerprint_dir, fingerprint_of
from .pathtable import PathTable
from .schema import ATTR_KEY, CROP_ARRAYS, EXIF_POLICY, SCHEMA_VERSION, Layout, StoreMeta

# zarr is imported on first use of these (``labelstore.open_store``, ``from labelstore import LabelStore``): the
# dataset scan's child process and the CLI's start (which starts the scan) need only the light part above.
_LAZY = {"LabelStore": "store", "open_store": "store", "create_store": "create", "Round": "reading",
         "check_block": "checks", "Location": "location", "location": "location", "store_exists": "location"}
_LAZY.update(format_summary="summary", summarize="summary")


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'labelstore' has no attribute {name!r}")
    import importlib  # noqa: PLC0415
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "ATTR_KEY", "CROP_ARRAYS", "EXIF_POLICY", "SCHEMA_VERSION", "LabelStore", "Layout", "Location", "PathTable",
    "Round",
    "StoreCorruptError", "StoreError", "StoreFormatError", "StoreIncompleteError", "StoreKindError", "StoreMeta",
    "StoreMismatchError", "StoreNotFoundError", "StoreWriteError", "check_block", "create_store",
    "file_sizes", "fingerprint_dir", "fingerprint_of", "format_summary", "location", "open_store",
    "store_exists", "summarize",
]
