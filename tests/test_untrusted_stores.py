"""A label store is input (docs/reliability.md, "The store is input too"): names that leave the dataset, rows
with impossible labels, absurd shapes in zarr.json, images replaced after generation. Every command that
reads a store (train, show, export-fkd, inspect, generate) refuses them with one clear line; nothing is
written outside its folder and nothing is allocated before the shapes are bounded."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr
from PIL import Image

import labelstore
from fkd_dali import imagefiles
from fkd_dali.cli import main
from fkd_dali.fkd_format import FKDFormatError, export_fkd
from fkd_dali.generate import generate
from fkd_dali.show import show
from pipelines import FKDLoader
from tests.conftest import current_device, pythonpath
from tests.test_generate import config, world  # noqa: F401 - module fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = current_device()


@pytest.fixture
def made(world, tmp_path):  # noqa: F811
    """A private dataset copy and a complete store generated from it."""
    data = str(tmp_path / "data")
    shutil.copytree(world["data"], data)
    store = str(tmp_path / "s")
    generate(config(world, store, data=data))
    return {"data": data, "store": store, "teachers": world["teachers"]}


def cli(capsys, *args):
    """`fkd-dali ARGS` (in this process: an exception other than the CLI's one-line errors fails the test)."""
    rc = main(list(args))
    return rc, capsys.readouterr().err


def every_command(m, tmp_path):
    """Each command that reads the store, as a real process."""
    s, d = m["store"], m["data"]
    return {
        "inspect --verify": ["inspect", s, "--verify"],
        "show": ["show", s, d, "--image", "0", "--out", str(tmp_path / "shown")],
        "export-fkd": ["export-fkd", s, "--out", str(tmp_path / "fkd")],
        "train": ["train", d, "--softlabel-path", s, "-a", "tiny_cnn", "--num-crops", "2", "-b", "8", "--epochs",
                  "2", "--input-size", "16", "--device", DEVICE, "--output", str(tmp_path / "run"), "-q"],
        "generate (resume)": ["generate", d, "--save-path", s, "-a", "torchscript", "--teacher-path",
                              m["teachers"][0], "--input-size", "24", "--num-crops", "6", "--top-k", "3", "--num-seg",
                              "4", "-b", "3", "--rows-per-shard", "8", "--seed", "2", "--device", DEVICE, "-q"],
    }


def refused_everywhere(m, tmp_path, capsys, says: str, skip: tuple[str, ...] = ()) -> None:
    for name, args in every_command(m, tmp_path).items():
        if name in skip:
            continue
        rc, err = cli(capsys, *args)
        assert rc == 1 and says in err, (name, err[-2000:])


def _set_attr(store: str, **kw) -> None:
    g = zarr.open_group(store, mode="r+")
    attrs = g.attrs.asdict()["fkd"]
    attrs.update(kw)
    g.attrs.update({"fkd": attrs})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["../../escaped/x.jpg", "/etc/passwd", "class_0/../../../x.jpg", "class_0//x.jpg"])
def test_a_file_name_leaving_the_dataset_is_refused_by_every_command(made, tmp_path, capsys, name):
    zarr.open_group(made["store"], mode="r+")["files"][0] = name
    # `train` and `generate` never build a path from the store's names: they read the images their own scan of
    # DATA found (the fingerprint ties them to the store), so a bad name there is never used (at ImageNet scale
    # they do not even read the names); every other command refuses it.
    refused_everywhere(made, tmp_path, capsys, f"file name 0 is {name!r}", skip=("train", "generate (resume)"))
    commands = every_command(made, tmp_path)
    for args in (commands["train"] + ["--soft-label-type", "marginal_smoothing_k3"], commands["generate (resume)"]):
        rc, err = cli(capsys, *args)
        assert rc == 0, err[-2000:]
    with pytest.raises(labelstore.StoreFormatError, match="may only name files inside its dataset folder"):
        FKDLoader(made["data"], made["store"], batch_size=4, num_crops=2, device=DEVICE)
    assert not (tmp_path / "fkd").exists() and not (tmp_path / "shown").exists()


