"""Runs that would "succeed" while producing nothing (docs/reliability.md): a loss that is not finite stops
training, naming the step and the options to look at, and leaves the last good checkpoint; a checkpoint write
that fails (a full disk) says why, removes its partial file and keeps the previous checkpoint."""

import os
import subprocess
import sys

import torch

from fkd_dali import checkpoint
from tests.conftest import pythonpath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


WRITE_WITH_A_FILE_SIZE_LIMIT = """
import os, resource, signal, sys, torch
from fkd_dali import checkpoint
folder = sys.argv[1]
checkpoint.save({"global_step": 1, "w": torch.zeros(10)}, folder)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the kernel then fails the write with EFBIG instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    checkpoint.save({"global_step": 2, "w": torch.zeros(100_000)}, folder)
except checkpoint.CheckpointError as e:
    print(e)
"""


def test_a_failed_checkpoint_write_says_why_and_keeps_the_previous_checkpoint(tmp_path):
    """A real kernel write failure (RLIMIT_FSIZE: a file may not grow past 4 KiB, as on a full disk it cannot
    grow at all): torch alone says only `enforce fail at inline_container.cc ... unexpected pos`."""
    folder = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-c", WRITE_WITH_A_FILE_SIZE_LIMIT, folder], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=pythonpath()), timeout=120)
    last = os.path.join(folder, checkpoint.LAST)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{last}.tmp: writing the checkpoint failed: File too large." in r.stdout, r.stdout
    assert f"the previous checkpoint, {last} (step 1), is left as it was" in r.stdout, r.stdout
    assert "inline_container" not in r.stdout and f"--resume {last}" in r.stdout, r.stdout
    assert sorted(os.listdir(folder)) == [checkpoint.LAST] and checkpoint.load(last)["global_step"] == 1


def test_a_full_disk_during_a_checkpoint_write_is_named(tmp_path, monkeypatch):
    """ENOSPC itself (no small file system to fill here): the checkpoint file's writes fail once 4 KiB are on
    disk, as the kernel fails them on a full disk."""
    import errno
    import io

    class FillsUp(io.FileIO):
        def write(self, data):
            if self.tell() + len(data) > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    folder = str(tmp_path / "run")
    checkpoint.save({"global_step": 1}, folder)
    real_open = open
    monkeypatch.setattr(checkpoint, "open", lambda p, mode="r": io.BufferedWriter(FillsUp(p, "w"))
                        if p.endswith(".tmp") else real_open(p, mode), raising=False)
    try:
        checkpoint.save({"global_step": 2, "w": torch.zeros(100_000)}, folder, is_best=True)
    except checkpoint.CheckpointError as e:
        why = str(e)
    else:
        raise AssertionError("a write that failed was reported as saved")
    last = os.path.join(folder, checkpoint.LAST)
    assert f"{last}.tmp: writing the checkpoint failed: No space left on device." in why, why
    assert sorted(os.listdir(folder)) == [checkpoint.LAST] and checkpoint.load(last)["global_step"] == 1
