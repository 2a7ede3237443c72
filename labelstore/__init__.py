"""The Zarr label store of fkd-dali (schema v1). numpy + zarr only: no torch, no DALI."""

from .errors import (StoreCorruptError, StoreError, StoreFormatError, StoreIncompleteError,
                     StoreMismatchError, StoreNotFoundError, StoreWriteError)
from .fingerprint import file_sizes, fingerprint_dir, fingerprint_of
from .schema import ATTR_KEY, CROP_ARRAYS, EXIF_POLICY, SCHEMA_VERSION, Layout, StoreMeta
from .store import LabelStore, Round, check_block, create_store, open_store
from .summary import format_summary, summarize

__all__ = [
    "ATTR_KEY", "CROP_ARRAYS", "EXIF_POLICY", "SCHEMA_VERSION", "LabelStore", "Layout", "Round",
    "StoreCorruptError", "StoreError", "StoreFormatError", "StoreIncompleteError", "StoreMeta",
    "StoreMismatchError", "StoreNotFoundError", "StoreWriteError", "check_block", "create_store",
    "file_sizes", "fingerprint_dir", "fingerprint_of", "format_summary", "open_store", "summarize",
]
