"""The benchmarks that had no test: ``bench scale``'s build and probes (run here in this process on a small
hard-linked dataset, where the benchmark runs each in a fresh one) and its table; ``bench meal`` end to end at
its smoke-test size; ``bench store``'s embedding-store figures against the store on disk."""

from __future__ import annotations

import json
import os
import time

import pytest

import labelstore
from fkd_dali.bench import scale
from fkd_dali.cli import main

IMAGES = 2000  # a shard or more of the store (rows per shard grow with the images; at least 64)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return scale.build(str(tmp_path_factory.mktemp("scale")), images=IMAGES, crops=8)


def test_scale_build_links_one_jpeg_and_reuses_what_it_built(built):
    from fkd_dali.dataset import scan_image_folder
    ds = scan_image_folder(os.path.join(built["data"], "train"))
    assert len(ds) == IMAGES and len(ds.classes) == scale.CLASSES
    first = os.stat(ds.path(0))
    assert first.st_nlink >= 2  # the other images of its class are hard links to it
    store = labelstore.open_store(built["store"])
    assert store.complete and len(store.shard_ranges()) == built["shards"] and store.num_images == IMAGES
    again = scale.build(os.path.dirname(built["data"]), images=IMAGES, crops=8)
    assert again == built  # the marker says it is built: nothing is rebuilt


def test_scale_probes_measure_and_the_table_reads_them(built, tmp_path):
    a = {"data": built["data"], "store": built["store"], "n": 2, "size": 32, "threads": 1}
    res = {"build": built, "num_crops": 2, "input_size": 32, "batch_size": 16, "rank_batch": 8,
           "scan": scale.probe_scan(a),
           "train": scale.probe_train({**a, "batch": 16, "out": str(tmp_path / "run"), "t0": time.time()}),
           "rank_w1": scale.probe_rank({**a, "batch": 8, "world": 1}),
           "rank_w8": scale.probe_rank({**a, "batch": 8, "world": 8}),
           "switch": scale.probe_switch({**a, "batch": 8}),
           "baselines": scale.probe_baselines({**a, "batch": 8}),
           "verify": scale.probe_verify({**a, "sample": 1})}
    assert res["scan"]["files"] == IMAGES and all(t > 0 for t in res["scan"]["scan_fingerprint_s"])
    assert 0 < res["train"]["imports_s"] < res["train"]["first_batch_from_start_s"]
    w1, w8 = (sum(res[k]["held_two_rounds"].values()) for k in ("rank_w1", "rank_w8"))
    assert w8 < w1  # a rank of eight holds its own rows, not everyone's
    assert res["switch"]["world"] >= 1 and res["switch"]["later_pass_first_batch_s"] > 0
    assert {x["images"] for x in res["baselines"].values()} >= {IMAGES}
    assert res["verify"]["shards"] == built["shards"]
    table = scale.format_table(res)
    assert f"| step ({IMAGES:,} images x 8 crops, top-5)" in table and "| verify," in table
    assert table.count("\n") >= 12


def test_requests_per_pass_counts_what_a_round_reads():
    # 4 crop arrays x (shard index + one inner chunk) per shard, a sizes chunk per shard, one LIST per array
    assert scale.requests_per_pass(shards=10, crops_per_chunk=4, n=4) == 4 * 10 * 2 + 10 + 4
    assert scale.requests_per_pass(shards=10, crops_per_chunk=4, n=8) == 4 * 10 * 3 + 10 + 4


