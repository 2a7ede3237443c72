"""The relabel store kind: one row per kept (epoch, step), labels of mixed crops; real Zarr stores on disk."""

import json

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from torchvision.transforms import functional as F

from fkd_dali.cli import main
from fkd_dali.fkd_format import export_fkd
from labelstore import (StoreCorruptError, StoreFormatError, StoreIncompleteError, StoreKindError, StoreWriteError,
                        format_summary, open_store, summarize)
from labelstore.relabel import create_relabel_store, open_relabel, pixel_boxes

N, B, CLASSES = 10, 4, 6


def new_store(path, **kw):
    args = dict(files=[f"c{i % 2}/img_{i}.jpg" for i in range(N)], targets=[i % 2 for i in range(N)],
                sizes=np.tile([40, 56], (N, 1)), classes=[f"c{i}" for i in range(CLASSES)], fingerprint="fp",
                dataset_root="train", epochs=3, batch_size=B, rows_per_shard=2)
    return create_relabel_store(str(path), **(args | kw))


def steps_data(rs, a, b, seed=0):
    """Valid values for rows [a, b): each step's partners a permutation of its used positions."""
    rng = np.random.default_rng(seed + a)
    S = b - a
    sizes = rs.step_sizes[a:b]
    partner = np.full((S, B), -1)
    images = np.full((S, B), -1)
    for r in range(S):
        partner[r, :sizes[r]] = rng.permutation(sizes[r])
        images[r, :sizes[r]] = rng.choice(N, sizes[r], replace=False)
    h, w = rng.uniform(0.1, 1, (S, B)), rng.uniform(0.1, 1, (S, B))
    boxes = np.stack([rng.uniform(0, 1 - h), rng.uniform(0, 1 - w), h, w], -1).astype(np.float32)
    out = {"images": images, "boxes": boxes, "flips": rng.random((S, B)) < 0.5, "mix_partner": partner,
           "mix_lam": rng.random(S), "mix_box": np.tile([3, 4, 20, 30], (S, 1))}
    if rs.label_format == "full":
        out["labels"] = (rng.normal(size=(S, B, CLASSES)) * 3).astype(rs.label_dtype)
    else:
        out["label_idx"] = np.argsort(-rng.random((S, B, CLASSES)), -1)[..., :rs.top_k]
        out["label_val"] = np.sort(rng.random((S, B, rs.top_k)), -1)[..., ::-1].astype(rs.label_dtype)
    return out


def fill(rs, seed=0):
    written = {}
    for a, b in rs.shard_rows():
        written[a] = steps_data(rs, a, b, seed)
        rs.write_steps(a, **written[a])
    assert rs.finalize()
    return written


def test_steps_round_trip_by_epoch_and_step(tmp_path):
    rs = new_store(tmp_path / "s")
    assert (rs.num_steps, rs.steps_per_epoch) == (9, 3)  # 10 images in steps of 4: 4, 4, 2
    assert rs.step_index.tolist() == [[e, s] for e in range(3) for s in range(3)]
    assert rs.step_sizes.tolist() == [4, 4, 2] * 3
    written = fill(rs)
    again = open_relabel(tmp_path / "s")
    for a, data in written.items():
        blk = again.read_steps(a, a + len(data["images"]))
        for name, v in data.items():
            got = getattr(blk, name)
            if got.ndim >= 2 and name not in ("mix_box",):
                used = np.arange(B)[None, :] < blk.step_size[:, None]
                np.testing.assert_array_equal(got[used], np.asarray(v)[used], err_msg=name)
            else:
                np.testing.assert_array_equal(got, v, err_msg=name)
        assert (blk.images[blk.step_size[0]:] == -1).all() if blk.step_size[0] < B else True
    blk = again.read_step(2, 2)
    assert blk.step_index.tolist() == [[2, 2]] and (blk.images[0, 2:] == -1).all()  # the short step's pad
    assert blk.labels.dtype == np.float16 and blk.boxes.dtype == np.float32 and blk.mix_lam.dtype == np.float64
    chunks = zarr.open_group(str(tmp_path / "s"), mode="r")["labels"].chunks
    assert chunks == (1, B, CLASSES)  # a training step reads one piece per array