def test_export_never_writes_outside_out(made, tmp_path):
    """The split name comes from the store too (dataset.root): '../escaped' would put files beside OUT."""
    dataset = labelstore.open_store(made["store"]).meta.to_attrs()["dataset"]
    _set_attr(made["store"], dataset={**dataset, "root": "../escaped"})
    with pytest.raises(labelstore.StoreFormatError, match=r"dataset.root .*'../escaped'"):
        export_fkd(made["store"], str(tmp_path / "fkd"), show_progress=False)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "fkd").exists()
    _set_attr(made["store"], dataset=dataset)
    os.makedirs(tmp_path / "elsewhere")
    os.makedirs(tmp_path / "fkd2")
    os.symlink(tmp_path / "elsewhere", tmp_path / "fkd2" / "train")  # a link inside OUT leading out of it
    with pytest.raises(labelstore.StoreFormatError, match=r"leads to .*elsewhere.*outside .*fkd2"):
        export_fkd(made["store"], str(tmp_path / "fkd2"), show_progress=False)
    assert os.listdir(tmp_path / "elsewhere") == []


@pytest.mark.slow
def test_export_refuses_two_images_with_one_fkd_name(world, tmp_path):  # noqa: F811
    data = str(tmp_path / "data")
    shutil.copytree(world["data"], data)
    cls = os.path.join(data, "train", "class_0")
    os.rename(os.path.join(cls, "img_000.jpg"), os.path.join(cls, "x.1.jpg"))
    os.rename(os.path.join(cls, "img_001.jpg"), os.path.join(cls, "x.2.jpg"))
    generate(config(world, str(tmp_path / "s"), data=data))  # fine for fkd-dali: its store keys whole names
    with pytest.raises(FKDFormatError, match=r"class_0/x.1.jpg and class_0/x.2.jpg would both be written as "
                                             r"train/class_0/x.tar"):
        export_fkd(str(tmp_path / "s"), str(tmp_path / "fkd"), show_progress=False)
    assert not (tmp_path / "fkd").exists()
    r = subprocess.run([sys.executable, "-m", "fkd_dali", "inspect", str(tmp_path / "s"), "--verify"], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=pythonpath()), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "class_0/x.1.jpg and class_0/x.2.jpg -> class_0/x.tar" in r.stdout, r.stdout


def test_export_counts_what_it_wrote_and_does_not_overwrite_unasked(made, tmp_path):
    rep = export_fkd(made["store"], str(tmp_path / "fkd"), show_progress=False)
    files = [f for _, _, fs in os.walk(tmp_path / "fkd") for f in fs]
    assert rep.written == len(files) == 30
    with pytest.raises(FKDFormatError, match="already holds 30 of the 30 label files .*--overwrite"):
        export_fkd(made["store"], str(tmp_path / "fkd"), show_progress=False)
    assert export_fkd(made["store"], str(tmp_path / "fkd"), overwrite=True, show_progress=False).written == 30


ROW = 10


def _poke(store: str, array: str, value) -> None:
    zarr.open_group(store, mode="r+")[array][ROW, 0] = value


@pytest.mark.parametrize("array,value,says", [
    ("boxes", [0, 0, 5000, 5], "a crop box reaches outside its image"),  # DALI would segfault on it
    ("boxes", [0, 0, 0, 0], "a crop box has zero height or width"),
    ("topk_val", [np.nan, 0.1, 0.1], "a probability is not a finite value"),
    ("topk_idx", [99, 1, 2], "a class id is outside 0..9"),
])
def test_show_and_export_validate_rows_as_train_does(made, tmp_path, array, value, says):
    _poke(made["store"], array, value)
    with pytest.raises(labelstore.StoreCorruptError, match=rf"row {ROW} \(class_3/img_010.jpg\): {says}"):
        show(made["store"], made["data"], str(ROW), str(tmp_path / "shown"))
    with pytest.raises(labelstore.StoreCorruptError, match=says):
        export_fkd(made["store"], str(tmp_path / "fkd"), show_progress=False)
    with pytest.raises(labelstore.StoreCorruptError, match=says):
        labelstore.open_store(made["store"]).verify()


def test_show_refuses_an_image_replaced_after_generation(made, tmp_path):
    victim = os.path.join(made["data"], "train", "class_3", "img_010.jpg")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(victim)
    with pytest.raises(labelstore.StoreMismatchError, match=r"class_3/img_010.jpg \(now 20x20 px, labelled at"):
        show(made["store"], made["data"], str(ROW), str(tmp_path / "shown"))


def _inflate(store: str, what: str, n: int) -> None:
    """Rewrite every zarr.json consistently for ``n`` images (or crops per image); no chunk is written."""
    axis = {"num_images": 0, "num_crops": 1}[what]
    for name in os.listdir(store):
        meta = os.path.join(store, name, "zarr.json")
        if os.path.isfile(meta):
            m = json.load(open(meta))
            if len(m["shape"]) > axis and (axis == 0 or name in labelstore.CROP_ARRAYS):
                m["shape"][axis] = n
                json.dump(m, open(meta, "w"))
    _set_attr(store, **{what: n})


