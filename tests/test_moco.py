"""Self-supervised pretraining without labels (``train --labels moco``, MoCo v2) on tiny real JPEGs with real DALI
CPU pipelines and a real ResNet-18: it trains, its queue fills, its checkpoint is an SSL teacher for ``generate
--ssl-teacher`` at the dim it was trained at, a stopped run resumes exactly; and the fresh views it (and
``--labels ssl-online``) sees: new views each pass, the same views for the same (seed, pass)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import labelstore
from fkd_dali import checkpoint
from fkd_dali.cli import main
from fkd_dali.dataset import scan_image_folder
from fkd_dali.views import fresh_views, sample_views
from pipelines import FreshViewLoader
from tests.conftest import ROOT, current_device, free_port, make_image_folder, pythonpath

DEVICE = current_device()
D = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("moco") / "data")
    make_image_folder(root, classes=2, per_class=4, seed=3, sizes=[(48, 64), (64, 48), (56, 56)])
    make_image_folder(root, classes=2, per_class=1, seed=4, sizes=[(48, 48)], split="val")
    return root


def _moco(data: str, out: str, *extra: str) -> list[str]:
    return ["train", data, "--labels", "moco", "-a", "resnet18", "--input-size", "32", "--epochs", "3", "-b", "8",
            "--lr", "0.05", "--temp", "0.2", "--moco-k", "12", "--moco-m", "0.9", "--moco-dim", str(D),
            "--output", out, "--device", DEVICE, "--no-amp", "--seed", "5", "-j", "1", "-q", *extra]


def _records(out: str) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("moco_run") / "run")
    assert main(_moco(data, out)) == 0
    return out


def test_moco_trains_without_labels_and_fills_its_queue(trained):
    recs = _records(trained)
    assert len(recs) == 3 and all(np.isfinite(r["train_loss"]) for r in recs)
    assert all(0 <= r["train_contrast_top1"] <= 1 for r in recs)
    assert not any("train_top1" in r or "val_top1" in r for r in recs)  # no class is read
    ck = checkpoint.load(os.path.join(trained, "checkpoint.pth.tar"))
    moco = ck["moco"]
    # 3 epochs x 8 images x 2 views = 48 keys through a queue of 12: it wrapped, every slot is a unit key
    assert moco["queue"].shape == (12, D) and moco["queue_ptr"] == 48 % 12
    assert torch.allclose(moco["queue"].norm(dim=1), torch.ones(12), atol=1e-4)
    initial = torch.nn.functional.normalize(torch.randn(12, D, generator=torch.Generator().manual_seed(5)), dim=1)
    assert not torch.allclose(moco["queue"], initial)  # the random start was replaced by keys
    # the key encoder followed the query encoder by momentum, without being it
    q, k = ck["state_dict"], moco["key_encoder"]
    assert set(q) == set(k) and not torch.equal(q["conv1.weight"], k["conv1.weight"])
    assert q["fc.2.weight"].shape == (D, 512)  # MoCo v2's head, Linear(512, 512), ReLU, Linear(512, D)


def test_its_checkpoint_is_an_ssl_teacher_at_its_dim(trained, data, tmp_path):
    from fkd_dali.ssl_teachers import load_embedding_teacher
    ckpt = os.path.join(trained, "checkpoint.pth.tar")
    teacher = load_embedding_teacher(ckpt)
    info = teacher.describe()
    assert teacher.dim == D and info["format"] == "fkd_dali" and info["arch"] == "resnet18"
    assert any("moco" in d for d in info["dropped"])
    # the teacher is the query encoder: its output is the trained student's, normalised
    from fkd_dali.models import create_model
    from fkd_dali.ssl_distill import attach_head
    student = create_model("resnet18", D, 32)
    attach_head(student, D)
    student.load_state_dict(checkpoint.load(ckpt)["state_dict"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), torch.nn.functional.normalize(student.eval()(x), dim=1), atol=1e-5)
    store = str(tmp_path / "store")
    assert main(["generate", data, "--ssl-teacher", ckpt, "--input-size", "32", "--num-crops", "2",
                 "--save-path", store, "--device", DEVICE, "--no-amp", "-q"]) == 0
    s = labelstore.open_store(store)
    assert s.kind.name == "embedding" and s.fields["dim"] == D


def test_a_stopped_moco_run_resumes_exactly(data, trained, tmp_path):
    part = str(tmp_path / "part")
    assert main(_moco(data, part, "--max-steps", "3")) == 0
    assert main(_moco(data, part, "--resume", os.path.join(part, "checkpoint.pth.tar"))) == 0
    a, b = (checkpoint.load(os.path.join(x, "checkpoint.pth.tar")) for x in (trained, part))
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for k in a["moco"]["key_encoder"]:
        assert torch.equal(a["moco"]["key_encoder"][k], b["moco"]["key_encoder"][k]), k
    assert torch.equal(a["moco"]["queue"], b["moco"]["queue"]) and a["moco"]["queue_ptr"] == b["moco"]["queue_ptr"]
    keys = ("train_loss", "train_contrast_top1")
    assert [[r[k] for k in keys] for r in _records(part)] == [[r[k] for k in keys] for r in _records(trained)]


def test_moco_refuses_what_it_cannot_do(data, tmp_path, capsys):
    assert main(_moco(data, str(tmp_path / "r"), "--moco-m", "1")) == 1
    assert "--moco-m 1" in capsys.readouterr().err
    assert main(_moco(data, str(tmp_path / "r"), "--mixup-cutmix")) == 1
    assert "drop --mixup-cutmix" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- fresh views
def _views(loader, epoch: int) -> torch.Tensor:
    loader.set_epoch(epoch)
    return torch.cat([b["images"] for b in loader])


def test_fresh_views_are_new_each_pass_and_the_same_for_the_same_pass(data):
    ds = scan_image_folder(os.path.join(data, "train"))

    def loader():
        return FreshViewLoader(ds.root, ds.files, ds.targets, num_crops=2, batch_size=4, crop_size=24, device=DEVICE,
                               seed=1, shuffle=False, num_threads=1, dtype="uint8",
                               draw=lambda p, rows, sizes: fresh_views(1, p, rows, sizes, 2))
    a, b = loader(), loader()
    try:
        first, again = _views(a, 0), _views(b, 0)
        second = _views(a, 1)
    finally:
        a.close()
        b.close()
    assert first.shape == (16, 3, 24, 24)
    assert torch.equal(first, again)  # determinism: the views of (seed, pass) on a new loader
    differ = (first.float() - second.float()).abs().flatten(1).mean(1) > 1
    assert differ.all()  # every view of pass 1 differs from pass 0's
    assert not torch.equal(first[0::2], first[1::2])  # an image's two views differ


def test_fresh_views_are_drawn_per_pass_by_the_store_recipe():
    sizes = np.array([[48, 64], [64, 48], [56, 56]])
    p0, p0b, p1 = (fresh_views(3, p, [0, 1, 2], sizes, 4) for p in (0, 0, 1))
    for k in p0:
        assert np.array_equal(p0[k], p0b[k])
    assert not np.array_equal(p0["boxes"], p1["boxes"])
    assert not np.array_equal(p0["jitter_factors"], p1["jitter_factors"])
    stored = sample_views(3, [0, 1, 2], sizes, 4)  # the store's own views of seed 3: not a pass's
    assert not np.array_equal(stored["boxes"], p0["boxes"])
    # the view recipe is honoured: no blur, no jitter when their probabilities are 0
    off = fresh_views(3, 0, [0, 1, 2], sizes, 4, {"blur_p": 0.0, "jitter_p": 0.0})
    assert (off["blur_sigma"] == 0).all() and not off["jitter"].any()
    # a segment of another crop count (its pass count restarts at 0) draws other views, not view 0 of these
    one = fresh_views(3, 0, [0, 1, 2], sizes, 1)
    assert one["boxes"].shape == (3, 1, 4) and p0["boxes"].shape == (3, 4, 4)
    assert not np.allclose(one["boxes"][:, 0], p0["boxes"][:, 0])


@pytest.mark.slow
def test_ddp_ranks_enqueue_every_ranks_keys_so_their_queues_are_one(data, tmp_path):
    """MoCo's concat_all_gather: each rank enqueues all ranks' keys in rank order, so the queues stay identical and
    the checkpoint's (rank 0's) queue is exact for every rank on --resume."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath(), FKD_TEST_MOCO="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), os.path.join(ROOT, "tests", "ddp_train_worker.py"), data, "-",
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    q0, q1 = torch.load(tmp_path / "rank0.queue.pt"), torch.load(tmp_path / "rank1.queue.pt")
    seen = [json.load(open(tmp_path / f"rank{k}.json")) for k in (0, 1)]
    keys = 2 * sum(len(rows) for rank in seen for rows in rank)  # two views per image, both ranks' images
    assert q0["queue_ptr"] == q1["queue_ptr"] == keys % 12
    assert torch.equal(q0["queue"], q1["queue"])
    initial = torch.nn.functional.normalize(torch.randn(12, D, generator=torch.Generator().manual_seed(0)), dim=1)
    assert not torch.allclose(q0["queue"], initial)  # keys replaced the random start


