"""GPU-only tests (marked ``gpu``; skipped without CUDA): the mixed decoder against the CPU decoder, GPU replay
against CPU replay and torchvision, zero-copy hand-off, buffer lifetime across streams, bad files on the GPU
decoder, bf16 channels-last steps of a CNN and a ViT with resume, generation on the GPU against the CPU, DDP
with ranks sharing one GPU (gloo) and a one-rank NCCL group, and the eval / standard loaders on the GPU.

Run them with ``pytest -m gpu`` (the rest of the suite on the GPU too: ``FKD_TEST_DEVICE=gpu pytest``). The
measurements are the doctor's (:mod:`fkd_dali.doctor.checks`); these tests assert the promises on them and
print the figures (``-s`` shows them) for docs/benchmarks.md.
"""

import os
import re
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import labelstore
from fkd_dali.doctor import checks
from fkd_dali.doctor.context import Context
from fkd_dali.imagefiles import UNUSABLE
from pipelines import EvalLoader, FKDLoader, LoaderError, StandardLoader
from tests.conftest import textured

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    torch.cuda.set_device(0)
    return Context(device="gpu", workdir=str(tmp_path_factory.mktemp("gpu")), threads=4, deadline=1e9)


def test_mixed_decode_matches_the_cpu_decode_on_every_kind(ctx):
    m = checks.measure_decode(ctx)
    for kind, row in m["kinds"].items():
        print(f"{kind:20s} GPU vs DALI CPU: max {row['vs_cpu']['max']:3d} mean {row['vs_cpu']['mean']:.4f}; "
              f"GPU vs Pillow: max {row['vs_pillow']['max']:3d} mean {row['vs_pillow']['mean']:.4f}")
    print(m["hw_loads"])
    assert m["gpu_decoder_active"], "the mixed decoder fell back to the CPU (nvJPEG not loaded)"
    for load, v in m["hw_loads"].items():
        assert v["max"] <= checks.DECODE_GPU_MAX and v["worst_mean"] <= checks.DECODE_GPU_MEAN, (load, v)
    # With the whole batch on one decoder, an image decodes the same wherever it sits in the batch.
    assert m["hw_loads"]["0.0"]["position_max"] == 0 and m["hw_loads"]["1.0"]["position_max"] == 0


def test_fancy_upsampling_is_what_makes_the_gpu_decode_match(ctx):
    """DALI's mixed-decoder default (no fancy upsampling) differs from the CPU decode on 4:2:0 JPEGs; ours does
    not. (If this ever fails because both agree, the option no longer matters: keep it anyway.)"""
    from pipelines import DecoderOptions
    path = dict(ctx.kinds())["JPEG 4:2:0"]
    cpu = checks.decode_files([path], "cpu")[0].astype(np.int16)
    ours = checks.decode_files([path], "gpu")[0].astype(np.int16)
    dali_default = checks.decode_files([path], "gpu", DecoderOptions(fancy_upsampling=False))[0].astype(np.int16)
    d_ours, d_default = np.abs(ours - cpu), np.abs(dali_default - cpu)
    print(f"4:2:0 vs CPU: fancy upsampling max {d_ours.max()} mean {d_ours.mean():.3f}; DALI default max "
          f"{d_default.max()} mean {d_default.mean():.3f}")
    assert d_default.max() > 0, "GPU and CPU decodes are identical without fancy upsampling: nvJPEG is not in use"
    assert d_ours.mean() <= d_default.mean()


def test_hardware_and_cuda_decoders_compared(ctx):
    """The hardware JPEG decoder (hw_decoder_load 1) against the CUDA decoder (0), kind by kind: reported for
    docs/benchmarks.md; both must stay within the decode bound against each other."""
    from pipelines import DecoderOptions
    paths = [p for _, p in ctx.kinds()]
    cuda = checks.decode_files(paths, "gpu", DecoderOptions(hw_decoder_load=0.0))
    hw = checks.decode_files(paths, "gpu", DecoderOptions(hw_decoder_load=1.0))
    for (kind, _), a, b in zip(ctx.kinds(), cuda, hw):
        d = np.abs(a.astype(np.int16) - b.astype(np.int16))
        print(f"{kind:20s} hardware vs CUDA decoder: max {d.max()} mean {d.mean():.4f}")
        assert d.max() <= checks.DECODE_GPU_MAX, kind


def test_gpu_replay_matches_cpu_replay_and_torchvision(ctx):
    m = checks.measure_replay(ctx)
    print(m)
    assert m["ids_labels_equal_cpu"]
    assert m["vs_torchvision_max"] <= checks.REPLAY_MAX  # the crop geometry, on the GPU-decoded image
    assert m["vs_cpu_max"] <= checks.REPLAY_MAX + checks.DECODE_GPU_MAX  # plus what the decoders differ by


