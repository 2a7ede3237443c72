"""Self-supervised views: the photometric ops of the replay graph against torchvision on PIL images (MoCo v2's
pixels), one graph for the teacher's and the student's views, generation into an embedding store with a tiny
real teacher, the loader serving the replayed views with their embeddings, and the measured fidelity (stored
embedding vs the teacher's fresh output on the training view, cosine >= 0.999 for every crop)."""

import itertools
import os

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import pytest
import torch
import torchvision.transforms.functional as F
from nvidia.dali import pipeline_def
from PIL import Image

import labelstore
from fkd_dali.generate import EmbeddingTeacher, GenerateConfig, GenerateError, generate
from fkd_dali.models.tiny import TinyCNN
from pipelines import FKDLoader
from pipelines.photometric import photometric
from tests.conftest import current_device, make_image_folder

DEVICE = current_device()
D = 16


def images(n=8, h=40, w=52, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for k in range(n):
        base = np.stack([(xx * (3 + k)) % 256, (yy * (5 + k)) % 256, ((xx + yy) * 2 + 40 * k) % 256], -1)
        out.append(np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8))
    return out


def params(f=(1, 1, 1, 0), o=(0, 1, 2, 3), g=False, s=0.0):
    return (np.array(f, np.float32), np.array(o, np.int8), np.array(g), np.array(s, np.float32))


def run_photometric(imgs, ps, device="cpu"):
    @pipeline_def(batch_size=len(imgs), num_threads=1, device_id=0 if device == "gpu" else None, exec_dynamic=True,
                  enable_conditionals=True)
    def pipe():
        x = fn.external_source(lambda: imgs, dtype=types.UINT8, layout="HWC")
        if device == "gpu":
            x = x.gpu()
        def column(i):
            return lambda: [p[i] for p in ps]  # DALI passes an argument to a source taking one: no default args
        f, o, g, s = (fn.external_source(column(i), dtype=t)
                      for i, t in enumerate((types.FLOAT, types.INT8, types.BOOL, types.FLOAT)))
        return photometric(x, f, o, g, s, device)
    p = pipe()
    out, = p.run()
    if device == "gpu":
        out = out.as_cpu()
    return [np.array(out[i]) for i in range(len(imgs))]


def diff(got, want):
    d = np.concatenate([np.abs(a.astype(int) - b.astype(int)).ravel() for a, b in zip(got, want)])
    return int(d.max()), float(d.mean())


def test_identity_parameters_give_the_crop_back_bit_for_bit():
    imgs = images()
    assert diff(run_photometric(imgs, [params()] * len(imgs)), imgs) == (0, 0.0)


def test_each_op_matches_torchvision_on_pil_images():
    """brightness, contrast, saturation and grayscale are Pillow's formulas exactly; hue differs by rounding in a
    few pixels (Pillow's HSV mixes float and double); blur equals torchvision's Gaussian (window 2*ceil(3s)+1),
    not MoCo's PIL box-blur approximation (measured, docs/ssl.md)."""
    imgs = images()
    pil = [Image.fromarray(a) for a in imgs]
    fs = np.linspace(0.6, 1.4, len(imgs)).astype(np.float32)
    for j, op in enumerate((F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)):
        got = run_photometric(imgs, [params(tuple(f if i == j else 1.0 for i in range(3)) + (0,)) for f in fs])
        assert diff(got, [np.array(op(p, float(f))) for p, f in zip(pil, fs)]) == (0, 0.0), op.__name__
    got = run_photometric(imgs, [params(g=True)] * len(imgs))
    assert diff(got, [np.array(F.rgb_to_grayscale(p, 3)) for p in pil]) == (0, 0.0)
    hs = np.linspace(-0.1, 0.1, len(imgs)).astype(np.float32)
    worst, mean = diff(run_photometric(imgs, [params((1, 1, 1, h)) for h in hs]),
                       [np.array(F.adjust_hue(p, float(h))) for p, h in zip(pil, hs)])
    assert worst <= 8 and mean < 0.02, (worst, mean)
    sig = np.linspace(0.1, 2.0, len(imgs)).astype(np.float32)
    tv = [F.gaussian_blur(torch.from_numpy(a).permute(2, 0, 1), kernel_size=2 * int(np.ceil(3 * s)) + 1,
                          sigma=float(s)).permute(1, 2, 0).numpy() for a, s in zip(imgs, sig)]
    worst, mean = diff(run_photometric(imgs, [params(s=s) for s in sig]), tv)
    assert worst <= 1 and mean < 0.01, (worst, mean)