def test_pruned_steps_are_absent_by_design_and_topk_labels(tmp_path):
    kept = np.array([[0, 0], [0, 2], [2, 1]])
    rs = new_store(tmp_path / "s", kept=kept, pruning={"how": "test"}, label_format="topk", top_k=3,
                   values="probabilities")
    assert rs.num_steps == 3 and rs.label_arrays == ("label_idx", "label_val")
    fill(rs)
    rs = open_relabel(tmp_path / "s")
    assert rs.row_of(0, 1) is None and rs.read_step(1, 0) is None and rs.row_of(2, 1) == 2
    assert rs.kept_steps(0).tolist() == [0, 2] and rs.rows_of_epoch(1) == (2, 2)
    assert rs.read_step(2, 1).label_idx.shape == (1, B, 3)
    text = format_summary(summarize(rs.store))
    assert "3 stored of 9" in text and "pruned     6 steps (66.7%): how=test" in text and "top-3" in text
    with pytest.raises(StoreWriteError, match="time order"):
        new_store(tmp_path / "t", kept=np.array([[0, 2], [0, 1]]))


def test_writers_own_whole_shards_resume_and_unwritten_steps_are_refused(tmp_path):
    rs = new_store(tmp_path / "s")
    data = steps_data(rs, 0, 3)
    with pytest.raises(StoreWriteError, match="whole shards"):
        rs.write_steps(0, **data)
    rs.write_steps(2, **steps_data(rs, 2, 4))
    assert rs.done().tolist() == [False, False, True, True] + [False] * 5
    assert rs.pending_shards() == [0, 2, 3, 4] and not rs.finalize()
    with pytest.raises(StoreIncompleteError, match=r"row 1 \(epoch 0, step 1\) has no labels"):
        rs.read_steps(1, 3)
    with pytest.raises(StoreWriteError, match="already done"):
        rs.write_steps(2, **steps_data(rs, 2, 4))
    bad = steps_data(rs, 0, 2)
    del bad["mix_box"]
    with pytest.raises(TypeError):
        rs.write_steps(0, **bad)
    bad = steps_data(rs, 0, 2) | {"labels": np.zeros((2, B, CLASSES + 1), np.float16)}
    with pytest.raises(StoreWriteError, match=r"'labels' block has shape \(2, 4, 7\), expected \(2, 4, 6\)"):
        rs.write_steps(0, **bad)


@pytest.mark.parametrize("array, value, what", [
    ("boxes", [0.5, 0.1, 0.6, 0.2], "crop box"),
    ("mix_partner", [0, 0, 1, 2], "not a permutation"),
    ("images", [0, 1, 2, N], "image index is outside 0..9"),
    ("mix_lam", 1.5, "lambda is not in"),
    ("mix_box", [3, 4, 2, 30], "CutMix box"),
    ("labels", np.inf, "not finite"),
    ("step_index", [0, 0], "does not come after the row before it"),
    ("step_size", 3, "step size is not the plan's"),
])
def test_bad_values_are_refused_on_write_and_found_by_verify(tmp_path, array, value, what):
    rs = new_store(tmp_path / "s")
    good = fill(rs)
    data = {k: np.array(v, copy=True) for k, v in good[0].items()}
    if array in data:  # step_index is written at creation, not by a block
        data[array][1] = value
        with pytest.raises(StoreCorruptError, match=f"row 1: .*{what}"):
            rs.write_steps(0, overwrite=True, **data)
    # the value written under the checks (a crafted or damaged store): inspect --verify names it
    zarr.open_group(str(tmp_path / "s"), mode="r+")[array][1] = data[array][1] if array in data else value
    with pytest.raises(StoreCorruptError, match=f"row 1: .*{what}"):
        open_store(str(tmp_path / "s")).verify(workers=1)
    assert main(["inspect", str(tmp_path / "s"), "--verify", "-j", "1"]) == 1


