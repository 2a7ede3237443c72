"""What can be proven about the GPU path without a GPU: every GPU graph is a valid DALI graph with the decoder
set to decode as the CPU does; each process picks its own GPU, backend and cores; a missing or doubled DALI
names its fix; the source tree runs uninstalled; and `fkd-dali doctor` passes here and fails on planted
faults."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from fkd_dali import affinity
from fkd_dali.cli import main
from fkd_dali.distributed import choose_backend, choose_device
from pipelines import DecoderOptions, graphs
from pipelines.dali_install import DaliInstallError, check_builds, check_driver, cuda_major, installed_builds
from pipelines.fkd_reader import FKDReader
from pipelines.generation_reader import GenerationReader
from pipelines.image_reader import ImageReader
from tests.conftest import ROOT, pythonpath
from tests.test_loader import make_store, write_coded_dataset
from tests.test_train import setup  # noqa: F401 - module fixture: 30 images and a top-5 store


# ---------------------------------------------------------------------------------------------- decoder, graphs
def test_gpu_decoder_is_set_to_decode_as_the_cpu_does():
    gpu = DecoderOptions().args("gpu")
    assert gpu["jpeg_fancy_upsampling"] is True and gpu["hw_decoder_load"] == 0.65
    assert DecoderOptions().args("cpu") == {}  # the CPU decoder already upsamples this way
    assert DecoderOptions(fast_idct=True).args("cpu") == {"use_fast_idct": True}
    assert DecoderOptions(hw_decoder_load=0.0).args("gpu")["hw_decoder_load"] == 0.0
    with pytest.raises(ValueError, match="hw_decoder_load must be between 0 and 1"):
        DecoderOptions(hw_decoder_load=1.5)


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ready"))
    data = os.path.join(root, "data")
    write_coded_dataset(data, 12)
    make_store(data, os.path.join(root, "store"), pool=4)
    return data, os.path.join(root, "store")


def test_every_pipeline_is_a_valid_dali_graph_on_the_gpu(coded):
    """DALI checks operator arguments when a graph is defined, before it needs a device: every pipeline defined
    with device="gpu" (mixed decoder with our options, GPU ops, CPU argument inputs) is accepted, and a wrong
    decoder argument would be refused there."""
    data, store = coded
    fkd = FKDReader(data, store, num_crops=2, batch_size=4)
    single = ImageReader(fkd.root, [f"x{i}.jpg" for i in range(4)], [0] * 4, batch_size=4)
    gen = GenerationReader(fkd.root, ["a.jpg"], group_size=2, batch_size=2)
    common = dict(batch_size=4, num_threads=1, device_id=None, exec_dynamic=True)
    dec = DecoderOptions(hw_decoder_load=0.3, device_memory_padding=1 << 20)
    graphs.fkd_pipeline(fkd, num_crops=2, size=32, device="gpu", decoder=dec, channels_last=True, **common)
    graphs.eval_pipeline(single, size=32, resize_size=36, device="gpu", decoder=dec, **common)
    graphs.standard_pipeline(single, size=32, device="gpu", decoder=dec, **common)
    graphs.generation_pipeline(gen, num_crops=2, views=[(32, "bicubic", graphs.IMAGENET_MEAN, graphs.IMAGENET_STD)],
                               device="gpu", decoder=dec, dtype="float16", **common)
    ssl = GenerationReader(fkd.root, ["a.jpg"], group_size=2, batch_size=2, view_params=graphs.VIEW_PARAMS)
    graphs.generation_pipeline(ssl, num_crops=2, views=[(32, "bilinear", graphs.IMAGENET_MEAN, graphs.IMAGENET_STD)],
                               device="gpu", decoder=dec, **common)  # self-supervised views behind fit_rois
    graphs.decode_pipeline(single, device="gpu", decoder=dec, images_out=True, **common)

    class Wrong(DecoderOptions):
        def args(self, device):
            return {**super().args(device), "jpeg_fancy_upsampling_typo": True}
    with pytest.raises(KeyError, match="jpeg_fancy_upsampling_typo"):
        graphs.fkd_pipeline(fkd, num_crops=2, size=32, device="gpu", decoder=Wrong(), **common)
    fkd.close()


# ---------------------------------------------------------------------------------------------- placement
def test_each_process_drives_its_own_gpu():
    assert [choose_device(r, 8) for r in range(8)] == list(range(8))  # torchrun: LOCAL_RANK
    assert [choose_device(r, 2) for r in range(4)] == [0, 1, 0, 1]  # plain launches: rank modulo the GPUs
    assert choose_device(5, 8, explicit=2) == 2
    with pytest.raises(ValueError, match="--device-id 3 but this process sees 2 CUDA device"):
        choose_device(0, 2, explicit=3)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        choose_device(0, 0)


def test_backend_is_nccl_only_when_every_rank_has_a_gpu():
    assert choose_backend("gpu", 8, 8) == "nccl"
    assert choose_backend("gpu", 2, 1) == "gloo"  # two ranks share one GPU: NCCL would refuse
    assert choose_backend("cpu", 4, 0) == "gloo"
    assert choose_backend("gpu", 8, 8, explicit="gloo") == "gloo"
    with pytest.raises(ValueError, match="nccl needs --device gpu"):
        choose_backend("cpu", 2, 0, explicit="nccl")


def test_cpu_shares_per_local_rank():
    assert affinity.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    cpus = list(range(16))
    assert [affinity.share(cpus, r, 4) for r in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11],
                                                               [12, 13, 14, 15]]
    # 4 GPUs, two per NUMA node (cores 0-7 near GPUs 0-1, 8-15 near GPUs 2-3): each rank gets 4 near cores.
    near = {0: range(8), 1: range(8), 2: range(8, 16), 3: range(8, 16)}
    got = [affinity.share(cpus, r, 4, lambda g: near[g]) for r in range(4)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    # GPUs listed on alternating nodes: ranks still get the cores near their own GPU.
    near = {0: range(8), 1: range(8, 16), 2: range(8), 3: range(8, 16)}
    got = [affinity.share(cpus, r, 4, lambda g: near[g]) for r in range(4)]
    assert got == [[0, 1, 2, 3], [8, 9, 10, 11], [4, 5, 6, 7], [12, 13, 14, 15]]
    assert affinity.share([0, 1], 1, 4) == [0, 1]  # fewer cores than ranks: no pinning gains anything
    assert affinity.pin_rank(0, 1, "cpu") is None  # a single rank is left alone


# ---------------------------------------------------------------------------------------------- installation
def test_two_dali_builds_in_one_environment_are_refused_with_the_fix():
    with pytest.raises(DaliInstallError, match=r"2 DALI builds .*pip uninstall -y nvidia-dali-cuda120"):
        check_builds({"nvidia-dali-cuda120": "2.4.0", "nvidia-dali-cuda130": "2.4.0"})
    check_builds({"nvidia-dali-cuda130": "2.4.0"})
    assert cuda_major("nvidia-dali-cuda120") == 12 and cuda_major("nvidia-dali-cuda130") == 13


def test_a_dali_build_newer_than_the_driver_is_refused_with_the_fix():
    with pytest.raises(DaliInstallError, match=r"needs a CUDA 13 driver.*CUDA 12\.8.*nvidia-dali-cuda120==2\.4\.0"):
        check_driver({"nvidia-dali-cuda130": "2.4.0"}, (12, 8))
    check_driver({"nvidia-dali-cuda120": "2.4.0"}, (13, 0))  # CUDA 12 builds run on newer drivers
    check_driver({"nvidia-dali-cuda130": "2.4.0"}, None)  # no driver: CPU only, nothing to check


@pytest.mark.slow
def test_a_second_dali_wheel_on_the_path_is_named(tmp_path):
    """A real environment with a second DALI distribution (its metadata on sys.path): any command says which
    wheels collide and how to keep one."""
    other = "nvidia-dali-cuda120" if "nvidia-dali-cuda130" in installed_builds() else "nvidia-dali-cuda130"
    meta = tmp_path / f"{other.replace('-', '_')}-2.4.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {other}\nVersion: 2.4.0\n")
    env = dict(os.environ, PYTHONPATH=pythonpath(ROOT, str(tmp_path)))
    r = subprocess.run([sys.executable, "-m", "fkd_dali", "train", str(tmp_path / "nope"), "--labels", "hard"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "2 DALI builds are installed" in r.stderr, r.stderr[-2000:]
    assert f"{other}==2.4.0" in r.stderr and "pip uninstall -y" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_missing_dali_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['nvidia.dali'] = None\n"  # as if the wheel were not installed
            "from fkd_dali.cli import main; sys.exit(main(['train', 'x', '--labels', 'hard']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=pythonpath()))
    assert r.returncode == 1, r.stderr[-2000:]
    assert "NVIDIA DALI cannot be imported" in r.stderr and "pip install 'fkd-dali[cuda12]'" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_the_source_tree_runs_without_installation(tmp_path):
    """As on a GPU machine whose DALI came as wheels: the tree copied elsewhere, its dependencies importable
    but no install hook (site's .pth files off), runs its commands from that copy."""
    src = tmp_path / "src"
    for d in ("fkd_dali", "pipelines", "labelstore"):
        shutil.copytree(os.path.join(ROOT, d), src / d, ignore=shutil.ignore_patterns("__pycache__"))
    site = sysconfig.get_paths()["purelib"]
    env = dict(os.environ, PYTHONPATH=pythonpath(str(src), site))
    code = "import fkd_dali, pipelines, labelstore; print(fkd_dali.__file__, pipelines.__file__)"
    r = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(str(src)), r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-S", "-m", "fkd_dali", "synth", "--out", str(tmp_path / "d"), "--classes",
                        "2", "--per-class", "2", "--val-per-class", "1", "--size", "64"], env=env,
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(os.listdir(tmp_path / "d" / "train")) == 2


