"""`fkd-dali train`: FKD's flags and recipes, the epoch plan, exact resume, DDP, baselines, bad input."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import labelstore
from fkd_dali.checkpoint import CheckpointError
from fkd_dali.cli import main
from fkd_dali.generate import GenerateConfig, generate
from fkd_dali.mixing import MixConfig, mix
from fkd_dali.models import ModelError, create_model
from fkd_dali.models.sret import sret
from fkd_dali.schedule import LRSchedule, fkd_segments
from fkd_dali.teachers import TeacherSpec
from fkd_dali.train import TrainConfig, TrainError, Trainer, train
from tests.conftest import assert_same_weights, current_device, free_port, pythonpath
from tests.test_generate import make_world
from tests.test_loader import partial_copy, write_coded_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = current_device()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    w = make_world(str(tmp_path_factory.mktemp("train")))
    root, data, teacher = w["root"], w["data"], w["teachers"][0]
    store = os.path.join(root, "store")
    generate(GenerateConfig(data=data, save_path=store, teachers=[TeacherSpec("torchscript", path=teacher,
                                                                               input_size=32)],
                            num_crops=8, top_k=5, group_size=8, batch_size=4, device=DEVICE, show_progress=False))
    return {"root": root, "data": data, "store": store, "teacher": teacher}


def cfg(s, tmp_path, **kw):
    args = dict(data=s["data"], arch="tiny_cnn", softlabel_path=s["store"], num_crops=2, batch_size=16, epochs=6,
                input_size=32, device=DEVICE, output=str(tmp_path / "run"), show_progress=False, lr=0.05, cos=True)
    args.update(kw)
    return TrainConfig(**args)


# ---------------------------------------------------------------------------------------------- models
def test_sret_lt_has_about_5m_parameters_and_deterministic_eval():
    m = sret("SReT_LT")
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 5.0e6) / 5.0e6 < 0.05, n
    m.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
    m.train()
    with torch.no_grad():  # training shuffles tokens in the recursive passes (and drops paths)
        assert not torch.equal(m(x), m(x))


def test_students_by_name():
    assert create_model("deit_tiny", 10)(torch.randn(1, 3, 224, 224)).shape == (1, 10)
    assert abs(sum(p.numel() for p in create_model("deit_tiny", 1000).parameters()) - 5.72e6) < 0.05e6
    assert create_model("SReT_T", 7, image_size=64)(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    with pytest.raises(ModelError, match="unknown architecture 'resnet_x'"):
        create_model("resnet_x", 10)


# ---------------------------------------------------------------------------------------------- plan
def test_fkd_epoch_plan():
    plan = fkd_segments(300, 4)
    assert [(s.start_epoch, s.crops) for s in plan[:2]] == [(0, 4), (4, 4)]
    assert sum(s.crops == 4 for s in plan) == 74 and [s.start_epoch for s in plan if s.crops == 1] == [296, 297, 298, 299]
    assert sum(s.crops for s in plan) == 300
    vit = fkd_segments(300, 4, warmup_epochs=5)
    assert [(s.start_epoch, s.crops) for s in vit[:6]] == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 4)]
    assert sum(s.crops for s in vit) == 300
    assert [(s.start_epoch, s.crops) for s in fkd_segments(9, 4)] == [(0, 4), (4, 4), (8, 1)]


def test_lr_schedule():
    cos = LRSchedule(lr=0.1, epochs=100)
    assert cos(0) == pytest.approx(0.1) and cos(50) == pytest.approx(0.05) and cos(100) == pytest.approx(0.0)
    warm = LRSchedule(lr=0.002, epochs=300, warmup_epochs=5, warmup_lr=1e-5, min_lr=1e-5)
    assert warm(0) == pytest.approx(1e-5) and warm(2.5) == pytest.approx((1e-5 + 0.002) / 2)
    step = LRSchedule(lr=0.1, epochs=300, cosine=False, milestones=(120, 240))
    assert (step(119.9), step(120), step(250)) == pytest.approx((0.1, 0.01, 0.001))


def test_mixing_is_seeded_and_keeps_labels_normalised():
    x = torch.randn(8, 3, 16, 16)
    y = torch.softmax(torch.randn(8, 10), 1)
    a = mix(x, y, MixConfig(), seed=1, step=5)
    b = mix(x, y, MixConfig(), seed=1, step=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    kinds = {mix(x, y, MixConfig(), seed=1, step=s)[2].split()[0] for s in range(20)}
    assert kinds == {"mixup", "cutmix"}
    for s in range(20):
        _, soft, _ = mix(x, y, MixConfig(), seed=2, step=s)
        torch.testing.assert_close(soft.sum(1), torch.ones(8))
    assert mix(x, y, MixConfig(prob=0.0), seed=1, step=1)[2] == "none"


# ---------------------------------------------------------------------------------------------- FKD's commands
@pytest.mark.parametrize("argv,expect", [
    ("-a resnet50 --lr 0.1 --num_crops 4 -b 1024 --cos --softlabel_path STORE DATA",
     dict(arch="resnet50", lr=0.1, num_crops=4, batch_size=1024, cos=True, opt="sgd", warmup_epochs=0,
          weight_decay=1e-4, softlabel_path="STORE")),
    ("-a SReT_LT --lr 0.002 --wd 0.05 --num_crops 4 -b 1024 --cos --softlabel_path STORE DATA",
     dict(arch="SReT_LT", lr=0.002, weight_decay=0.05, opt="adamw", warmup_epochs=5, min_lr=1e-5)),
    ("-a deit_tiny --lr 0.002 --wd 0.05 --num_crops 4 -b 1024 --cos --softlabel_path STORE DATA",
     dict(arch="deit_tiny", opt="adamw", warmup_epochs=5)),
    ("-a resnet50 -e --resume CKPT DATA", dict(evaluate=True, resume="CKPT")),
])
def test_fkd_readme_commands_parse_to_fkd_recipes(argv, expect, monkeypatch):
    seen = {}
    monkeypatch.setattr("fkd_dali.train.train", lambda c, scan=None: seen.setdefault("cfg", c.resolved()) and {})
    assert main(["train"] + argv.split()) == 0
    got = seen["cfg"]
    for k, v in expect.items():
        assert getattr(got, k) == v, (k, getattr(got, k), v)


@pytest.mark.slow
def test_fkd_readme_command_runs_verbatim_plus_a_small_budget(setup, tmp_path):
    r = subprocess.run([sys.executable, "train.py", "-a", "resnet18", "--lr", "0.1", "--num_crops", "4", "-b", "32",
                        "--cos", "--softlabel_path", setup["store"], setup["data"], "--epochs", "5", "--input-size",
                        "32", "--device", DEVICE, "--output", str(tmp_path / "r"), "-q"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch 0-3:" in r.stdout and "epoch 4:" in r.stdout and "best val top-1" in r.stdout
    e = subprocess.run([sys.executable, "train.py", "-a", "resnet18", "-e", "--resume",
                        str(tmp_path / "r" / "checkpoint.pth.tar"), "--input-size", "32", "--device", DEVICE,
                        setup["data"]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert e.returncode == 0 and "top-1" in e.stdout and "(10 images)" in e.stdout, e.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- the loop
@pytest.mark.slow
def test_training_writes_logs_and_checkpoints(setup, tmp_path):
    out = train(cfg(setup, tmp_path, mixup_cutmix=True, model_ema=True))
    # 30 images, 16 crops per step: passes of 2 crops take 8 images/step (4 steps), single-crop epochs 16 (2 steps)
    assert out["global_step"] == 2 * 4 + 2 * 2
    lines = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl")]
    assert [x["epochs"] for x in lines] == [[0, 2], [2, 4], [4, 5], [5, 6]]
    assert all(np.isfinite(x["train_loss"]) and "val_top1" in x and "val_ema_top1" in x for x in lines)
    assert (tmp_path / "run" / "checkpoint.pth.tar").exists() and (tmp_path / "run" / "model_best.pth.tar").exists()
    ck = torch.load(tmp_path / "run" / "checkpoint.pth.tar", weights_only=False)
    assert ck["arch"] == "tiny_cnn" and ck["segment"] == 4 and ck["ema"] is not None and len(ck["rng"]) == 1


def _weights(path):
    return torch.load(path, weights_only=False)["state_dict"]


def stored_crops(batch) -> tuple[list, list]:
    """What an FKD step trained on: (store rows, crop ids) per crop."""
    return batch["indices"].tolist(), batch["crop_ids"].tolist()


def run_recording(c: TrainConfig, record=stored_crops, crash_at: tuple | None = None) -> tuple[dict | None, list]:
    """Train with ``c`` and record ``record(batch)`` of each step; ``crash_at``: raise at the step of that position
    (a crash after the checkpoints written so far; the result is then None)."""
    trainer = Trainer(c)
    seen, step = [], trainer.step

    def recording_step(batch, lr):
        if trainer.position == crash_at:
            raise RuntimeError("simulated crash")
        seen.append(record(batch))
        return step(batch, lr)

    trainer.step = recording_step
    if crash_at is None:
        return trainer.run(), seen
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.run()
    return None, seen


@pytest.mark.slow
@pytest.mark.parametrize("stop", [3, 9])  # inside the first multi-crop pass; inside the first single-crop epoch
def test_resume_continues_exactly(setup, tmp_path, stop):
    """Stopped at step ``stop`` and resumed: the same images and crops in the same order as an uninterrupted
    run, and its weights (bit for bit on the CPU; on a GPU as close as a rerun, see assert_same_weights)."""
    _, seen_a = run_recording(cfg(setup, tmp_path / "a", output=str(tmp_path / "a"), mixup_cutmix=True))
    first, seen_b = run_recording(cfg(setup, tmp_path / "b", output=str(tmp_path / "b"), mixup_cutmix=True,
                                      max_steps=stop))
    assert first["stopped_early"] and first["global_step"] == stop
    _, rest = run_recording(cfg(setup, tmp_path / "b", output=str(tmp_path / "b"), mixup_cutmix=True,
                                resume=str(tmp_path / "b" / "checkpoint.pth.tar")))
    assert seen_b + rest == seen_a
    rerun = None
    if DEVICE != "cpu":
        train(cfg(setup, tmp_path / "a2", output=str(tmp_path / "a2"), mixup_cutmix=True))
        rerun = _weights(tmp_path / "a2" / "checkpoint.pth.tar")
    assert_same_weights(_weights(tmp_path / "a" / "checkpoint.pth.tar"), _weights(tmp_path / "b" / "checkpoint.pth.tar"),
                        rerun)
    if DEVICE == "cpu":
        la = [json.loads(x)["val_top1"] for x in open(tmp_path / "a" / "log.jsonl")]
        lb = [json.loads(x)["val_top1"] for x in open(tmp_path / "b" / "log.jsonl")]
        assert la == lb


def images(batch) -> torch.Tensor:
    return batch["images"].clone()


@pytest.mark.parametrize("stop", ["inside an epoch", "after an epoch's last step", "crash after an epoch's end"])
def test_a_baseline_resumes_with_the_random_crops_it_would_have_drawn(setup, tmp_path, stop):
    """The hard-label baseline's crops and flips come from DALI's random generators; their state travels in the
    checkpoint, so a resumed run trains on the same images as an uninterrupted one, bit for bit on the CPU."""
    kw = dict(labels="hard", softlabel_path=None, epochs=4, batch_size=16)  # 30 images: 2 steps per epoch
    _, seen_a = run_recording(cfg(setup, tmp_path / "a", output=str(tmp_path / "a"), **kw), images)
    b = str(tmp_path / "b")
    if stop == "crash after an epoch's end":  # the checkpoint written at the end of epoch 1 (after validation)
        _, seen_b = run_recording(cfg(setup, tmp_path / "b", output=b, **kw), images, crash_at=(2, 1))
        seen_b = seen_b[:4]
    else:
        _, seen_b = run_recording(cfg(setup, tmp_path / "b", output=b, max_steps=3 if stop == "inside an epoch"
                                      else 4, **kw), images)
    saved = torch.load(os.path.join(b, "checkpoint.pth.tar"), weights_only=True)
    state = saved["loader_state"][0][1]
    assert (state["epoch"], state["batch"], state["at_end"]) == \
        {"inside an epoch": (1, 1, False), "after an epoch's last step": (1, 2, False),
         "crash after an epoch's end": (1, 2, True)}[stop]
    _, rest = run_recording(cfg(setup, tmp_path / "b", output=b, resume=os.path.join(b, "checkpoint.pth.tar"), **kw),
                            images)
    assert len(seen_b) + len(rest) == len(seen_a) == 8
    assert all(torch.equal(x, y) for x, y in zip(seen_b + rest, seen_a))
    assert_same_weights(_weights(tmp_path / "a" / "checkpoint.pth.tar"), _weights(tmp_path / "b" / "checkpoint.pth.tar"))


def test_a_damaged_loader_state_is_refused_naming_the_checkpoint(setup, tmp_path):
    kw = dict(labels="hard", softlabel_path=None, epochs=4, batch_size=16)
    train(cfg(setup, tmp_path, max_steps=3, **kw))
    path = tmp_path / "run" / "checkpoint.pth.tar"
    ck = torch.load(path, weights_only=True)
    ck["loader_state"][0][1]["batch"] = -5
    torch.save(ck, path)
    with pytest.raises(TrainError, match=r"checkpoint.pth.tar: the loader state of rank 0 is damaged \(loader 1: "
                                         r"its epoch, offset and batch are not a position"):
        train(cfg(setup, tmp_path, resume=str(path), **kw))


@pytest.mark.slow
def test_checkpoint_epochs_saves_less_and_a_crash_resumes_cleanly(setup, tmp_path, monkeypatch):
    """checkpoint_epochs=3: the checkpoint is written at the first segment end 3 epochs after the last one and at
    the end (passes [0,2) [2,4) [4,5) [5,6): after epochs 4 and 6). A crash after an unsaved segment resumes from
    the last checkpoint: the log holds each segment once and the run trains what the uninterrupted one did."""
    from fkd_dali import checkpoint
    _, seen_a = run_recording(cfg(setup, tmp_path / "a", output=str(tmp_path / "a")))
    writes = []
    real_save = checkpoint.save

    def counting_save(state, folder, is_best=False, last=True):
        writes.append((state["segment"], last))
        return real_save(state, folder, is_best, last)

    monkeypatch.setattr(checkpoint, "save", counting_save)
    train(cfg(setup, tmp_path / "c", output=str(tmp_path / "c"), checkpoint_epochs=3))
    assert [seg for seg, last in writes if last] == [2, 4], writes

    # a crash at the last segment's first step: segment 2's end was not saved
    _, seen_b = run_recording(cfg(setup, tmp_path / "b", output=str(tmp_path / "b"), checkpoint_epochs=3),
                              crash_at=(3, 0))
    assert len(open(tmp_path / "b" / "log.jsonl").readlines()) == 3  # segments 0-2 logged, 0-1 checkpointed
    _, rest = run_recording(cfg(setup, tmp_path / "b", output=str(tmp_path / "b"), checkpoint_epochs=3,
                                resume=str(tmp_path / "b" / "checkpoint.pth.tar")))
    assert seen_b[:8] + rest == seen_a  # segments 0-1 (8 steps) before the checkpoint, the rest after the resume
    la = [json.loads(x) for x in open(tmp_path / "a" / "log.jsonl")]
    lb = [json.loads(x) for x in open(tmp_path / "b" / "log.jsonl")]
    assert [x["epochs"] for x in lb] == [x["epochs"] for x in la] == [[0, 2], [2, 4], [4, 5], [5, 6]]
    if DEVICE == "cpu":
        assert [x["val_top1"] for x in lb] == [x["val_top1"] for x in la]
    with pytest.raises(TrainError, match="checkpoint-epochs 0"):
        train(cfg(setup, tmp_path / "d", output=str(tmp_path / "d"), checkpoint_epochs=0))


def test_only_the_pipeline_in_use_is_alive(setup, tmp_path):
    """The n-crop, 1-crop and validation pipelines never hold their threads and buffers at the same time: each
    step runs with only its own loader's pipeline built (Trainer.release_loaders)."""
    trainer = Trainer(cfg(setup, tmp_path, epochs=5))  # 2 passes of 2 crops, then 1 single-crop epoch
    alive = []
    step = trainer.step

    def recording_step(batch, lr):
        alive.append(frozenset(k for k, ld in trainer.loaders.items() if ld._pipe is not None))
        return step(batch, lr)

    trainer.step = recording_step
    trainer.run()
    assert set(alive) == {frozenset({2}), frozenset({1})}, set(alive)
    assert "val" in trainer.loaders  # it was used (after each segment) and released again


