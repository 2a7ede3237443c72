"""The Zarr label store of fkd-dali (schema v1). numpy + zarr only: no torch, no DALI."""

from .errors import (StoreCorruptError, StoreError, StoreFormatError, StoreIncompleteError,
                     StoreMismatchError, StoreNotFoundError, StoreWriteError)
from .fingerprint import file_sizes, fingerprint_dir, fingerprint_of
from .pathtable import PathTable
from .schema import ATTR_KEY, CROP_ARRAYS, EXIF_POLICY, SCHEMA_VERSION, Layout, StoreMeta
from .store import LabelStore, Location, Round, check_block, create_store, location, open_store, store_exists
from .summary import format_summary, summarize

__all__ = [
    "ATTR_KEY", "CROP_ARRAYS", "EXIF_POLICY", "SCHEMA_VERSION", "LabelStore", "Layout", "Location", "PathTable",
    "Round",
    "StoreCorruptError", "StoreError", "StoreFormatError", "StoreIncompleteError", "StoreMeta",
    "StoreMismatchError", "StoreNotFoundError", "StoreWriteError", "check_block", "create_store",
    "file_sizes", "fingerprint_dir", "fingerprint_of", "format_summary", "location", "open_store",
    "store_exists", "summarize",
]
