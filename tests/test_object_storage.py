"""Label stores on object storage, end to end against a real S3-compatible server (moto in server mode on
127.0.0.1): two ranks generate into s3://, inspect --verify reads it back, train replays it, and the store
equals one generated on local disk."""

import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import s3fs
from moto.server import ThreadedMotoServer

import labelstore
from tests.test_generate import make_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    fs = s3fs.S3FileSystem(key="test", secret="test", endpoint_url=endpoint)
    fs.mkdir("labels")
    yield {"env": env, "fs": fs, "world": make_world(str(tmp_path_factory.mktemp("s3")))}
    server.stop()


def _run(args, env, **kw):
    r = subprocess.run([sys.executable, "-m", "fkd_dali", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **env), **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _generate(w, save, rank=None):
    args = ["generate", w["data"], "--save-path", save, "-a", "torchscript", "--teacher-path", w["teachers"][0],
            "--input-size", "24", "--num-crops", "8", "--num-seg", "4", "-b", "2", "--top-k", "5",
            "--rows-per-shard", "8", "--device", "cpu", "-q"]
    return args + (["--rank", str(rank), "--world-size", "2"] if rank is not None else [])


@pytest.mark.slow
def test_generate_inspect_train_with_the_store_on_s3(s3, tmp_path):
    w, env = s3["world"], s3["env"]
    url = "s3://labels/run1/store"
    ranks = [subprocess.Popen([sys.executable, "-m", "fkd_dali", *_generate(w, url, r)], cwd=ROOT, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **env),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    for p in ranks:  # each rank PUTs its own shard objects whole: no locks on object storage
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    keys = s3["fs"].find("labels/run1/store/boxes/c")
    assert len(keys) == 4  # 30 rows / 8 per shard: one object per shard, nothing partial left
    out = _run(["inspect", url, "--verify"], env)
    assert "verified 4 shards" in out and "30 done rows" in out and "complete   yes" in out
    out = _run(["inspect", url, "--sample", "2"], env)
    assert "verified 2 of 4 shards" in out

    local = str(tmp_path / "local")
    _run(_generate(w, local), env)
    os.environ.update(env)  # this process reads the S3 store too (fsspec takes its options from FSSPEC_S3_*)
    import fsspec.config
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = env["FSSPEC_S3_ENDPOINT_URL"]
    try:
        remote = labelstore.open_store(url)
        a, b = remote.read_rows(range(30)), labelstore.open_store(local).read_rows(range(30))
        for name in ("sizes", "boxes", "flips", "topk_idx", "topk_val", "done"):
            assert np.array_equal(a[name], b[name]), name  # the same labels as a local generation
        assert labelstore.summarize(remote)["bytes_total"] > 0
    finally:
        fsspec.config.conf["s3"].pop("endpoint_url", None)

    out = _run(["train", w["data"], "-a", "tiny_cnn", "--softlabel-path", url, "--num-crops", "2", "-b", "16",
                "--epochs", "3", "--input-size", "24", "--device", "cpu", "--max-steps", "3", "--output",
                str(tmp_path / "run"), "-q"], env)
    assert "3 steps" in out and "stopped by --max-steps" in out


class Requests(logging.Handler):
    """The requests the moto server answers (method, path), from werkzeug's access log."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seen: list[tuple[str, str]] = []

    def emit(self, record):
        m = re.search(r'"(\w+) (\S+) HTTP', re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))
        if m:
            self.seen.append((m.group(1), m.group(2).split("?")[0]))


def test_a_pass_costs_one_get_per_object_and_two_per_shard_of_a_crop_array(s3, tmp_path):
    """What docs/object-storage.md says a pass costs: per shard one GET of ``sizes`` (and of ``done``, once per
    loader) and, per crop array, one GET of the shard index and one of the round's chunk; no HEAD before a
    GET (s3fs sends one to decide on parallel ranges unless told not to)."""
    from tests.test_loader import make_store
    w = s3["world"]
    local = str(tmp_path / "store")
    make_store(w["data"], local, pool=6)  # 30 rows, 8 per shard: 4 shards
    s3["fs"].put(local, "labels/cost/store", recursive=True)
    log = logging.getLogger("werkzeug")
    seen = Requests()
    log.addHandler(seen)
    level = log.level
    log.setLevel(logging.INFO)
    os.environ.update(s3["env"])
    import fsspec.config
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = s3["env"]["FSSPEC_S3_ENDPOINT_URL"]
    try:
        store = labelstore.open_store("s3://labels/cost/store")
        seen.seen.clear()
        done = store.require_complete()
        once = list(seen.seen)
        seen.seen.clear()
        store.read_round(1, 2, rows=np.arange(3, 30, 2), done=done)
        per_pass = list(seen.seen)
    finally:
        fsspec.config.conf["s3"].pop("endpoint_url", None)
        log.removeHandler(seen)
        log.setLevel(level)

    def chunks(reqs, name):
        return [r for r in reqs if r[1].startswith(f"/labels/cost/store/{name}/c/")]
    assert not [r for r in once + per_pass if r[0] == "HEAD"], once + per_pass
    assert len(chunks(once, "done")) == 4
    assert len(chunks(per_pass, "sizes")) == 4
    for name in labelstore.CROP_ARRAYS:
        assert len(chunks(per_pass, name)) == 2 * 4, name  # shard index + the round's chunk, per shard
    assert len([r for r in per_pass if "/c/" in r[1]]) == 4 + 4 * 2 * 4


@pytest.mark.slow
def test_training_reads_a_read_only_zip_store(s3, tmp_path):
    w = s3["world"]
    store = str(tmp_path / "store")
    _run(_generate(w, store), {})
    zpath = shutil.make_archive(str(tmp_path / "store"), "zip", store)
    out = _run(["train", w["data"], "-a", "tiny_cnn", "--softlabel-path", zpath, "--num-crops", "2", "-b", "16",
                "--epochs", "3", "--input-size", "24", "--device", "cpu", "--max-steps", "2", "--output",
                str(tmp_path / "run"), "-q"], {})
    assert "2 steps" in out
