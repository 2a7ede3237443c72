"""Self-supervised FKD end to end: `generate --ssl-teacher` from a checkpoint in MoCo v2's layout, then `train
--labels ssl` (S2-BNN's head and loss, --recipe s2-bnn) from the embedding store, on tiny real JPEGs with real
DALI CPU pipelines and tiny real models; a negative control (embeddings shuffled across images), exact resume,
the online baseline, DDP, and the refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import labelstore
from fkd_dali import checkpoint
from fkd_dali.cli import main
from fkd_dali.models import create_model
from fkd_dali.schedule import LRSchedule
from fkd_dali.ssl_distill import attach_head, ssl_loss
from pipelines import FKDLoader
from tests.conftest import current_device, make_image_folder

DEVICE = current_device()
D = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """8 images (2 classes), a MoCo v2 checkpoint of the teacher (``module.encoder_q.*`` with an MLP head, plus
    ``encoder_k`` and ``queue``), and its embedding store written by the command line (6 views per image)."""
    root = tmp_path_factory.mktemp("ssl_obj")
    data = str(root / "data")
    make_image_folder(data, classes=2, per_class=4, seed=7, sizes=[(48, 64), (64, 48), (56, 56)])
    make_image_folder(data, classes=2, per_class=2, seed=8, sizes=[(48, 48)], split="val")
    ckpt = _moco_resnet18(str(root / "moco_v2_800ep_pretrain.pth.tar"), data)
    store = str(root / "store")
    assert main(["generate", data, "--ssl-teacher", ckpt, "--input-size", "32", "--num-crops", "6",
                 "--save-path", store, "--device", DEVICE, "--no-amp", "-q"]) == 0
    return {"root": root, "data": data, "ckpt": ckpt, "store": store}


def _moco_resnet18(path: str, data: str) -> str:
    """facebookresearch/moco's checkpoint layout (``main_moco.py --mlp``: ``module.encoder_q.*`` with the MLP head
    ``fc.0``, ``fc.2``; ``encoder_k.*``, ``queue``) around a torchvision ResNet-18, D = 8. A random ResNet's pooled
    features of different images are nearly parallel, so the head is set to spread them: ``fc.0`` standardises
    the features of the training images, ``fc.2`` is random with zero-mean rows (no common direction)."""
    import glob

    import torchvision
    from PIL import Image
    torch.manual_seed(1)
    enc = torchvision.models.resnet18(weights=None).eval()
    enc.fc = nn.Identity()
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x = torch.stack([(torch.from_numpy(np.array(Image.open(f).convert("RGB").resize((32, 32)))).permute(2, 0, 1)
                      / 255 - mean) / std for f in sorted(glob.glob(os.path.join(data, "train", "*", "*.jpg")))])
    with torch.no_grad():
        f = enc(x)
    mu, sd = f.mean(0), f.std(0).clamp(min=1e-3)
    enc.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, D))
    with torch.no_grad():
        enc.fc[0].weight.copy_(torch.diag(1 / sd))
        enc.fc[0].bias.copy_(-mu / sd)
        w = torch.randn(D, 512)
        enc.fc[2].weight.copy_(w - w.mean(1, keepdim=True))
        enc.fc[2].bias.zero_()
    state = {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}
    state |= {f"module.encoder_k.{k}": (v + 0.5 if v.is_floating_point() else v) for k, v in enc.state_dict().items()}
    state |= {"module.queue": nn.functional.normalize(torch.randn(D, 16), dim=0),
              "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 800, "arch": "resnet18", "state_dict": state}, path)
    return path


def _train_argv(world, out, *extra, store=None):
    return ["train", world["data"], "--recipe", "s2-bnn", "--softlabel-path", store or world["store"], "-a",
            "tiny_cnn", "--input-size", "32", "-b", "16", "--num-crops", "2", "--epochs", "8", "--lr", "0.01",
            "--device", DEVICE, "--output", out, "-q", "--seed", "3", *extra]


def _records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _agreement(world, out, store=None) -> float:
    """How much more the trained student (its checkpoint) agrees with each stored view's own embedding (of
    ``store``, default the true one) than with the embeddings of other images' views: mean cosine to its own minus
    mean cosine to the others (a student that only learnt the embeddings' common direction scores ~0)."""
    ckpt = checkpoint.load(os.path.join(out, "checkpoint.pth.tar"))
    model = create_model("tiny_cnn", D, 32, None)
    attach_head(model, D)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    ld = FKDLoader(world["data"] + "/train", store or world["store"], batch_size=4, num_crops=6, crop_size=32,
                   device=DEVICE, shuffle=False)
    s, t, rows = [], [], []
    with torch.no_grad():
        for b in ld:
            s.append(nn.functional.normalize(model(b["images"].float().cpu()), dim=1))
            t.append(nn.functional.normalize(b["embedding"].cpu(), dim=1))
            rows.append(b["indices"].cpu())
    ld.close()
    s, t, rows = torch.cat(s), torch.cat(t), torch.cat(rows)
    cos = s @ t.T
    other = rows[:, None] != rows[None, :]
    return float(cos.diagonal().mean() - cos[other].mean())


# ---------------------------------------------------------------------------------------------- generate
def test_generate_with_a_moco_v2_checkpoint_writes_an_embedding_store_that_records_the_teacher(world):
    s = labelstore.open_store(world["store"])
    assert s.kind.name == "embedding" and s.fields["dim"] == D and s.complete
    t = s.meta.teachers[0]
    assert t["name"] == "moco_v2:resnet18" and t["dim"] == D and t["input_size"] == 32
    assert t["describe"]["format"] == "moco_v2" and t["describe"]["sha256"] == t["sha256"]
    assert "encoder_k.*" in " ".join(t["describe"]["dropped"])
    emb = s.read_rows(range(s.num_images))
    e = emb["embedding"].astype(np.float32).reshape(-1, D)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    assert float((e @ e.T).mean()) < 0.6  # the views point in different directions: a student has to tell them


def test_generate_refuses_top_k_options_and_a_missing_teacher(world, tmp_path, capsys):
    base = ["generate", world["data"], "--save-path", str(tmp_path / "s"), "--device", DEVICE, "-q"]
    assert main(base + ["--ssl-teacher", world["ckpt"], "--top-k", "3", "--temp", "2"]) == 1
    err = capsys.readouterr().err
    assert "--top-k, --temp: not used with --ssl-teacher" in err and "Traceback" not in err
    assert main(base) == 1
    assert "give the teacher: -a ARCH" in capsys.readouterr().err
    assert main(base + ["-a", "resnet18", "--ssl-head", "none"]) == 1
    assert "--ssl-head applies to --ssl-teacher" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s")


def test_the_s2_bnn_views_preset_is_recorded_and_must_match_on_resume(world, tmp_path, capsys):
    store = str(tmp_path / "s2")
    argv = ["generate", world["data"], "--ssl-teacher", world["ckpt"], "--input-size", "32", "--num-crops", "1",
            "--save-path", store, "--device", DEVICE, "-q", "--views", "s2-bnn"]
    assert main(argv) == 0
    views = labelstore.open_store(store).fields["views"]
    assert views["jitter_p"] == 0.6 and views["blur_p"] == 0.2
    assert main(argv[:-2]) == 1  # the default recipe (MoCo v2's) on a store of S2-BNN's views
    assert "views" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the objective
def test_the_loss_is_s2_bnns_distribution_loss_and_its_variants():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, D, generator=g), torch.randn(5, D, generator=g)
    sn, tn = nn.functional.normalize(s, dim=1), nn.functional.normalize(t, dim=1)
    # S2-BNN's DistributionLoss(student / T, teacher / T) on the normalised outputs, written out
    want = -(torch.softmax(tn / 0.2, 1).unsqueeze(1) @ torch.log_softmax(sn / 0.2, 1).unsqueeze(2)).mean()
    loss, cos = ssl_loss(s, t, "kl", 0.2)
    assert torch.allclose(loss, want, atol=1e-6)
    assert torch.allclose(cos, (sn * tn).sum(1).mean(), atol=1e-6)
    assert torch.allclose(ssl_loss(s, t, "cosine")[0], 1 - (sn * tn).sum(1).mean(), atol=1e-6)
    assert torch.allclose(ssl_loss(s, t, "mse")[0], 2 * (1 - (sn * tn).sum(1)).mean(), atol=1e-5)
    assert ssl_loss(3 * t, t, "cosine")[0].abs() < 1e-6  # the student's scale does not matter


