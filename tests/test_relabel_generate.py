"""Relabelling with mixing into a relabel store: real JPEGs, a real TorchScript teacher, a real Zarr store; the
stored logits are the teacher's on the very pixels training replays (the same loader and graph)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fkd_dali.generate import GenerateError
from fkd_dali.relabel_generate import RelabelConfig, generate_relabel
from fkd_dali.sre2l_plan import sre2l_plan
from fkd_dali.teachers import TeacherSpec
from labelstore.relabel import open_relabel
from pipelines.relabel import RelabelLoader, StoreSteps
from tests.conftest import current_device, make_image_folder

DEVICE = current_device()
S = 32


def tiny_teacher(path: str, seed: int, classes: int = 3) -> str:
    """A small conv net (spatially sensitive: a pasted CutMix box changes its logits), saved as TorchScript."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(24, classes)).eval()
    torch.jit.save(torch.jit.script(net), path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("relabel_gen"))
    make_image_folder(os.path.join(root, "data"), classes=3, per_class=4, seed=0, split="train")
    make_image_folder(os.path.join(root, "data"), classes=3, per_class=2, seed=1, split="val")
    return {"root": root, "data": os.path.join(root, "data"),
            "teachers": [tiny_teacher(os.path.join(root, f"t{k}.pt"), k) for k in range(2)]}


def config(world, save: str, **kw) -> RelabelConfig:
    args = dict(data=world["data"], save_path=save, input_size=S, epochs=2, batch_size=4, rows_per_shard=2,
                teachers=[TeacherSpec("torchscript", path=world["teachers"][0], input_size=S)], device=DEVICE,
                threads=1, show_progress=False, seed=3)
    args.update(kw)
    return RelabelConfig(**args)


def replay(path: str, batch: int, rank: int = 0, world: int = 1):
    """The training loader of a store: (epoch, batch dict) for every batch."""
    rs = open_relabel(path)
    st = StoreSteps(rs)
    s = rs.store
    ld = RelabelLoader(os.path.join(os.path.dirname(path), "data", "train"), s.file_table(), s.targets_compact(),
                       s.sizes(), steps_of=st.steps_of, labels_of=st.labels_of, label_specs=st.label_specs,
                       stored_step=rs.batch_size, mix=rs.mix, batch_size=batch, crop_size=rs.input_size,
                       device=DEVICE, rank=rank, world_size=world, num_threads=1)
    for e in range(rs.epochs):
        ld.set_epoch(e)
        for b in ld:
            yield e, b


@pytest.mark.parametrize("mix", ["cutmix", "mixup"])
def test_stored_logits_are_the_teachers_on_the_replayed_mixed_crops(world, mix):
    save = os.path.join(world["root"], f"store_{mix}")
    generate_relabel(config(world, save, mix=mix))
    rs = open_relabel(save)
    assert rs.done().all() and rs.store.meta.complete
    assert rs.mix == mix and rs.epochs == 2 and rs.batch_size == 4 and rs.num_steps == 6
    # the steps hold SRe2L's images (its seeded sampler), in its order
    want = [imgs.tolist() for _, _, imgs in sre2l_plan(12, 4, 2)]
    got = rs.read_steps(0, 6)
    assert [got.images[r][:got.step_size[r]].tolist() for r in range(6)] == want
    if mix == "cutmix":
        assert (got.mix_box >= 0).all() and (got.mix_lam < 1).all()
    teacher = torch.jit.load(world["teachers"][0])
    n = 0
    for _, b in replay(save, batch=4):
        with torch.no_grad():
            fresh = teacher(b["images"].cpu()).float()
        stored = b["labels"].float().cpu()
        torch.testing.assert_close(stored, fresh.half().float(), atol=2e-3, rtol=2e-3)
        n += len(stored)
    assert n == 24


def test_norm_equalised_ensemble_and_top_k(world):
    save = os.path.join(world["root"], "store_ens")
    specs = [TeacherSpec("torchscript", path=p, input_size=S) for p in world["teachers"]]
    generate_relabel(config(world, save, teachers=specs, label_format="topk", top_k=2, label_dtype="float32"))
    models = [torch.jit.load(p) for p in world["teachers"]]
    for _, b in replay(save, batch=4):
        with torch.no_grad():
            outs = torch.stack([m(b["images"].cpu()).float() for m in models])
        norm = torch.norm(outs, dim=[1, 2], keepdim=True)  # G-VBSM: per teacher over the whole step
        ens = (outs / norm * norm.mean(0, keepdim=True)).mean(0)
        val, idx = ens.topk(2, dim=1)
        assert torch.equal(b["label_idx"].long().cpu(), idx)
        torch.testing.assert_close(b["label_val"].cpu(), val, atol=1e-5, rtol=1e-5)