@pytest.mark.slow
def test_bench_meal_runs_at_its_smoke_size(tmp_path, capsys):
    out = str(tmp_path / "meal.json")
    assert main(["bench", "meal", "--size", "quick", "--seeds", "0", "--epochs", "1", "--workdir",
                 str(tmp_path / "w"), "--out", out, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    r = json.load(open(out))
    assert set(r["runs"]) == {"start", "meal-v2", "meal-v2-no-disc", "fkd"} and r["settings"]["seeds"] == [0]
    assert set(r["teachers"]) == {"resnet18", "resnet34", "ensemble"}
    assert all(0 <= v["0"] <= 100 for v in r["runs"].values())
    assert "| MEAL V2 recipe, discriminator on |" in printed and "Machine:" in printed


def test_bench_meal_table_gives_each_seed_and_the_spread():
    from fkd_dali.bench.meal import format_table
    result = {"settings": {"seeds": [0, 1]}, "teachers": {"resnet18": 80.0, "ensemble": 82.5},
              "runs": {"start": {"0": 70.0}, "meal-v2": {"0": 71.0, "1": 73.0}, "fkd": {"0": 75.0}}}
    rows = {line.split(" | ")[0]: line for line in format_table(result).splitlines()}
    assert rows["| start: hard-label student (seed 0; one start for every seed)"].endswith(
        "| 70.0 | 70.0 | 70.0 | 70.0 | 70.0 |")  # one start, shown for every seed
    assert rows["| MEAL V2 recipe, discriminator on"].endswith("| 71.0 | 73.0 | 72.0 | 71.0 | 73.0 |")
    assert rows["| MEAL V2 recipe, no discriminator"].endswith("| - | - | - | - | - |")  # not run
    assert rows["| plain FKD (the demo's FKD recipe) from the same start"].endswith("| 75.0 | - | 75.0 | 75.0 | 75.0 |")
    assert format_table(result).endswith("teachers' val top-1: resnet18 80.0 %, ensemble 82.5 %")


def test_bench_store_reports_an_embedding_stores_bytes_per_crop_as_on_disk(tmp_path, capsys):
    """The embedding store's B/crop is its files' bytes / its crops (what `inspect` reports too), each array's its
    folder's; the command prints them grouped (embedding, scale, view parameters, boxes, flips) with the round time."""
    from fkd_dali.bench.store import EMBEDDING_GROUPS, embedding_store
    path = str(tmp_path / "store")
    r = embedding_store(path, images=6, crops=4, dim=16, n=2)
    crops = 6 * 4
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    assert r["bytes_per_crop"]["apparent"] * crops == pytest.approx(on_disk)
    summary = labelstore.summarize(labelstore.open_store(path))
    assert summary["kind"] == "embedding" and summary["dim"] == 16
    assert r["bytes_per_crop"]["apparent"] == pytest.approx(summary["bytes_per_crop"])
    by = r["bytes_per_crop_by_array"]
    assert set(by) == {a for arrays in EMBEDDING_GROUPS.values() for a in arrays}
    for name, value in by.items():
        assert value * crops == pytest.approx(summary["arrays"][name]["bytes"]), name
    assert len(r["read_round_s"]) == 2 and r["read_round_crops_per_s"] > 0  # 4 crops: 2 rounds of 2

    code = main(["bench", "store", "--size-images", "4", "--size-crops", "2", "--images", "64", "--crops", "4",
                 "--round-crops", "2", "--dim", "16", "--ssl-images", "6", "--ssl-crops", "4",
                 "--workdir", str(tmp_path), "--out", str(tmp_path / "store.json")])
    out = capsys.readouterr().out
    e = json.load(open(tmp_path / "store.json"))["embedding"]
    assert code == 0 and (e["images"], e["crops"], e["dim"]) == (6, 4, 16)
    assert "6 images x 4 crops x D=16" in out and "| embedding | scale | view parameters | boxes | flips |" in out
    assert f"| {e['bytes_per_crop']['apparent']:.2f} | " in out
    assert sorted(os.listdir(tmp_path)) == ["store", "store.json"]  # the bench's own stores are gone


def test_scale_wds_packs_the_folder_and_its_probes_measure(tmp_path):
    """``bench scale --format wds`` at a small size: the folder (a small JPEG) packed as tars; the crops probe reads
    the same pass from files and from shards; two ranks at once map one index (each maps every page its pass's
    records fall on, and Pss, the pages' share, is below RSS); the table reads the figures."""
    work = str(tmp_path / "wds")
    built = scale.build(work, images=IMAGES, crops=8, px=32, quality=75)
    assert built["jpeg_bytes"] < 2000
    sh = scale.build_shards(work, built)
    assert sh["shards"] >= 1 and sh["tar_bytes"] > IMAGES * built["jpeg_bytes"]
    assert scale.build_shards(work, built) == sh  # reused
    a = {"store": built["store"], "n": 2, "size": 32, "threads": 1, "batch": 8, "batches": 3}
    files, shards = (scale.probe_crops({**a, "data": d}) for d in (built["data"], sh["root"]))
    assert files["world"] == shards["world"] and files["crops"] == shards["crops"] > 0
    assert shards["rank_images"] == -(-IMAGES // shards["world"])
    barrier = str(tmp_path / "barrier")
    os.makedirs(barrier)
    ranks = scale._run_concurrent("index", [{**a, "data": sh["root"], "rank": r, "world": 2, "barrier": barrier}
                                            for r in range(2)])
    for x in ranks:
        mapped = x["after_pass_records"]["mapped_kb"]
        assert x["rows"] == IMAGES // 2 and x["private_copy_bytes"] == 16 * x["rows"]
        assert mapped["Rss"] * 1024 >= x["index_file_bytes"] // 2 and mapped["Pss"] < mapped["Rss"]
    res = {"format": "wds", "build": built, "shards": sh,
           "train": [{"first_batch_from_start_s": 5.0, "imports_s": 2.0, "trainer_s": 1.0, "loader_s": 0.5}],
           "index_w8": ranks, "crops": {"files": [files], "shards": [shards]},
           "crops_ratio": scale._spread([shards["crops_per_s"] / files["crops_per_s"]])}
    table = scale.format_shards_table(res)
    assert f"| step ({IMAGES:,} images as {sh['shards']} WebDataset tars" in table and "≥ 0.95x" in table
