"""Two runs on one place (docs/reliability.md, "Two runs at once"): two `generate` runs on one store, two
`train` runs into one output folder. A live writer is named and the second run refused; a dead one (SIGKILL)
never blocks its rerun; a store never holds labels of two teachers while its metadata names one."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import labelstore
from labelstore.locking import LockedError, create_atomically, store_writer_lock
from fkd_dali.cli import main
from fkd_dali.train import TrainError, train
from tests.conftest import pythonpath
from tests.test_generate import _cli, _done_rows, _env, _same_stores, world  # noqa: F401 - module fixture
from tests.test_labelstore import new_store
from tests.test_train import cfg as train_cfg
from tests.test_train import setup  # noqa: F401 - module fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD = """
import sys, time
from labelstore.locking import store_writer_lock
lock = store_writer_lock(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_the_store_lock_names_its_holder_and_dies_with_it(tmp_path, capsys):
    path = str(tmp_path / "s")
    new_store(path)
    p = subprocess.Popen([sys.executable, "-c", HOLD, path], env=dict(os.environ, PYTHONPATH=pythonpath()),
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"label store {path} is in use by another run \(pid {p.pid} on host"):
            store_writer_lock(path)
        assert main(["inspect", path, "--clear-rows", "0:2"]) == 1  # not under a running writer
        assert f"is in use by another run (pid {p.pid}" in capsys.readouterr().err
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with store_writer_lock(path) as lock:  # the kernel dropped the dead holder's lock
        assert lock.held and lock.still_ours()
        labelstore.open_store(path).verify()  # the lock file is invisible to zarr
        os.rename(path, path + ".moved")  # the store deleted or replaced under a writer: it must notice
        new_store(path)
        assert not lock.still_ours()


def test_a_store_is_created_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "s")

    def failing(tmp):
        new_store(tmp)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        create_atomically(path, failing)
    assert os.listdir(tmp_path) == []  # nothing half-made, not even the staging folder
    assert create_atomically(path, new_store)
    first = labelstore.open_store(path).meta.teachers
    assert not create_atomically(path, lambda tmp: new_store(tmp, n=12))  # a second creator loses, and says so
    assert labelstore.open_store(path).num_images == 10 and labelstore.open_store(path).meta.teachers == first
    assert sorted(os.listdir(tmp_path)) == ["s"]


def _other_teacher(w, save, crops="8"):
    cmd = _cli(w, save)
    cmd[cmd.index("--teacher-path") + 1] = w["teachers"][1]
    cmd[cmd.index("--num-crops") + 1] = crops
    return cmd


def _small(w, save):
    cmd = _cli(w, save)
    cmd[cmd.index("--num-crops") + 1] = "8"
    return cmd


@pytest.mark.slow
def test_two_generate_runs_started_at_once_with_other_teachers(world, tmp_path):  # noqa: F811
    """The issue's case: both runs at once on one --save-path. Exactly one writes the store; the other is
    refused by name (the lock's holder, or the setting that differs); every label comes from the teacher the
    metadata names."""
    save = str(tmp_path / "s")
    runs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for cmd in (_small(world, save), _other_teacher(world, save))]
    outs = [(p.wait(timeout=300), *p.communicate()) for p in runs]
    ok = [i for i, (rc, _, _) in enumerate(outs) if rc == 0]
    assert len(ok) == 1, [o[2][-1500:] for o in outs]
    loser = outs[1 - ok[0]]
    assert "Traceback" not in loser[2]
    assert "is in use by another run (pid" in loser[2] or "was generated with teachers" in loser[2], loser[2][-1500:]
    winner_teacher = world["teachers"][ok[0]]
    store = labelstore.open_store(save)
    assert [t["path"] for t in store.meta.teachers] == [winner_teacher] and store.complete
    ref = str(tmp_path / "ref")
    ref_cmd = (_small if ok[0] == 0 else _other_teacher)(world, ref)
    subprocess.run(ref_cmd, env=_env(), check=True, capture_output=True, timeout=300)
    _same_stores(ref, save)


@pytest.mark.slow
def test_a_second_generate_run_is_refused_while_the_first_writes_and_a_killed_one_blocks_nothing(
        world, tmp_path):  # noqa: F811
    save = str(tmp_path / "s")
    long = _cli(world, save)
    long[long.index("--num-crops") + 1] = "4096"  # ~35 s of work on 2 cores: time for two refusals
    first = subprocess.Popen(long, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while _done_rows(save) == 0 and time.monotonic() - t0 < 120 and first.poll() is None:
            time.sleep(0.05)
        for cmd in (long, _other_teacher(world, save, crops="4096")):  # same settings; another teacher
            r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
            assert first.poll() is None, "the first run ended before the second was refused: make it longer"
            assert r.returncode == 1 and f"is in use by another run (pid {first.pid} on host" in r.stderr, \
                r.stderr[-2000:]
            assert "Traceback" not in r.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with store_writer_lock(save) as lock:  # the killed run's lock died with it (the SIGKILL-resume test in
        assert lock.held                   # test_generate.py reruns generate after each kill)
    r = subprocess.run(_other_teacher(world, save, crops="4096"), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "was generated with teachers" in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- train


def test_train_refuses_an_output_folder_holding_another_run(setup, tmp_path):  # noqa: F811
    first = train(train_cfg(setup, tmp_path, max_steps=2))
    ckpt = tmp_path / "run" / "checkpoint.pth.tar"
    before = ckpt.read_bytes()
    with pytest.raises(TrainError, match=r"run holds a checkpoint of tiny_cnn at step 2 .*--resume .*--overwrite"):
        train(train_cfg(setup, tmp_path, max_steps=3))
    assert ckpt.read_bytes() == before
    resumed = train(train_cfg(setup, tmp_path, max_steps=3, resume=str(ckpt)))
    assert first["global_step"] == 2 and resumed["global_step"] == 3
    fresh = train(train_cfg(setup, tmp_path, max_steps=1, overwrite=True))
    assert fresh["global_step"] == 1 and torch.load(ckpt, weights_only=True)["global_step"] == 1
    assert not (tmp_path / "run" / "log.jsonl").exists() or \
        (tmp_path / "run" / "log.jsonl").read_text() == ""  # the replaced run's log went with it


def test_two_train_runs_into_one_folder_cannot_both_proceed(setup, tmp_path):  # noqa: F811
    out = str(tmp_path / "run")
    os.makedirs(out)
    p = subprocess.Popen([sys.executable, "-c", HOLD.replace("store_writer_lock(sys.argv[1])",
                                                              "acquire(sys.argv[1] + '/train.lock', 'x')")
                          .replace("import store_writer_lock", "import acquire"), out],
                         env=dict(os.environ, PYTHONPATH=pythonpath()), stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(TrainError, match=rf"output folder {out} is in use by another run \(pid {p.pid}"):
            train(train_cfg(setup, tmp_path, max_steps=1))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert train(train_cfg(setup, tmp_path, max_steps=1))["global_step"] == 1  # the holder died: free again
