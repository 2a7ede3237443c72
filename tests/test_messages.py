"""Messages for people (docs/reliability.md, "Messages"): no raw traceback for a wrong path, a read-only folder,
a closed pipe or a refused pickle; no silently abbreviated option; counts and ETAs that mean something."""

import argparse
import os
import signal
import subprocess
import sys

import pytest
import torch

from fkd_dali import checkpoint
from fkd_dali.cli import build_parser, main
from fkd_dali.interrupt import Interrupted
from fkd_dali.train import TrainError, Trainer, train
from tests.conftest import current_device, pythonpath
from tests.test_labelstore import new_store
from tests.test_loader import partial_copy
from tests.test_reliability import _without_root_file_access
from tests.test_train import cfg, setup  # noqa: F401 - module fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = current_device()


def run(*args, read_only: str | None = None):
    """A real `fkd-dali` process; with ``read_only``, that folder is made read-only for it (as root the
    process runs without root's file-access capabilities, as any user would)."""
    if read_only:
        os.chmod(read_only, 0o555)
    try:
        return subprocess.run([sys.executable, "-m", "fkd_dali", *args], cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=pythonpath()), capture_output=True, text=True, timeout=300,
                              preexec_fn=_without_root_file_access if os.geteuid() == 0 else None)
    finally:
        if read_only:
            os.chmod(read_only, 0o755)


def one_line_error(r, command: str, says: str) -> None:
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"fkd-dali {command}: error: " in r.stderr and says in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_wrong_and_read_only_paths_are_one_clear_line(setup, tmp_path):  # noqa: F811
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    gen = ["generate", setup["data"], "-a", "torchscript", "--teacher-path", setup["teacher"], "--input-size", "24",
           "--num-crops", "2", "--device", DEVICE, "-q", "--save-path"]
    one_line_error(run(*gen, str(a_file)), "generate", f"--save-path {a_file} is a file")
    ro = tmp_path / "ro"
    ro.mkdir()
    one_line_error(run(*gen, str(ro / "s"), read_only=str(ro)), "generate", "Permission denied")
    one_line_error(run("train", setup["data"], "--softlabel-path", setup["store"], "-a", "tiny_cnn", "--device", DEVICE,
                       "--output", str(ro / "run"), read_only=str(ro)), "train", "Permission denied")
    one_line_error(run("synth", "--out", str(ro / "d"), "--classes", "2", "--per-class", "1", read_only=str(ro)),
                   "synth", "Permission denied")
    store = str(tmp_path / "store")
    new_store(store)
    one_line_error(run("inspect", store, "--clear-rows", "0:2", read_only=os.path.join(store, "done")), "inspect",
                   "Permission denied")


def test_a_closed_pipe_is_not_an_error(tmp_path):
    store = str(tmp_path / "s")
    new_store(store)
    p = subprocess.Popen([sys.executable, "-m", "fkd_dali", "inspect", store, "--json"], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=pythonpath()), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # as `| head` does once it has what it wants (here: before anything was written)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "BrokenPipeError" not in err and "Traceback" not in err, err


def test_refused_pickles_say_why_and_what_a_trusting_user_can_do(setup, tmp_path, capsys):  # noqa: F811
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = str(tmp_path / "evil.pth.tar")
    torch.save({"state_dict": Evil()}, evil)
    assert main(["train", setup["data"], "-a", "resnet18", "-e", "--resume", evil, "--device", DEVICE]) == 1
    err = capsys.readouterr().err
    assert "refused for safety: it holds code-bearing Python objects (posix.system)" in err, err
    assert "truncated" not in err and "If you trust where it came from" in err
    assert main(["generate", setup["data"], "--save-path", str(tmp_path / "s"), "-a", "resnet18", "--teacher-path",
                 evil, "--device", DEVICE, "-q"]) == 1
    assert "refused for safety" in capsys.readouterr().err


@pytest.mark.parametrize("abbreviated", ["--num-crop", "--epoch", "--softlabel"])
def test_abbreviated_options_are_refused_not_guessed(abbreviated, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "DATA", abbreviated, "2"])
    assert f"unrecognized arguments: {abbreviated}" in capsys.readouterr().err


def test_every_option_says_what_it_does():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("synth", "inspect", "show", "export-fkd", "import-fkd", "linear-eval"):
        bare = [a.dest for a in sub.choices[name]._actions if a.help is None]
        assert not bare, (name, bare)


