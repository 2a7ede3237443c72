"""import-fkd / export-fkd against files written exactly as FKD's generator writes them."""

import io
import os
import zipfile

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from fkd_dali.cli import main
from tests.conftest import make_image_folder
from fkd_dali.crops import sample_crops
from fkd_dali.dataset import scan_image_folder
from fkd_dali.fkd_format import FKDFormatError, export_fkd, import_fkd, load_fkd_file
from labelstore import open_store

C, K = 20, 5


@pytest.fixture
def image_folder(tmp_path) -> str:
    """6 classes x 2 images: enough classes for top-5 labels."""
    root = str(tmp_path / "data")
    make_image_folder(root, classes=6, per_class=2)
    return root


def write_fkd_labels(data_root: str, out: str, *, fp16=False, layout="marginal", seed=0, skip=()):
    """FKD_SLG/generate_soft_label.py's output: out/<class>/<stem>.tar = [coords, flips, output]."""
    ds = scan_image_folder(os.path.join(data_root, "train"))
    rng = np.random.default_rng(seed)
    truth = {}
    for i, rel in enumerate(ds.files):
        if rel in skip:
            continue
        W, H = Image.open(os.path.join(ds.root, rel)).size
        boxes, flips = sample_crops(seed, [i], [[H, W]], C)
        boxes, flips = boxes[0], flips[0]
        coords = np.stack([torch.FloatTensor((b[0] / H, b[1] / W, b[2] / H, b[3] / W)).numpy() for b in boxes])
        p = torch.tensor(rng.dirichlet(np.ones(6) * 0.3, C), dtype=torch.float32)
        order = torch.argsort(p, dim=1, descending=True)
        if layout == "marginal":
            output = torch.stack([torch.stack([order[c, :K].float(), p[c, order[c, :K]]]) for c in range(C)]).numpy()
        elif layout == "smoothing":
            output = torch.stack([torch.stack([order[c, 0].float(), p[c, order[c, 0]]]) for c in range(C)]).numpy()
        else:
            output = order[:, 0].numpy()
        if fp16:
            coords, output = coords.astype(np.float16), output.astype(np.float16)
        cls, name = rel.split("/")
        dest = os.path.join(out, cls, name.split(".")[0] + ".tar")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        torch.save([coords, flips, output], dest)
        truth[rel] = (boxes, flips, output)
    return ds, truth


def test_import_recovers_exact_pixel_boxes_and_labels(image_folder, tmp_path):
    src = str(tmp_path / "fkd" / "imagenet" / "train")  # FKD generator's save_path/<name>/train/<class>
    ds, truth = write_fkd_labels(image_folder, src)
    rep = import_fkd(str(tmp_path / "fkd"), image_folder, str(tmp_path / "store"), show_progress=False)
    assert rep.imported == len(ds) and rep.label_type == "marginal_k5" and rep.coord_dtype == "float32"
    assert rep.max_rounding_px < 0.01
    store = open_store(str(tmp_path / "store"))
    assert store.complete and store.num_crops == C and store.top_k == K
    rows = store.read_rows(np.arange(len(ds)))
    for i, rel in enumerate(ds.files):
        boxes, flips, output = truth[rel]
        np.testing.assert_array_equal(rows["boxes"][i], boxes)
        np.testing.assert_array_equal(rows["flips"][i], flips)
        np.testing.assert_array_equal(rows["topk_idx"][i], output[:, 0, :].astype(int))
        np.testing.assert_array_equal(rows["topk_val"][i], output[:, 1, :].astype(np.float16))
    store.check_dataset(files=ds.files, classes=ds.classes, fingerprint=ds.fingerprint, targets=ds.targets)


def test_float16_files_report_their_rounding(image_folder, tmp_path):
    write_fkd_labels(image_folder, str(tmp_path / "fkd"), fp16=True)
    rep = import_fkd(str(tmp_path / "fkd"), image_folder, str(tmp_path / "store"), show_progress=False)
    assert rep.coord_dtype == "float16" and 0 < rep.max_rounding_px < 0.5
    assert open_store(str(tmp_path / "store")).meta.source["max_box_rounding_px"] == rep.max_rounding_px


