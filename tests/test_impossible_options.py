"""Options that cannot be right are refused while the command line is parsed, before any work, naming the
option, the value and the valid range; commands that would report success on nothing refuse instead
(docs/reliability.md, "Messages")."""

import json
import os

import pytest
import torch

from fkd_dali.cli import main

TRAIN = ["train", "{tmp}/data", "--softlabel-path", "{tmp}/store", "--output", "{tmp}/out"]
GENERATE = ["generate", "{tmp}/data", "-a", "resnet18", "--save-path", "{tmp}/store"]


@pytest.mark.parametrize("argv, says", [
    (TRAIN + ["--temp", "0"], "argument --temp: 0 is out of range: give a finite number > 0"),
    (TRAIN + ["--temp", "nan"], "argument --temp: nan is not a finite number: give a finite number > 0"),
    (TRAIN + ["--lr", "nan"], "argument --lr/--learning-rate: nan is not a finite number: give a finite number >= 0"),
    (TRAIN + ["--lr", "inf"], "argument --lr/--learning-rate: inf is not a finite number"),
    (TRAIN + ["--lr", "-0.1"], "argument --lr/--learning-rate: -0.1 is out of range: give a finite number >= 0"),
    (TRAIN + ["-b", "-4"], "argument -b/--batch-size: -4 is out of range: give an integer >= 1"),
    (TRAIN + ["--num-crops", "0"], "argument --num-crops/--num_crops: 0 is out of range: give an integer from 1 to "
                                   "65,536"),
    (GENERATE + ["--temp", "0"], "argument --temp/--temperature: 0 is out of range: give a finite number > 0"),
    (GENERATE + ["--temp", "inf"], "argument --temp/--temperature: inf is not a finite number"),
    (GENERATE + ["--temp", "nan"], "argument --temp/--temperature: nan is not a finite number"),
    (GENERATE + ["--num-crops", "0"], "argument --num-crops/--num_crops: 0 is out of range: give an integer from 1 to "
                                      "65,536"),
    (GENERATE + ["--num-crops", "-3"], "argument --num-crops/--num_crops: -3 is out of range"),
    (GENERATE + ["--num-crops", "99999999999"], "argument --num-crops/--num_crops: 99999999999 is out of range"),
    (GENERATE + ["--num-crops", "x"], "argument --num-crops/--num_crops: 'x' is not an integer"),
    (["synth", "--out", "{tmp}/synth", "--classes", "0"], "argument --classes: 0 is out of range: give an integer >= 1"),
    (["synth", "--out", "{tmp}/synth", "--quality", "500"], "argument --quality: 500 is out of range: give an "
                                                            "integer from 1 to 95"),
    (["doctor", "--out", "{tmp}/doctor", "--deadline", "0"], "argument --deadline: 0 is out of range: give a finite "
                                                             "number > 0"),
    (["doctor", "--out", "{tmp}/doctor", "--deadline", "-5"], "argument --deadline: -5 is out of range"),
    (["bench", "store", "--images", "0", "--out", "{tmp}/b.json"], "argument --images: 0 is out of range"),
])
def test_an_option_that_cannot_be_right_is_refused_before_any_work(argv, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"fkd-dali {argv[0]}" in err and f": error: {says}" in err, err
    assert os.listdir(tmp_path) == []  # no store, output folder or dataset was begun


@pytest.mark.parametrize("size", ["-5", "200000"])
def test_synth_refuses_a_size_it_cannot_draw_before_allocating(size, tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "d"), "--size", size]) == 1
    err = capsys.readouterr().err
    assert f"fkd-dali synth: error: --size {size}: give a side from 1 to 8192 px, or 0" in err, err
    assert not os.path.exists(tmp_path / "d")


def test_synth_refuses_to_write_no_image(tmp_path, capsys):
    """Before: exit 0 and NaN statistics."""
    assert main(["synth", "--out", str(tmp_path / "d"), "--per-class", "0", "--val-per-class", "0"]) == 1
    assert "nothing to write; give at least 1 class and 1 image per class" in capsys.readouterr().err


def test_a_doctor_that_ran_no_check_does_not_say_they_passed(tmp_path, capsys):
    """A deadline too short for any check: every one is skipped; the report says so and the exit is 1."""
    from fkd_dali.doctor import verdict
    out = str(tmp_path / "doctor")
    assert main(["doctor", "--device", "cpu", "--only", "bench-loader", "--deadline", "1", "--out", out]) == 1
    md = open(os.path.join(out, "doctor.md")).read()
    assert "All checks passed" not in md and "No check ran: none of the 1 asked for fits in the 1 s deadline" in md
    report = {"failed": [], "deadline_s": 30, "results": [{"name": "a", "status": "pass"},
                                                          {"name": "b", "status": "skip"}]}
    assert verdict(report) == ("The 1 check(s) that ran passed; 1 skipped (deadline): b. Give a longer --deadline to "
                               "run them")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_doctor_on_a_gpu_that_is_not_there_is_one_line(tmp_path, capsys):
    assert main(["doctor", "--device", "gpu", "--out", str(tmp_path / "doctor")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("fkd-dali doctor: error: --device gpu but torch sees no CUDA device; run `fkd-dali doctor "
                           "--device cpu`"), err


def test_bench_store_of_few_images_reads_what_there_is(tmp_path, capsys):
    """Before: `Cannot take a larger sample than population when replace is False` (numpy) for < 1000 images."""
    out = str(tmp_path / "store.json")
    assert main(["bench", "store", "--size-images", "3", "--size-crops", "4", "--images", "20", "--dim", "0",
                 "--out", out, "--workdir", str(tmp_path)]) == 0
    assert "read_rows of 20 random rows took" in capsys.readouterr().out
    assert json.load(open(out))["speed"]["read_rows_random"] == 20
    assert main(["bench", "store", "--images", "20", "--crops", "2", "--out", out, "--workdir", str(tmp_path)]) == 1
    assert "--round-crops 4 is more than --crops 2" in capsys.readouterr().err
