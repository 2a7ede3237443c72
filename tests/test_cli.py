"""The command line as a user runs it: entry points, help, errors without tracebacks, bench store."""

import json
import os
import subprocess
import sys

import pytest

from fkd_dali.cli import main
from tests.conftest import current_device

DEVICE = current_device()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", ["train.py", "generate.py"])
def test_fkd_style_entry_points_parse_help(script):
    r = run(script, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout and "DATA" in r.stdout


def test_console_script_lists_its_commands():
    r = run("-m", "fkd_dali", "--help")
    assert r.returncode == 0
    for cmd in ("generate", "train", "inspect", "import-fkd", "export-fkd", "bench", "synth"):
        assert cmd in r.stdout


def test_inspect_of_a_missing_store_is_one_clear_line(tmp_path):
    r = run("-m", "fkd_dali", "inspect", str(tmp_path / "missing"))
    assert r.returncode == 1
    assert "does not exist: expected an fkd-dali label store" in r.stderr
    assert "Traceback" not in r.stderr


def test_bench_store_writes_its_figures(tmp_path, capsys):
    out = str(tmp_path / "store.json")
    assert main(["bench", "store", "--size-images", "20", "--size-crops", "50", "--images", "3000",
                 "--crops", "16", "--dim", "0", "--out", out, "--workdir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| FKD files, float16 |" in text and "read_round (n=4" in text
    r = json.load(open(out))
    assert r["size"]["ours_bytes_per_crop"]["apparent"] < r["size"]["fkd_fp16_bytes_per_crop"]["apparent"]
    assert r["speed"]["append_crops_per_s"] > 0 and r["speed"]["read_round_crops_per_s"] > 0
    assert r["machine"]["cores"] >= 1


def test_synth_writes_an_image_folder(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "d"), "--flavour", "photo", "--classes", "2", "--per-class", "2",
                 "--val-per-class", "1", "--size", "64"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 6 and info["mean_bytes"] > 1000
    assert sorted(os.listdir(tmp_path / "d" / "train")) == ["class_0000", "class_0001"]


def test_synth_objects_is_deterministic_and_names_its_classes(tmp_path, capsys):
    for out in ("a", "b"):
        assert main(["synth", "--out", str(tmp_path / out), "--classes", "3", "--per-class", "2",
                     "--val-per-class", "1", "--size", "48", "--seed", "7"]) == 0
    classes = sorted(os.listdir(tmp_path / "a" / "train"))
    assert len(classes) == 3 and all("_" in c for c in classes)  # e.g. 0_disc: the shape is in the name
    for split, n in (("train", 2), ("val", 1)):
        for c in classes:
            files = sorted(os.listdir(tmp_path / "a" / split / c))
            assert len(files) == n
            for f in files:  # same seed, same bytes
                assert (tmp_path / "a" / split / c / f).read_bytes() == (tmp_path / "b" / split / c / f).read_bytes()


def test_synth_distractors_change_the_images_and_are_checked(tmp_path, capsys):
    """--distractors 0 draws only the class object (other images than the default's up-to-5 distractors); a
    distractor as large as a class object or a negative count is refused."""
    from fkd_dali.synthetic import write_dataset
    for out, extra in (("five", []), ("none", ["--distractors", "0"])):
        assert main(["synth", "--out", str(tmp_path / out), "--classes", "4", "--per-class", "3",
                     "--val-per-class", "0", "--size", "48", "--seed", "1", *extra]) == 0
    files = [os.path.join(c, f) for c in sorted(os.listdir(tmp_path / "five" / "train"))
             for f in sorted(os.listdir(tmp_path / "five" / "train" / c))]
    differ = [f for f in files if (tmp_path / "five" / "train" / f).read_bytes()
              != (tmp_path / "none" / "train" / f).read_bytes()]
    assert len(files) == 12 and differ, "no image drew a distractor"
    for bad in (dict(distractors=-1), dict(distractor_scale=(0.2, 0.35))):
        with pytest.raises(ValueError, match="no larger than the class object"):
            write_dataset(str(tmp_path / "bad"), flavour="objects", classes=2, per_class=1, **bad)


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    import labelstore
    from PIL import Image
    work = tmp_path / "demo"
    assert main(["demo", "--workdir", str(work), "--quick", "--device", DEVICE]) == 0
    out = capsys.readouterr().out
    for row in ("| teacher (resnet18", "| one-off labelling", "| student, hard labels", "| student, online KD",
                "| student, FKD", "with the one-off labelling", "the hard-label student", "demo finished in"):
        assert row in out, row
    assert any(line.startswith("FKD ") and "online KD" in line and " % vs " in line for line in out.splitlines())
    assert "epoch 0:" not in out  # progress bars, not a line per epoch
    assert "FKD replay" not in out  # no loader-only race at settings where decode-once cannot pay off
    results = (work / "results.md").read_text()
    assert "| student, online KD" in results and "FKD" in results.splitlines()[-1]
    store = labelstore.open_store(str(work / "store"))
    assert store.complete and store.num_crops == 8
    for run_dir in ("teacher", "student-hard", "student-online", "student-fkd"):
        assert (work / run_dir / "checkpoint.pth.tar").stat().st_size > 100_000
    with open(work / "student-hard" / "log.jsonl") as f:
        validated = ["val_top1" in json.loads(line) for line in f]
    assert validated == [False, True, False, True]  # eval_every 2 of the quick demo's 4 epochs; the last always
    with Image.open(work / "students.png") as im:
        assert im.size[0] > 600 and im.size[1] > 300
    with Image.open(work / "show" / "sheet.png") as im:
        assert im.size[0] > 600 and im.size[1] > 200
    for k in range(8):
        with Image.open(work / "show" / f"crop_{k}.png") as im:
            assert im.size == (96, 96) and im.mode == "RGB"


def test_demo_rejects_zero_seeds(capsys):
    assert main(["demo", "--seeds", "0"]) == 1
    assert "--seeds 0" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_generate_smoke(tmp_path, capsys):
    assert main(["bench", "generate", "--images", "24", "--classes", "3", "--input-size", "32", "--num-crops", "4",
                 "--num-seg", "4", "-b", "4", "--train-epochs", "1", "--device", DEVICE, "--workdir",
                 str(tmp_path / "w"), "--out", str(tmp_path / "g.json")]) == 0
    text = capsys.readouterr().out
    assert "| teacher forward only" in text and "(the loader's geometry) |" in text
    r = json.load(open(tmp_path / "g.json"))
    # Same pixels, same teacher: the same top-1 (on a GPU, bf16 in batches of other sizes may flip near-ties).
    assert r["runs"]["loader-geometry"]["top1_agreement"] >= (1.0 if DEVICE == "cpu" else 0.99)
    assert 0 < r["runs"]["fkd-default"]["ratio_to_forward_only"]


def test_the_train_command_starts_the_scan_before_torch_is_imported(tmp_path):
    """The CLI imports torch only after it started the dataset scan (a child process on a large dataset), so
    the two run side by side; a scan of another folder is refused by the Trainer."""
    r = subprocess.run([sys.executable, "-c", "import sys, fkd_dali.cli; print(sorted(m for m in ('torch', "
                        "'torchvision', 'nvidia.dali') if m in sys.modules))"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    from fkd_dali.dataset import start_train_scan
    from fkd_dali.train import TrainConfig, Trainer
    for split in ("a", "b"):
        os.makedirs(tmp_path / split / "train" / "c0")
    scan = start_train_scan(str(tmp_path / "a"))
    assert start_train_scan(str(tmp_path / "a"), evaluate=True) is None
    with pytest.raises(ValueError, match="not of .*b's train split"):
        Trainer(TrainConfig(data=str(tmp_path / "b"), labels="hard", device="cpu"), scan)