def test_ranks_and_a_resume_give_the_single_run_store(world):
    one = os.path.join(world["root"], "one")
    generate_relabel(config(world, one))
    two = os.path.join(world["root"], "two")
    generate_relabel(config(world, two, rank=0, world_size=2))  # shards 0 and 2; shard 1 left pending
    assert not open_relabel(two).done().all()
    partial = os.path.join(two, "labels", "c", "1.partial")  # a chunk file a killed writer left half-written
    os.makedirs(os.path.dirname(partial), exist_ok=True)
    with open(partial, "wb") as f:
        f.write(b"half")
    generate_relabel(config(world, two))  # the resume labels only what is pending, and removes the partial file
    assert not os.path.exists(partial)
    a, b = open_relabel(one).read_steps(0, 6), open_relabel(two).read_steps(0, 6)
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=k)
    with pytest.raises(GenerateError, match="relabelled with --epochs = 2 but this run asks for 3"):
        generate_relabel(config(world, two, epochs=3))


def test_a_teacher_of_another_view_is_refused(world):
    with pytest.raises(GenerateError, match="Give the teacher --input-size 32"):
        generate_relabel(config(world, os.path.join(world["root"], "bad"),
                                teachers=[TeacherSpec("torchscript", path=world["teachers"][0], input_size=24)]))


def loud_teacher(path: str, scale: float) -> str:
    """tiny_teacher with its logits multiplied by ``scale`` (finite in float32; 1e6 overflows float16)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(24, 3)).eval()
    with torch.no_grad():
        net[-1].weight.mul_(scale)
        net[-1].bias.fill_(scale)
    torch.jit.save(torch.jit.script(net), path)
    return path


def test_a_float16_overflow_is_refused_before_the_store_exists_and_fp32_reruns_on_the_same_path(world, tmp_path):
    """The teacher is checked on the plan's first step before the store is created: the refusal leaves nothing at
    --save-path, so the --fp32 rerun the message asks for creates the store there."""
    teacher = [TeacherSpec("torchscript", path=loud_teacher(str(tmp_path / "loud.pt"), 1e6), input_size=S)]
    save = str(tmp_path / "s")
    with pytest.raises(GenerateError, match=r"beyond float16's 65504 \(the first step \(nothing was written\)\); "
                                            r"relabel with --fp32 \(same --save-path\)"):
        generate_relabel(config(world, save, teachers=teacher))
    assert not os.path.exists(save)
    generate_relabel(config(world, save, teachers=teacher, label_dtype="float32"))
    rs = open_relabel(save)
    assert rs.store.meta.complete and rs.label_dtype == np.float32
    assert float(np.abs(rs.read_steps(0, 1).labels).max()) > 65504


HOLD = """
import sys, time
from labelstore.locking import store_writer_lock
lock = store_writer_lock(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_relabel_run_on_a_store_in_use_is_refused_and_a_dead_holder_blocks_nothing(world, tmp_path):
    """A run holding the store's writer lock (another relabel run, here a process holding it) refuses a second run
    by the holder's pid, before it labels anything; once the holder is killed (SIGKILL: its lock file stays, stale)
    the rerun resumes the store and completes it."""
    import signal
    import subprocess
    import sys

    from tests.conftest import pythonpath
    save = str(tmp_path / "s")
    generate_relabel(config(world, save, rank=0, world_size=2))  # shards 0 and 2 done, shard 1 pending
    before = open_relabel(save).done().copy()
    assert not before.all()
    p = subprocess.Popen([sys.executable, "-c", HOLD, save], env=dict(os.environ, PYTHONPATH=pythonpath()),
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(GenerateError, match=rf"label store {save} is in use by another run \(pid {p.pid} on "
                                                r"host.*launch them with torchrun"):
            generate_relabel(config(world, save))
        assert (open_relabel(save).done() == before).all()  # nothing labelled under the other writer
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    from labelstore.locking import STORE_LOCK
    assert "pid" in open(os.path.join(save, STORE_LOCK)).read()  # the dead holder's lock file stays (stale)
    generate_relabel(config(world, save))
    assert open_relabel(save).done().all() and open_relabel(save).store.meta.complete