def test_the_keys_never_share_the_query_batchs_batchnorm_statistics(data, tmp_path):
    """Shuffled BN below 32 views a rank: the keys run in two groups, so a key's BatchNorm statistics are not those
    of the query batch (which holds the same views) — with one group they would be, and leak the positive."""
    from fkd_dali.train import TrainConfig, Trainer  # noqa: PLC0415
    cfg = TrainConfig(data=data, labels="moco", arch="resnet18", input_size=32, batch_size=8, epochs=1, lr=0.05,
                      temperature=0.2, moco_k=12, moco_m=0.9, moco_dim=D, output=str(tmp_path / "run"),
                      device=DEVICE, amp=False, show_progress=False)
    trainer = Trainer(cfg)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(trainer.torch_device)
    trainer.objective.targets(trainer, {}, images)
    keys = trainer.objective._pending
    with torch.no_grad():  # the key encoder on the 8 views as one batch: the query batch's statistics
        one_batch = torch.nn.functional.normalize(trainer.objective.key_encoder.train()(images).float(), dim=1)
    assert keys.shape == one_batch.shape and torch.allclose(keys.norm(dim=1), torch.ones(8), atol=1e-4)
    assert not torch.allclose(keys, one_batch, atol=1e-3)


def test_labels_moco_takes_moco_v2s_recipe_and_given_options_win(data):
    """--labels moco alone trains with MoCo v2's main_moco.py defaults (--moco-t 0.2 --cos), not FKD's (T 1, lr 0.1,
    steps); the lr scales with the images a step; options given win, and the run's notes say what was set."""
    from fkd_dali.options import train_config, train_parser  # noqa: PLC0415
    from fkd_dali.train_config import TrainError, check, notes  # noqa: PLC0415
    c = train_config(train_parser().parse_args([data, "--labels", "moco"])).resolved()
    check(c)
    assert (c.recipe, c.opt, c.temperature, c.momentum, c.weight_decay, c.epochs, c.cos, c.batch_size) == \
        ("moco-v2", "sgd", 0.2, 0.9, 1e-4, 200, True, 512)
    assert c.lr == pytest.approx(0.03)  # 512 views = 256 images: MoCo's 0.03
    assert "recipe moco-v2" in " ".join(notes(c))
    c = train_config(train_parser().parse_args([data, "--labels", "moco", "-b", "128", "--temp", "0.07"])).resolved()
    assert c.lr == pytest.approx(0.0075) and c.temperature == 0.07 and c.batch_size == 128  # 64 images: 0.03 / 4
    c = train_config(train_parser().parse_args([data, "--labels", "moco", "--lr", "0.05", "--sched", "step"]))
    assert c.lr == 0.05 and not c.resolved().cos
    with pytest.raises(TrainError, match="--recipe moco-v2 pretrains without labels"):
        check(train_config(train_parser().parse_args([data, "--recipe", "moco-v2", "--labels", "hard"])).resolved())


@pytest.mark.parametrize("arch", ["regnet_x_400mf", "reactnet_a"])
def test_a_non_resnet_encoder_of_the_project_loads_as_a_teacher(arch, tmp_path):
    """The fkd_dali layout is built from its config's arch (a torchvision RegNet, the project's ReActNet — S2-BNN's
    student), not guessed as a ResNet from the keys."""
    from fkd_dali.models import create_model  # noqa: PLC0415
    from fkd_dali.ssl_distill import attach_head  # noqa: PLC0415
    from fkd_dali.ssl_teachers import load_embedding_teacher  # noqa: PLC0415
    torch.manual_seed(0)
    student = create_model(arch, D, 32)
    attach_head(student, D)
    path = str(tmp_path / "ckpt.pth.tar")
    torch.save({"config": {"arch": arch, "input_size": 32}, "state_dict": student.state_dict()}, path)
    teacher = load_embedding_teacher(path)
    assert teacher.dim == D and teacher.describe()["arch"] == arch
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), torch.nn.functional.normalize(student.eval()(x), dim=1), atol=1e-4)
