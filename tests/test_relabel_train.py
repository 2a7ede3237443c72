"""Training on a relabel store (--labels relabel / relabel-mse): real JPEGs, a relabel store made by
generate_relabel with a real TorchScript teacher, a real tiny student, the real Trainer."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fkd_dali.relabel_generate import RelabelConfig, generate_relabel
from fkd_dali.relabel_losses import dense_logits, mse_gt, sre2l_kl
from fkd_dali.teachers import TeacherSpec
from fkd_dali.train import train
from fkd_dali.train_config import TrainConfig, TrainError
from fkd_dali.trainer import Trainer
from tests.conftest import assert_same_weights, current_device, make_image_folder
from tests.test_relabel_generate import S, tiny_teacher

DEVICE = current_device()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("relabel_train"))
    data = os.path.join(root, "data")
    make_image_folder(data, classes=3, per_class=4, seed=0, split="train")
    make_image_folder(data, classes=3, per_class=2, seed=1, split="val")
    teacher = tiny_teacher(os.path.join(root, "t.pt"), 0)
    store = os.path.join(root, "store")
    generate_relabel(RelabelConfig(data=data, save_path=store, input_size=S, epochs=3, batch_size=4, device=DEVICE,
                                   teachers=[TeacherSpec("torchscript", path=teacher, input_size=S)], threads=1,
                                   show_progress=False, seed=1))
    return {"root": root, "data": data, "store": store}


def cfg(s, out, **kw):
    args = dict(data=s["data"], arch="tiny_cnn", labels="relabel", softlabel_path=s["store"], batch_size=4,
                epochs=3, input_size=S, device=DEVICE, output=str(out), show_progress=False, lr=0.05, cos=True,
                temperature=3.0, warmup_epochs=0, val_batch_size=8)
    args.update(kw)
    return TrainConfig(**args)


def steps_seen(c: TrainConfig) -> tuple[list, list]:
    """Train with ``c``; per step the (store rows, positions) it trained on and the loss."""
    trainer = Trainer(c)
    seen, losses, step = [], [], trainer.step

    def recording(batch, lr):
        seen.append((batch["indices"].tolist(), batch["positions"].tolist()))
        loss, top1 = step(batch, lr)
        losses.append(float(loss))
        return loss, top1

    trainer.step = recording
    trainer.run()
    return seen, losses


def test_the_student_trains_on_the_stored_steps_in_the_stored_order(setup, tmp_path):
    """3 epochs of 3 steps of 4 crops: each step is the store's step, its positions in order; the loss is finite and
    falls (a tiny problem: the student learns the teacher's labels)."""
    from labelstore.relabel import open_relabel
    seen, losses = steps_seen(cfg(setup, tmp_path / "a", epochs=3, lr=0.02))
    blk = open_relabel(setup["store"]).read_steps(0, 9)
    assert [rows for rows, _ in seen] == [blk.images[r][:blk.step_size[r]].tolist() for r in range(9)]
    assert all(pos == list(range(len(pos))) for _, pos in seen)
    assert all(torch.isfinite(torch.tensor(losses)))
    log = [json.loads(x) for x in open(tmp_path / "a" / "log.jsonl")]
    assert len(log) == 3 and log[-1]["train_loss"] < log[0]["train_loss"], [x["train_loss"] for x in log]


def test_half_steps_over_pieces_and_an_exact_resume(setup, tmp_path):
    """-b 2 (half a stored step): 2 pieces per step; stopped after 5 steps and resumed, the same crops in the same
    order and the same weights as without the stop."""
    seen_a, _ = steps_seen(cfg(setup, tmp_path / "a", batch_size=2, output=str(tmp_path / "a")))
    assert len(seen_a) == 18 and [p for _, p in seen_a[:2]] == [[0, 1], [2, 3]]
    seen_b, _ = steps_seen(cfg(setup, tmp_path / "b", batch_size=2, output=str(tmp_path / "b"), max_steps=5))
    rest, _ = steps_seen(cfg(setup, tmp_path / "b", batch_size=2, output=str(tmp_path / "b"),
                             resume=str(tmp_path / "b" / "checkpoint.pth.tar")))
    assert seen_b + rest == seen_a
    w = [torch.load(tmp_path / k / "checkpoint.pth.tar", weights_only=False)["state_dict"] for k in ("a", "b")]
    assert_same_weights(*w)


def test_batch_sizes_the_plan_cannot_serve_are_refused_with_the_size_to_use(setup, tmp_path):
    with pytest.raises(TrainError, match=r"-b 3 .*neither divides the stored step of 4 crops.*per rank: 1, 2, 4\) "
                                         r"or is a multiple of it \(per rank: 8, 12, 16"):
        train(cfg(setup, tmp_path, batch_size=3))
    with pytest.raises(TrainError, match="--epochs 4 but .* holds labels of 3 epochs"):
        train(cfg(setup, tmp_path, epochs=4))
    with pytest.raises(TrainError, match="drop --mixup-cutmix"):
        train(cfg(setup, tmp_path, mixup_cutmix=True))
    with pytest.raises(TrainError, match=f"use --input-size {S}"):
        train(cfg(setup, tmp_path, input_size=24))


def test_a_relabel_store_given_to_the_fkd_objective_is_refused_by_name(setup, tmp_path):
    with pytest.raises(Exception, match="not top-k soft labels: train it with --labels relabel"):
        train(cfg(setup, tmp_path, labels="fkd"))


def test_mse_gt_with_ema_trains(setup, tmp_path):
    train(cfg(setup, tmp_path / "m", labels="relabel-mse", ce_weight=0.025, model_ema=True, model_ema_decay=0.99,
              lr=0.01))
    log = [json.loads(x) for x in open(tmp_path / "m" / "log.jsonl")]
    assert all(torch.isfinite(torch.tensor(x["train_loss"])) for x in log) and "val_ema_top1" in log[-1]


def test_the_losses_are_the_papers_formulas():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7) * 3
    y = torch.randint(0, 7, (5,))
    T = 3.0
    kl = (torch.softmax(t / T, 1) * (torch.log_softmax(t / T, 1) - torch.log_softmax(s / T, 1))).sum() / 5
    torch.testing.assert_close(sre2l_kl(s, t, T), kl)
    want = ((s - t) ** 2).mean() + 0.1 * torch.nn.functional.cross_entropy(s, y)
    torch.testing.assert_close(mse_gt(s, t, y, 0.1), want)
    val, idx = t.topk(2, 1)
    dense = dense_logits({"label_idx": idx, "label_val": val}, "topk", "logits", 7)
    p = torch.softmax(dense, 1)
    assert torch.equal(p.argmax(1), t.argmax(1)) and ((p > 0).sum(1) == 2).all()