# ---------------------------------------------------------------------------------------------- doctor
@pytest.fixture(scope="module")
def doctor_work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("doctor"))


def _report(out):
    with open(os.path.join(out, "doctor.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_doctor_passes_on_this_machine(doctor_work, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc = main(["doctor", "--device", "cpu", "--only", "decode,replay,zero-copy,buffers,generate,ddp,memory",
               "--out", out, "--workdir", doctor_work, "--deadline", "600"])
    rep = _report(out)
    status = {r["name"]: r["status"] for r in rep["results"]}
    assert rc == 0, status
    assert status == {"decode parity": "pass", "replay parity": "pass", "zero copy": "pass", "buffer lifetime": "pass",
                      "generation parity": "pass", "DDP smoke": "pass", "memory per rank": "info"}
    ddp = next(r for r in rep["results"] if r["name"] == "DDP smoke")["details"]["runs"][0]
    if len(os.sched_getaffinity(0)) >= 2:  # two ranks on one node: each pinned to its own cores
        assert not set(ddp["cpus"][0]) & set(ddp["cpus"][1]), ddp["cpus"]
    md = open(os.path.join(out, "doctor.md")).read()
    assert "| decode parity | pass |" in md and "All checks passed." in md
    assert rep["environment"]["dali"] and rep["environment"]["zarr"]