@pytest.mark.parametrize("tamper,says", [
    (lambda s: _inflate(s, "num_images", 10 ** 13), "it claims 10,000,000,000,000 images"),
    (lambda s: _set_attr(s, num_classes=10 ** 9), "num_classes is 1,000,000,000"),
    (lambda s: _inflate(s, "num_crops", 10 ** 9), "num_crops is 1,000,000,000"),
    (lambda s: _set_attr(s, layout={"rows_per_shard": 0, "crops_per_chunk": 4}), "layout.rows_per_shard is 0"),
])
def test_absurd_shapes_in_zarr_json_are_one_clear_line_everywhere(made, tmp_path, capsys, tamper, says):
    tamper(made["store"])
    refused_everywhere(made, tmp_path, capsys, says)


def test_a_chunk_larger_than_memory_is_refused_before_reading(made, tmp_path):
    meta = os.path.join(made["store"], "done", "zarr.json")
    m = json.load(open(meta))
    m["chunk_grid"]["configuration"]["chunk_shape"] = [10 ** 12]
    json.dump(m, open(meta, "w"))
    with pytest.raises(labelstore.StoreFormatError, match=r"array 'done' has chunks of shape \(1000000000000,\)"):
        labelstore.open_store(made["store"])


def test_a_store_never_reads_or_writes_through_a_symlink(made, tmp_path, capsys):
    """Issue 23, items 1-2: a downloaded store whose lock file (or a chunk folder) links outside it. `generate`
    (on a complete store too) and `inspect --clear-rows` wrote the lock's JSON into the linked file, and
    `generate` wrote chunk files into a linked folder. Every command now refuses a link inside a store."""
    s = made["store"]
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.remove(os.path.join(s, "done", "writer.lock"))
    os.symlink(victim, os.path.join(s, "done", "writer.lock"))
    gen = every_command(made, tmp_path)["generate (resume)"]
    for args in (gen, ["inspect", s, "--clear-rows", "0:8"], ["inspect", s]):
        rc, err = cli(capsys, *args)
        assert rc == 1 and f"done/writer.lock is a symbolic link (to {victim})" in err and "cp -rL" in err, err
    assert victim.read_text() == "precious"  # untouched
    os.remove(os.path.join(s, "done", "writer.lock"))
    os.symlink(tmp_path / "missing.txt", os.path.join(s, "done", "writer.lock"))  # a link to nothing: not created
    assert cli(capsys, *gen)[0] == 1 and not (tmp_path / "missing.txt").exists()
    os.remove(os.path.join(s, "done", "writer.lock"))

    outside = tmp_path / "outside"
    shutil.move(os.path.join(s, "topk_val", "c"), outside)
    os.symlink(outside, os.path.join(s, "topk_val", "c"))
    before = sorted(str(p) for p in outside.rglob("*"))
    for name, args in every_command(made, tmp_path).items():
        rc, err = cli(capsys, *args)
        assert rc == 1 and f"topk_val/c is a symbolic link (to {outside})" in err, (name, err[-2000:])
    rc, err = cli(capsys, "inspect", s, "--clear-rows", "0:8")
    assert rc == 1 and "topk_val/c is a symbolic link" in err
    assert sorted(str(p) for p in outside.rglob("*")) == before
    os.remove(os.path.join(s, "topk_val", "c"))
    shutil.move(outside, os.path.join(s, "topk_val", "c"))
    assert cli(capsys, "inspect", s, "--verify")[0] == 0  # the real folder back: a sound store

    os.symlink(s, tmp_path / "link-to-store")  # the store's own path may be a link (the user made it)
    assert cli(capsys, "inspect", str(tmp_path / "link-to-store"), "--verify")[0] == 0


def _filled(tmp_path) -> str:
    from tests.test_labelstore import filled_store
    path = str(tmp_path / "s")
    filled_store(path, n=12, c=8, rows_per_shard=4)
    return path


def test_a_nul_byte_in_a_stored_name_is_refused_naming_the_row(tmp_path, capsys):
    """Issue 23, item 7: a NUL byte passed `--verify`; `show` said only "embedded null byte"."""
    s = _filled(tmp_path)
    zarr.open_group(s, mode="r+")["files"][2] = "class_2/img\0_002.jpg"
    rc, err = cli(capsys, "inspect", s, "--verify")
    assert rc == 1 and "file name 2 is 'class_2/img\\x00_002.jpg': it holds a NUL byte (1 such names)" in err, err
    for read in (lambda st: st.files, lambda st: st.file_table()):
        with pytest.raises(labelstore.StoreFormatError, match="file name 2 .* it holds a NUL byte"):
            read(labelstore.open_store(s))