@pytest.mark.slow
def test_ddp_ranks_share_each_step_and_stay_in_sync(setup, tmp_path):
    """-b 2 on 2 gloo ranks (1 crop each per step, half a stored step per optimizer step): each piece's positions
    split between the ranks, every position of every stored step trained once, the replicas identical."""
    import subprocess
    import sys

    from labelstore.relabel import open_relabel
    from tests.conftest import free_port, pythonpath
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath())
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), os.path.join(root, "tests", "relabel_ddp_worker.py"), setup["data"],
                        setup["store"], str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [json.load(open(tmp_path / f"rank{k}.json")) for k in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 12  # 2 epochs x 3 steps x 2 pieces
    blk = open_relabel(setup["store"]).read_steps(0, 6)
    for i, ((rows0, pos0), (rows1, pos1)) in enumerate(zip(*seen)):
        step, piece = divmod(i, 2)
        assert pos0 == [2 * piece] and pos1 == [2 * piece + 1]
        assert rows0 + rows1 == blk.images[step][2 * piece:2 * piece + 2].tolist()
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def pruned_copy(setup, path: str, keep) -> str:
    """A copy of the setup's store keeping only rows ``keep`` (pruned by step, as LPLD's stores are)."""
    import numpy as np

    from labelstore.relabel import create_relabel_store, open_relabel
    src = open_relabel(setup["store"])
    s = src.store
    keep = np.asarray(keep)
    blk = src.read_steps(0, src.num_steps)
    rs = create_relabel_store(path, files=s.file_table(), targets=s.targets_compact(), sizes=s.sizes(),
                              classes=s.classes, fingerprint=s.meta.fingerprint, dataset_root="train", epochs=3,
                              batch_size=4, mix=src.mix, input_size=src.input_size, kept=src.step_index[keep],
                              pruning={"how": "test"}, rows_per_shard=len(keep))
    rs.write_steps(0, **{k: blk.arrays[k][keep] for k in ("images", "boxes", "flips", "mix_partner", "mix_lam",
                                                          "mix_box", "labels")})
    rs.finalize()
    return path


def test_a_pruned_store_trains_every_epoch_on_steps_drawn_from_the_kept_ones(setup, tmp_path):
    """LPLD's batch_to_epoch: the plan's first 4 of 9 steps kept (epoch 0, and epoch 1's step 0); each of the 3
    run epochs trains 3 steps drawn from them, an epoch's last step (epoch 0, step 2) replaced by the step before
    it; the draws are the seed's, the same on a rerun and a resume, others with another seed."""
    from labelstore.relabel import open_relabel
    from pipelines.relabel_steps import epoch_rows, lpld_pool
    path = pruned_copy(setup, str(tmp_path / "pruned"), range(4))
    rs = open_relabel(path)
    assert lpld_pool(rs).tolist() == [0, 1, 1, 3]  # row 2 (epoch 0's last step) -> row 1
    seen, losses = steps_seen(cfg(setup, tmp_path / "a", softlabel_path=path, seed=5))
    assert len(seen) == 9 and all(torch.isfinite(torch.tensor(losses)))
    blk = rs.read_steps(0, 4)
    drawn = [r for e in range(3) for r in epoch_rows(rs, e, 5).tolist()]
    assert set(drawn) <= {0, 1, 3} and len(set(drawn)) > 1
    assert [rows for rows, _ in seen] == [blk.images[r].tolist() for r in drawn]
    again, _ = steps_seen(cfg(setup, tmp_path / "b", softlabel_path=path, seed=5, max_steps=4))
    rest, _ = steps_seen(cfg(setup, tmp_path / "b", softlabel_path=path, seed=5,
                             resume=str(tmp_path / "b" / "checkpoint.pth.tar")))
    assert again + rest == seen
    other = [r for e in range(3) for r in epoch_rows(rs, e, 6).tolist()]
    assert other != drawn


def test_a_batch_of_two_whole_steps(setup, tmp_path):
    """-b 8 over stored steps of 4: 2 whole steps per optimizer step (3 steps an epoch: 2 batches, the last one a
    single step); every crop of every step trained once, in the stored order."""
    from labelstore.relabel import open_relabel
    seen, losses = steps_seen(cfg(setup, tmp_path / "w", batch_size=8))
    blk = open_relabel(setup["store"]).read_steps(0, 9)
    assert len(seen) == 6 and all(torch.isfinite(torch.tensor(losses)))
    for e in range(3):
        first, last = seen[2 * e], seen[2 * e + 1]
        assert first[0] == blk.images[3 * e].tolist() + blk.images[3 * e + 1].tolist()
        assert first[1] == [0, 1, 2, 3] * 2 and last[0] == blk.images[3 * e + 2].tolist()


def test_recipe_sre2l_sets_sre2ls_defaults(setup, tmp_path):
    from fkd_dali.train_config import check, notes, recipe_config
    c = recipe_config("sre2l", data=setup["data"], softlabel_path=setup["store"]).resolved()
    assert (c.labels, c.opt, c.lr, c.weight_decay, c.batch_size, c.epochs, c.cos, c.temperature, c.min_lr,
            c.warmup_epochs) == ("relabel", "adamw", 0.001, 0.01, 1024, 300, True, 3.0, 0.0, 0)
    assert "recipe sre2l" in notes(c)[0] and "--temp 3" in notes(c)[0]
    c = recipe_config("sre2l", data=setup["data"], labels="relabel-mse", temperature=20.0, lr=0.002).resolved()
    assert (c.labels, c.temperature, c.lr) == ("relabel-mse", 20.0, 0.002)
    check(c)
    with pytest.raises(TrainError, match="--recipe sre2l trains a student on a relabel store"):
        check(recipe_config("sre2l", data=setup["data"], labels="fkd").resolved())
    plain = cfg(setup, tmp_path).resolved()
    assert "are --recipe sre2l" in " ".join(notes(plain))
    # the command line: --recipe sre2l with only the store and -b given trains with the recipe's AdamW and T
    from fkd_dali.options import train_config, train_parser
    args = train_parser().parse_args([setup["data"], "--recipe", "sre2l", "--softlabel-path", setup["store"],
                                      "-b", "4"])
    c = train_config(args)
    assert (c.labels, c.opt, c.temperature, c.batch_size, c.cos) == ("relabel", "adamw", 3.0, 4, True)
