"""``fkd-dali bench relabel``: the top-k copies it trains from, the table it prints, and (with a VILA-Lab/SRe2L
checkout) its whole smoke run: SRe2L's own relabel and trainer beside fkd-dali's."""

import json
import os

import numpy as np
import pytest
import torch

from fkd_dali.bench.relabel import _sre2l_last_loss, _sre2l_last_top1, format_table, topk_copy, verdict
from fkd_dali.cli import main
from labelstore.relabel import open_relabel
from tests.test_relabel_store import fill, new_store
from tests.test_sre2l_format import _sre2l_checkout


def test_topk_copy_keeps_the_steps_and_the_largest_logits(tmp_path):
    src = new_store(tmp_path / "full")  # 6 classes, full fp16 logits
    written = fill(src)
    topk_copy(str(tmp_path / "full"), str(tmp_path / "top3"), 3)
    got = open_relabel(tmp_path / "top3")
    assert (got.label_format, got.top_k, got.label_dtype, got.num_steps) == ("topk", 3, src.label_dtype, src.num_steps)
    for a, data in written.items():
        blk = got.read_steps(a, a + len(data["images"]))
        used = np.arange(src.batch_size)[None, :] < blk.step_size[:, None]
        for name in ("images", "boxes", "flips", "mix_partner"):
            np.testing.assert_array_equal(getattr(blk, name)[used], data[name][used], err_msg=name)
        np.testing.assert_array_equal(blk.mix_lam, data["mix_lam"])
        val, idx = torch.from_numpy(data["labels"].astype(np.float32)).topk(3, dim=-1)
        np.testing.assert_array_equal(blk.label_idx[used], idx.numpy()[used])
        np.testing.assert_array_equal(blk.label_val[used], val.numpy().astype(np.float16)[used])
    with pytest.raises(SystemExit, match="top-3 copies are made of full labels"):
        topk_copy(str(tmp_path / "top3"), str(tmp_path / "again"), 3)


def _result(sre2l=(60.0, 62.0, 61.0), full=(61.0, 63.0, 62.0), top5=(60.0, 61.0, 62.0), top50=(61.5, 62.0, 62.5)):
    def runs(v, wall):
        return {str(s): {"top1": x, "wall_s": wall} for s, x in enumerate(v)}
    return {"seeds": [0, 1, 2], "top_k": [5, 50], "teacher_arch": "t", "teacher": {"val_top1": 90.0},
            "size": {"epochs": 24, "batch": 20}, "generate": {"sre2l_s": 30.0, "ours_s": 20.0},
            "bytes": {"sre2l_files": 100_000, "full": 50_000, "top5": 1_000, "top50": 2_000, "ours_generated": 49_000},
            "runs": {"sre2l": runs(sre2l, 90.0), "ours-full": runs(full, 60.0), "ours-top5": runs(top5, 50.0),
                     "ours-top50": runs(top50, 55.0)}}


def test_verdict_names_the_smallest_k_within_half_a_point_of_full():
    v = verdict(_result())
    assert v["same_top1_within_spread"] and v["top1_difference"] == pytest.approx(1.0)
    assert v["smallest_k_within_half_point"] == 50 and v["bytes_ratio_at_that_k"] == pytest.approx(50.0)
    assert v["train_speedup"] == pytest.approx(1.5) and v["generate_speedup"] == pytest.approx(1.5)
    assert verdict(_result(top5=(61.5, 61.6, 62.0)))["smallest_k_within_half_point"] == 5  # 0.3 below full
    v = verdict(_result(full=(70.0, 71.0, 72.0), top50=(60.0, 60.0, 60.0)))
    assert not v["same_top1_within_spread"] and v["smallest_k_within_half_point"] is None


def test_table_gives_each_seed_the_spread_bytes_and_times():
    r = _result()
    r["runs"]["sre2l"]["0"]["own_top1"] = 60.0
    r["verdict"] = verdict(r)
    table = format_table(r)
    assert "| SRe2L's train_FKD.py on SRe2L's files (full logits, fp16) | 100,000 | 1.0 | 60.0 | 62.0 | 61.0 | 61.0 " \
           "| 60.0 | 62.0 | 90 | - | - |" in table
    assert "| fkd-dali train on the imported store, top-50 logits | 2,000 | 50.0 | 61.5 | 62.0 | 62.5 | 62.0" in table
    assert "(x1.50)" in table and "smallest k within 0.5 points of full: 50 (50x smaller" in table


def test_sre2l_log_gives_its_last_validation(tmp_path):
    log = tmp_path / "log"
    log.write_text("TEST Iter 0: loss = 1.0,\tTop-1 err = 90.000000,\tTop-5 err = 50.0\n"
                   "TRAIN Iter 9: lr = 0.000400,\tloss = 0.251234,\tTop-1 err = 90.0\n"
                   "TEST Iter 9: loss = 1.0,\tTop-1 err = 37.500000,\tTop-5 err = 5.0\n")
    assert _sre2l_last_top1(str(log)) == pytest.approx(62.5)
    assert _sre2l_last_loss(str(log)) == pytest.approx(0.251234)


@pytest.mark.slow
def test_bench_relabel_quick_runs_sre2l_and_fkd_dali_side_by_side(tmp_path, capsys):
    sre2l = _sre2l_checkout(tmp_path)
    if sre2l is None or not os.path.isfile(os.path.join(sre2l, "validate", "train_FKD.py")):
        pytest.skip("no VILA-Lab/SRe2L checkout: set FKD_DALI_SRE2L_DIR to its SRe2L folder (or fetch the mirror)")
    out = str(tmp_path / "relabel.json")
    assert main(["bench", "relabel", "--quick", "--seeds", "0", "--top-k", "5", "--sre2l", sre2l, "--workdir",
                 str(tmp_path / "w"), "--out", out]) == 0
    r = json.load(open(out))
    assert set(r["runs"]) == {"sre2l", "ours-full", "ours-top5"}
    assert all(0 <= x["0"]["top1"] <= 100 and x["0"]["wall_s"] > 0 for x in r["runs"].values())
    assert r["bytes"]["top5"] < r["bytes"]["full"] < r["bytes"]["sre2l_files"]
    assert r["generate"]["sre2l_s"] > 0 and r["generate"]["ours_s"] > 0
    printed = capsys.readouterr().out
    assert "| SRe2L's train_FKD.py on SRe2L's files" in printed and "| fkd-dali train on the imported store, top-5" \
        in printed and "Machine:" in printed