def _retype_topk_idx(s: str) -> None:
    g = zarr.open_group(s, mode="r+")
    data = g["topk_idx"][:]
    del g["topk_idx"]
    g.create_array("topk_idx", data=data.astype(np.uint8), chunks=(4, 8, 3))


@pytest.mark.parametrize("tamper,says", [
    (lambda s: _set_attr(s, skipped=5), "the metadata attribute 'skipped' is 5 (int); expected a list of [row, reason] "
                                        "pairs, rows in 0..11"),
    (lambda s: _set_attr(s, skipped=[[40, "x"]]),
     "'skipped' is [[40, \"x\"]] (list); expected a list of [row, reason]"),
    (lambda s: _set_attr(s, complete="yes"),
     "the metadata attribute 'complete' is \"yes\" (str); expected true or false"),
    (lambda s: _set_attr(s, dataset=[1]), "the metadata attribute 'dataset' is [1] (list); expected an object"),
    (lambda s: _set_attr(s, num_crops="8"),
     "the metadata attribute 'num_crops' is \"8\" (str); expected a whole number"),
    (_retype_topk_idx, "array 'topk_idx' holds uint8 values; a label store's 'topk_idx' is int16 or int32"),
], ids=["skipped-not-a-list", "skipped-row-out-of-range", "complete-a-string", "dataset-a-list", "num-crops-a-string",
        "topk-idx-uint8"])
def test_wrongly_typed_metadata_and_arrays_are_named(tmp_path, capsys, tamper, says):
    """Issue 23, item 6: a `skipped` that is not a list and a uint8 `topk_idx` (train: KeyError: 'uint8') were raw
    tracebacks."""
    s = _filled(tmp_path)
    tamper(s)
    with pytest.raises(labelstore.StoreFormatError, match="damaged or (was crafted|was not made by fkd-dali)") as e:
        labelstore.open_store(s)
    assert says in str(e.value) and s in str(e.value)
    rc, err = cli(capsys, "inspect", s)
    assert rc == 1 and says in err


def _argparse_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 2
    return capsys.readouterr().err


def test_a_lost_done_file_is_an_error_and_no_command_reports_work_it_did_not_do(tmp_path, capsys):
    """Issue 23, item 5: a complete store whose `done` chunk is missing said "complete yes (0 / 12 rows done)" and
    `export-fkd` "wrote 0" (exit 0); --clear-rows 5:2 cleared nothing but marked the store incomplete;
    --verify --sample 0 verified 0 shards, "success"; --clear-rows abc gave Python's message."""
    s = _filled(tmp_path)
    os.remove(os.path.join(s, "done", "c", "1"))
    says = "array 'done' has no chunk file done/c/1 (rows 4..7) although the store is marked complete"
    for args in (["inspect", s], ["inspect", s, "--verify"], ["export-fkd", s, "--out", str(tmp_path / "fkd")]):
        rc, err = cli(capsys, *args)
        assert rc == 1 and says in err and "--clear-rows 4:8" in err, (args, err)
    assert not (tmp_path / "fkd").exists()
    assert cli(capsys, "inspect", s, "--clear-rows", "4:8")[0] == 0  # the advised fix works
    assert labelstore.open_store(s).missing_rows().tolist() == [4, 5, 6, 7]

    s = _filled(tmp_path / "t")
    for bad, says in (("5:2", "'5:2' holds no row: A:B clears rows A..B-1, so it needs 0 <= A < B"),
                      ("abc", "'abc': give the rows as A:B (rows A..B-1, e.g. 0:8) or one row A")):
        assert f"argument --clear-rows: {says}" in _argparse_error(capsys, "inspect", s, "--clear-rows", bad)
    rc, err = cli(capsys, "inspect", s, "--clear-rows", "8:40")
    assert rc == 1 and "rows 8:40 are not a range of its rows" in err and "0 <= A < B <= 12" in err, err
    assert labelstore.open_store(s).complete  # nothing was changed
    assert "argument --sample: 0: give at least 1" in _argparse_error(capsys, "inspect", s, "--verify", "--sample", "0")
    with pytest.raises(ValueError, match="a sample of 0 shards checks nothing"):
        labelstore.open_store(s).verify(sample=0)

    empty = str(tmp_path / "empty")
    from tests.test_labelstore import new_store
    new_store(empty, n=12, c=8)
    rc, err = cli(capsys, "export-fkd", empty, "--out", str(tmp_path / "fkd"))
    assert rc == 1 and "has no labelled row yet (0 of 12 rows done): nothing to export" in err, err