def test_inspect_shows_a_relabel_store(tmp_path, capsys):
    rs = new_store(tmp_path / "s", mix="none")
    for a, b in rs.shard_rows():
        d = steps_data(rs, a, b)
        d["mix_partner"] = np.where(d["mix_partner"] >= 0, np.arange(B)[None, :], -1)
        d["mix_lam"][:] = 1
        d["mix_box"][:] = -1
        rs.write_steps(a, **d)
    rs.finalize()
    assert main(["inspect", str(tmp_path / "s"), "--verify", "-j", "1"]) == 0
    out = capsys.readouterr().out
    for text in ("rows: 9 steps x 4 positions", "kind relabel, 3 epochs x 3 steps of 4, none, full float16 logits",
                 "steps      9 stored of 9", "per label  12 B uncompressed", "pruned     0 steps", "9 done rows"):
        assert text in out, text


def test_a_relabel_store_is_refused_by_name_where_top_k_labels_are_needed(tmp_path):
    fill(new_store(tmp_path / "s"))
    with pytest.raises(StoreKindError, match=r"holds soft labels of mixed crops .*kind relabel.* not top-k soft "
                                              r"labels: train it with --labels relabel"):
        export_fkd(str(tmp_path / "s"), str(tmp_path / "fkd"))
    with pytest.raises(ValueError, match="read by steps"):
        open_store(str(tmp_path / "s")).read_round(0, 1)
    from tests.test_labelstore import new_store as topk_store
    topk_store(str(tmp_path / "topk"), n=4, c=2)
    with pytest.raises(StoreKindError, match="not soft labels of mixed crops"):
        open_relabel(tmp_path / "topk")


def test_crafted_metadata_is_refused_before_allocating(tmp_path):
    fill(new_store(tmp_path / "s"))
    meta = tmp_path / "s" / "zarr.json"
    doc = json.loads(meta.read_text())
    for key, value, match in (("num_steps", 10 ** 12, "kind_fields.num_steps"),
                              ("mix", "cutout", "kind_fields.mix"),
                              ("batch_size", 5, "kind_fields.batch_size"),
                              ("steps_per_epoch", 4, r"kind_fields.steps_per_epoch' is 4; expected 3: 10 images")):
        bad = json.loads(json.dumps(doc))
        bad["attributes"]["fkd"]["kind_fields"][key] = value
        meta.write_text(json.dumps(bad))
        with pytest.raises(StoreFormatError, match=match):
            open_relabel(tmp_path / "s")
    meta.write_text(json.dumps(doc))
    assert open_relabel(tmp_path / "s").num_steps == 9


def test_pixel_boxes_are_the_pixels_sre2l_crops():
    """SRe2L's replay: float coords * size into torchvision's F.crop on a PIL image (Pillow rounds the edges)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        H, W = (int(x) for x in rng.integers(20, 300, 2))
        arr = np.zeros((H, W, 3), np.uint8)
        arr[..., 0], arr[..., 1] = (np.arange(H) % 256)[:, None], (np.arange(W) % 256)[None, :]
        img = Image.fromarray(arr)
        i, j = int(rng.integers(0, H - 1)), int(rng.integers(0, W - 1))
        h, w = int(rng.integers(1, H - i + 1)), int(rng.integers(1, W - j + 1))
        c = torch.FloatTensor((i / H, j / W, h / H, w / W))  # SRe2L's RandomResizedCropWithCoords
        crop = np.asarray(F.crop(img, c[0].item() * H, c[1].item() * W, c[2].item() * H, c[3].item() * W))
        top, left, ph, pw = pixel_boxes(c.numpy(), np.array([H, W])).tolist()
        assert crop.shape[:2] == (ph, pw) and crop[0, 0, 0] == top % 256 and crop[0, 0, 1] == left % 256
        assert (top, left, ph, pw) == (i, j, h, w)  # float32 coords of whole pixels come back exactly