@pytest.mark.parametrize("layout,kind,k", [("smoothing", "smoothing", 1), ("hard", "hard", 1)])
def test_other_fkd_label_layouts(image_folder, tmp_path, layout, kind, k):
    ds, truth = write_fkd_labels(image_folder, str(tmp_path / "fkd"), layout=layout)
    rep = import_fkd(str(tmp_path / "fkd"), image_folder, str(tmp_path / "store"), show_progress=False)
    assert rep.label_type == kind
    store = open_store(str(tmp_path / "store"))
    assert store.top_k == k
    out = truth[ds.files[0]][2]
    ids = out[:, 0] if layout == "smoothing" else out
    np.testing.assert_array_equal(store.read_rows([0])["topk_idx"][0, :, 0], ids.astype(int))


def test_export_then_import_round_trips(image_folder, tmp_path):
    write_fkd_labels(image_folder, str(tmp_path / "fkd"))
    import_fkd(str(tmp_path / "fkd"), image_folder, str(tmp_path / "a"), show_progress=False)
    n = export_fkd(str(tmp_path / "a"), str(tmp_path / "exported"), show_progress=False).written
    assert n == 12
    # FKD's trainer reads --softlabel_path/train/<class>/<stem>.tar with a plain torch.load.
    coords, flips, output = torch.load(str(tmp_path / "exported" / "train" / "class_0" / "img_000.tar"),
                                       weights_only=False)
    orig = torch.load(str(tmp_path / "fkd" / "class_0" / "img_000.tar"), weights_only=False)
    np.testing.assert_array_equal(coords, orig[0])
    np.testing.assert_array_equal(flips, orig[1])
    np.testing.assert_allclose(output, orig[2], rtol=1e-3)  # probabilities went through float16
    import_fkd(str(tmp_path / "exported"), image_folder, str(tmp_path / "b"), show_progress=False)
    a, b = open_store(str(tmp_path / "a")), open_store(str(tmp_path / "b"))
    for name in ("boxes", "flips", "topk_idx", "topk_val", "sizes"):
        np.testing.assert_array_equal(a.read_rows(range(12))[name], b.read_rows(range(12))[name])


def test_missing_files_are_counted_and_named(image_folder, tmp_path):
    write_fkd_labels(image_folder, str(tmp_path / "fkd"), skip={"class_1/img_001.jpg", "class_2/img_000.jpg"})
    with pytest.raises(FKDFormatError, match=r"2 of 12 images have no FKD label file.*class_1/img_001.tar.*"
                                             "--allow-missing"):
        import_fkd(str(tmp_path / "fkd"), image_folder, str(tmp_path / "s"), show_progress=False)
    rep = import_fkd(str(tmp_path / "fkd"), image_folder, str(tmp_path / "s2"), allow_missing=True,
                     show_progress=False)
    assert rep.imported == 10 and len(rep.missing) == 2
    store = open_store(str(tmp_path / "s2"))
    assert not store.complete and int((~store.done()).sum()) == 2


def test_corrupt_file_is_named(image_folder, tmp_path):
    write_fkd_labels(image_folder, str(tmp_path / "fkd"))
    victim = tmp_path / "fkd" / "class_2" / "img_001.tar"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(FKDFormatError, match=r"1 label file\(s\).*class_2/img_001.tar.*truncated or corrupt"):
        import_fkd(str(tmp_path / "fkd"), image_folder, str(tmp_path / "s"), show_progress=False)


@pytest.mark.parametrize("victim", ["class_0/img_000", "class_1/img_001"])  # the very first file, or another
def test_mismatched_crop_count_names_the_majority_and_the_odd_file(image_folder, tmp_path, victim):
    write_fkd_labels(image_folder, str(tmp_path / "fkd"))
    path = str(tmp_path / "fkd" / f"{victim}.tar")
    coords, flips, output = torch.load(path, weights_only=False)
    torch.save([coords[:10], flips[:10], output[:10]], path)
    with pytest.raises(FKDFormatError, match=rf"Most hold 20 crops, marginal_k5 labels \(top-5\) \(11 of 12 files "
                                             rf"sampled.*1 differ: \S*{victim}.tar \(10 crops") as e:
        import_fkd(str(tmp_path / "fkd"), image_folder, str(tmp_path / "s"), show_progress=False)
    assert str(e.value).count(".tar") == 1  # only the odd file is named
    assert not os.path.exists(tmp_path / "s")  # nothing half-made left behind (the rerun is not refused)


