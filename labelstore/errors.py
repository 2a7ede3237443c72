"""Errors raised by the label store. Each message names the store, the array or value, and the fix."""


class StoreError(Exception):
    """Base class: anything wrong with a label store."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The path holds no label store."""


class StoreFormatError(StoreError):
    """The store's metadata or arrays do not follow the schema."""


class StoreMismatchError(StoreError):
    """The store was made from another dataset (count, classes, files or their sizes differ)."""


class StoreIncompleteError(StoreError):
    """Some rows are not written yet (generation stopped early)."""


class StoreCorruptError(StoreError):
    """A chunk on disk cannot be decoded (truncated, overwritten, checksum mismatch)."""


class StoreWriteError(StoreError):
    """A write was refused: misaligned block, wrong shapes or dtypes, or the disk failed."""


class StoreKindError(StoreError):
    """The store holds another kind of labels than the code reading it needs (top-k vs embeddings)."""
