"""docs/dali-integration.md: both listings run as written (on the test device, tiny model), and the FKD one
serves each epoch's planned images and round."""

import os
import re

import numpy as np
import pytest
import torch

from pipelines import FKDReader
from pipelines.graphs import devices
from tests.conftest import current_device
from tests.test_loader import make_store, write_coded_dataset

DEVICE = current_device()
DEVICE_ID = 0 if DEVICE == "gpu" else None
DECODER, OPS = devices(DEVICE)

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "dali-integration.md")


def blocks() -> dict[str, str]:
    text = open(DOC).read()
    return {m.group(1): m.group(2) for m in re.finditer(r"```python (\w+)\n(.*?)```", text, flags=re.S)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("integration"))
    data = os.path.join(root, "data")
    write_coded_dataset(data, 30)
    make_store(data, os.path.join(root, "store"), pool=8, k=5)
    return data, os.path.join(root, "store")


def sample_bytes(ds, key_of=lambda i, key: key):
    """(key, image bytes, class) of each image of an ImageFolder scan, in row order."""
    for i in range(len(ds)):
        with open(ds.path(i), "rb") as f:
            yield key_of(i, ds.files[i]), f.read(), int(ds.targets[i])


@pytest.fixture(scope="module")
def shard_sets(setup, tmp_path_factory):
    """The integration dataset packed as a TFRecord set (keys = the folder's paths: the folder's store pairs with
    it) and as one RecordIO file (keys = row numbers) with a store made from that set, as generate would."""
    from fkd_dali.dataset import scan_image_folder
    from pipelines.shards import write_shards
    from tests.test_loader import code_of
    data, store = setup
    root = str(tmp_path_factory.mktemp("shards"))
    ds = scan_image_folder(os.path.join(data, "train"))
    sets = {}
    for fmt, shard_bytes, key_of in (("tfrecord", 20_000, lambda i, key: key),
                                     ("recordio", 1 << 30, lambda i, key: str(i))):
        os.makedirs(os.path.join(root, fmt, "train"))
        write_shards(os.path.join(root, fmt, "train"), fmt, sample_bytes(ds, key_of), shard_bytes=shard_bytes,
                     classes=ds.classes, prefix="train")
        sets[fmt] = os.path.join(root, fmt)
    rec = scan_image_folder(os.path.join(sets["recordio"], "train"))
    import labelstore
    from PIL import Image

    from fkd_dali.crops import sample_crops
    sizes = np.array([Image.open(rec.header_source(i)).size[::-1] for i in range(len(rec))])
    boxes, flips = sample_crops(0, range(len(rec)), sizes, 8)
    rec_store = labelstore.create_store(os.path.join(root, "rec-store"), files=rec.files, targets=rec.targets,
                                        classes=rec.classes, fingerprint=rec.fingerprint, dataset_root="train",
                                        num_crops=8, num_classes=10, top_k=5, rows_per_shard=8)
    idx = np.array([[code_of(r, c) + [9, 9] for c in range(8)] for r in range(len(rec))])
    for a, b in rec_store.shard_ranges():
        rec_store.write_block(a, sizes=sizes[a:b], boxes=boxes[a:b], flips=flips[a:b], topk_idx=idx[a:b],
                              topk_val=np.full(idx[a:b].shape, 0.2, np.float16))
    rec_store.finalize()
    return {"tfrecord": (sets["tfrecord"], store), "recordio": (sets["recordio"], rec_store.path)}


def loop_of(listing: str) -> str:
    """The training loop of a listing (its lines from ``for epoch``), which the shard listings reuse."""
    return listing[listing.index("for epoch in range(EPOCHS):"):]


def namespace(data, store):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 10))
    model.to("cuda" if DEVICE == "gpu" else "cpu")
    return {"DATA": data, "STORE": store, "DEVICE": DEVICE, "DEVICE_ID": DEVICE_ID, "rank": 0, "world": 1,
            "EPOCHS": 2, "NUM_CLASSES": 10, "model": model,
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.01)}


def test_doc_has_the_listings():
    assert set(blocks()) == {"common", "standard", "fkd", "tfrecord_standard", "tfrecord_fkd", "recordio_standard"}


@pytest.mark.parametrize("which", ["standard", "fkd"])
def test_listing_runs(setup, which):
    ns = namespace(*setup)
    code = blocks()
    exec(code["common"], ns)
    exec(code[which], ns)
    assert torch.isfinite(ns["loss"]) and ns["epoch"] == 1
    if which == "fkd":
        assert ns["images"].shape == (14 * 4, 3, 224, 224)  # 30 images in batches of 16: the last holds 14