def test_zero_copy_hand_off(ctx):
    m = checks.measure_zero_copy(ctx)
    print(m)
    assert m["zero_copy"]
    for name, v in m["layouts"].items():
        assert v["device_ok"] and v["dtype_ok"] and v["layout_ok"], name
        if name.startswith("float32"):
            assert v["torch_alloc_bytes"] < 0.25 * v["image_bytes"], name


def test_batches_stay_valid_when_kept_dropped_early_or_read_on_a_side_stream(ctx):
    m = checks.measure_buffer_lifetime(ctx)
    print(m)
    assert m["kept_unchanged"] and m["late on torch's stream"] and m["side stream"]


@pytest.mark.parametrize("kind", list(UNUSABLE))
def test_unusable_files_on_the_gpu_decoder_are_named(ctx, tmp_path, kind):
    """Zero-byte, truncated, random and bomb files never become a batch. By default the store's fingerprint
    names the changed file before the first batch; without that check (verify_files=False) the GPU decoder's
    own failure is caught and the file named (a decompression bomb is refused by headers only: DALI decodes
    it to garbage without an error, which is why the check is on by default)."""
    p = ctx.photos(12)
    data = str(tmp_path / "data")
    shutil.copytree(p["data"], data)
    store = labelstore.open_store(p["store"])
    name = str(store.files[5])
    victim = os.path.join(data, store.meta.dataset_root or "train", name)
    UNUSABLE[kind](victim, textured(np.random.default_rng(0), 60, 80))
    with pytest.raises(labelstore.StoreMismatchError, match=re.escape(name)):
        FKDLoader(data, p["store"], batch_size=4, num_crops=2, crop_size=32, device="gpu")
    if kind == "header claims 30000x30000":
        return
    ld = FKDLoader(data, p["store"], batch_size=4, num_crops=2, crop_size=32, device="gpu", verify_files=False)
    with pytest.raises(LoaderError, match=re.escape(name)):
        for _ in ld:
            pass


def test_eval_and_standard_loaders_on_the_gpu(ctx, tmp_path):
    data = str(tmp_path / "val")
    rng = np.random.default_rng(2)
    files = []
    for r, (h, w) in enumerate([(375, 500), (500, 333), (240, 320)]):
        rel = f"c{r}/{r}.jpg"
        os.makedirs(os.path.join(data, f"c{r}"))
        Image.fromarray(textured(rng, h, w)).save(os.path.join(data, rel), quality=95)
        files.append(rel)
    ld = EvalLoader(data, files, [0, 1, 2], batch_size=2, crop_size=224, device="gpu", normalize=False)
    images = torch.cat([b["images"] for b in ld])
    assert images.is_cuda
    for i, rel in enumerate(files):
        img = Image.open(os.path.join(data, rel)).convert("RGB")
        ref = TF.center_crop(TF.resize(img, ld.resize_size, TF.InterpolationMode.BILINEAR, antialias=True), 224)
        d = np.abs(images[i].cpu().numpy().astype(int) - np.asarray(ref).astype(int).transpose(2, 0, 1))
        print(f"eval view {rel}: interior max {d[:, 1:-1, 1:-1].max()} mean {d.mean():.3f}")
        assert d[:, 1:-1, 1:-1].max() <= 3 and d.mean() < 0.5
    std = StandardLoader(data, files, [0, 1, 2], batch_size=3, crop_size=64, device="gpu", seed=1)
    b = next(iter(std))
    assert b["images"].is_cuda and b["images"].shape == (3, 3, 64, 64)
    assert b["targets"].tolist() == b["indices"].tolist()  # image i is of class i here


@pytest.mark.parametrize("arch", ["resnet18", "deit_tiny"])
def test_bf16_channels_last_steps_and_resume_order(ctx, arch):
    m = checks.measure_train_steps(ctx, arch)
    print(m)
    assert m["amp_bf16"] and m["channels_last"] and m["input_channels_last"]
    assert m["finite"] and m["resume_same_order"]


def test_generation_on_the_gpu_matches_the_cpu(ctx):
    m = checks.measure_generation(ctx)
    print(m)
    assert m["cpu_geometry_equal"] and m["sharded_geometry_equal"]
    assert m["cpu_top1_agreement"] >= 0.97
    assert m["sharded_top1_agreement"] >= 0.99 and m["sharded_max_prob_diff"] <= 0.01


def test_ddp_two_ranks_sharing_the_gpu_with_gloo(ctx):
    r = checks.run_ddp(ctx, 2, None)  # the default backend must pick gloo: NCCL refuses two ranks on one GPU
    print(r)
    assert r["backend"] == "gloo" and r["disjoint_shards"] and r["same_weights"] and r["steps"] >= 3
    assert all(d.startswith("cuda") for d in r["devices"])


def test_ddp_one_rank_nccl_group(ctx):
    r = checks.run_ddp(ctx, 1, None)
    print(r)
    assert r["backend"] == "nccl" and r["steps"] >= 3 and r["devices"] == ["cuda:0"]
