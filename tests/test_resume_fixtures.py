"""Checkpoints written by earlier code resume exactly: tests/fixtures/resume/ holds, for each way a student learns
(FKD soft labels with Mixup/CutMix and EMA, Fast MEAL V2's discriminator, a ViT with AdamW and warm-up, hard
labels, online KD), the checkpoint that a run stopped by --max-steps left after 4 steps, written by the training
code before the objectives were split out of the Trainer (MANIFEST.json names the commit), and what that code
got by resuming it to the end of the plan. Each is resumed with today's code and compared bit for bit (weights,
EMA, discriminator; the log records) with what the earlier code got, and, where the stored crops make a resume
exact, with an uninterrupted run of today's code (optimizer states too).

The hard-label and online-KD baselines draw their crops from DALI's random operators, whose state the checkpoints
of that code do not hold (today's keep it, ``loader_state``: tests/test_train.py checks those resume exactly): from
these fixtures a resumed baseline goes on with fresh random crops, so for those two only the first comparison
applies. CPU only: the fixtures are CPU float32 runs."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fkd_dali import checkpoint
from fkd_dali.train import train
from tests.conftest import current_device
from tests.fixtures.make_resume_fixtures import FINAL_PARTS, RUNS, THREADS, run_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "resume")
RANDOM_CROPS = {"hard", "online"}  # DALI's random crops: not in the checkpoints of the code that wrote these
NEW_ENTRIES = {"loader_state"}  # what today's checkpoints hold beyond those of the code that wrote these
TIMING = ("seconds", "crops_per_s", "resumed_at_step")

pytestmark = pytest.mark.skipif(current_device() != "cpu", reason="the fixtures are CPU runs, compared bit for bit")


@pytest.fixture
def one_thread():
    """The fixtures were written with one intra-op thread: sums split the same way here."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _tensors(obj, prefix=""):
    """Every tensor of a nested state (state_dicts, optimizer states), by a path name."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _records(folder: str, name: str = "log.jsonl") -> list[dict]:
    with open(os.path.join(folder, name)) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _assert_equal(a: dict, b: dict, what: str, parts=FINAL_PARTS) -> None:
    for part in parts:
        assert (a.get(part) is None) == (b.get(part) is None), part
        if a.get(part) is None:
            continue
        ta, tb = dict(_tensors(a[part])), dict(_tensors(b[part]))
        assert ta.keys() == tb.keys(), part
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{part}{k} differs from {what}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_an_old_checkpoint_resumes_exactly(name, tmp_path, one_thread):
    old = os.path.join(FIXTURES, name, "checkpoint.pth.tar")
    stopped = checkpoint.load(old)
    assert stopped["global_step"] == 4 and stopped["batch"] > 0  # inside a segment: its partial sums are carried
    resumed = train(run_config(FIXTURES, name, str(tmp_path / "resumed"), resume=old))
    b = checkpoint.load(str(tmp_path / "resumed" / "checkpoint.pth.tar"))
    # the same entries, but for those an objective never uses (the earlier code wrote "discriminator": None ...)
    assert set(b) - NEW_ENTRIES <= set(stopped) and {k for k, v in stopped.items() if v is not None} <= set(b), \
        "the checkpoint's keys changed"
    _assert_equal(torch.load(os.path.join(FIXTURES, name, "resumed_final.pt"), weights_only=True), b,
                  "what the earlier code got by resuming this checkpoint")
    assert _records(str(tmp_path / "resumed")) == _records(os.path.join(FIXTURES, name), "resumed_log.jsonl")
    if name in RANDOM_CROPS:
        return
    full = train(run_config(FIXTURES, name, str(tmp_path / "full")))
    assert resumed["global_step"] == full["global_step"] > 4
    a = checkpoint.load(str(tmp_path / "full" / "checkpoint.pth.tar"))
    _assert_equal(a, b, "an uninterrupted run", FINAL_PARTS + ("optimizer", "d_optimizer"))
    assert _records(str(tmp_path / "resumed")) == _records(str(tmp_path / "full"))
    assert resumed["best_top1"] == full["best_top1"]
