"""`fkd-dali linear-eval CHECKPOINT DATA`: MoCo's linear probe (frozen backbone in eval mode, a new classifier) on
the DALI loaders through the training loop, and the weighted-kNN monitor on the frozen features."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from fkd_dali.backbone import BackboneError, read_backbone
from fkd_dali.cli import main
from fkd_dali.dataset import scan_image_folder
from fkd_dali.linear_eval import LinearEvalConfig, LinearEvalError, knn_votes, linear_eval, probe_config
from fkd_dali.models import create_model
from fkd_dali.synthetic import write_dataset
from fkd_dali.train import TrainConfig, TrainError, train
from pipelines import EvalLoader
from tests.conftest import assert_same_weights, current_device, free_port, pythonpath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = current_device()
SIZE = 32
HEAD = "11"  # tiny_cnn's classifier (its last Linear)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """4 classes of objects on clutter (24 training, 8 validation images each, 40 px), a tiny_cnn trained on their
    labels, and a tiny_cnn with random weights saved in FKD's checkpoint form (arch + state_dict)."""
    root = tmp_path_factory.mktemp("linear_eval")
    data = str(root / "data")
    write_dataset(data, flavour="objects", classes=4, per_class=24, val_per_class=8, size=40, distractors=0)
    trained = str(root / "trained")
    train(TrainConfig(data=data, arch="tiny_cnn", labels="hard", epochs=12, batch_size=32, lr=0.2, cos=True,
                      input_size=SIZE, device=DEVICE, output=trained, show_progress=False, scale=(0.35, 1.0)))
    torch.manual_seed(5)
    random = str(root / "random.pth.tar")
    torch.save({"arch": "tiny_cnn", "state_dict": create_model("tiny_cnn", 4).state_dict()}, random)
    return {"root": root, "data": data, "trained": os.path.join(trained, "checkpoint.pth.tar"), "random": random}


def probe(world, out, checkpoint=None, **options) -> dict:
    options = dict(dict(epochs=3, lr=0.5, batch_size=32, input_size=SIZE, device=DEVICE, output=str(out),
                        show_progress=False), **options)
    knn = options.pop("knn", 0)
    return linear_eval(LinearEvalConfig(checkpoint or world["trained"], world["data"], knn=knn, options=options))


def _state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_the_recipe_is_mocos_linear_evaluation(world):
    cfg = probe_config(LinearEvalConfig(world["trained"], world["data"]), read_backbone(world["trained"])).resolved()
    assert (cfg.labels, cfg.opt, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs, cfg.cos, tuple(cfg.schedule),
            cfg.batch_size, cfg.freeze_backbone, cfg.scale) == \
        ("hard", "sgd", 30.0, 0.9, 0.0, 100, False, (60, 80), 256, True, (0.08, 1.0))
    assert cfg.output == os.path.join("runs", "tiny_cnn-linear-eval")


def test_the_probe_changes_only_the_classifier_and_keeps_batchnorm_statistics(world, tmp_path):
    """MoCo's sanity check: every backbone weight and BatchNorm statistic is bit for bit the checkpoint's (a
    BatchNorm in train mode would update its running statistics without any gradient); the classifier learnt."""
    rep = probe(world, tmp_path / "run")
    assert rep["backbone_unchanged"] and rep["probe"]["global_step"] == 3 * 3  # 96 images / 32 per step
    before, after = _state(world["trained"]), _state(tmp_path / "run" / "checkpoint.pth.tar")
    assert before.keys() == after.keys()
    for k in before:
        if k.startswith(HEAD + "."):
            assert not torch.equal(before[k], after[k]), k  # a new classifier, then trained
        else:
            assert torch.equal(before[k], after[k]), k
    assert any("running_mean" in k for k in before)
    ck = torch.load(tmp_path / "run" / "checkpoint.pth.tar", weights_only=True)
    assert ck["config"]["freeze_backbone"] and ck["config"]["init_backbone_from"] == world["trained"]
    assert len(ck["optimizer"]["state"]) == 2  # the optimizer holds the classifier's weight and bias only


