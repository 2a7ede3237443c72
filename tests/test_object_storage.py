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


def _refused(args, env, clear=()):
    """A real process (so that what Python prints at exit shows): exit 1, one line, no traceback."""
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, AWS_EC2_METADATA_DISABLED="true", **env)
    for name in clear:
        full.pop(name, None)
    r = subprocess.run([sys.executable, "-m", "fkd_dali", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=full)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]
    return r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no such bucket", "no bucket named", "no credentials", "endpoint unreachable"])
def test_an_unusable_object_store_is_one_line_naming_the_url_and_the_fix(s3, tmp_path, case):
    """generate and inspect: botocore's traceback (and, from inspect, three "Exception ignored" tracebacks at
    exit: zarr's other requests left pending when its first one failed) -> one line each."""
    from tests.conftest import free_port
    env, clear = dict(s3["env"]), ()
    url, says = "s3://labels/nothing/store", ""
    if case == "no such bucket":
        url, says = "s3://no-such-bucket/store", "the bucket 'no-such-bucket' does not exist; create it first"
    elif case == "no bucket named":
        url, says = "s3://", "s3:// names no bucket: use s3://BUCKET/PREFIX/STORE"
    elif case == "no credentials":
        env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
        clear, says = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), "no credentials were found"
    else:  # a closed port on this machine refuses at once; one attempt, no retries
        env.update(FSSPEC_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_MAX_ATTEMPTS="1", AWS_RETRY_MODE="standard")
        says = "the object store cannot be reached (FSSPEC_S3_ENDPOINT_URL=http://127.0.0.1:"
    err = _refused(_generate(s3["world"], url), env, clear)
    assert f"error: {url}" in err and says in err, err
    if case != "no such bucket":  # reading a store in a missing bucket is "does not exist", as any missing store
        err = _refused(["inspect", url], env, clear)
        assert f"error: {url}" in err and says in err, err


def test_places_no_store_can_be_written_are_refused_by_name(s3, tmp_path, capsys, monkeypatch):
    """memory:// kept nothing ("store complete", exit 0); a new .zip path was called missing, not read-only; a
    prefix holding other objects was emptied (zarr's mode "w" deletes the prefix it creates a group in)."""
    from fkd_dali.cli import main
    s3["fs"].pipe("labels/precious/keep.txt", b"not a label store")
    for name, value in s3["env"].items():
        monkeypatch.setenv(name, value)
    import fsspec.config
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}),
                                                   "endpoint_url": s3["env"]["FSSPEC_S3_ENDPOINT_URL"]})
    for where, says in (("memory://labels/store", "memory:// keeps a store in this process's memory only"),
                        (str(tmp_path / "new.zip"), "a .zip label store is read-only; generate or resume into a "
                                                    "folder"),
                        ("s3://labels/precious", "holds other files and is not a label store")):
        assert main(_generate(s3["world"], where)) == 1
        err = capsys.readouterr().err
        assert f"error: {where}: {says}" in err or f"error: {where} {says}" in err, err
        if "://" not in where or where.startswith("memory"):
            assert main(["inspect", where]) == 1 and where in capsys.readouterr().err
    assert not (tmp_path / "new.zip").exists()
    assert s3["fs"].find("labels/precious") == ["labels/precious/keep.txt"]
