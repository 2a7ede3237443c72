"""The reliability catalogue (docs/reliability.md): every awkward input gets a clear answer or a documented
policy, and every command that dies can be resumed. Bad inputs go through the real commands (generate,
train, import-fkd) and the loaders; files are real files written here."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import labelstore
from fkd_dali.dataset import scan_image_folder
from fkd_dali.fkd_format import FKDFormatError, export_fkd, import_fkd
from fkd_dali.generate import GenerateError, generate
from fkd_dali.train import train
from pipelines import FKDLoader, LoaderError, StandardLoader
from pipelines.errors import image_header
from tests import badfiles
from tests.conftest import assert_same_weights, current_device, free_port, pythonpath, textured
from tests.test_generate import config, world  # noqa: F401 - the module-scoped fixture
from tests.test_train import cfg as train_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = current_device()
VICTIM = os.path.join("class_3", "img_010.jpg")  # row 10 of the coded dataset
ROW = 10


@pytest.fixture
def data(world, tmp_path):  # noqa: F811
    """A private copy of the coded dataset (30 images, 10 classes) and its val split."""
    d = str(tmp_path / "data")
    shutil.copytree(world["data"], d)
    return d


def put(data: str, writer, rel: str = VICTIM, size: tuple[int, int] = (60, 80)) -> str:
    path = os.path.join(data, "train", rel)
    if os.path.exists(path):
        os.remove(path)
    writer(path, textured(np.random.default_rng(3), *size))
    return path


# --- files no decoder can use -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(badfiles.UNUSABLE))
def test_unusable_file_stops_generate_with_its_name_or_is_left_out(world, data, tmp_path, kind):  # noqa: F811
    put(data, badfiles.UNUSABLE[kind])
    with pytest.raises(GenerateError, match=r"class_3/img_010.jpg: .*--skip-corrupt"):
        generate(config(world, str(tmp_path / "s"), data=data))
    rep = generate(config(world, str(tmp_path / "s"), data=data, skip_corrupt=True))
    assert rep.complete and [r for r, _ in rep.skipped] == [ROW]
    store = labelstore.open_store(str(tmp_path / "s"))
    assert store.skipped_rows().tolist() == [ROW] and "class_3/img_010.jpg" in dict(store.meta.skipped)[ROW]
    served = {i for b in FKDLoader(data, store, batch_size=8, num_crops=2, crop_size=16, device=DEVICE)
              for i in b["indices"].tolist()}
    assert served == set(range(30)) - {ROW}  # never trained on


@pytest.mark.parametrize("kind", list(badfiles.UNUSABLE))
def test_unusable_file_in_hard_label_training_is_named_before_it_reaches_a_model(data, tmp_path, kind):
    put(data, badfiles.UNUSABLE[kind])
    ds = scan_image_folder(os.path.join(data, "train"))
    ld = StandardLoader(ds.root, ds.files, ds.targets, batch_size=8, crop_size=16, device=DEVICE, seed=3)
    bad_row = ds.files.index("class_3/img_010.jpg")
    # the header check runs per batch, ahead of the pipeline: no batch holding the file is ever yielded
    served = []
    with pytest.raises(LoaderError, match=r"1 unusable image file\(s\): .*class_3/img_010.jpg: "):
        for b in ld:
            served += b["indices"].tolist()
    assert bad_row not in served
    ld.close()


def test_a_decompression_bomb_is_refused_before_any_decode(data):
    path = put(data, badfiles.huge_header)
    size, why = image_header(path)
    assert size is None and "header claims more than 178,956,970 pixels" in why


def test_a_jpeg_cut_short_is_refused_by_its_header_check_and_padding_is_not(data):
    """nvJPEG (the GPU decoder) decodes a JPEG cut short without an error, into partly garbage pixels; so the
    header check every command runs first also looks for the end marker in the file's last 4 KB."""
    path = put(data, badfiles.progressive_jpeg)
    raw = open(path, "rb").read()
    assert image_header(path) == ((60, 80), None)
    for cut in (len(raw) // 2, len(raw) - 2):
        open(path, "wb").write(raw[:cut])
        size, why = image_header(path)
        assert size is None and "without its end marker" in why, cut
    open(path, "wb").write(raw + b"\x00" * 500)  # encoders may pad after the marker: still fine
    assert image_header(path) == ((60, 80), None)


# --- files that decode: by content, as Pillow sees them ----------------------------------------------

@pytest.mark.parametrize("kind", list(badfiles.DECODABLE))
def test_odd_but_valid_files_are_labelled_and_replayed_as_pillow_decodes_them(world, data, tmp_path, kind):  # noqa: F811
    path = put(data, badfiles.DECODABLE[kind], size=(60, 80))
    want = badfiles.expected_rgb(path)
    assert want.shape == (60, 80, 3)  # EXIF orientation 6 would display it 80x60: ignored, as Pillow/FKD do
    rep = generate(config(world, str(tmp_path / "s"), data=data))
    assert rep.complete and not rep.skipped
    store = labelstore.open_store(str(tmp_path / "s"))
    row = store.read_rows([ROW])
    assert row["sizes"][0].tolist() == [60, 80]
    S = 32
    ld = FKDLoader(data, store, batch_size=4, num_crops=6, crop_size=S, device=DEVICE, normalize=False,
                   shuffle=False)
    seen = 0
    for b in ld:
        for img, r, k in zip(b["images"], b["indices"].tolist(), b["crop_ids"].tolist()):
            if r != ROW:
                continue
            t, l, h, w = (int(v) for v in row["boxes"][0, k])
            ref = TF.resized_crop(Image.fromarray(want), t, l, h, w, [S, S], TF.InterpolationMode.BILINEAR,
                                  antialias=True)
            ref = np.asarray(TF.hflip(ref) if row["flips"][0, k] else ref).transpose(2, 0, 1).astype(int)
            diff = np.abs(img.cpu().numpy().astype(int) - ref)[:, 1:-1, 1:-1]
            assert diff.max() <= 3, (kind, k, diff.max())
            seen += 1
    assert seen == 6


def test_16_bit_png_expectation_is_the_high_byte(tmp_path):
    """What the catalogue compares a 48-bit PNG against: value // 257, i.e. the picture before it was widened
    (the loader test above then shows DALI's decode equals it)."""
    rgb = textured(np.random.default_rng(0), 20, 30)
    path = str(tmp_path / "d" / "a.png")
    badfiles.png_16bit_rgb(path, rgb)
    with Image.open(path) as im:
        assert im.mode in ("RGB", "RGB;16", "I;16") and im.size == (30, 20)
    assert np.array_equal(badfiles.expected_rgb(path), rgb)


# --- the dataset changed under the store ------------------------------------------------------------

def test_file_deleted_or_replaced_after_generate_is_named_by_train(world, data, tmp_path):  # noqa: F811
    generate(config(world, str(tmp_path / "s"), data=data))
    victim = os.path.join(data, "train", VICTIM)
    original = open(victim, "rb").read()
    os.remove(victim)
    with pytest.raises(FileNotFoundError, match="class_3/img_010.jpg is listed in the label store"):
        FKDLoader(data, str(tmp_path / "s"), batch_size=4, num_crops=2, device=DEVICE)
    put(data, lambda p, a: Image.fromarray(a).save(p, quality=80), size=(50, 50))
    with pytest.raises(labelstore.StoreMismatchError,
                       match=r"1 file\(s\) changed: class_3/img_010.jpg \(now 50x50 px, labelled at .*regenerate"):
        FKDLoader(data, str(tmp_path / "s"), batch_size=4, num_crops=2, device=DEVICE)
    open(victim, "wb").write(original + b"\0")  # same picture, one byte of padding after its end marker
    with pytest.raises(labelstore.StoreMismatchError, match="same names and pixel sizes, different byte sizes"):
        FKDLoader(data, str(tmp_path / "s"), batch_size=4, num_crops=2, device=DEVICE)


def test_non_image_files_are_ignored_as_imagefolder_does(world, data, tmp_path):  # noqa: F811
    for junk in ("notes.txt", ".DS_Store", "Thumbs.db"):
        open(os.path.join(data, "train", "class_0", junk), "w").write("not an image")
    generate(config(world, str(tmp_path / "s"), data=data))
    files = list(labelstore.open_store(str(tmp_path / "s")).files)
    assert len(files) == 30 and not [f for f in files if not f.endswith(".jpg")]


def _without_root_file_access() -> None:
    """preexec_fn: as root, drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so the
    exec'd command obeys file permissions like any user (root otherwise reads a chmod 000 file)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.slow
def test_unreadable_file_is_named(world, data, tmp_path):  # noqa: F811
    """A real chmod 000 file, met by generate and by train (as root, the commands run without root's
    file-access capabilities)."""
    generate(config(world, str(tmp_path / "before"), data=data, num_crops=4, top_k=5))  # labelled while readable
    os.chmod(os.path.join(data, "train", VICTIM), 0)
    common = ["--device", DEVICE, "-q"]
    gen = ["generate", data, "--save-path", str(tmp_path / "s"), "-a", "torchscript", "--teacher-path",
           world["teachers"][0], "--input-size", "24", "--num-crops", "4", "--top-k", "3"]
    trn = ["train", data, "--softlabel-path", str(tmp_path / "before"), "-a", "tiny_cnn", "--num-crops", "2", "-b",
           "8", "--epochs", "2", "--input-size", "24", "--output", str(tmp_path / "run")]
    for args, says in ((gen, "class_3/img_010.jpg: the file cannot be read (permission denied)"),
                       (trn, "class_3/img_010.jpg: the file cannot be read (permission denied)")):
        r = subprocess.run([sys.executable, "-m", "fkd_dali", *args, *common], cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=pythonpath()), capture_output=True, text=True, timeout=300,
                           preexec_fn=_without_root_file_access if os.geteuid() == 0 else None)
        assert r.returncode == 1, r.stderr[-2000:]
        assert says in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr


# --- wrong stores and settings ----------------------------------------------------------------------

def test_top_k_larger_than_the_class_count(world, data, tmp_path):  # noqa: F811
    with pytest.raises(GenerateError, match=r"--top-k 11 must be between 1 and the number of classes \(10\)"):
        generate(config(world, str(tmp_path / "s"), data=data, top_k=11))


def test_corrupt_chunk_stops_training_naming_the_chunk(world, data, tmp_path):  # noqa: F811
    generate(config(world, str(tmp_path / "s"), data=data, num_crops=8, top_k=5))
    chunk = next(os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "s" / "topk_val") for f in fs
                 if f != "zarr.json")
    raw = bytearray(open(chunk, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(chunk, "wb").write(bytes(raw))
    s = {"data": data, "store": str(tmp_path / "s")}
    with pytest.raises(labelstore.StoreCorruptError, match=r"topk_val.*chunk"):
        train(train_cfg(s, tmp_path, epochs=2))


def test_out_of_range_boxes_in_an_fkd_import_are_named(world, data, tmp_path):  # noqa: F811
    generate(config(world, str(tmp_path / "s"), data=data))
    export_fkd(str(tmp_path / "s"), str(tmp_path / "fkd"), show_progress=False)
    victim = os.path.join(tmp_path, "fkd", "train", "class_3", "img_010.tar")
    coords, flips, output = torch.load(victim, weights_only=False)
    coords[1] = torch.tensor([0.5, 0.5, 0.9, 0.9]) if torch.is_tensor(coords) else np.array([0.5, 0.5, 0.9, 0.9])
    torch.save([coords, flips, output], victim)
    with pytest.raises(FKDFormatError, match=r"class_3/img_010.tar: crop 1 has coords .* outside its image"):
        import_fkd(str(tmp_path / "fkd"), data, str(tmp_path / "back"), show_progress=False)


def test_disk_full_while_writing_stops_cleanly_and_resumes(world, data, tmp_path, monkeypatch):  # noqa: F811
    """ENOSPC injected into the store's writes after two shards: generate stops with a message saying so,
    the finished shards stay done, and the rerun finishes the same store as an uninterrupted run."""
    import labelstore.store as store_mod
    real = store_mod.LabelStore.write_block
    calls = {"n": 0}

    def failing(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise labelstore.StoreWriteError(f"{self.path}: writing failed: "
                                             f"{OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))}")
        return real(self, *a, **kw)

    monkeypatch.setattr(store_mod.LabelStore, "write_block", failing)
    with pytest.raises(labelstore.StoreWriteError, match="No space left on device"):
        generate(config(world, str(tmp_path / "s"), data=data))
    assert int(labelstore.open_store(str(tmp_path / "s")).done().sum()) == 16
    monkeypatch.setattr(store_mod.LabelStore, "write_block", real)
    assert generate(config(world, str(tmp_path / "s"), data=data)).complete
    generate(config(world, str(tmp_path / "ref"), data=data))
    a, b = labelstore.open_store(str(tmp_path / "s")), labelstore.open_store(str(tmp_path / "ref"))
    for name in ("boxes", "flips", "topk_idx", "topk_val"):
        assert np.array_equal(a.read_rows(range(30))[name], b.read_rows(range(30))[name]), name


# --- killed jobs ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_training_killed_at_a_random_moment_resumes_to_the_same_weights(world, tmp_path):  # noqa: F811
    """SIGKILL a real `fkd-dali train` process after its third step's checkpoint; resuming from the last
    checkpoint gives the weights of an uninterrupted run (same data order, crop rounds and LR schedule). A tiny
    student for 30 epochs (120 steps, a checkpoint after each): the kill lands well before the end."""
    store = str(tmp_path / "s")
    generate(config(world, store, num_crops=8, top_k=5))

    def cmd(out, *extra):
        return [sys.executable, "-m", "fkd_dali", "train", world["data"], "--softlabel-path", store, "-a",
                "tiny_cnn", "--num-crops", "2", "-b", "8", "--epochs", "30", "--input-size", "32", "--lr", "0.05",
                "--cos", "--device", DEVICE, "--checkpoint-every", "1", "--output", out, "-q", *extra]

    env = dict(os.environ, PYTHONPATH=pythonpath(), OMP_NUM_THREADS="1")
    full = subprocess.run(cmd(str(tmp_path / "a")), env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    ckpt = tmp_path / "b" / "checkpoint.pth.tar"
    p = subprocess.Popen(cmd(str(tmp_path / "b")), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["global_step"] >= 3:
            break
        time.sleep(0.05)
    time.sleep(float(np.random.default_rng().uniform(0, 0.5)))
    assert p.poll() is None, "training ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = torch.load(ckpt, weights_only=True)["global_step"]
    again = subprocess.run(cmd(str(tmp_path / "b"), "--resume", str(ckpt)), env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    a = torch.load(tmp_path / "a" / "checkpoint.pth.tar", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["global_step"] == b["global_step"] > killed_at
    rerun = None
    if DEVICE != "cpu":  # GPU kernels need not be deterministic: compare with a second uninterrupted run
        again2 = subprocess.run(cmd(str(tmp_path / "a2")), env=env, capture_output=True, text=True, timeout=600)
        assert again2.returncode == 0, again2.stderr[-2000:]
        rerun = torch.load(tmp_path / "a2" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    assert_same_weights(a["state_dict"], b["state_dict"], rerun)


@pytest.mark.slow
def test_a_dying_ddp_rank_ends_the_job_instead_of_hanging(world, tmp_path):  # noqa: F811
    """Rank 1 SIGKILLs itself after its second step; torchrun must end rank 0 and exit with an error in
    bounded time (not wait out the collective timeout)."""
    store = str(tmp_path / "s")
    generate(config(world, store, num_crops=8, top_k=5))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath(), FKD_TEST_DIE_RANK="1", FKD_TEST_DIE_STEP="2")
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), os.path.join(ROOT, "tests", "ddp_train_worker.py"), world["data"], store,
                        str(tmp_path), "--dist-timeout", "120"], env=env, capture_output=True, text=True,
                       timeout=600)
    took = time.time() - t
    print(f"job ended {took:.1f} s after start, exit {r.returncode}")
    assert r.returncode != 0
    assert took < 100, took
    assert "Signals.SIGKILL" in r.stderr or "exitcode  : -9" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("kind", list(badfiles.UNUSABLE))
def test_unusable_image_in_an_fkd_import_is_named(world, data, tmp_path, kind):  # noqa: F811
    """import-fkd reads each image's header (for the pixel boxes) and a JPEG's end marker: an unusable image
    is named, nothing is imported for it."""
    generate(config(world, str(tmp_path / "s"), data=data))
    export_fkd(str(tmp_path / "s"), str(tmp_path / "fkd"), show_progress=False)
    put(data, badfiles.UNUSABLE[kind])
    with pytest.raises(FKDFormatError, match=r"class_3/img_010.jpg: .*replace or remove the image"):
        import_fkd(str(tmp_path / "fkd"), data, str(tmp_path / "back"), show_progress=False)
