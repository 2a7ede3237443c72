"""Where a label store lives: a local folder, a read-only ``.zip`` or any fsspec URL (``s3://``, ``gs://``,
``file://``, ...); :func:`location` picks zarr's own store class for it (LocalStore, ZipStore, FsspecStore)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import zarr
import zarr.storage
from zarr.abc.store import Store
from zarr.core.sync import sync

from .errors import StoreNotFoundError, StoreWriteError


@dataclasses.dataclass
class Location:
    """Where a store lives: zarr's store object, the name shown to people, and the local folder if any."""

    store: Store
    name: str
    local_dir: str | None = None


def location(where: "str | os.PathLike | Store", mode: str = "r") -> Location:
    """zarr's own store for a local folder, a ``.zip`` (read-only), ``file://`` or any fsspec URL.

    A URL whose scheme needs a package that is not installed raises StoreNotFoundError saying which one to
    install. Credentials come the usual way (environment, config files), as for the fsspec backend alone;
    ``FSSPEC_<PROTOCOL>_<OPTION>`` variables (e.g. ``FSSPEC_S3_ENDPOINT_URL``) set backend options.
    """
    read_only = mode == "r"
    if isinstance(where, Store):
        local = where.root if isinstance(where, zarr.storage.LocalStore) else None
        return Location(where, str(where), os.fspath(local) if local is not None else None)
    where = os.fspath(where)
    scheme, sep, rest = where.partition("://")
    if sep and scheme == "file":
        where, sep = rest, ""
    if sep:
        import fsspec  # noqa: PLC0415 - a zarr dependency; only URLs need it
        import fsspec.config  # noqa: PLC0415
        from fsspec.registry import known_implementations  # noqa: PLC0415
        try:
            fsspec.get_filesystem_class(scheme)
        except ImportError as e:
            impl = known_implementations.get(scheme, {}).get("class", "")
            pkg = impl.split(".")[0] or "the fsspec backend for it"
            raise StoreNotFoundError(f"{where}: {scheme}:// label stores need the {pkg} package ({e}); install "
                                     f"it with `pip install {pkg}`") from None
        except ValueError as e:
            raise StoreNotFoundError(f"{where}: unknown URL scheme {scheme}:// ({e}); use a local path or an "
                                     "fsspec URL such as s3://bucket/store") from None
        # No listings cache: ranks write shards concurrently, and a cached listing (or a cached "not found"
        # from before another rank created the store) would hide them.
        options: dict[str, Any] = {"use_listings_cache": False}
        if scheme in ("s3", "s3a") and "max_concurrency" not in fsspec.config.conf.get(scheme, {}):
            # s3fs sends a HEAD before every whole-object GET to decide whether to split it into parallel ranges
            # (objects over 50 MB); a store's objects are all smaller, so that doubled the requests for the
            # unsharded arrays (done, sizes, targets, metadata). One stream per object: one GET.
            options["max_concurrency"] = 1
        return Location(zarr.storage.FsspecStore.from_url(where, read_only=read_only, storage_options=options), where)
    if where.endswith(".zip") and not os.path.isdir(where):
        if not read_only:
            raise StoreWriteError(f"{where}: a .zip label store is read-only; generate or resume into a folder "
                                  "(or an object-store URL), then zip it (see docs/object-storage.md)")
        if not os.path.isfile(where):
            raise StoreNotFoundError(f"{where} does not exist: expected an fkd-dali label store, made by "
                                     "`fkd-dali generate` or `fkd-dali import-fkd`")
        return Location(zarr.storage.ZipStore(where, mode="r"), where)
    # An absolute root: zarr's LocalStore lists keys by deleting every "ROOT/" from the paths it finds, so a
    # relative root such as "s" turned "s/boxes/c/0" into "boxec/0" (a healthy store then "lost" its files).
    return Location(zarr.storage.LocalStore(os.path.abspath(where), read_only=read_only), where, where)


def exists(loc: Location) -> bool:
    """Whether anything is at ``loc`` (a folder, or a group's metadata object)."""
    if loc.local_dir is not None:
        return os.path.exists(loc.local_dir)
    return bool(sync(loc.store.exists("zarr.json")))


def store_exists(where: "str | os.PathLike | Store") -> bool:
    """Whether a label store (a Zarr group) is at ``where`` (a path or URL)."""
    loc = location(where)
    if loc.local_dir is not None:
        return os.path.isfile(os.path.join(loc.local_dir, "zarr.json"))
    try:
        return bool(sync(loc.store.exists("zarr.json")))
    except FileNotFoundError:
        return False