@pytest.mark.parametrize("value", [99, -1])
def test_verify_refuses_a_class_id_outside_the_store(tmp_path, capsys, value):
    """Issue 23, item 5: `inspect --verify` called targets 99 and -1 "valid labels"."""
    s = _filled(tmp_path)
    zarr.open_group(s, mode="r+")["targets"][3] = value
    rc, err = cli(capsys, "inspect", s, "--verify")
    assert rc == 1 and f"row 3 (class_3/img_003.jpg): its class (targets) is {value}, outside 0..6 (the store has " \
                       "7 classes; 1 rows affected)" in err, err
    with pytest.raises(labelstore.StoreCorruptError, match="its class"):
        labelstore.open_store(s).targets


# --- images that are not the size their boxes were stored for ------------------------------------------------

VICTIM = os.path.join("class_3", "img_010.jpg")  # store row ROW


def _replace_by_a_smaller_image_of_the_same_byte_size(data: str) -> None:
    """What the fingerprint (paths + byte sizes) cannot see: an 8x8 JPEG padded to the old file's byte size."""
    imagefiles.smaller_of_same_byte_size(os.path.join(data, "train", VICTIM), np.full((8, 8, 3), 120, np.uint8))


def _every_batch(m) -> None:
    ld = FKDLoader(m["data"], m["store"], batch_size=4, num_crops=2, crop_size=16, device=DEVICE, shuffle=False)
    try:
        for _ in ld:
            pass
    finally:
        ld.close()


def test_the_loader_refuses_an_image_replaced_by_a_smaller_one_of_the_same_byte_size(made):
    """Its stored boxes lie outside the new image: DALI crashed the process (segmentation fault) on them. The
    graph compares each image's header with its stored size before a box is used."""
    _replace_by_a_smaller_image_of_the_same_byte_size(made["data"])
    with pytest.raises(labelstore.StoreMismatchError,
                       match=r"1 file\(s\) changed: class_3/img_010.jpg \(now 8x8 px, labelled at \d+x\d+\)"):
        _every_batch(made)


@pytest.mark.parametrize("stored", [(500, 400), (8, 8)], ids=["larger than the image", "smaller than the image"])
def test_crafted_sizes_and_boxes_that_agree_but_not_with_the_image_are_refused(made, tmp_path, stored):
    """A store whose sizes and boxes agree with each other (so its own checks pass) but not with the image:
    boxes outside the image (a crash before) or crops of another picture (silently wrong before)."""
    g = zarr.open_group(made["store"], mode="r+")
    g["sizes"][ROW] = stored
    g["boxes"][ROW] = np.tile([0, 0, stored[0], stored[1]], (g["boxes"].shape[1], 1))
    h, w = labelstore.open_store(made["store"]).read_rows([ROW])["sizes"][0]
    assert (h, w) == stored
    says = rf"class_3/img_010.jpg \(now \d+x\d+ px, labelled at {w}x{h}\)"
    with pytest.raises(labelstore.StoreMismatchError, match=says):
        _every_batch(made)
    with pytest.raises(labelstore.StoreMismatchError, match=says):
        show(made["store"], made["data"], str(ROW), str(tmp_path / "shown"))
    assert not (tmp_path / "shown").exists()


@pytest.mark.slow
def test_commands_name_an_image_replaced_by_a_smaller_one_of_the_same_byte_size(made, tmp_path):
    """train, show and generate --reference as real processes: one line naming the file, not a segfault (139)."""
    _replace_by_a_smaller_image_of_the_same_byte_size(made["data"])
    commands = every_command(made, tmp_path)
    gen = ["generate", made["data"], "--save-path", str(tmp_path / "s2"), "--reference", made["store"], "-a",
           "torchscript", "--teacher-path", made["teachers"][0], "--input-size", "24", "--num-crops", "6", "--top-k",
           "3", "--device", DEVICE, "-q"]
    for args, says in ((commands["train"] + ["--soft-label-type", "marginal_smoothing_k3"], "now 8x8 px"),
                       (commands["show"][:4] + [str(ROW)] + commands["show"][5:], "now 8x8 px"),
                       (gen, f"--reference {made['store']} labelled it at")):
        r = subprocess.run([sys.executable, "-m", "fkd_dali", *args], cwd=ROOT, env=dict(os.environ,
                           PYTHONPATH=pythonpath()), capture_output=True, text=True, timeout=300)
        assert r.returncode == 1, (args[0], r.returncode, r.stderr[-2000:])
        assert "class_3/img_010.jpg" in r.stderr and says in r.stderr and "Traceback" not in r.stderr, r.stderr