def test_files_pickled_by_numpy_1_load_safely(tmp_path):
    """FKD's published files were written with numpy 1.x (module numpy.core); a code-running pickle is refused."""
    state = [np.zeros((2, 4), np.float32), np.zeros(2, bool), np.zeros((2, 2, 5), np.float32)]
    torch.save(state, str(tmp_path / "new.tar"))
    src = zipfile.ZipFile(str(tmp_path / "new.tar"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(item, data)
    (tmp_path / "old.tar").write_bytes(buf.getvalue())
    coords, flips, output = load_fkd_file(str(tmp_path / "old.tar"))
    assert coords.shape == (2, 4) and output.shape == (2, 2, 5)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save([Evil(), 1, 2], str(tmp_path / "evil.tar"))
    with pytest.raises(FKDFormatError, match=r"refused for safety: it holds code-bearing Python objects "
                                             r"\(posix.system\).*If you trust where it came from") as e:
        load_fkd_file(str(tmp_path / "evil.tar"))
    assert "truncated" not in str(e.value) and "corrupt" not in str(e.value)


def test_cli_import_and_inspect(image_folder, tmp_path, capsys):
    write_fkd_labels(image_folder, str(tmp_path / "fkd"))
    assert main(["import-fkd", str(tmp_path / "fkd"), "--data", image_folder, "--save-path",
                 str(tmp_path / "s")]) == 0
    assert "imported 12 images" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "s"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verified 1 shards" in out and "complete   yes" in out and "source     kind=import-fkd" in out
    assert main(["import-fkd", str(tmp_path / "nothing"), "--data", image_folder, "--save-path",
                 str(tmp_path / "s3")]) == 1
    assert "holds no FKD label folders" in capsys.readouterr().err


# --- what FKD's own trainer reads (szq0214/FKD utils_FKD.py, train_FKD.py) ----------------------------------

def fkd_trainer_reads(path: str, label_type: str, num_classes: int) -> torch.Tensor:
    """What FKD's trainer does with one label file, on this torch: a plain torch.load (weights_only=True by
    default since torch 2.6), the crops' labels stacked as its collate does, and its Recover_soft_label for
    ``label_type`` (hard: scatter of the ids; smoothing / marginal: values scattered into the uniform rest,
    the rest's dtype from torch.ones, i.e. float32)."""
    coords, flips, output = torch.load(path, map_location="cpu")
    label = torch.stack([torch.as_tensor(output[i]) for i in range(len(output))])
    n = label.size(0)
    if label_type == "hard":
        return torch.zeros(n, num_classes).scatter_(1, label.view(-1, 1), 1)
    if label_type == "smoothing":
        index, value = label[:, 0].to(dtype=int), label[:, 1]
        minor = ((torch.ones_like(value) - value) / (num_classes - 1)).reshape(-1, 1)
        return (minor * torch.ones(n, num_classes)).scatter_(1, index.view(-1, 1), value.view(-1, 1))
    index, value = label[:, 0, :].to(dtype=int), label[:, 1, :]
    minor = (torch.ones(n, 1) - value.sum(1, keepdim=True)) / (num_classes - value.shape[1])
    return (minor * torch.ones(n, num_classes)).scatter_(1, index, value)


def _store(image_folder, tmp_path, layout, name="a"):
    write_fkd_labels(image_folder, str(tmp_path / f"fkd-{name}"), layout=layout)
    import_fkd(str(tmp_path / f"fkd-{name}"), image_folder, str(tmp_path / name), show_progress=False)
    return str(tmp_path / name)


@pytest.mark.parametrize("layout,fkd_type", [("hard", "hard"), ("smoothing", "smoothing"),
                                             ("marginal", "marginal_smoothing_k5")])
def test_the_default_export_is_what_fkds_trainer_reads(image_folder, tmp_path, layout, fkd_type):
    store = _store(image_folder, tmp_path, layout)
    rep = export_fkd(store, str(tmp_path / "out"), show_progress=False)
    assert rep.fkd_label_type == fkd_type and rep.written == 12
    path = str(tmp_path / "out" / "train" / "class_0" / "img_000.tar")
    soft = fkd_trainer_reads(path, fkd_type, 6)
    torch.testing.assert_close(soft.sum(1), torch.ones(C))
    ids = open_store(store).read_rows([0])["topk_idx"][0, :, 0]
    np.testing.assert_array_equal(soft.argmax(1).numpy(), ids)
    if layout == "hard":  # FKD's hard files: (C,) integer class ids
        output = torch.load(path)[2]
        assert output.shape == (C,) and output.dtype == torch.int64


def test_a_store_generated_for_hard_labels_exports_fkd_hard_files(image_folder, tmp_path):
    """`generate --label-type hard` records the type; the export follows it (not (C, 2) [id, 1.0] rows)."""
    store = _store(image_folder, tmp_path, "smoothing")
    g = zarr.open_group(store, mode="r+")  # as `generate --label-type hard` records it
    attrs = g.attrs.asdict()["fkd"]
    g.attrs.update({"fkd": {**attrs, "source": {"kind": "generate", "label_type": "hard"}}})
    rep = export_fkd(store, str(tmp_path / "out"), show_progress=False)
    assert rep.layout == "hard" and rep.fkd_label_type == "hard"
    fkd_trainer_reads(str(tmp_path / "out" / "train" / "class_0" / "img_000.tar"), "hard", 6)


def test_export_fkd_writes_and_names_the_layout_meal_v2_reads(image_folder, tmp_path, capsys):
    """MEAL V2's FKD_train.py reads one folder deeper than FKD: SOFTLABEL_PATH/<last folder of --imagenet>/train/
    <class>/<stem>.tar (its ImageFolder_FKD, written out below). The default export says so; --dataset-folder NAME
    writes that layout, and every image's path as MEAL V2 computes it holds that image's labels."""
    import torchvision
    store = _store(image_folder, tmp_path, "marginal")
    assert main(["export-fkd", store, "--out", str(tmp_path / "fkd")]) == 0
    out = capsys.readouterr().out
    assert "MEAL V2's FKD_train.py reads one folder deeper" in out and "--dataset-folder NAME" in out, out
    meal = str(tmp_path / "meal")
    assert main(["export-fkd", store, "--out", meal, "--dataset-folder", "data"]) == 0
    out = capsys.readouterr().out
    assert f"MEAL V2's FKD_train.py reads them with --softlabel_path {meal} --imagenet .../data --soft_label_type " \
           "marginal_smoothing_k5" in out, out
    imagenet = image_folder  # MEAL V2's --imagenet; its train loader is an ImageFolder of --imagenet/train
    samples = torchvision.datasets.ImageFolder(os.path.join(imagenet, "train")).samples
    assert len(samples) == 12
    for path, _ in samples:  # MEAL V2's utils_FKD.ImageFolder_FKD.__getitem__, @59e6bca
        label_path = os.path.join(meal, '/'.join(path.split('/')[-4:]).split('.')[0] + '.tar')
        fkd = os.path.join(tmp_path, "fkd", os.path.relpath(path, imagenet)).rsplit(".", 1)[0] + ".tar"
        for a, b in zip(torch.load(label_path), torch.load(fkd)):
            assert torch.equal(a, b), path
    for bad in ("my.data", "a/b", ""):
        assert main(["export-fkd", store, "--out", str(tmp_path / "x"), "--dataset-folder", bad]) == 1
        assert f"--dataset-folder {bad!r}: give the last folder name of the --imagenet path" in capsys.readouterr().err


def test_fp16_and_numpy_exports_and_what_fkds_trainer_makes_of_them(image_folder, tmp_path):
    """The documented limits (docs/reliability.md): float16 files load but FKD's loss fails on their dtype
    (FKD's own --use_fp16 files too); numpy files need weights_only=False on torch >= 2.6. Hard labels stay
    int64 ids even with --fp16, so FKD can use them."""
    store = _store(image_folder, tmp_path, "marginal")
    export_fkd(store, str(tmp_path / "fp16"), fp16=True, show_progress=False)
    with pytest.raises(RuntimeError, match="scatter"):
        fkd_trainer_reads(str(tmp_path / "fp16" / "train" / "class_0" / "img_000.tar"), "marginal_smoothing_k5", 6)
    export_fkd(store, str(tmp_path / "np"), arrays="numpy", show_progress=False)
    path = str(tmp_path / "np" / "train" / "class_0" / "img_000.tar")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path)
    coords, flips, output = torch.load(path, weights_only=False)
    assert isinstance(output, np.ndarray) and output.dtype == np.float32
    export_fkd(store, str(tmp_path / "t"), show_progress=False)  # the same numbers as the default tensors
    assert np.array_equal(load_fkd_file(path)[2], load_fkd_file(str(tmp_path / "t" / "train" / "class_0" /
                                                                    "img_000.tar"))[2])
    hard = _store(image_folder, tmp_path, "hard", name="h")
    export_fkd(hard, str(tmp_path / "hard16"), fp16=True, show_progress=False)
    fkd_trainer_reads(str(tmp_path / "hard16" / "train" / "class_0" / "img_000.tar"), "hard", 6)


def test_a_failed_import_leaves_nothing_and_overwrite_keeps_the_old_store_until_success(image_folder, tmp_path):
    write_fkd_labels(image_folder, str(tmp_path / "fkd"))
    import_fkd(str(tmp_path / "fkd"), image_folder, str(tmp_path / "s"), show_progress=False)
    before = open_store(str(tmp_path / "s")).read_rows(range(12))
    victim = tmp_path / "fkd" / "class_2" / "img_001.tar"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(FKDFormatError, match="truncated or corrupt"):
        import_fkd(str(tmp_path / "fkd"), image_folder, str(tmp_path / "new"), show_progress=False)
    assert sorted(os.listdir(tmp_path)) == ["data", "fkd", "s"]  # no half-made store, no staging folder
    with pytest.raises(FKDFormatError, match="truncated or corrupt"):
        import_fkd(str(tmp_path / "fkd"), image_folder, str(tmp_path / "s"), overwrite=True, show_progress=False)
    after = open_store(str(tmp_path / "s")).read_rows(range(12))  # the old store is intact
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    assert sorted(os.listdir(tmp_path)) == ["data", "fkd", "s"]


def test_the_loader_bench_fkd_contender_reads_an_export_as_fkds_trainer(image_folder, tmp_path):
    """``bench loader``'s FKD baseline (a re-creation of FKD's own DataLoader) trains from an export-fkd folder:
    crops of the asked size, each with one of its image's stored labels and the image's class."""
    from fkd_dali.bench.fkd_original import fkd_original_loader, iterate
    store = _store(image_folder, tmp_path, "marginal")
    export_fkd(store, str(tmp_path / "out"), show_progress=False)
    ds = scan_image_folder(os.path.join(image_folder, "train"))
    loader = fkd_original_loader(ds.root, list(ds.files), [int(t) for t in ds.targets], str(tmp_path / "out" / "train"),
                                 batch_size=4, num_crops=2, workers=0, size=24)
    rows = open_store(store).read_rows(range(len(ds)))
    stored = {(int(ds.targets[i]), tuple(rows["topk_idx"][i, c].tolist()), tuple(rows["topk_val"][i, c].tolist()))
              for i in range(len(ds)) for c in range(C)}
    seen = 0
    for images, soft, hard in iterate(loader):
        assert images.shape == (len(hard), 3, 24, 24) and soft.shape == (len(hard), 2, K)
        for s, t in zip(soft, hard):
            ids, vals = s[0].long().tolist(), s[1].numpy().astype(np.float16).tolist()
            assert (int(t), tuple(ids), tuple(vals)) in stored
        seen += len(hard)
    assert seen == 2 * len(ds)
