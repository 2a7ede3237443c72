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

from .errors import StoreError, StoreNotFoundError, StoreWriteError

#: URL schemes whose first path component is a bucket (or container) that must exist before a store is written.
BUCKET_SCHEMES = ("s3", "s3a", "gs", "gcs", "abfs", "abfss", "az")


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
            fs_class = fsspec.get_filesystem_class(scheme)
        except ImportError as e:
            impl = known_implementations.get(scheme, {}).get("class", "")
            pkg = impl.split(".")[0] or "the fsspec backend for it"
            raise StoreNotFoundError(f"{where}: {scheme}:// label stores need the {pkg} package ({e}); install "
                                     f"it with `pip install {pkg}`") from None
        except ValueError as e:
            raise StoreNotFoundError(f"{where}: unknown URL scheme {scheme}:// ({e}); use a local path or an "
                                     "fsspec URL such as s3://bucket/store") from None
        from fsspec.implementations.memory import MemoryFileSystem  # noqa: PLC0415
        if issubclass(fs_class, MemoryFileSystem):
            raise StoreWriteError(f"{where}: {scheme}:// keeps a store in this process's memory only, gone when the "
                                  "command ends (nothing would be kept); use a folder or an object-store URL "
                                  "(s3://BUCKET/PREFIX/STORE, gs://..., see docs/object-storage.md)")
        # No listings cache: ranks write shards concurrently, and a cached listing (or a cached "not found"
        # from before another rank created the store) would hide them.
        options: dict[str, Any] = {"use_listings_cache": False}
        if scheme in ("s3", "s3a") and "max_concurrency" not in fsspec.config.conf.get(scheme, {}):
            # s3fs sends a HEAD before every whole-object GET to decide whether to split it into parallel ranges
            # (objects over 50 MB); a store's objects are all smaller, so that doubled the requests for the
            # unsharded arrays (done, sizes, targets, metadata). One stream per object: one GET.
            options["max_concurrency"] = 1
        store = zarr.storage.FsspecStore.from_url(where, read_only=read_only, storage_options=options)
        _probe(store, where, scheme, writing=not read_only)
        return Location(store, where)
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


def _probe(store: zarr.storage.FsspecStore, url: str, scheme: str, writing: bool) -> None:
    """One request, alone, before zarr's concurrent ones: credentials, endpoint and (to write) the bucket, each
    refused in one line naming the URL and the fix. (Were zarr's first requests the ones to fail, its other
    requests of the moment would be left pending and print "Exception ignored" tracebacks at exit.)"""
    bucket = store.path.split("/")[0] if scheme in BUCKET_SCHEMES else None
    if bucket == "":
        raise StoreNotFoundError(f"{url} names no bucket: use {scheme}://BUCKET/PREFIX/STORE")
    try:
        if sync(store.exists("zarr.json")) or not writing or bucket is None:
            return
        try:
            sync(store.fs._info(bucket))
        except PermissionError:  # may write objects under a prefix without seeing the bucket: go on
            return
    except FileNotFoundError:
        raise StoreNotFoundError(f"{url}: the bucket {bucket!r} does not exist; create it first (for S3: `aws s3 mb "
                                 f"s3://{bucket}`) or name an existing one: {scheme}://BUCKET/PREFIX/STORE") from None
    except Exception as e:  # noqa: BLE001 - the backend's own errors (botocore, aiohttp, ...) named for people
        raise _unreachable(url, scheme, e) from None


def _unreachable(url: str, scheme: str, e: Exception) -> StoreError:
    """The error of a request to an object store as one line: what failed and what to set."""
    kinds = {type(x).__name__ for x in (e, e.__cause__, e.__context__) if x is not None}
    said = f"{type(e).__name__}: {e}"
    if kinds & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        how = ("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role" if scheme.startswith("s3")
               else f"the credentials {scheme}:// takes (environment or config file)")
        return StoreError(f"{url}: no credentials were found ({said}); set {how} (docs/object-storage.md)")
    if isinstance(e, PermissionError):
        return StoreError(f"{url}: access denied ({said}); check that the credentials may read (and, to "
                          "generate, write) this bucket and prefix")
    if isinstance(e, (ConnectionError, TimeoutError)) or kinds & {
            "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError",
            "ServerTimeoutError"}:
        where = f" (FSSPEC_{scheme.upper()}_ENDPOINT_URL={os.environ[f'FSSPEC_{scheme.upper()}_ENDPOINT_URL']})" \
            if f"FSSPEC_{scheme.upper()}_ENDPOINT_URL" in os.environ else ""
        return StoreError(f"{url}: the object store cannot be reached{where} ({said}); check the endpoint and the "
                          "network")
    return StoreError(f"{url}: the object store refused the request ({said})")


def exists(loc: Location) -> bool:
    """Whether anything is at ``loc`` (a folder, or any object under a URL's prefix: zarr's mode "w" would
    delete it)."""
    if loc.local_dir is not None:
        return os.path.exists(loc.local_dir)
    return not sync(loc.store.is_empty(""))


def store_exists(where: "str | os.PathLike | Store", writing: bool = False) -> bool:
    """Whether a label store (a Zarr group) is at ``where`` (a path or URL). ``writing``: the caller means to
    create or resume one there, so a place no store can be written (a ``.zip``, ``memory://``, a bucket that
    does not exist) and one holding something other than a store (creating a store deletes what is there) are
    refused by name."""
    loc = location(where, "r+" if writing else "r")
    if loc.local_dir is not None:
        found = os.path.isfile(os.path.join(loc.local_dir, "zarr.json"))
        other = not found and os.path.isdir(loc.local_dir) and bool(os.listdir(loc.local_dir))
    else:
        try:
            found = bool(sync(loc.store.exists("zarr.json")))
        except FileNotFoundError:
            found = False
        other = not found and writing and exists(loc)
    if writing and other:
        raise StoreWriteError(f"{loc.name} holds other files and is not a label store; a store is made only in an "
                              "empty folder or prefix (making it there would delete them): choose another place")
    return found