def test_max_steps_zero_is_refused_and_a_run_without_validation_says_so(setup, tmp_path, capsys):  # noqa: F811
    with pytest.raises(TrainError, match="--max-steps 0: give at least 1 step"):
        Trainer(cfg(setup, tmp_path, max_steps=0))
    assert main(["train", setup["data"], "--softlabel-path", setup["store"], "-a", "tiny_cnn", "--num-crops", "2",
                 "-b", "16", "--epochs", "6", "--input-size", "32", "--device", DEVICE, "--max-steps", "1",
                 "--output", str(tmp_path / "r"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "not validated yet" in out and "nan" not in out, out


def test_train_shows_the_eta_of_the_whole_run(setup, tmp_path, capsys):  # noqa: F811
    train(cfg(setup, tmp_path, epochs=2))
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch")]
    assert len(lines) == 2 and all("run ETA " in x for x in lines), lines
    assert lines[-1].endswith("run ETA 00:00)")  # nothing left after the last segment


@pytest.mark.slow
def test_progress_in_a_log_file_is_plain_lines_at_intervals(setup, tmp_path):  # noqa: F811
    """A batch job's log (stdout and stderr a file, not a terminal): no bar redrawn with carriage returns, one plain
    line per FKD_DALI_PROGRESS_SECONDS at most, plus the line that closes each segment's bar."""
    import json
    import re
    import time
    log, out = tmp_path / "job.log", tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=pythonpath(), FKD_DALI_PROGRESS_SECONDS="0.5")
    t0 = time.monotonic()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "fkd_dali", "train", setup["data"], "--softlabel-path", setup["store"],
                            "-a", "tiny_cnn", "--num-crops", "2", "-b", "16", "--epochs", "6", "--input-size", "32",
                            "--device", DEVICE, "--output", str(out)], cwd=ROOT, env=env, stdout=f, stderr=f,
                           timeout=300)
    seconds = time.monotonic() - t0
    text = log.read_bytes().decode()  # bytes: reading text would turn carriage returns into newlines
    assert r.returncode == 0, text[-2000:]
    assert "\r" not in text and "\x1b" not in text, repr(text[-2000:])
    bars = [x for x in text.splitlines() if re.match(r"epoch \d+(-\d+)?: \d+/\d+ step \(\d+%\) \[", x)]
    segments = len((out / "log.jsonl").read_text().splitlines())
    assert segments <= len(bars) <= segments + seconds / 0.5 + 1, (segments, seconds, bars)
    assert all("loss=" in x for x in bars if "(100%)" in x) and all("step/s" in x or "s/step" in x for x in bars), bars  # tqdm: s/step below 1 step/s
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["epochs"][-1] == 6


def test_allow_incomplete_says_what_it_leaves_out(setup, tmp_path, capsys):  # noqa: F811
    part = partial_copy(setup["store"], str(tmp_path / "part"), done=16)
    Trainer(cfg(setup, tmp_path, softlabel_path=part, allow_incomplete=True))
    out = capsys.readouterr().out
    assert "--allow-incomplete: training on 16 of 30 images" in out and "14 have no labels yet" in out, out
    assert "4 of 10 classes have no labelled image at all (class_6, class_7, class_8, class_9)" in out, out


def test_a_finished_store_and_an_empty_one_say_so(setup, tmp_path, capsys):  # noqa: F811
    args = ["generate", setup["data"], "--save-path", setup["store"], "-a", "torchscript", "--teacher-path",
            setup["teacher"], "--input-size", "32", "--num-crops", "8", "--top-k", "5", "--num-seg", "8", "-b", "4",
            "--device", DEVICE, "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "nothing to label: every shard in" in out and "0 crops/s" not in out, out
    store = str(tmp_path / "empty")
    new_store(store)
    assert main(["inspect", store]) == 0
    out = capsys.readouterr().out
    assert "no crop labelled yet" in out and "B per" not in out, out
    assert "to finish  10 rows have no labels" in out


def test_a_command_stopped_at_once_says_how_to_resume(monkeypatch, capsys, tmp_path):
    """What the CLI prints when a second signal (train) stops a command at once: --resume the checkpoint that
    exists, naming its step, and only when one exists (a second Ctrl-C during the first validation comes before
    any checkpoint was written)."""
    def stopped(cfg, scan=None):
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr("fkd_dali.train.train", stopped)
    out = str(tmp_path / "out")
    args = ["train", "DATA", "-a", "resnet18", "--softlabel-path", "S", "--output", out]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "fkd-dali train: stopped by SIGINT; no checkpoint was written yet" in err and "--resume" not in err, err
    checkpoint.save({"arch": "resnet18", "global_step": 7}, out)
    assert main(args) == 130
    last = os.path.join(out, checkpoint.LAST)
    assert (f"fkd-dali train: stopped by SIGINT; the last checkpoint written is {last} (step 7): rerun the same "
            f"command with --resume {last}" in capsys.readouterr().err)