def test_doctor_checks_fail_on_planted_faults(doctor_work, tmp_path):
    out = str(tmp_path / "out")
    rc = main(["doctor", "--device", "cpu", "--only", "decode,replay", "--plant", "decoder-option", "--plant",
               "shifted-box", "--out", out, "--workdir", doctor_work])
    rep = _report(out)
    assert rc == 0 and rep["planted"] == ["decoder-option", "shifted-box"]
    by = {r["name"]: r for r in rep["results"]}
    assert by["decode parity"]["status"] == "fail" and "label noise" in by["decode parity"]["meaning"]
    assert by["replay parity"]["status"] == "fail" and by["replay parity"]["details"]["vs_torchvision_max"] > 10
    assert "not the crops the teacher labelled" in by["replay parity"]["meaning"]


def test_doctor_stops_cleanly_at_its_deadline(doctor_work, tmp_path):
    out = str(tmp_path / "out")
    main(["doctor", "--device", "cpu", "--only", "decode,bench-loader", "--out", out, "--workdir", doctor_work,
          "--deadline", "6"])
    rep = _report(out)
    by = {r["name"]: r for r in rep["results"]}
    assert by["bench-loader"]["status"] == "skip" and "deadline" in by["bench-loader"]["figure"]
    assert rep["seconds"] < 60