def test_jitter_runs_in_the_stored_order():
    imgs = images()
    pil = [Image.fromarray(a) for a in imgs]
    perms = list(itertools.permutations(range(4)))
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    ps, want, other = [], [], []
    for i, p in enumerate(pil):
        f = np.array((0.7 + 0.05 * i, 1.3 - 0.05 * i, 0.8 + 0.04 * i, -0.08 + 0.02 * i), np.float32)
        o = perms[(5 * i) % 24]
        ps.append(params(f, o, g=(i % 3 == 0)))
        for order, out in ((o, want), (o[::-1], other)):
            x = p
            for j in order:
                x = ops[j](x, float(f[j]))
            out.append(np.array(F.rgb_to_grayscale(x, 3) if i % 3 == 0 else x))
    got = run_photometric(imgs, ps)
    worst, mean = diff(got, want)
    assert mean < 0.2 and worst <= 10, (worst, mean)
    assert diff(got, other)[1] > 5 * max(mean, 0.05)  # another order gives other pixels


class Teacher(torch.nn.Module):
    """A tiny real network: tiny_cnn's features and a linear head to D, L2-normalised."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyCNN(D)
        self.net.eval()

    def forward(self, x):
        return torch.nn.functional.normalize(self.net(x), dim=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ssl"))
    make_image_folder(os.path.join(root, "data"), classes=2, per_class=3, seed=3,
                      sizes=[(48, 64), (64, 48), (56, 72)])
    teacher = EmbeddingTeacher(Teacher(), dim=D, name="tiny", input_size=32)
    cfg = GenerateConfig(data=os.path.join(root, "data"), save_path=os.path.join(root, "store"), teachers=[],
                         embedding_teacher=teacher, num_crops=8, group_size=3, batch_size=2, rows_per_shard=4,
                         device=DEVICE, show_progress=False, seed=5, amp=False)  # the fp32 teacher's output
    report = generate(cfg)
    return {"root": root, "cfg": cfg, "teacher": teacher, "report": report}


def test_generation_writes_an_embedding_store(world):
    assert world["report"].complete and world["report"].crops == 6 * 8
    s = labelstore.open_store(world["cfg"].save_path)
    assert s.kind.name == "embedding" and s.fields["dim"] == D and s.describe_kind() == "kind embedding, D=16"
    rows = s.read_rows(range(6))
    assert rows["jitter"].any() and (~rows["jitter"]).any() and rows["grayscale"].any()
    assert (rows["blur_sigma"] > 0).any() and (rows["blur_sigma"] == 0).any()
    again = generate(world["cfg"])  # the same command resumes: nothing is pending
    assert again.complete and again.shards == 0
    import dataclasses
    other = dataclasses.replace(world["cfg"], views={"blur_p": 0.0})
    with pytest.raises(GenerateError, match="views"):
        generate(other)


def loader(world, **kw):
    t = world["teacher"]
    return FKDLoader(os.path.join(world["root"], "data"), world["cfg"].save_path, batch_size=3, num_crops=4,
                     crop_size=t.input_size, device=DEVICE, shuffle=False, mean=t.mean, std=t.std, **kw)


def test_the_loader_serves_replayed_views_with_their_embeddings(world):
    ld = loader(world)
    batches = list(ld)
    b = batches[0]
    assert set(b) == {"images", "embedding", "targets", "indices", "crop_ids"}
    assert b["images"].shape == (12, 3, 32, 32) and b["embedding"].shape == (12, D)
    assert b["embedding"].dtype == torch.float32
    raw = list(loader(world, dtype="uint8"))
    s = labelstore.open_store(world["cfg"].save_path)
    rows = s.read_rows(range(6))
    for bt in raw:
        img = bt["images"].permute(0, 2, 3, 1).numpy().astype(int)  # (B*n, S, S, 3)
        for x, r, c in zip(img, bt["indices"].tolist(), bt["crop_ids"].tolist()):
            grey_view = (x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all()
            assert grey_view == bool(rows["grayscale"][r, c]), (r, c)


def fidelity(world, device):
    """Cosine of each stored embedding to the teacher's fresh float32 output on the training loader's view."""
    teacher = world["teacher"].module.to("cuda" if device == "gpu" else "cpu")
    cos, wrong = [], []
    for p in range(2):
        ld = loader(world) if device == DEVICE else FKDLoader(
            os.path.join(world["root"], "data"), world["cfg"].save_path, batch_size=3, num_crops=4, crop_size=32,
            device=device, shuffle=False, mean=world["teacher"].mean, std=world["teacher"].std)
        ld.set_epoch(p)
        for b in ld:
            with torch.no_grad():
                fresh = teacher(b["images"].float()).cpu()
            stored = b["embedding"].cpu()
            cos.append(torch.nn.functional.cosine_similarity(fresh, stored, dim=1))
            wrong.append(torch.nn.functional.cosine_similarity(fresh, stored.roll(1, 0), dim=1))
    return torch.cat(cos), torch.cat(wrong)


def test_fidelity_stored_embedding_vs_the_teacher_on_the_training_view(world):
    cos, wrong = fidelity(world, DEVICE)
    print(f"fidelity on {DEVICE}: cosine min {cos.min():.6f} mean {cos.mean():.6f} over {len(cos)} crops")
    assert len(cos) == 6 * 8 and cos.min() >= 0.999
    assert wrong.min() < 0.999  # another crop's embedding is told apart: the test can fail


@pytest.mark.gpu
def test_fidelity_with_the_gpu_decoder(world):
    cos, _ = fidelity(world, "gpu")
    print(f"fidelity on the GPU loader: cosine min {cos.min():.6f} mean {cos.mean():.6f} over {len(cos)} crops")
    assert cos.min() >= 0.999


def test_show_draws_the_views_the_loader_delivers_with_their_parameters(world, tmp_path):
    from fkd_dali.show import show, view_lines
    r = show(world["cfg"].save_path, os.path.join(world["root"], "data"), "2", str(tmp_path / "show"), crop_size=32,
             columns=4, device=DEVICE)
    assert r["crops"] == 8 and os.path.isfile(r["sheet"])
    served = {}
    ld = loader(world, dtype="uint8")
    for p in range(2):  # two passes: both rounds of 4 crops
        ld.set_epoch(p)
        for b in ld:
            for x, row, c in zip(b["images"].permute(0, 2, 3, 1).numpy(), b["indices"].tolist(),
                                 b["crop_ids"].tolist()):
                served[(row, c)] = x
    for k in range(8):
        shown = np.asarray(Image.open(os.path.join(tmp_path, "show", f"crop_{k}.png")))
        np.testing.assert_array_equal(shown, served[(2, k)])
    rows = labelstore.open_store(world["cfg"].save_path).read_rows([2])
    text = [" ".join(view_lines(rows, k)) for k in range(8)]
    assert any("jitter" in t and "no jitter" not in t for t in text) and any("blur" in t for t in text)


def test_a_resumed_generation_relabels_cleared_rows_identically(world, tmp_path):
    import dataclasses
    import shutil
    copy = str(tmp_path / "store")
    shutil.copytree(world["cfg"].save_path, copy)
    before = labelstore.open_store(copy).read_rows(range(6))
    labelstore.open_store(copy, mode="r+").clear_done(0, 4)
    report = generate(dataclasses.replace(world["cfg"], save_path=copy))
    assert report.complete and report.shards == 1 and report.images == 4
    after = labelstore.open_store(copy).read_rows(range(6))
    for name, v in before.items():
        np.testing.assert_array_equal(after[name], v, err_msg=name)


def test_an_embedding_teacher_of_another_dim_is_refused_naming_it(world, tmp_path):
    import dataclasses

    from fkd_dali.teachers import TeacherError
    wrong = EmbeddingTeacher(Teacher(), dim=8, name="tiny", input_size=32)
    cfg = dataclasses.replace(world["cfg"], save_path=str(tmp_path / "s"), embedding_teacher=wrong)
    with pytest.raises(TeacherError, match=r"tiny outputs shape \(\d+, 16\).*not \(N, 8\)"):
        generate(cfg)
    with pytest.raises(TeacherError, match="dim 0 must be a whole number in 1..16384"):
        generate(dataclasses.replace(cfg, embedding_teacher=EmbeddingTeacher(Teacher(), dim=0)))


def test_training_fkd_from_an_embedding_store_is_refused_by_name(world, capsys):
    from fkd_dali.cli import main
    code = main(["train", os.path.join(world["root"], "data"), "--softlabel-path", world["cfg"].save_path, "-a",
                 "tiny_cnn", "--num-crops", "2", "--epochs", "2", "-b", "4", "--input-size", "32", "--device", DEVICE,
                 "--output", os.path.join(world["root"], "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert "holds teacher embeddings (kind embedding, D=16), not top-k soft labels: train it with --labels ssl" in err
    assert "Traceback" not in err


def test_an_image_replaced_by_a_smaller_one_of_the_same_byte_size_is_refused_naming_it(world, tmp_path):
    """The embedding store's twin of test_untrusted_stores.py::
    test_the_loader_refuses_an_image_replaced_by_a_smaller_one_of_the_same_byte_size: the views' stored boxes lie
    outside the new 8x8 image (the fingerprint, paths + byte sizes, cannot see it). The self-supervised replay
    graph compares each image's header with its stored size before a box is used (graphs.fit_rois, as the top-k
    graph does): the loader and show refuse naming the file instead of DALI reading outside the image."""
    import shutil

    from fkd_dali import imagefiles
    from fkd_dali.show import show
    data = str(tmp_path / "data")
    shutil.copytree(os.path.join(world["root"], "data"), data)
    victim = "class_1/img_001.jpg"
    imagefiles.smaller_of_same_byte_size(os.path.join(data, "train", victim), np.full((8, 8, 3), 120, np.uint8))
    says = r"1 file\(s\) changed: class_1/img_001.jpg \(now 8x8 px, labelled at \d+x\d+\)"
    t = world["teacher"]
    ld = FKDLoader(data, world["cfg"].save_path, batch_size=3, num_crops=4, crop_size=t.input_size, device=DEVICE,
                   shuffle=False, mean=t.mean, std=t.std)
    with pytest.raises(labelstore.StoreMismatchError, match=says):
        try:
            for _ in ld:
                pass
        finally:
            ld.close()
    row = list(labelstore.open_store(world["cfg"].save_path).files).index(victim)
    with pytest.raises(labelstore.StoreMismatchError, match=says):
        show(world["cfg"].save_path, data, str(row), str(tmp_path / "shown"), crop_size=32, device=DEVICE)
    assert not (tmp_path / "shown").exists()


def test_inspect_verify_reads_a_generated_embedding_store(world, capsys):
    from fkd_dali.cli import main
    assert main(["inspect", world["cfg"].save_path, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "kind embedding, D=16" in out