def test_resume_refuses_other_settings(setup, tmp_path):
    train(cfg(setup, tmp_path, max_steps=2))
    with pytest.raises(TrainError, match="other settings .*num_crops: 2 -> 4"):
        train(cfg(setup, tmp_path, num_crops=4, resume=str(tmp_path / "run")))


@pytest.mark.slow
def test_ddp_two_gloo_ranks_see_disjoint_shards_and_stay_in_sync(setup, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath())
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), os.path.join(ROOT, "tests", "ddp_train_worker.py"), setup["data"], setup["store"],
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [json.load(open(tmp_path / f"rank{k}.json")) for k in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 3
    for a, b in zip(*seen):
        assert not set(a) & set(b)  # each step, the ranks train on different images
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


@pytest.mark.parametrize("labels", ["hard", "online"])
def test_baselines_run_in_the_same_loop(setup, tmp_path, labels):
    extra = dict(teacher_arch="torchscript", teacher_path=setup["teacher"]) if labels == "online" else \
        dict(label_smoothing=0.1)
    out = train(cfg(setup, tmp_path, labels=labels, softlabel_path=None, epochs=2, **extra))
    assert out["global_step"] == 2 * 2 and np.isfinite(out["last"]["train_loss"])  # 30 images / 16 per step


# ---------------------------------------------------------------------------------------------- start-up
def timed(monkeypatch, owner, name: str, log: dict, delay: float = 0.0) -> None:
    """Record when ``owner.name`` (the real function) starts and ends; ``delay`` makes it that much slower."""
    real = getattr(owner, name)

    def wrapper(*args, **kw):
        log.setdefault(name, []).append([time.perf_counter(), None])
        time.sleep(delay)
        try:
            return real(*args, **kw)
        finally:
            log[name][-1][1] = time.perf_counter()
    monkeypatch.setattr(owner, name, wrapper)


def test_the_first_pass_rows_are_read_while_the_dataset_is_scanned(setup, tmp_path, monkeypatch):
    """The rows a rank serves in pass 0 depend on the store alone: their read runs while the dataset is scanned
    (both slowed down here), the loader serves them only after the store passed its check, and they are the
    store's rows of the pass's round."""
    import fkd_dali.dataset
    import fkd_dali.trainer
    log: dict = {}
    timed(monkeypatch, fkd_dali.dataset, "scan_image_folder", log, delay=1.0)
    timed(monkeypatch, fkd_dali.trainer, "scan_image_folder", log, delay=1.0)  # wherever the Trainer scans
    timed(monkeypatch, labelstore.LabelStore, "read_round", log, delay=0.5)
    timed(monkeypatch, labelstore.LabelStore, "check_dataset", log)
    trainer = Trainer(cfg(setup, tmp_path))
    (scan_start, scan_end), = log["scan_image_folder"]
    assert len(log.get("read_round", [])) == 1, "the first pass's rows were not read while the Trainer started"
    (read_start, read_end), = log["read_round"]
    assert read_start < scan_end and scan_start < read_end  # both started before either ended
    assert log["check_dataset"][0][0] > scan_end
    reads = trainer.objective.early_reads
    loader = trainer.loader(2)
    assert loader.reader.reads is reads and trainer.objective.early_reads is None  # adopted, not read again
    loader.set_epoch(0)
    batches = list(loader)
    assert len(log["read_round"]) == 2  # pass 0 (early) and pass 1 (in the background while pass 0 trains)
    store = labelstore.open_store(setup["store"])
    rnd = store.read_round(loader.round_of(0), 2)
    rows = np.concatenate([b["indices"].numpy() for b in batches])
    assert sorted(set(rows.tolist())) == list(range(30))
    idx = torch.cat([b["topk_idx"] for b in batches]).view(-1, 2, store.top_k).numpy()
    assert np.array_equal(idx, rnd.topk_idx[rows[::2]])
    crops = torch.cat([b["crop_ids"] for b in batches]).view(-1, 2).numpy()
    assert (crops == np.arange(2) + 2 * loader.round_of(0)).all()
    loader.close()


def test_a_store_that_does_not_match_is_refused_while_its_rows_are_read(setup, tmp_path, monkeypatch):
    """The first pass's read starts before the store is checked against the dataset; the check still refuses a
    store of other files (naming the file), and nothing is served."""
    data = str(tmp_path / "data")
    shutil.copytree(setup["data"], data)
    folder = os.path.join(data, "train", "class_3")
    os.rename(os.path.join(folder, "img_010.jpg"), os.path.join(folder, "img_010b.jpg"))
    import fkd_dali.dataset
    log: dict = {}
    timed(monkeypatch, fkd_dali.dataset, "scan_image_folder", log, delay=0.5)
    timed(monkeypatch, labelstore.LabelStore, "read_round", log, delay=0.5)
    with pytest.raises(labelstore.StoreMismatchError, match="'class_3/img_010.jpg' in the store but "
                                                            "'class_3/img_010b.jpg'"):
        Trainer(cfg(setup, tmp_path, data=data))
    assert len(log["read_round"]) == 1  # the early read had started


# ---------------------------------------------------------------------------------------------- bad input
def test_store_from_another_dataset(setup, tmp_path):
    other = str(tmp_path / "other")
    write_coded_dataset(other, 12, seed=3)
    with pytest.raises(labelstore.StoreMismatchError, match="labels 30 images"):
        Trainer(cfg(setup, tmp_path, data=other))


def test_incomplete_store_and_pool_and_classes(setup, tmp_path):
    part = partial_copy(setup["store"], str(tmp_path / "part"), done=16)
    with pytest.raises(labelstore.StoreIncompleteError, match="14 of 30 rows"):
        train(cfg(setup, tmp_path, softlabel_path=part))
    with pytest.raises(TrainError, match="--num-crops 9 but .* stores 8"):
        Trainer(cfg(setup, tmp_path, num_crops=9))
    with pytest.raises(TrainError, match="--num-classes 12 but .* 10 classes"):
        Trainer(cfg(setup, tmp_path, num_classes=12))
    with pytest.raises(ModelError, match="unknown architecture"):
        Trainer(cfg(setup, tmp_path, arch="resnet_x"))
    with pytest.raises(ValueError, match="top-5"):
        Trainer(cfg(setup, tmp_path, soft_label_type="marginal_smoothing_k10"))


def test_checkpoint_of_another_arch(setup, tmp_path):
    train(cfg(setup, tmp_path, max_steps=1))
    with pytest.raises(CheckpointError, match="checkpoint of tiny_cnn, not resnet34"):
        train(cfg(setup, tmp_path, arch="resnet34", evaluate=True, resume=str(tmp_path / "run")))


def test_fkd_checkpoint_format_can_be_evaluated(setup, tmp_path, capsys):
    model = create_model("resnet18", 10)
    torch.save({"epoch": 300, "arch": "resnet18", "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "best_acc1": 0.0, "optimizer": {}}, str(tmp_path / "fkd.pth.tar"))
    res = train(cfg(setup, tmp_path, arch="resnet18", evaluate=True, resume=str(tmp_path / "fkd.pth.tar")))
    assert res["images"] == 10 and 0 <= res["top1"] <= 100


def test_a_trained_student_can_teach(setup, tmp_path):
    """A `fkd-dali train` checkpoint is a valid --teacher-path for `generate` (safe, weights-only loading)."""
    train(cfg(setup, tmp_path, arch="resnet18", max_steps=2))
    rep = generate(GenerateConfig(data=setup["data"], save_path=str(tmp_path / "s"), teachers=[
        TeacherSpec("resnet18", path=str(tmp_path / "run" / "checkpoint.pth.tar"), input_size=32)], num_crops=2,
        top_k=3, group_size=2, batch_size=4, device=DEVICE, show_progress=False))
    assert rep.complete
