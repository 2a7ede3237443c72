"""Ctrl-C and SIGTERM (docs/reliability.md, "Killed jobs"): `train` saves a resumable checkpoint at the next
step boundary and says how to resume (every DDP rank stopping after the same step); a second signal stops
at once; `generate` says how to resume after either signal. Real processes, real signals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fkd_dali.interrupt import GracefulStop, Interrupted
from tests.conftest import current_device, free_port, pythonpath
from tests.test_generate import _cli, _done_rows, _env, world  # noqa: F401 - module fixture
from tests.test_generate import config as gen_config
from fkd_dali.generate import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = current_device()


def _train_cmd(w, store, out, *extra):
    return [sys.executable, "-m", "fkd_dali", "train", w["data"], "--softlabel-path", store, "-a", "resnet18",
            "--num-crops", "2", "-b", "8", "--epochs", "6", "--input-size", "32", "--lr", "0.05", "--cos",
            "--device", DEVICE, "--output", out, "-q", *extra]


def _sigint_as_on_a_terminal() -> None:
    """A child's SIGINT as a terminal gives it: a shell starts background jobs (``make test &``) with SIGINT
    ignored, and Python then keeps ignoring it, so the signal these tests send would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _log(path):
    return [json.loads(x) for x in open(path)]


def _log_lines(path) -> int:
    return path.exists() and len(path.read_text().splitlines())


@pytest.fixture(scope="module")
def store(world, tmp_path_factory):  # noqa: F811
    path = str(tmp_path_factory.mktemp("interrupts") / "s")
    generate(gen_config(world, path, num_crops=8, top_k=5))
    return path


@pytest.fixture(scope="module")
def uninterrupted(world, store, tmp_path_factory):  # noqa: F811
    """The run the interrupted ones are compared with (the same for every signal)."""
    out = tmp_path_factory.mktemp("interrupts") / "a"
    full = subprocess.run(_train_cmd(world, store, str(out)), env=_train_env(), capture_output=True, text=True,
                          timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    return out


def _train_env() -> dict:
    return dict(os.environ, PYTHONPATH=pythonpath(), OMP_NUM_THREADS="1")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_train_saves_a_checkpoint_that_resumes_exactly(world, store, uninterrupted, tmp_path,  # noqa: F811
                                                                      sig):
    env = _train_env()
    out = tmp_path / "b"
    p = subprocess.Popen(_train_cmd(world, store, str(out)), env=env, preexec_fn=_sigint_as_on_a_terminal,
                         stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not _log_lines(out / "log.jsonl"):
        time.sleep(0.02)  # until the first segment is done: the signal lands inside the second
    assert p.poll() is None, "training ended before it could be signalled"
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, stderr[-2000:]
    last = out / "checkpoint.pth.tar"
    assert f"stopped by {signal.Signals(sig).name} after step" in stdout and f"--resume {last}" in stdout, stdout
    assert "Traceback" not in stderr
    stopped_at = torch.load(last, weights_only=True)
    assert 0 < stopped_at["batch"]  # inside a segment, not at its end: the loss so far travels in the checkpoint
    again = subprocess.run(_train_cmd(world, store, str(out), "--resume", str(last)), env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    a = torch.load(uninterrupted / "checkpoint.pth.tar", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] > stopped_at["global_step"]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    la, lb = _log(uninterrupted / "log.jsonl"), _log(out / "log.jsonl")
    assert [x["train_loss"] for x in la] == [x["train_loss"] for x in lb]  # a resumed segment's loss is whole
    assert [x["steps"] for x in la] == [x["steps"] for x in lb]
    assert [x.get("resumed_at_step") for x in lb].count(stopped_at["batch"]) == 1


@pytest.mark.slow
def test_sigterm_to_one_ddp_rank_stops_every_rank_after_the_same_step(world, store, tmp_path):  # noqa: F811
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath(), FKD_TEST_DIE_RANK="1", FKD_TEST_DIE_STEP="2",
               FKD_TEST_SIGNAL="TERM")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), os.path.join(ROOT, "tests", "ddp_train_worker.py"), world["data"], store,
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.load(open(tmp_path / f"rank{k}.result.json")) for k in (0, 1)]
    assert results[0] == results[1] == {"global_step": 3, "interrupted": "SIGTERM"}  # rank 0 got no signal
    seen = [json.load(open(tmp_path / f"rank{k}.json")) for k in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 3
    ck = torch.load(tmp_path / "run" / "checkpoint.pth.tar", weights_only=True)
    assert ck["global_step"] == 3 and len(ck["rng"]) == 2 and len(ck["partial"]) == 2
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def test_a_second_signal_stops_at_once_and_a_repeat_within_a_second_does_not():
    before = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN when the suite runs as a background job
    with GracefulStop(distributed=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() and stop.name == "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun forwards the terminal's Ctrl-C: the same request
        assert stop.requested()
        time.sleep(1.1)
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_generate_stopped_by_a_signal_says_how_to_resume(world, tmp_path, sig):  # noqa: F811
    save = str(tmp_path / "s")
    cmd = _cli(world, save)
    cmd[cmd.index("--num-crops") + 1] = "2048"
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_sigint_as_on_a_terminal)
    t0 = time.monotonic()
    while _done_rows(save) == 0 and time.monotonic() - t0 < 120 and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + sig
    assert (f"fkd-dali generate: stopped by {signal.Signals(sig).name}; finished shards are kept: rerun the same "
            "command to resume") in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