@pytest.mark.slow  # two probes of 8 epochs
def test_a_trained_backbone_probes_far_better_than_a_random_one(world, tmp_path):
    trained = probe(world, tmp_path / "t", epochs=8)["probe"]["last"]["val_top1"]
    random = probe(world, tmp_path / "r", checkpoint=world["random"], epochs=8)["probe"]["last"]["val_top1"]
    assert trained >= 80 and trained >= random + 20, (trained, random)


def _features(checkpoint: str, split: str, data: str):
    """The frozen features of ``split``'s centre crops, computed here: the checkpoint's model without its classifier,
    one process, the validation view."""
    model = create_model("tiny_cnn", 4)
    model.load_state_dict(_state(checkpoint))
    model[int(HEAD)] = nn.Identity()
    model.eval()
    ds = scan_image_folder(os.path.join(data, split))
    feats, labels = [], []
    with torch.no_grad():
        for batch in EvalLoader(ds.root, ds.files, ds.targets, batch_size=16, crop_size=SIZE, device=DEVICE):
            feats.append(model(batch["images"].cpu()).numpy())
            labels.append(batch["targets"].cpu().numpy())
    f = np.concatenate(feats).astype(np.float64)
    return f / np.linalg.norm(f, axis=1, keepdims=True), np.concatenate(labels)


def _brute_force_votes(train_f, train_l, val_f, k: int, t: float) -> np.ndarray:
    votes = np.zeros((len(val_f), 4))
    for q in range(len(val_f)):
        sims = train_f @ val_f[q]
        for j in np.argsort(-sims)[:k]:
            votes[q, train_l[j]] += np.exp(sims[j] / t)
    return votes


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("network", ["trained", "random"])
def test_knn_equals_a_brute_force_computation_on_the_same_features(world, tmp_path, k, network):
    rep = probe(world, tmp_path / "knn", checkpoint=world[network], epochs=0, knn=k)
    assert "probe" not in rep and not os.path.exists(tmp_path / "knn" / "checkpoint.pth.tar")  # no probe trained
    got = rep["knn"]
    train_f, train_l = _features(world[network], "train", world["data"])
    val_f, val_l = _features(world[network], "val", world["data"])
    votes = _brute_force_votes(train_f, train_l, val_f, k, 0.07)
    top1 = 100 * float(np.mean(votes.argmax(1) == val_l))
    assert got["top1"] == pytest.approx(top1, abs=1e-9), (got, top1)
    assert (got["k"], got["train_images"], got["val_images"], got["feature_dim"]) == (k, 96, 32, 64)
    assert json.load(open(tmp_path / "knn" / "knn.json"))["top1"] == got["top1"]
    # the votes themselves (the weights exp(cosine / 0.07) of the k nearest), on these features
    mine = knn_votes(torch.tensor(train_f, dtype=torch.float32), torch.tensor(train_l),
                     torch.tensor(val_f, dtype=torch.float32), k, 0.07, 4)
    assert np.allclose(mine.numpy(), votes, rtol=1e-4, atol=0), np.abs(mine.numpy() - votes).max()


