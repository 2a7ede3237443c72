"""Dataset scan: identical to torchvision's ImageFolder; clear errors for bad folders."""

import os

import numpy as np
import pytest
from torchvision.datasets import ImageFolder

from fkd_dali.dataset import DatasetError, scan_image_folder, split_dir, start_scan
from labelstore import PathTable, fingerprint_of
from tests.conftest import make_image_folder, textured, write_jpeg


def test_same_classes_files_and_order_as_torchvision(tmp_path):
    root = tmp_path / "train"
    rng = np.random.default_rng(0)
    layout = ["b_cls/z.jpg", "b_cls/A.JPG", "b_cls/sub/deeper/x.jpeg", "b_cls/sub/y.png", "a_cls/1.webp",
              "a_cls/10.jpg", "a_cls/2.jpg", "a_cls/notes.txt", "a_cls/.hidden.jpg", "C_cls/q.Jpg",
              "C_cls/img.tiff"]
    for rel in layout:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            p.write_text("not an image")
        else:
            from PIL import Image
            fmt = {"png": "PNG", "webp": "WEBP", "tiff": "TIFF"}.get(rel.rsplit(".", 1)[1].lower(), "JPEG")
            Image.fromarray(textured(rng, 16, 16)).save(p, fmt)
    ours = scan_image_folder(str(root))
    tv = ImageFolder(str(root))
    assert ours.classes == tv.classes
    assert [os.path.join(str(root), f) for f in ours.files] == [p for p, _ in tv.samples]
    assert ours.targets.tolist() == [t for _, t in tv.samples]
    assert "a_cls/notes.txt" not in ours.files
    assert ours.byte_sizes.tolist() == [os.path.getsize(p) for p, _ in tv.samples]


def test_path_table_is_a_compact_sequence_with_the_same_fingerprint():
    paths = ["top.jpg", "a/1.jpg", "a/2.jpg", "a/sub/x.jpg", "b/\udcff-odd name.jpg", "a/3.jpg", "b/ü.jpg"]
    table = PathTable.from_paths(paths)
    assert list(table) == paths and [table[i] for i in range(len(paths))] == paths and table[-1] == "b/ü.jpg"
    assert table[1:3] == paths[1:3] and table == PathTable.from_paths(iter(paths)) and len(table) == 7
    sizes = np.arange(7) * 1000 + 7
    assert fingerprint_of(table, sizes) == fingerprint_of(paths, sizes)  # stores made before keep matching
    with pytest.raises(IndexError):
        table[7]
    many = PathTable.from_paths(f"n{c:08d}/n{c:08d}_{i}.JPEG" for c in range(10) for i in range(1000))
    assert many.nbytes < 25 * len(many)  # 19-byte names + offsets, the folder once per run


def test_the_vectorised_fingerprint_is_the_per_file_format():
    """PathTable formats ``rel\\0size\\n`` with numpy, in blocks: every size width, folder prefixes of any
    length (none at the top level), names that are not UTF-8, and rows across block boundaries hash exactly as
    the per-file string form (which stores made before keep matching)."""
    import hashlib

    from labelstore.pathtable import FINGERPRINT_BLOCK
    rng = np.random.default_rng(3)
    paths = [f"{'d' * int(rng.integers(1, 30))}{i % 7}/" * int(rng.integers(0, 3)) + f"f{i}_é\udcff.jpg"
             for i in range(2 * FINGERPRINT_BLOCK + 5)]
    sizes = np.concatenate([[0, 9, 10, 99, 100, 10**12, 2**62, 10**18 - 1, 10**18],
                            rng.integers(0, 10**10, len(paths) - 9)])
    want = hashlib.sha256(b"".join(f"{p}\0{int(s)}\n".encode("utf-8", "surrogateescape")
                                   for p, s in zip(paths, sizes))).hexdigest()
    assert fingerprint_of(PathTable.from_paths(paths), sizes) == "sha256:" + want


def test_fingerprint_tracks_paths_and_sizes(tmp_path):
    split = make_image_folder(str(tmp_path / "d"), classes=2, per_class=3)
    a = scan_image_folder(split).fingerprint
    assert scan_image_folder(split).fingerprint == a and a.startswith("sha256:")
    victim = os.path.join(split, "class_1", "img_002.jpg")
    write_jpeg(victim, textured(np.random.default_rng(9), 80, 80))  # replaced by another image
    assert scan_image_folder(split).fingerprint != a
    os.remove(victim)
    assert len(scan_image_folder(split)) == 5


def test_errors_name_the_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        split_dir(str(tmp_path / "nope"), "train")
    (tmp_path / "data").mkdir()
    with pytest.raises(DatasetError, match="data/train does not exist"):
        split_dir(str(tmp_path / "data"), "train")
    (tmp_path / "data" / "train").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        scan_image_folder(split_dir(str(tmp_path / "data"), "train"))
    make_image_folder(str(tmp_path / "data"), classes=2, per_class=2)
    (tmp_path / "data" / "train" / "empty_cls").mkdir()
    (tmp_path / "data" / "train" / "txt_only").mkdir()
    (tmp_path / "data" / "train" / "txt_only" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="empty_cls, txt_only contain no image"):
        scan_image_folder(str(tmp_path / "data" / "train"))


def test_split_folder_may_be_given_directly(tmp_path):
    split = make_image_folder(str(tmp_path / "d"), classes=2, per_class=1)
    assert split_dir(split, "train") == split


def test_a_scan_in_a_child_process_gives_the_same_dataset_and_errors(tmp_path):
    """start_scan runs a large dataset's scan in another process (its stats then run beside this process's own
    work, not under its GIL): the same files, targets, sizes and fingerprint as the scan here, and the same
    errors."""
    split = make_image_folder(str(tmp_path / "d"), classes=3, per_class=4)
    os.makedirs(os.path.join(split, "class_1", "sub"))
    write_jpeg(os.path.join(split, "class_1", "sub", "deep.jpg"), textured(np.random.default_rng(1), 20, 30))
    here = scan_image_folder(split)
    scan = start_scan(split, child=True)
    assert scan.proc is not None  # really another process
    got = scan.result()
    assert got.files == here.files and list(got.files) == list(here.files) and got.classes == here.classes
    assert np.array_equal(got.targets, here.targets) and np.array_equal(got.byte_sizes, here.byte_sizes)
    assert got.fingerprint == here.fingerprint and got.root == split
    assert start_scan(split).proc is None  # a small dataset is scanned here, in result()
    os.makedirs(os.path.join(split, "empty_cls"))
    with pytest.raises(DatasetError, match="empty_cls contain no image"):
        start_scan(split, child=True).result()


def test_symlink_loop_is_an_error_not_a_hang(tmp_path):
    split = make_image_folder(str(tmp_path / "d"), classes=2, per_class=1)
    os.symlink(os.path.join(split, "class_0"), os.path.join(split, "class_0", "loop"))
    with pytest.raises(DatasetError, match="symlink loop"):
        scan_image_folder(split)