def test_doctor_markdown_cells_keep_the_table_intact():
    from fkd_dali.doctor import format_markdown
    md = format_markdown({"device": "cpu", "seconds": 1, "deadline_s": 2, "planted": [], "failed": [],
                          "environment": {}, "results": [{"name": "x", "status": "pass", "figure": "max |Δ| 1",
                                                          "meaning": ""}]})
    row = next(line for line in md.splitlines() if line.startswith("| x |"))
    assert row.replace("\\|", "").count("|") == 5 and "max \\|Δ\\| 1" in row  # 4 cells; the figure's bars escaped


def test_the_ddp_worker_trains_and_reports_in_one_process(setup, tmp_path):  # noqa: F811
    """The doctor's DDP smoke worker, here as a world of one (torchrun starts two of it in the doctor's check):
    three steps from the store, and the report the parent compares across ranks."""
    from fkd_dali.doctor import ddp_worker
    ddp_worker.main(setup["data"], setup["store"], str(tmp_path), "cpu")
    report = json.load(open(tmp_path / "rank0.json"))
    assert report["rank"] == 0 and report["backend"] == "none" and len(report["rows"]) == 3
    assert report["device"] == "cpu" and set(report["cpus"]) <= os.sched_getaffinity(0)
    assert all(report["rows"]) and "/" in report["weights"]


# ---------------------------------------------------------------------------------------------- the GPU session
def test_a_session_step_is_bounded_by_its_share_and_logged(tmp_path):
    """The GPU session's steps (doctor/session.py): each runs with its output in a log, its outcome is passed,
    its exit code, or stopped at its share of the budget; the summary shows a log's last lines."""
    from fkd_dali.doctor.session import _run, _tail
    env = dict(os.environ)
    log = str(tmp_path / "ok.log")
    outcome, secs = _run([sys.executable, "-c", "print('one'); print('two')"], log, 60, env)
    assert outcome == "passed" and secs < 60 and _tail(log) == f"$ {sys.executable} -c print('one'); " \
        "print('two') / one / two"
    assert _run([sys.executable, "-c", "raise SystemExit(3)"], str(tmp_path / "bad.log"), 60, env)[0] == "exit 3"
    outcome, secs = _run([sys.executable, "-c", "import time; time.sleep(30)"], str(tmp_path / "slow.log"), 1, env)
    assert outcome == "stopped at its 1 s share of the budget" and secs < 10


@pytest.mark.slow
def test_the_gpu_session_rehearses_on_the_cpu_within_its_budget(tmp_path, monkeypatch):
    """docs/gpu-check.md's one command, rehearsed without a GPU and with a budget too small for the whole suite:
    the doctor within its deadline, the GPU-only tests (skipped here), the suite not started; the summary says
    which and the exit code is not 0."""
    from fkd_dali.doctor import session
    out = tmp_path / "session"
    # 120 s: the doctor (8 s of checks) and the skipped GPU tests fit even on a loaded 2-core machine (each start
    # imports torch and DALI: 8-30 s measured, quiet to loaded); what is left is below what the suite is said to
    # need, whatever the machine's speed, so the suite is not started.
    monkeypatch.setattr(session, "SUITE_MIN_SECONDS", 120.0)
    rc = session.main(["--device", "cpu", "--out", str(out), "--budget", "120", "--doctor-deadline", "8"])
    summary = (out / "session.md").read_text()
    assert rc == 1 and "| test suite on the cpu | not started: budget used up |" in summary, summary
    assert "| GPU-only tests (pytest -m gpu) | passed |" in summary, summary
    assert "| doctor |" in summary and (out / "doctor.log").exists() and (out / "pytest-gpu.log").exists()
    assert len(os.listdir(out)) <= 6  # all of it comes back from a lent machine


def test_python_dash_m_fkd_dali_is_the_command_line():
    r = subprocess.run([sys.executable, "-m", "fkd_dali", "--help"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=pythonpath()), timeout=120)
    assert r.returncode == 0 and "usage: fkd-dali" in r.stdout and "generate" in r.stdout and "doctor" in r.stdout
