"""Training checkpoints: written atomically, holding everything a resume needs to continue exactly.

``checkpoint.pth.tar`` (the last state) and ``model_best.pth.tar`` (best validation top-1) in the output
folder, with FKD's keys (``epoch``, ``arch``, ``state_dict``, ``best_acc1``, ``optimizer``) plus ours: the
position (segment, step inside it, global step), EMA weights, every rank's RNG states, the run's
configuration and the label store's identity.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
import zipfile
from typing import Any

import numpy as np
import torch

from labelstore.locking import Lock, acquire

LAST = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"
LOG = "log.jsonl"
LOCK = "train.lock"
TRUSTED_FIX = ("load it once in a trusted Python session (torch.load(path, weights_only=False)) and torch.save its "
               "state_dict alone")


class CheckpointError(Exception):
    """A checkpoint cannot be used for what was asked."""


def rng_state() -> dict[str, Any]:
    """Every RNG's state, in types ``torch.load(weights_only=True)`` accepts (no numpy objects)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(state: dict[str, Any], folder: str, is_best: bool = False, last: bool = True) -> str:
    """Write ``folder/checkpoint.pth.tar`` (unless not ``last``) and the best copy (if ``is_best``) atomically:
    a kill never leaves half a file, a failed write (a full disk) leaves the previous file as it was."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LAST)
    if last:
        write_atomically(state, path)
    if is_best:
        write_atomically({k: v for k, v in state.items() if k not in ("optimizer", "d_optimizer", "rng")},
                         os.path.join(folder, BEST))
    return path


class _Writes:
    """A file for torch.save that keeps the OS error of a failed write: torch reports it only as its own
    ``enforce fail at inline_container.cc ... unexpected pos``."""

    def __init__(self, file):
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()


def write_atomically(obj: Any, path: str) -> None:
    """torch.save ``obj`` to ``path`` through a temporary file beside it (flushed to the disk, then renamed over
    ``path``). A failed write removes the temporary file and raises a CheckpointError naming the OS's reason
    (``No space left on device``) and the fix; ``path`` keeps its previous content."""
    tmp = path + ".tmp"
    out = None
    try:
        with open(tmp, "wb") as f:
            out = _Writes(f)
            torch.save(obj, out)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, Exception):  # a second Ctrl-C: stop at once, without the half-written file
            raise
        raise CheckpointError(_write_failed(tmp, path, (out.error if out is not None else None) or e)) from e
    os.replace(tmp, path)


def _write_failed(tmp: str, path: str, cause: Exception) -> str:
    if isinstance(cause, OSError) and cause.strerror:
        why = cause.strerror  # e.g. No space left on device
    else:
        why = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:200]}"
    if os.path.exists(path):
        kept = f"the previous checkpoint, {describe(path)}, is left as it was"
        again = f" with --resume {path}" if os.path.basename(path) == LAST else ""
    else:
        kept, again = f"no {os.path.basename(path)} was written before", ""
    return (f"{tmp}: writing the checkpoint failed: {why}. The partial file was removed; {kept}. Free space on "
            f"that disk (or check its quota and permissions) or give another --output, then rerun the same "
            f"command{again}")


def refused(path: str, e: Exception, holds: str, fix: str) -> str | None:
    """The message for a file torch.load(weights_only=True) refused because it holds objects that could run
    code (not a damaged file), or None for any other failure. ``holds``: what the file should hold."""
    if not (isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e)):
        return None
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    return (f"{path}: refused for safety: it holds code-bearing Python objects ({m.group(1) if m else 'unknown'}), "
            f"not only {holds}, so loading it could run code. If you trust where it came from, {fix}")


def load(path: str) -> dict[str, Any]:
    if os.path.isdir(path):
        path = os.path.join(path, LAST)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist (give the file, or the --output folder holding "
                              f"{LAST})")
    return read_untrusted(path, CheckpointError, "it may be truncated")


def numpy_globals() -> list:
    """What ``torch.load(weights_only=True)`` needs to read numpy arrays, dtypes and scalars (as FKD's and SRe2L's
    label files hold them, under numpy 1's and numpy 2's module names): no class that can run code."""
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    names = [core._reconstruct, np.ndarray, np.dtype]
    names += [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int64, np.int32, np.bool_)]
    aliases = [(core._reconstruct, "numpy.core.multiarray._reconstruct"),
               (core._reconstruct, "numpy._core.multiarray._reconstruct"),
               (core.scalar, "numpy.core.multiarray.scalar"), (core.scalar, "numpy._core.multiarray.scalar")]
    return names + aliases


def read_untrusted(path: str, error: type[Exception], unreadable_fix: str, allow: tuple | list = (), *,
                   holds: str = "tensors and plain data", trusted_fix: str = TRUSTED_FIX,
                   what: str = "a checkpoint", max_bytes: int | None = None) -> Any:
    """``torch.load`` of a file that may come from anyone (a checkpoint, a teacher's weights, a label file): tensors
    and plain data only (``weights_only``; ``allow``: classes it may hold besides, e.g. :func:`numpy_globals`), on
    the CPU. A file holding code-bearing objects raises ``error`` naming the file, what it should hold (``holds``)
    and ``trusted_fix``; one that cannot be read raises ``error`` naming it as ``what`` and ending with
    ``unreadable_fix``. ``max_bytes``: the most the file may hold once unpacked (torch's zip format may compress
    its entries), refused before loading."""
    if max_bytes is not None:
        _check_unpacked_size(path, error, max_bytes, what)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = refused(path, e, holds, trusted_fix)
        if why:
            raise error(why) from e
        raise error(f"{path} cannot be read as {what} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}); {unreadable_fix}") from e


def _check_unpacked_size(path: str, error: type[Exception], max_bytes: int, what: str) -> None:
    """Raise ``error`` when ``path`` holds more than ``max_bytes``: on disk, or, for torch's zip format, in its
    entries' uncompressed sizes (a small DEFLATE-compressed file can unpack into gigabytes)."""
    size = os.path.getsize(path)
    if size <= max_bytes and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                size = sum(i.file_size for i in z.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise error(f"{path} cannot be read as {what} (its zip directory is damaged: {e})") from e
    if size > max_bytes:
        raise error(f"{path} holds {size:,} bytes (unpacked); {what} holds at most {max_bytes:,} here: it is not "
                    f"{what} (refused before loading)")


def _checkpoint_file(path: str) -> str:
    return os.path.join(path, LAST) if os.path.isdir(path) else path


def claim_folder(folder: str, *, resume: str | None, overwrite: bool) -> Lock:
    """Take ``folder`` for a training run: its exclusive lock (a second live run there is refused, naming
    the first), and refuse a folder holding another run's checkpoint or log unless the run continues that
    very checkpoint (``resume``) or ``overwrite`` says to replace it (its checkpoints, log and tb/ go)."""
    os.makedirs(folder, exist_ok=True)
    lock = acquire(os.path.join(folder, LOCK), f"output folder {folder}")
    try:
        last = os.path.join(folder, LAST)
        present = [f for f in (LAST, BEST) if os.path.exists(os.path.join(folder, f))]
        log = os.path.join(folder, LOG)
        if os.path.exists(log) and os.path.getsize(log):
            present.append(LOG)
        continuing = bool(resume) and os.path.exists(last) and os.path.exists(_checkpoint_file(resume)) and \
            os.path.samefile(_checkpoint_file(resume), last)
        if present and not continuing:
            if not overwrite:
                raise CheckpointError(f"{folder} holds {_describe(last)} from another run ({', '.join(present)}). "
                                      f"Pass --resume {last} to continue it, --overwrite to replace it (its "
                                      "checkpoints and log are deleted), or choose another --output")
            for name in (LAST, BEST, LOG):
                if os.path.exists(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
            shutil.rmtree(os.path.join(folder, "tb"), ignore_errors=True)
    except BaseException:
        lock.release()
        raise
    return lock


def _describe(last: str) -> str:
    if not os.path.exists(last):
        return "a training log"
    ck = _peek(last)
    if ck is None:
        return "a checkpoint (unreadable)"
    return f"a checkpoint of {ck.get('arch', 'an unknown model')} at step {ck.get('global_step', '?')}"


def _peek(path: str) -> dict | None:
    """A checkpoint's entries without reading its tensors (memory-mapped), or None when it cannot be read."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is described as such
        return None
    return ck if isinstance(ck, dict) else None


def describe(path: str) -> str:
    """``path`` and the step it was written at, e.g. ``runs/x/checkpoint.pth.tar (step 120)``, for messages."""
    ck = _peek(path)
    return f"{path} (" + (f"step {ck.get('global_step', '?')})" if ck else "unreadable)")


def strip_ddp_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved from a DDP-wrapped model, without DDP's ``module.`` prefix."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def is_bare_state_dict(ckpt: Any) -> bool:
    """A file holding ``model.state_dict()`` itself (MEAL V2's ``model_state_XX.pytar``, torchvision's weights)."""
    return isinstance(ckpt, dict) and bool(ckpt) and all(isinstance(v, torch.Tensor) for v in ckpt.values())


def model_state(ckpt: dict[str, Any], path: str) -> dict[str, torch.Tensor]:
    """The model weights of ours, FKD's or MEAL V2's checkpoints (DDP/DataParallel's ``module.`` prefix
    removed): ``state_dict`` (ours, FKD's) or ``model`` under a dict, or a bare state_dict (MEAL V2's)."""
    if is_bare_state_dict(ckpt):
        return strip_ddp_prefix(ckpt)
    sd = ckpt.get("state_dict", ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds no 'state_dict' (nor is it a state_dict of tensors itself)")
    return strip_ddp_prefix(sd)


def state_mismatch(model: torch.nn.Module, sd: dict[str, torch.Tensor], arch: str) -> str | None:
    """Why the weights ``sd`` cannot be loaded into ``model`` (keys, then shapes), or None when they fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        return (f"does not fit {arch}: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} "
                f"unexpected keys (e.g. {unexpected[:3]})")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            return (f"does not fit {arch}: '{k}' has shape {tuple(v.shape)} in the checkpoint but "
                    f"{tuple(own[k].shape)} in the model")
    return None


def load_weights(model: torch.nn.Module, ckpt: dict[str, Any], path: str, arch: str) -> None:
    """Load a checkpoint's weights, with an error that says which architecture it belongs to."""
    made_for = None if is_bare_state_dict(ckpt) else ckpt.get("arch")
    if made_for is not None and made_for != arch:
        raise CheckpointError(f"{path} is a checkpoint of {made_for}, not {arch}; pass -a {made_for} or the "
                              f"checkpoint of a {arch}")
    sd = model_state(ckpt, path)
    why = state_mismatch(model, sd, arch)
    if why:
        raise CheckpointError(f"{path} {why}: it is a checkpoint of another architecture, class count or input "
                              "size")
    model.load_state_dict(sd)