def test_the_head_is_s2_bnns_mlp_in_place_of_the_classifier():
    import torchvision
    m = torchvision.models.resnet18(weights=None, num_classes=D)
    assert attach_head(m, 128) == "fc"
    assert [type(x) for x in m.fc] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (m.fc[0].in_features, m.fc[0].out_features, m.fc[2].out_features) == (512, 512, 128)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    assert attach_head(create_model("tiny_cnn", D, 32, None), D) == "11"  # no fc: its last Linear


def test_linear_decay_is_s2_bnns_schedule():
    lr = LRSchedule(3e-4, 200, linear=True)
    assert lr(0) == 3e-4 and math.isclose(lr(50), 3e-4 * 0.75) and lr(200) == 0.0


LEARN = ("--ssl-loss", "cosine", "--lr", "0.003", "--epochs", "30")  # S2-BNN's KL at T 0.2 learns too slowly here


@pytest.mark.slow  # two trainings of ~30 steps of 16 replayed views each (~25 s each on 2 CPU cores)
def test_ssl_training_learns_the_teachers_embeddings_and_a_shuffled_store_does_not(world, tmp_path, capsys):
    out = str(tmp_path / "true")
    assert main(_train_argv(world, out, *LEARN)) == 0
    printed = capsys.readouterr().out
    assert "cosine to the teacher" in printed and "train top-1" not in printed and "(ssl labels)" in printed
    recs = _records(out)
    assert all("train_top1" not in r and "val_top1" not in r for r in recs)
    first, last = recs[:3], recs[-3:]  # a pass's three rounds of views differ in difficulty: compare whole cycles
    assert sum(r["train_loss"] for r in last) < sum(r["train_loss"] for r in first) - 0.3
    assert sum(r["train_cosine"] for r in last) > sum(r["train_cosine"] for r in first) + 0.3
    cfg = checkpoint.load(os.path.join(out, "checkpoint.pth.tar"))["config"]
    assert (cfg["labels"], cfg["opt"], cfg["weight_decay"], cfg["temperature"], cfg["linear"]) == \
        ("ssl", "adam", 0.0, 0.2, True)
    learnt = _agreement(world, out)

    # negative control: the same store with each image's embeddings moved to another image
    shuffled = str(tmp_path / "shuffled")
    shutil.copytree(world["store"], shuffled)
    s = labelstore.open_store(shuffled, mode="r+")
    rows = s.read_rows(range(s.num_images))
    perm = np.roll(np.arange(s.num_images), 4)  # rows 0-3 are class_0, 4-7 class_1: each gets the other class's
    rows["embedding"], rows["embedding_scale"] = rows["embedding"][perm], rows["embedding_scale"][perm]
    s.write_block(0, overwrite=True, **{k: v for k, v in rows.items() if k != "done"})
    control = str(tmp_path / "control")
    assert main(_train_argv(world, control, *LEARN, store=shuffled)) == 0
    capsys.readouterr()
    fooled = _agreement(world, control)
    print(f"specific agreement with the teacher's embeddings: trained on them {learnt:.3f}, on shuffled ones "
          f"{fooled:.3f}")
    assert learnt > 0.1 and fooled < 0.02  # measured 0.143 and -0.049 (CPU, seeded)


