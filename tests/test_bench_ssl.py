"""``fkd-dali bench ssl --quick``: the whole self-supervised flow once on tiny objects data (a MoCo teacher trained
without labels, generate --ssl-teacher, the four students, linear probes), its table's structure, and the
negative control's store: the real store's embeddings moved to other images, row by row."""

from __future__ import annotations

import json
import numpy as np

import labelstore
from fkd_dali.bench.ssl import STUDENTS, shuffled_copy
from fkd_dali.cli import main


def test_bench_ssl_quick(tmp_path, capsys):
    work, out = str(tmp_path / "work"), str(tmp_path / "ssl.json")
    assert main(["bench", "ssl", "--quick", "--workdir", work, "--out", out]) == 0
    printed = capsys.readouterr().out
    with open(out) as f:
        result = json.load(f)
    (run,) = result["runs"]
    assert set(run["top1"]) == {"teacher", *(k for k, _ in STUDENTS)}
    assert all(0 <= v <= 100 for v in run["top1"].values()) and set(run["knn"]) == set(run["top1"])
    assert run["cost"]["ratio"] >= 2  # the teacher costs at least twice the student per image (measured)
    assert run["epoch_ratio"] > 0 and run["bytes_per_crop"]["embedding"] > 0 and run["bytes_per_crop"]["top5"] > 0
    assert run["commands"]["teacher"].startswith("fkd-dali train ") and "--labels moco" in run["commands"]["teacher"]
    assert "--ssl-teacher" in run["commands"]["generate"] and "--labels ssl-online" in run["commands"]["online"]
    # the table: a header, its rule, one row per seed, then min / mean / max / std
    lines = result["table"].splitlines()
    assert lines[0].startswith("| seed | teacher | random init | online | FKD-SSL | control | FKD − random")
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["0", "**min**", "**mean**", "**max**", "**std**"]
    assert all(ln.count("|") == 13 for ln in lines)
    assert result["table"] in printed and any(v.startswith("- ") and "FKD-SSL >= random" in v for v in result["verdict"])

    # the negative control: every row's embeddings are another image's, its views its own
    real, ctrl = (labelstore.open_store(p) for p in (run["store"], run["control"]))
    a, b = real.read_rows(np.arange(real.num_images)), ctrl.read_rows(np.arange(ctrl.num_images))
    for row in range(real.num_images):
        assert not np.array_equal(a["embedding"][row], b["embedding"][row]), row
        assert np.array_equal(a["boxes"][row], b["boxes"][row]) and np.array_equal(a["blur_sigma"][row],
                                                                                   b["blur_sigma"][row])
    n_crops = a["embedding"].shape[1]
    assert sorted(map(bytes, b["embedding"].reshape(real.num_images * n_crops, -1))) == \
        sorted(map(bytes, a["embedding"].reshape(real.num_images * n_crops, -1)))  # the same embeddings, moved
    assert ctrl.meta.fingerprint == real.meta.fingerprint and ctrl.meta.complete


def test_shuffled_copy_is_a_derangement(tmp_path):
    """Each seed's control moves every (image, crop)'s embedding to another slot, independently (no fixed point,
    across shards; the crops of one image do not move together to one other image), and keeps each image's own
    views."""
    from tests.test_store_kinds import filled  # noqa: PLC0415 - a real embedding store, written
    src = str(tmp_path / "src")
    filled(src, n=7, c=3)  # two shards of 4 rows
    want = labelstore.open_store(src).read_rows(np.arange(7))
    for seed in range(5):
        perm = shuffled_copy(src, str(tmp_path / f"c{seed}"), seed)
        assert sorted(perm) == list(range(21)) and (perm != np.arange(21)).all()
        source_image = perm.reshape(7, 3) // 3  # the image each crop's embedding came from
        assert any(len(set(r)) > 1 for r in source_image)  # one image's crops come from several images
        got = labelstore.open_store(str(tmp_path / f"c{seed}")).read_rows(np.arange(7))
        assert np.array_equal(got["embedding"], want["embedding"].reshape(21, -1)[perm].reshape(7, 3, -1))
        assert np.array_equal(got["embedding_scale"], want["embedding_scale"].reshape(21)[perm].reshape(7, 3))
        for k in ("boxes", "flips", "jitter", "jitter_factors", "jitter_order", "grayscale", "blur_sigma", "sizes"):
            assert np.array_equal(got[k], want[k]), k


def test_the_control_is_not_tested_when_fkd_is_not_clearly_above_random():
    from fkd_dali.bench.ssl import verdict  # noqa: PLC0415

    def run(fkd, control):
        return {"top1": {"teacher": 60.0, "random": 20.0, "online": fkd, "fkd": fkd, "control": control}}
    weak = verdict([run(22.0, 21.0), run(23.0, 20.0)])  # FKD 2.5 points above random: the control shows nothing
    assert any(v.startswith("- not tested: negative control") for v in weak)
    strong = verdict([run(45.0, 21.0), run(47.0, 20.0)])
    assert any(v.startswith("- met: negative control") for v in strong)
    assert any(v.startswith("- NOT met: negative control") for v in verdict([run(45.0, 40.0), run(47.0, 41.0)]))
