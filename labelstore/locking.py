"""Who may write: one run per label store (and per training output folder), and stores created whole.

Everything about locks lives here, so that the rule is stated once:

* **Local and shared POSIX file systems**: a run holds an exclusive ``flock(2)`` on a lock file for as long
  as it writes. The kernel drops the lock when the process dies (SIGKILL included), so a crashed run never
  blocks its rerun; a live holder is named (pid, host, command, start time, read from the lock file) in the
  refusal. Ranks of one sharded run share their rank 0's lock (they own disjoint shard files).
  A store's lock file is ``STORE/done/writer.lock``: inside the ``done`` array's folder, where zarr looks
  for nothing but ``zarr.json`` and ``c/`` (at the group root zarr would warn about an unknown entry).
* **Object storage** (``s3://``, ``gs://``, ... URLs): **no lock**; the settings check alone protects the
  store (every writer compares its settings with those recorded at creation before writing a shard), so
  two runs with other settings still cannot mix labels, but two identical runs may duplicate work.
* **A file system without locks** (``flock`` fails with ENOLCK/EOPNOTSUPP/ENOSYS): the same as object storage,
  said once on stderr.

New stores are built at a hidden sibling path and renamed into place (:func:`create_atomically`), so two
runs starting at once cannot both create (and overwrite) one store, and a failed build leaves nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import stat
import sys
from collections.abc import Callable

from .errors import StoreError
from .paths import check_no_links

STORE_LOCK = os.path.join("done", "writer.lock")
NO_LOCK_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.EBADF)


class LockedError(StoreError):
    """Another live run holds the lock (it is named in the message)."""


class LockFileError(StoreError):
    """The lock file is a link or a file with other names: it is not opened (writing it would change them)."""


def is_url(path: str) -> bool:
    return "://" in str(path)


@dataclasses.dataclass
class Lock:
    """A held lock (``fd`` set) or the statement that none protects the path (``note`` says why)."""

    path: str | None
    note: str
    fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def still_ours(self) -> bool:
        """False when the lock file was deleted or replaced since we took it (e.g. the store was removed and
        recreated by someone else): a writer must stop rather than write into another run's store."""
        if self.fd is None:
            return True
        try:
            now, ours = os.stat(self.path), os.fstat(self.fd)
        except OSError:
            return False
        return (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500],
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def describe_holder(lock_file: str) -> str:
    try:
        h = json.loads(open(lock_file).read() or "{}")
    except (OSError, ValueError):
        h = {}
    if not h:
        return "a process that did not say who it is"
    return f"pid {h.get('pid')} on host {h.get('host')}, started {h.get('started')}: {h.get('command')}"


def _open_lock_file(lock_file: str) -> int:
    """Open (or create) a lock file, never through a symbolic link (``O_NOFOLLOW``) and never a file that has
    another name too (a hard link): the lock's JSON is written into it."""
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise LockFileError(f"{lock_file} is a symbolic link (to {os.readlink(lock_file)}); a lock file is never "
                            "opened through a link (it would overwrite the file it points to). Remove the link "
                            "(it holds nothing: the lock is recreated)") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} names " \
            "(a hard link: writing the lock would change the other names' content)"
        raise LockFileError(f"{lock_file} is {what}; a lock file is written, so it must be a plain file of its "
                            "own. Remove it (it holds nothing: the lock is recreated)")
    return fd


def acquire(lock_file: str, what: str) -> Lock:
    """Take the exclusive lock ``lock_file`` for ``what`` (e.g. "label store /data/s"), without waiting.

    Raises :class:`LockedError` naming the live holder. On a file system without locks, returns a Lock that
    holds nothing and says so."""
    if is_url(lock_file):
        return Lock(None, f"{what}: no lock on object storage; settings check only")
    fd = _open_lock_file(lock_file)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockedError(f"{what} is in use by another run ({describe_holder(lock_file)}). Wait for it to "
                          "finish or stop it; two runs must never write one place at once") from None
    except OSError as e:
        os.close(fd)
        if e.errno in NO_LOCK_ERRNOS:
            note = f"{what}: this file system offers no lock ({e.strerror}); settings check only"
            print(f"fkd-dali: warning: {note}", file=sys.stderr)
            return Lock(None, note)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    return Lock(lock_file, f"{what}: exclusive lock {lock_file}", fd)


def store_writer_lock(store_path: str) -> Lock:
    """The lock of the one run allowed to write the store at ``store_path`` (which must exist)."""
    if is_url(store_path):
        return Lock(None, f"label store {store_path}: no lock on object storage; settings check only")
    check_no_links(store_path, store_path)  # its ``done`` folder is where the lock file goes
    return acquire(os.path.join(store_path, STORE_LOCK), f"label store {store_path}")


def _staging_path(path: str, tag: str) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{tag}-{socket.gethostname()}-{os.getpid()}")


def _remove_stale_staging(path: str) -> None:
    """Staging folders of dead processes on this host (a build that was SIGKILLed)."""
    parent, name = os.path.split(os.path.abspath(path))
    for d in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.creating-{socket.gethostname()}-*")):
        try:
            pid = int(d.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _what_is(path: str) -> str:
    if os.path.islink(path):
        return f"a symbolic link to {os.readlink(path)}"
    return "a folder" if os.path.isdir(path) else "a file"


def create_atomically(path: str, build: Callable[[str], None], *, replace: bool = False) -> bool:
    """Run ``build(tmp)`` on a fresh hidden sibling of ``path`` and rename it into place.

    Returns False (and discards the build) when ``path`` already holds something, unless ``replace``: then
    the old content is swapped out and deleted only after the new one is in place. A build that raises
    leaves nothing behind. ``path`` may be an empty folder. On object storage the build writes ``path``
    directly (no rename there); a failed build is then deleted by the caller's policy."""
    if is_url(path):
        build(path)
        return True
    _remove_stale_staging(path)
    tmp = _staging_path(path, "creating")
    old = None
    try:
        os.mkdir(tmp)  # made here, never found: a link (or anything) already at this name is not built into
    except FileExistsError:
        raise StoreError(f"{tmp} already exists ({_what_is(tmp)}); it is the staging folder of this process "
                         f"and was not made by it, so nothing is built into it. Remove it and rerun") from None
    try:
        build(tmp)
        if replace and os.path.exists(path):
            old = _staging_path(path, "replaced")
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if os.path.exists(path):
                shutil.rmtree(old, ignore_errors=True)
            else:  # the rename in failed: put the old one back
                os.rename(old, path)
    return True