def test_an_interrupted_probe_resumes_exactly(world, tmp_path):
    """Stopped inside an epoch (--max-steps) and resumed: the weights and validation of an uninterrupted probe, bit
    for bit on the CPU (the random crops' state travels in the checkpoint)."""
    probe(world, tmp_path / "a")
    first = probe(world, tmp_path / "b", max_steps=4)["probe"]
    assert first["stopped_early"] and first["global_step"] == 4
    probe(world, tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint.pth.tar"))
    assert_same_weights(_state(tmp_path / "a" / "checkpoint.pth.tar"), _state(tmp_path / "b" / "checkpoint.pth.tar"))
    if DEVICE == "cpu":
        logs = [[json.loads(x)["val_top1"] for x in open(tmp_path / r / "log.jsonl")] for r in "ab"]
        assert logs[0] == logs[1] and len(logs[0]) == 3
    with pytest.raises(TrainError, match="other settings .*init_backbone_from"):  # another network: refused
        probe(world, tmp_path / "b", checkpoint=world["random"], resume=str(tmp_path / "b" / "checkpoint.pth.tar"))


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main(["linear-eval", *argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_command_reports_the_knn_and_the_probe(world, tmp_path, capsys):
    code, out = _cli(capsys, world["trained"], world["data"], "--knn", "3", "--epochs", "1", "--lr", "0.5", "-b", "32",
                     "--input-size", str(SIZE), "--device", DEVICE, "--output", str(tmp_path / "run"), "-q")
    assert code == 0, out
    assert "kNN (k=3, T=0.07) of " in out and "(32 images) against " in out and "(96 images, 64-d features" in out
    last = json.loads(open(tmp_path / "run" / "log.jsonl").readlines()[-1])
    assert (f"linear probe of {world['trained']} (a tiny_cnn trained by `fkd-dali train --labels hard`): top-1 "
            f"{last['val_top1']:.2f}%  top-5 {last['val_top5']:.2f}%") in out
    assert "the frozen backbone is bit for bit the checkpoint's" in out and "Traceback" not in out


def test_an_output_folder_of_another_run_is_refused_before_the_knn_is_written(world, tmp_path):
    probe(world, tmp_path / "run", epochs=1)
    kept = {f: open(tmp_path / "run" / f, "rb").read() for f in ("checkpoint.pth.tar", "log.jsonl")}
    with pytest.raises(TrainError, match="holds a checkpoint of tiny_cnn .* from another run"):
        probe(world, tmp_path / "run", checkpoint=world["random"], epochs=1, knn=3)
    assert kept == {f: open(tmp_path / "run" / f, "rb").read() for f in kept}
    assert not os.path.exists(tmp_path / "run" / "knn.json")
    probe(world, tmp_path / "other", epochs=1, knn=3)  # a folder with a kNN result too: refused before the kNN runs
    kept = {f: open(tmp_path / "other" / f, "rb").read() for f in ("knn.json", "checkpoint.pth.tar", "log.jsonl")}
    with pytest.raises(LinearEvalError, match="knn.json already holds the kNN result of another linear-eval"):
        probe(world, tmp_path / "other", checkpoint=world["random"], epochs=1, knn=3)
    assert kept == {f: open(tmp_path / "other" / f, "rb").read() for f in kept}


def test_a_knn_result_in_the_output_folder_is_replaced_only_with_overwrite(world, tmp_path):
    """`--knn K --epochs 0` (no checkpoint, no log: the training run's folder claim sees nothing) into a folder that
    holds a knn.json: refused before anything is computed, naming the file and --overwrite; replaced with it."""
    probe(world, tmp_path / "run", epochs=0, knn=3)
    knn = tmp_path / "run" / "knn.json"
    kept = knn.read_bytes()
    for epochs in (0, 1):
        with pytest.raises(LinearEvalError, match=f"{knn} already holds the kNN result of another linear-eval "
                                                  r"\(k=3, .*\); pass --overwrite to replace it"):
            probe(world, tmp_path / "run", checkpoint=world["random"], epochs=epochs, knn=5)
        assert knn.read_bytes() == kept and sorted(os.listdir(tmp_path / "run")) == ["knn.json"]
    rep = probe(world, tmp_path / "run", checkpoint=world["random"], epochs=0, knn=5, overwrite=True)
    assert json.loads(knn.read_text()) == {"checkpoint": world["random"], **rep["knn"]} and rep["knn"]["k"] == 5


def test_a_checkpoint_without_a_backbone_or_of_an_unknown_layout_or_arch_is_refused(world, tmp_path, capsys):
    head_only = str(tmp_path / "head_only.pth.tar")
    full = _state(world["trained"])
    torch.save({"arch": "tiny_cnn", "state_dict": {k: v for k, v in full.items() if k.startswith(HEAD + ".")},
                "config": {"labels": "hard"}}, head_only)
    code, out = _cli(capsys, head_only, world["data"], "--output", str(tmp_path / "o1"))
    assert code == 1 and "holds no backbone: its 2 weights are 11.* (2), all of them the tiny_cnn's classifier" in out
    assert "Traceback" not in out

    unknown = str(tmp_path / "byol.pth.tar")
    torch.save({"online_network": {"w": torch.zeros(2)}, "step": 3}, unknown)
    code, out = _cli(capsys, unknown, world["data"], "--output", str(tmp_path / "o2"))
    assert code == 1 and "is neither a checkpoint of `fkd-dali train`" in out and "online_network" in out
    assert "Known layouts: MoCo v1/v2" in out or "known layouts: MoCo v1/v2" in out

    code, out = _cli(capsys, world["trained"], world["data"], "-a", "resnet18", "--output", str(tmp_path / "o3"))
    assert code == 1 and "holds the backbone of a tiny_cnn, not of a resnet18" in out

    code, out = _cli(capsys, str(tmp_path / "nothing.pth.tar"), world["data"])
    assert code == 1 and "nothing.pth.tar does not exist" in out

    vit = str(tmp_path / "tiny_vit.pth.tar")  # position embeddings for 32-px images, probed at 64 px
    torch.save({"arch": "tiny_vit", "state_dict": create_model("tiny_vit", 4, 32).state_dict(),
                "config": {"labels": "hard", "input_size": 32}}, vit)
    with pytest.raises(BackboneError, match="does not fit a tiny_vit at this input size: give --input-size 32"):
        probe(world, tmp_path / "o5", checkpoint=vit, input_size=64)

    with pytest.raises(LinearEvalError, match="--epochs 0 without --knn K does nothing"):
        probe(world, tmp_path / "o4", epochs=0)
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o2")  # nothing written


def _ssl_student(world, tmp_path) -> tuple[str, dict]:
    """A checkpoint laid out as a `--labels ssl` student's: the trained backbone, its classifier replaced by an MLP
    projection head to 16 dimensions (keys HEAD.0, HEAD.2), the objective recorded in its config."""
    full = _state(world["trained"])
    ssl = {k: v for k, v in full.items() if not k.startswith(HEAD + ".")}
    ssl |= {f"{HEAD}.0.weight": torch.randn(64, 64), f"{HEAD}.0.bias": torch.zeros(64),
            f"{HEAD}.2.weight": torch.randn(16, 64), f"{HEAD}.2.bias": torch.zeros(16)}
    path = str(tmp_path / "ssl_student.pth.tar")
    torch.save({"arch": "tiny_cnn", "num_classes": 16, "state_dict": ssl, "config": {"labels": "ssl"}}, path)
    return path, ssl


def test_an_ssl_student_checkpoint_probes_its_backbone_without_its_projection_head(world, tmp_path):
    """A student whose classifier was replaced by an MLP projection head (the self-supervised objective's):
    the head is dropped, the rest is the backbone."""
    path, ssl = _ssl_student(world, tmp_path)
    found = read_backbone(path)
    assert found.source == "a tiny_cnn trained by `fkd-dali train --labels ssl`" and "11.* (4)" in found.dropped[0]
    rep = probe(world, tmp_path / "run", checkpoint=path, epochs=1)
    assert rep["backbone_unchanged"]
    after = _state(tmp_path / "run" / "checkpoint.pth.tar")
    assert all(torch.equal(after[k], v) for k, v in ssl.items() if not k.startswith(HEAD + "."))
    assert after[HEAD + ".weight"].shape == (4, 64)


def test_evaluating_an_ssl_student_with_train_e_points_to_linear_eval(world, tmp_path, capsys):
    """`train -e --resume CKPT` on a `--labels ssl` student (its head outputs embeddings): the objective recorded in
    the checkpoint says there is no classifier, and the message gives the linear-eval command; a classifier's
    checkpoint still evaluates."""
    path, _ = _ssl_student(world, tmp_path)
    argv = ["train", world["data"], "-a", "tiny_cnn", "--input-size", str(SIZE), "--device", DEVICE, "-e"]
    assert main(argv + ["--resume", path]) == 1
    out = capsys.readouterr()
    text = out.out + out.err
    assert f"fkd-dali linear-eval {path} {world['data']}" in text and "--labels ssl" in text, text
    assert "no classifier" in text and "does not fit" not in text and "Traceback" not in text
    assert main(argv + ["--resume", world["trained"]]) == 0
    assert "top-1" in capsys.readouterr().out


def _moco_v2(path: str) -> nn.Module:
    """facebookresearch/moco main_moco.py's checkpoint with --mlp (MoCo v2) of a ResNet-18: the query encoder's
    ResNet (fc = Linear, ReLU, Linear), a key encoder of other weights, the queue."""
    import torchvision
    torch.manual_seed(3)
    q = torchvision.models.resnet18()
    q.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    for m in q.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {f"module.encoder_q.{k}": v for k, v in q.state_dict().items()}
    state |= {f"module.encoder_k.{k}": v + 0.5 if v.is_floating_point() else v for k, v in q.state_dict().items()}
    state |= {"module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 800, "arch": "resnet18", "state_dict": state, "optimizer": {}}, path)
    return q


def test_a_moco_v2_checkpoints_backbone_is_its_query_encoder_up_to_fc(tmp_path):
    path = str(tmp_path / "moco_v2_800ep_pretrain.pth.tar")
    q = _moco_v2(path)
    found = read_backbone(path)
    assert found.arch == "resnet18" and "moco_v2" in found.source
    assert "encoder_k.*" in " ".join(found.dropped) and "queue" in " ".join(found.dropped)
    assert sorted(found.state) == sorted(k for k in q.state_dict() if not k.startswith("fc."))
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in found.state.items())
    with pytest.raises(BackboneError, match="holds the backbone of a resnet18, not of a resnet50"):
        read_backbone(path, "resnet50")
    plain = str(tmp_path / "resnet18.pth")  # a torchvision state_dict, named ARCH:PATH
    torch.save(q.state_dict(), plain)
    found = read_backbone("resnet18:" + plain)
    assert found.arch == "resnet18" and all(torch.equal(v, q.state_dict()[k]) for k, v in found.state.items())
    assert sorted(found.state) == sorted(k for k in q.state_dict() if not k.startswith("fc."))


@pytest.mark.slow
def test_ddp_two_gloo_ranks_probe_and_gather_the_knn(world, tmp_path):
    """torchrun with 2 CPU ranks: each extracts its share of the features; the kNN equals one process's, the probe
    trains in DDP and the backbone stays the checkpoint's."""
    single = probe(world, tmp_path / "one", epochs=0, knn=5)["knn"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath())
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "fkd_dali", "linear-eval", world["trained"], world["data"], "--knn",
                        "5", "--epochs", "2", "--lr", "0.5", "-b", "32", "--input-size", str(SIZE), "--device", DEVICE,
                        "--output", str(tmp_path / "two"), "-q", "--dist-backend", "gloo"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    knn = json.load(open(tmp_path / "two" / "knn.json"))
    assert (knn["top1"], knn["top5"], knn["val_images"]) == (single["top1"], single["top5"], 32)
    assert "the frozen backbone is bit for bit the checkpoint's" in r.stdout
    before, after = _state(world["trained"]), _state(tmp_path / "two" / "checkpoint.pth.tar")
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(HEAD + "."))


@pytest.mark.slow  # a ResNet-18 probed for an epoch
def test_a_moco_v2_checkpoint_probes_its_query_encoder(world, tmp_path):
    path = str(tmp_path / "moco_v2_800ep_pretrain.pth.tar")
    q = _moco_v2(path)
    rep = probe(world, tmp_path / "run", checkpoint=path, epochs=1, knn=5, lr=1.0)
    assert rep["backbone_unchanged"] and rep["arch"] == "resnet18" and rep["knn"]["feature_dim"] == 512
    after = _state(tmp_path / "run" / "checkpoint.pth.tar")
    for k, v in q.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(after[k], v), k
    assert after["fc.weight"].shape == (4, 512)