def test_exact_resume(world, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(_train_argv(world, full, "--epochs", "5")) == 0
    assert main(_train_argv(world, part, "--epochs", "5", "--max-steps", "2")) == 0
    assert main(_train_argv(world, part, "--epochs", "5", "--resume", os.path.join(part, "checkpoint.pth.tar"))) == 0
    a, b = (checkpoint.load(os.path.join(x, "checkpoint.pth.tar")) for x in (full, part))
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    keys = ("train_loss", "train_cosine", "lr")
    assert [[r[k] for k in keys] for r in _records(part)] == [[r[k] for k in keys] for r in _records(full)]


def test_the_online_baseline_runs_the_teacher_on_every_view(world, tmp_path, capsys):
    out = str(tmp_path / "online")
    assert main(_train_argv(world, out, "--labels", "ssl-online", "--ssl-teacher", world["ckpt"], "--epochs",
                            "3")) == 0
    recs = _records(out)
    assert all(-1 <= r["val_cosine"] <= 1 and "val_top1" not in r and "train_top1" not in r for r in recs)
    assert "val_cosine" in recs[-1]
    # its targets are the teacher's fresh outputs on the served views: the stored ones up to int8 rounding
    from fkd_dali.ssl_teachers import load_embedding_teacher
    teacher = load_embedding_teacher(world["ckpt"])
    ld = FKDLoader(world["data"] + "/train", world["store"], batch_size=4, num_crops=6, crop_size=32, device=DEVICE,
                   shuffle=False)
    b = next(iter(ld))
    with torch.no_grad():
        fresh = teacher(b["images"].float().cpu())
    ld.close()
    assert nn.functional.cosine_similarity(fresh, b["embedding"].cpu(), dim=1).min() > 0.999


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("extra, message", [
    (("--mixup-cutmix",), "Mixup/CutMix"),
    (("--num-classes", "5"), "outputs embeddings of the teacher's size (D=8)"),
    (("--recipe", "fkd", "--labels", "ssl", "--ssl-loss", "cosine", "--num-crops", "7"), "--num-crops 7 but"),
], ids=["mixup", "num-classes", "crops"])
def test_refusals_name_the_option(world, tmp_path, capsys, extra, message):
    assert main(_train_argv(world, str(tmp_path / "r"), *extra)) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_top_k_store_and_a_zero_temperature_are_refused(world, tmp_path, capsys):
    topk = os.path.join(ROOT, "tests", "fixtures", "resume")
    argv = ["train", os.path.join(topk, "data"), "--labels", "ssl", "--softlabel-path", os.path.join(topk, "store"),
            "-a", "tiny_cnn", "--input-size", "32", "--device", DEVICE, "--output", str(tmp_path / "r"), "-q"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "holds top-k soft labels" in err and "not teacher embeddings" in err and "--labels fkd" in err
    with pytest.raises(SystemExit):
        main(_train_argv(world, str(tmp_path / "t"), "--temp", "0"))
    assert "--temp: 0 is out of range" in capsys.readouterr().err
    from fkd_dali.train import TrainConfig, TrainError, Trainer
    with pytest.raises(TrainError, match=r"--temp 0: the loss divides"):
        Trainer(TrainConfig(data=world["data"], labels="ssl", softlabel_path=world["store"], temperature=0.0,
                            arch="tiny_cnn", device=DEVICE))
    with pytest.raises(TrainError, match="--recipe s2-bnn distils .* not --labels fkd"):
        Trainer(TrainConfig(data=world["data"], recipe="s2-bnn", labels="fkd", softlabel_path=world["store"],
                            arch="tiny_cnn", device=DEVICE))


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_gloo_ranks_train_ssl_in_sync(world, tmp_path):
    from tests.test_train import free_port, pythonpath
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath(), FKD_TEST_SSL="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), os.path.join(ROOT, "tests", "ddp_train_worker.py"), world["data"],
                        world["store"], str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [json.load(open(tmp_path / f"rank{k}.json")) for k in (0, 1)]
    for a, b in zip(*seen):
        assert not set(a) & set(b)
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert any(k.startswith("11.2.") for k in w0)  # the student carries the projection head
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def test_the_online_baseline_sees_fresh_views_unless_told_to_replay_the_stored_ones(world, tmp_path):
    """The first step (8 images) from the same initial student: ``--ssl-views stored`` replays the store's
    views, so its loss is ``--labels ssl``'s up to the stored embeddings' int8 rounding (the
    teacher's fresh output on the same pixels); the default (fresh) draws
    other views, so its loss is another."""
    one = ("--epochs", "2", "--ssl-loss", "cosine")
    runs = {"ssl": (), "stored": ("--labels", "ssl-online", "--ssl-teacher", world["ckpt"], "--ssl-views", "stored"),
            "fresh": ("--labels", "ssl-online", "--ssl-teacher", world["ckpt"])}
    loss = {}
    for name, extra in runs.items():
        out = str(tmp_path / name)
        assert main(_train_argv(world, out, *one, *extra)) == 0
        rec = _records(out)[0]
        assert rec["steps"] == 1
        loss[name] = rec["train_loss"]
    # measured (CPU, seeded): ssl 0.699, stored 0.710, fresh 1.192
    assert abs(loss["stored"] - loss["ssl"]) < 0.03
    assert abs(loss["fresh"] - loss["ssl"]) > max(0.2, 10 * abs(loss["stored"] - loss["ssl"]))
