"""Objectives as plug-ins: an objective written outside the package (here, in this file) and registered trains
through the command line, logs its own values, checkpoints its own state and resumes exactly, with no edit to
the training loop; the registry's names and refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fkd_dali import checkpoint, objectives
from fkd_dali.cli import main
from fkd_dali.objectives.base import Loss, mixed
from fkd_dali.objectives.fkd import StoredSoftLabels
from fkd_dali.soft_labels import soft_cross_entropy
from fkd_dali.train import TrainConfig, TrainError, Trainer
from tests.conftest import current_device

DEVICE = current_device()
NAME = "learned-temperature"


class LearnedTemperature(StoredSoftLabels):
    """FKD's stored crops and soft labels (its loader and targets, inherited), the student's logits divided by a
    temperature that is learnt with the student: one parameter of the objective's own, with its own optimizer
    (Adam), logged, checkpointed and restored."""

    metrics = ("temperature",)

    def setup(self, run) -> None:
        super().setup(run)
        self.log_t = torch.zeros((), device=run.torch_device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.log_t], lr=0.05)

    def loss(self, run, logits, targets, mix):
        t = self.log_t.exp()
        return Loss(soft_cross_entropy(logits / t, mixed(targets, mix)), metrics={"temperature": t.detach()})

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()

    def state_dict(self):
        return {**super().state_dict(),
                "learned_temperature": {"log_t": self.log_t.detach().clone(), "optimizer": self.optimizer.state_dict()}}

    def load_state_dict(self, ckpt, path) -> None:
        super().load_state_dict(ckpt, path)
        with torch.no_grad():
            self.log_t.copy_(ckpt["learned_temperature"]["log_t"])
        self.optimizer.load_state_dict(ckpt["learned_temperature"]["optimizer"])

    def describe(self, record) -> str:
        return f" (temperature {record['train_temperature']:.3f})"


@pytest.fixture
def registered():
    objectives.register(NAME, LearnedTemperature, help="hard labels with a learned temperature")
    yield
    objectives.unregister(NAME)


# a tiny dataset (3 classes x 4 images) and its label store (6 crops per image, top-2), read only
DATA, STORE = (os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "resume", x)
               for x in ("data", "store"))


def _argv(out, *extra):
    return ["train", DATA, "--labels", NAME, "--softlabel-path", STORE, "--soft-label-type", "marginal_smoothing_k2",
            "-a", "tiny_cnn", "--input-size", "32", "-b", "8", "--num-crops", "2", "--epochs", "5", "--lr", "0.05",
            "--cos", "--device", DEVICE, "--output", out, "-q", "--mixup-cutmix", "--seed", "2", *extra]


def test_a_registered_objective_trains_logs_checkpoints_and_resumes_exactly(registered, tmp_path, capsys):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(_argv(full)) == 0
    printed = capsys.readouterr().out
    assert "(temperature " in printed and f"({NAME} labels)" in printed
    with open(os.path.join(full, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 3 and all(r["train_temperature"] > 0 for r in records)  # a pass of 2 epochs, then 1, 1
    assert len({r["train_temperature"] for r in records}) == 3  # it is learnt: it moves from segment to segment
    a = checkpoint.load(os.path.join(full, "checkpoint.pth.tar"))
    assert a["config"]["labels"] == NAME and a["learned_temperature"]["log_t"] != 0

    assert main(_argv(part, "--max-steps", "4")) == 0  # inside the second segment (3 steps, then 2, 2)
    stopped = checkpoint.load(os.path.join(part, "checkpoint.pth.tar"))
    assert stopped["global_step"] == 4 and stopped["batch"] == 1
    assert main(_argv(part, "--resume", os.path.join(part, "checkpoint.pth.tar"))) == 0
    b = checkpoint.load(os.path.join(part, "checkpoint.pth.tar"))
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert torch.equal(a["learned_temperature"]["log_t"], b["learned_temperature"]["log_t"])
    with open(os.path.join(part, "log.jsonl")) as f:
        resumed = [json.loads(line) for line in f]
    same = ("train_loss", "train_top1", "train_temperature", "val_top1")
    assert [[r[k] for k in same] for r in resumed] == [[r[k] for k in same] for r in records]


def test_unknown_and_misplaced_names_are_refused(image_folder, tmp_path):
    base = dict(data=image_folder, arch="tiny_cnn", input_size=32, device=DEVICE, output=str(tmp_path / "run"))
    with pytest.raises(TrainError, match=r"--labels must be one of fkd, hard, online, ssl, ssl-online, moco, relabel, relabel-mse, got 'nope'"):
        Trainer(TrainConfig(labels="nope", **base))
    with pytest.raises(TrainError, match=r"--labels must be one of .* got 'meal-v2'"):  # chosen by its own option
        Trainer(TrainConfig(labels="meal-v2", **base))
    with pytest.raises(ValueError, match="built in"):
        objectives.register("fkd", LearnedTemperature)
    assert list(objectives.label_choices()) == ["fkd", "hard", "online", "ssl", "ssl-online", "moco", "relabel", "relabel-mse"]
    with pytest.raises(SystemExit):  # the command line offers the registered names only
        main(["train", DATA, "--labels", NAME])


def test_objective_names_reach_the_command_line_without_torch():
    """The CLI lists the objectives before it starts the dataset scan, i.e. before torch is imported."""
    import subprocess
    import sys
    code = ("import sys; from fkd_dali import objectives; from fkd_dali.options import train_parser; "
            "p = train_parser(); assert 'torch' not in sys.modules, 'torch imported'; "
            "print(','.join(objectives.label_choices()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fkd,hard,online,ssl,ssl-online,moco,relabel,relabel-mse"