@pytest.mark.parametrize("fmt,which", [("tfrecord", "tfrecord_standard"), ("tfrecord", "tfrecord_fkd"),
                                       ("recordio", "recordio_standard"), ("recordio", "tfrecord_fkd")])
def test_shard_listing_runs(shard_sets, fmt, which):
    """DeepLearningExamples' TFRecord / RecordIO readers on shards we packed, and the same shards switched to
    FKD (the TFRecord listing's FKD part serves RecordIO too); each with its loop."""
    shards, store = shard_sets[fmt]
    ns = namespace(None, store)
    ns["SHARDS"] = shards
    code = blocks()
    exec(code["common"], ns)
    exec(code[which], ns)
    loop = {"tfrecord_standard": "", "recordio_standard": loop_of(code["standard"])}.get(which, loop_of(code["fkd"]))
    exec(loop, ns)
    assert torch.isfinite(ns["loss"]) and ns["epoch"] == 1
    if which == "tfrecord_fkd":
        assert ns["reader"].serves_bytes
        if fmt == "tfrecord":
            assert len(ns["reader"].paths.shards.names) > 1
        assert ns["images"].shape == (14 * 4, 3, 224, 224)
    else:
        assert 0 <= int(ns["labels"].min()) and int(ns["labels"].max()) < 10  # the 1-based TFRecord labels less 1


def test_fkd_listing_pattern_keeps_epochs_aligned(setup):
    """start_epoch + DALIGenericIterator(auto_reset=True): every batch matches the reader's plan."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from pipelines import replay_crops
    reader = FKDReader(setup[0], setup[1], num_crops=2, batch_size=8, seed=4)

    @pipeline_def
    def pipe(reader):
        nodes = reader.nodes()
        images = fn.decoders.image(fn.io.file.read(nodes["paths"]), device=DECODER, output_type=types.RGB)
        return replay_crops(images, nodes["roi_start"], nodes["roi_end"], 2, 16, DEVICE), nodes["index"], \
            nodes["crop_ids"]

    it = DALIGenericIterator(pipe(reader, batch_size=8, num_threads=1, device_id=DEVICE_ID),
                             ["images", "index", "crop_ids"], auto_reset=True)
    rounds = []
    for epoch in range(4):
        plan = reader.start_epoch(epoch)
        n = 0
        for i, (b,) in enumerate(it):
            assert b["index"].tolist() == plan.batch_rows(i).tolist()
            assert np.unique(b["crop_ids"].cpu().numpy()).tolist() == [plan.crop_start, plan.crop_start + 1]
            n += 1
        assert n == plan.num_batches == 4
        rounds.append(plan.round_index)
    assert sorted(rounds) == [0, 1, 2, 3]
    # Asking for another epoch while the pipeline already reads ahead is refused, not mixed.
    from pipelines import LoaderError
    next(iter(it))
    with pytest.raises(LoaderError, match="came too late"):
        reader.start_epoch(9)


def test_fkd_crops_from_box_and_flip_nodes_equals_the_reader_path(setup):
    """The drop-in block for users with their own box/flip DataNodes gives the reader path's pixels."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    from pipelines import fkd_crops, replay_crops
    reader = FKDReader(setup[0], setup[1], num_crops=3, batch_size=6, shuffle=False)
    plan = reader.start_epoch(0)
    rnd = reader.store.read_round(plan.round_index, 3)

    def boxes_and_flips(info):
        rows = plan.batch_rows(info.iteration)
        return rnd.boxes[rows].astype(np.float32), rnd.flips[rows].astype(np.float32)

    @pipeline_def
    def pipe():
        nodes = reader.nodes()
        boxes, flips = fn.external_source(boxes_and_flips, num_outputs=2, batch=True, batch_info=True,
                                          dtype=[types.FLOAT, types.FLOAT])
        images = fn.decoders.image(fn.io.file.read(nodes["paths"]), device=DECODER, output_type=types.RGB)
        a = replay_crops(images, nodes["roi_start"], nodes["roi_end"], 3, 20, DEVICE)
        b = fkd_crops(images, boxes, flips, 3, 20, DEVICE)
        return a, b

    p = pipe(batch_size=6, num_threads=1, device_id=DEVICE_ID)
    for _ in range(plan.num_batches):
        a, b = p.run()
        assert np.array_equal(np.array(a.as_cpu().as_tensor()), np.array(b.as_cpu().as_tensor()))
