"""Store kinds: the embedding kind (teacher embeddings + the view's photometric parameters per crop) beside the
top-k kind, opened, written, read, verified and summarised by the same store core; a store of one kind refused
by name where the other is needed; MoCo v2's view parameters drawn from (seed, row)."""

import json
import os
import re

import numpy as np
import pytest

import labelstore
from fkd_dali.views import sample_views
from labelstore import StoreFormatError, StoreKindError, create_store, open_store
from labelstore.kinds import MOCO_V2_VIEWS, decode_embeddings, encode_embeddings

NUM_CLASSES = 3
D = 16


def unit(shape, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embedding_store(path, n=6, c=8, dim=D, rows_per_shard=4):
    files = [f"class_{i % NUM_CLASSES}/img_{i:03d}.jpg" for i in range(n)]
    return create_store(path, files=files, targets=[i % NUM_CLASSES for i in range(n)],
                        classes=[f"class_{i}" for i in range(NUM_CLASSES)], fingerprint="sha256:abc",
                        dataset_root="train", num_crops=c, seed=0, rows_per_shard=rows_per_shard,
                        kind="embedding", kind_fields={"dim": dim, "views": MOCO_V2_VIEWS})


def view_content(n, c, dim=D, seed=0):
    rng = np.random.default_rng(seed)
    sizes = np.stack([rng.integers(20, 90, n), rng.integers(20, 90, n)], 1)
    data = sample_views(seed, list(range(n)), sizes, c)
    q, scale = encode_embeddings(unit((n, c, dim), seed))
    return {"sizes": sizes, **data, "embedding": q, "embedding_scale": scale}


def filled(path, n=6, c=8):
    store = embedding_store(path, n, c)
    data = view_content(n, c)
    for a, b in store.shard_ranges():
        store.write_block(a, **{k: v[a:b] for k, v in data.items()})
    store.finalize()
    return store, data


def test_an_embedding_store_round_trips_embeddings_and_view_parameters(tmp_path):
    store, data = filled(str(tmp_path / "s"))
    s = open_store(str(tmp_path / "s"))
    assert s.kind.name == "embedding" and s.fields["dim"] == D and s.describe_kind() == "kind embedding, D=16"
    assert s.array("embedding").dtype == np.int8 and s.array("embedding").shape == (6, 8, D)
    rnd = s.read_round(1, 4)
    cs = slice(4, 8)
    for name in ("boxes", "flips", "embedding", "embedding_scale", "jitter", "jitter_factors", "jitter_order",
                 "grayscale", "blur_sigma"):
        np.testing.assert_array_equal(getattr(rnd, name), data[name][:, cs], err_msg=name)
    rows = s.read_rows([5, 0])
    np.testing.assert_array_equal(rows["jitter_order"], data["jitter_order"][[5, 0]])
    assert s.verify(workers=1)["rows_checked"] == 6
    with pytest.raises(AttributeError, match="no array 'topk_idx'"):
        rnd.topk_idx


def test_old_stores_without_a_kind_are_topk_and_keep_their_metadata(tmp_path):
    from tests.test_labelstore import filled_store
    filled_store(str(tmp_path / "s"), n=4, c=4, rows_per_shard=4)
    with open(os.path.join(tmp_path, "s", "zarr.json")) as f:
        attrs = json.load(f)["attributes"]["fkd"]
    assert "kind" not in attrs and "kind_fields" not in attrs  # a top-k store is written as before kinds
    s = open_store(str(tmp_path / "s"))
    assert s.kind.name == "topk" and s.crop_arrays == ("boxes", "flips", "topk_idx", "topk_val")
    assert s.read_round(0, 2).topk_idx.shape == (4, 2, 3)


def test_a_store_of_the_other_kind_is_refused_by_name(tmp_path):
    store, _ = filled(str(tmp_path / "e"))
    with pytest.raises(StoreKindError) as e:
        store.require_kind("topk")
    assert str(e.value) == (f"label store {store.path} holds teacher embeddings (kind embedding, D=16), not top-k "
                            "soft labels: train it with --labels ssl")
    from tests.test_labelstore import filled_store
    topk, _ = filled_store(str(tmp_path / "t"), n=4, c=4, rows_per_shard=4)
    with pytest.raises(StoreKindError, match=r"holds top-k soft labels \(kind topk, k=3\), not teacher embeddings: "
                                             "train it with --labels fkd"):
        topk.require_kind("embedding")
    topk.require_kind("topk")
    store.require_kind("embedding")


def test_the_fkd_export_refuses_an_embedding_store(tmp_path):
    from fkd_dali.fkd_format import export_fkd
    store, _ = filled(str(tmp_path / "e"))
    with pytest.raises(StoreKindError, match="teacher embeddings.*--labels ssl"):
        export_fkd(store.path, str(tmp_path / "out"))


def test_a_block_gives_the_kinds_arrays(tmp_path):
    store = embedding_store(str(tmp_path / "s"))
    data = view_content(6, 8)
    with pytest.raises(labelstore.StoreWriteError, match="teacher embeddings.*embedding, embedding_scale"):
        store.write_block(0, **{k: v[:4] for k, v in data.items() if k != "blur_sigma"})


@pytest.mark.parametrize("name, value, what", [
    ("jitter_order", [0, 0, 1, 2], "not a permutation"),
    ("jitter_factors", [1.5, 1.0, 1.0, 0.0], "outside the recipe's ranges"),
    ("jitter_factors", [1.0, 1.0, 1.0, 0.2], "outside the recipe's ranges"),
    ("blur_sigma", 2.5, "blur sigma"),
    ("blur_sigma", np.nan, "blur sigma"),
    ("embedding_scale", np.inf, "scale"),
])
def test_impossible_view_parameters_are_refused_naming_the_row(tmp_path, name, value, what):
    store = embedding_store(str(tmp_path / "s"))
    data = {k: v[:4].copy() for k, v in view_content(6, 8).items()}
    data["jitter"][2, 3] = True
    data[name][2, 3] = value
    with pytest.raises(labelstore.StoreError, match=rf"row 2 \(class_2/img_002.jpg\).*{what}"):
        store.write_block(0, **data)
    assert not store.done().any()


def test_no_jitter_means_identity_factors(tmp_path):
    store = embedding_store(str(tmp_path / "s"))
    data = {k: v[:4].copy() for k, v in view_content(6, 8).items()}
    data["jitter"][1, 0] = False
    data["jitter_factors"][1, 0] = [1.2, 1.0, 1.0, 0.0]
    with pytest.raises(labelstore.StoreError, match="row 1.*without colour jitter"):
        store.write_block(0, **data)


def test_metadata_of_an_unknown_kind_or_dim_is_refused(tmp_path):
    store, _ = filled(str(tmp_path / "s"))
    path = os.path.join(tmp_path, "s", "zarr.json")
    with open(path) as f:
        meta = json.load(f)
    for change, what in (({"kind": "mixplan"}, "kind 'mixplan'; this fkd-dali reads the kinds topk, embedding"),
                         ({"kind_fields": {"dim": 10**9, "views": MOCO_V2_VIEWS}}, r"kind_fields.dim' is 1000000000"),
                         ({"kind_fields": {"dim": D, "views": {**MOCO_V2_VIEWS, "blur_p": 2}}}, "blur_p is 2")):
        bad = json.loads(json.dumps(meta))
        bad["attributes"]["fkd"].update(change)
        with open(path, "w") as f:
            json.dump(bad, f)
        with pytest.raises(StoreFormatError, match=what):
            open_store(str(tmp_path / "s"))


def test_a_lost_embedding_file_is_named(tmp_path):
    filled(str(tmp_path / "s"))
    os.remove(os.path.join(tmp_path, "s", "embedding_scale", "c", "1", "0"))
    with pytest.raises(labelstore.StoreCorruptError, match="embedding_scale/c/1/0.*lost a file"):
        open_store(str(tmp_path / "s")).read_round(0, 4)


def test_inspect_shows_the_kind_dim_and_bytes_per_crop(tmp_path):
    store, _ = filled(str(tmp_path / "s"))
    s = labelstore.summarize(open_store(store.path))
    text = labelstore.format_summary(s)
    assert s["kind"] == "embedding" and s["dim"] == D and s["label_bytes_per_crop"] > 0
    assert "kind embedding, D=16" in text and "teacher embeddings" in text and "B per labelled crop" in text
    assert "jitter_order" in text


TEACHER = {"name": "moco_v2:resnet50", "sha256": "ab" * 32, "dim": D, "input_size": 32,
           "describe": {"format": "moco_v2", "arch": "resnet50", "dim": D, "source": "/ckpt/moco_v2_800ep.pth.tar",
                        "dropped": ["encoder_k.* (320 keys)", "queue", "queue_ptr"]}}


def test_inspect_of_an_embedding_store_shows_what_applies_to_its_kind(tmp_path, capsys):
    """No temperature (the kind has none), the teacher's description one field per line, and no export-fkd note on
    file names that would share an FKD label file (the store cannot be exported); a top-k store keeps both."""
    from fkd_dali.cli import main
    files = ["class_0/img.a.jpg", "class_0/img.b.jpg", "class_1/c.jpg"]  # the first two: one FKD label-file name
    for kind, fields in (("embedding", {"dim": D, "views": MOCO_V2_VIEWS}), ("topk", None)):
        path = str(tmp_path / kind)
        store = create_store(path, files=files, targets=[0, 0, 1], classes=["class_0", "class_1"],
                             fingerprint="sha256:abc", dataset_root="train", num_crops=2, top_k=1, seed=0,
                             teachers=[TEACHER], kind=kind, kind_fields=fields)
        store.finalize()
        assert main(["inspect", path, "--verify"]) == 0
        out = capsys.readouterr().out
        lines = out.splitlines()
        if kind == "embedding":
            assert max(map(len, lines)) < 160, max(lines, key=len)
            assert "temperature" not in out and "export-fkd" not in out
            assert any(re.fullmatch(r" +format +moco_v2", x) for x in lines), out
            assert any(re.fullmatch(r" +source +/ckpt/moco_v2_800ep.pth.tar", x) for x in lines), out
            assert any(re.fullmatch(r" +dropped +encoder_k.* \(320 keys\), queue, queue_ptr", x) for x in lines), out
        else:
            assert "temperature 1.0" in out and "export-fkd" in out and "img.a.jpg and class_0/img.b.jpg" in out


def test_int8_embeddings_keep_the_teachers_direction():
    x = unit((4096, 128), seed=3)
    q, scale = encode_embeddings(x)
    y = decode_embeddings(q, scale)
    cos = (x * y).sum(-1) / np.linalg.norm(y, axis=-1)
    assert cos.min() >= 0.9999, cos.min()
    assert q.dtype == np.int8 and scale.dtype == np.float32
    q0, s0 = encode_embeddings(np.zeros((2, 8)))
    assert not q0.any() and not s0.any()


def test_views_are_moco_v2_aug_plus_drawn_per_row():
    sizes = np.array([[100, 120]] * 400)
    v = sample_views(7, list(range(400)), sizes, 50)
    again = sample_views(7, [3, 399], sizes[:2], 50)  # another block of rows draws the same
    for k in v:
        np.testing.assert_array_equal(again[k], v[k][[3, 399]], err_msg=k)
    n = 400 * 50
    assert abs(v["jitter"].mean() - 0.8) < 0.02 and abs(v["grayscale"].mean() - 0.2) < 0.02
    assert abs((v["blur_sigma"] > 0).mean() - 0.5) < 0.02 and abs(v["flips"].mean() - 0.5) < 0.02
    s = v["blur_sigma"][v["blur_sigma"] > 0]
    assert 0.1 <= s.min() and s.max() <= 2.0
    f = v["jitter_factors"][v["jitter"]]
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4 and -0.1 <= f[:, 3].min() and f[:, 3].max() <= 0.1
    orders = {tuple(o) for o in v["jitter_order"][v["jitter"]]}
    assert len(orders) == 24  # every permutation of the four ops occurs
    area = v["boxes"][..., 2] * v["boxes"][..., 3] / (100 * 120)
    assert area.min() >= 0.19 and n == v["boxes"].shape[0] * v["boxes"].shape[1]
    assert (v["jitter_factors"][~v["jitter"]] == [1, 1, 1, 0]).all()


@pytest.mark.parametrize("change, what", [
    ({"kind": 5}, "the metadata attribute 'kind' is 5 (int); expected a store kind's name"),
    ({"kind": ["embedding"]}, "the metadata attribute 'kind' is [\"embedding\"] (list); expected a store kind's name"),
    ({"kind_fields": [16]}, "the metadata attribute 'kind_fields' is [16] (list); expected an object"),
], ids=["kind-a-number", "kind-a-list", "kind-fields-a-list"])
def test_a_wrongly_typed_kind_is_named_as_other_metadata_is(tmp_path, change, what):
    """StoreMeta.from_attrs type-checks the kind and its fields as every other attribute (issue 23, item 6)."""
    filled(str(tmp_path / "s"))
    path = os.path.join(tmp_path, "s", "zarr.json")
    with open(path) as f:
        meta = json.load(f)
    meta["attributes"]["fkd"].update(change)
    with open(path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(StoreFormatError, match=re.escape(what)):
        open_store(str(tmp_path / "s"))


@pytest.mark.parametrize("name, dtype, allowed", [("embedding", np.float32, "int8"),
                                                  ("embedding_scale", np.float64, "float32"),
                                                  ("jitter_order", np.int64, "int8"),
                                                  ("grayscale", np.uint8, "bool")])
def test_an_embedding_array_of_another_dtype_is_refused_on_open(tmp_path, name, dtype, allowed):
    """The dtype check on open asks the store kind for its label arrays' dtypes (schema.DTYPES holds the arrays
    every kind shares): an embedding store's arrays are checked as a top-k store's are."""
    import zarr
    filled(str(tmp_path / "s"))
    g = zarr.open_group(str(tmp_path / "s"), mode="r+")
    data, chunks = g[name][:], g[name].chunks
    del g[name]
    g.create_array(name, data=data.astype(dtype), chunks=chunks)
    got = np.dtype(dtype).name
    with pytest.raises(StoreFormatError, match=f"array '{name}' holds {got} values; a label store's '{name}' is "
                                               f"{allowed}"):
        open_store(str(tmp_path / "s"))
