"""Runs that would "succeed" while producing nothing (docs/reliability.md): a loss that is not finite stops
training, naming the step and the options to look at, and leaves the last good checkpoint; a checkpoint write
that fails (a full disk) says why, removes its partial file and keeps the previous checkpoint."""

import os
import re
import subprocess
import sys

import pytest
import torch

from fkd_dali import checkpoint
from fkd_dali.train import TrainError, train
from tests.conftest import pythonpath
from tests.test_train import cfg, setup  # noqa: F401 - module fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_temperature_of_zero_stops_at_its_first_step_without_a_checkpoint(setup, tmp_path):  # noqa: F811
    """--temp 0 (refused on the command line; here through the API): every loss is nan. The run stops at step 1
    instead of training 6 epochs of nan and saving them."""
    c = cfg(setup, tmp_path, temperature=0.0)
    with pytest.raises(TrainError) as stopped:  # a run of nan losses must not finish
        train(c)
    why = str(stopped.value)
    assert "the training loss became nan or inf at step 1 " in why and "--temp 0" in why and "--lr" in why, why
    assert "no checkpoint was written yet" in why, why
    assert not os.path.exists(os.path.join(c.output, checkpoint.LAST))


def test_a_diverging_run_stops_and_leaves_the_last_good_checkpoint(setup, tmp_path):  # noqa: F811
    """lr 1e30 after one step of warm-up at 0.01: the weights blow up within a step or two. With a checkpoint after
    every step, the one left is the step before the first non-finite one, and its weights are finite."""
    c = cfg(setup, tmp_path, lr=1e30, warmup_epochs=2, warmup_lr=0.01, checkpoint_every=1)
    with pytest.raises(TrainError) as stopped:  # a run of nan losses must not finish
        train(c)
    why = str(stopped.value)
    m = re.search(r"became nan or inf at step (\d+) ", why)
    assert m and "--lr 1e+30" in why, why
    last = os.path.join(c.output, checkpoint.LAST)
    ck = checkpoint.load(last)
    assert ck["global_step"] == int(m.group(1)) - 1 >= 1, (ck["global_step"], why)
    assert f"{last} (step {ck['global_step']}), is left as it was" in why, why
    assert _finite(ck["state_dict"]) and not os.path.exists(last + ".tmp")


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
