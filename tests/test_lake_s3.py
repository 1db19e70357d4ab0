"""Lakes on object storage, against a real local S3 server (moto, 127.0.0.1): the conditional PUT the commit
protocol relies on, errors as one line, SIGKILL during an S3 ingest, Grain reads and training from an ``s3://`` lake.
The backend-independent contract tests run on both backends in test_lake_protocol.py / test_lake_contract.py."""

import concurrent.futures
import json
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lepton_jax.cli import main
from lepton_jax.errors import LakeError
from lepton_jax.lake import Lake, ingest
from lepton_jax.lake.storage import ObjectStorage, open_storage
from lepton_jax.serve import Predictor
from lepton_jax.serve.server import ServedModel
from tests.lake_data import npz_shard, npz_source, version_rows
from tests.serving import served_classes

WRITER = """
import sys
from lepton_jax.lake import Lake, NpzSource, ingest
ingest(Lake(sys.argv[1], target_shard_bytes=1024), "t", NpzSource(sys.argv[2], value_range=(0, 255),
                                                                  split_key="split"), mode="append")
"""






def test_the_servers_conditional_put_refuses_a_second_create(s3_env):
    """The guarantee the commit point relies on: obstore's create mode (If-None-Match: *) against this server."""
    import obstore
    from obstore.exceptions import AlreadyExistsError
    from obstore.store import S3Store

    store = S3Store("lake-tests", prefix=s3_env.new_root().rsplit("/", 1)[1], client_options={"allow_http": True})
    obstore.put(store, "t/_log/00000001.json", b"first", mode="create")
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, "t/_log/00000001.json", b"second", mode="create")
    assert bytes(obstore.get(store, "t/_log/00000001.json").bytes()) == b"first"


def test_racing_creates_of_one_key_have_exactly_one_winner(s3_env):
    storage = open_storage(s3_env.new_root())
    assert isinstance(storage, ObjectStorage)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(lambda k: storage.create("t/_log/00000001.json", f"writer {k}".encode()), range(16)))
    assert wins.count(True) == 1
    assert storage.read("t/_log/00000001.json") == f"writer {wins.index(True)}".encode()
    assert storage.list("t/_log/") == ["00000001.json"] and storage.list("") == ["t"]
    assert storage.list("t/nothing/") == []


def test_storage_primitives_on_s3(s3_env):
    storage = open_storage(s3_env.new_root())
    storage.write("t/data/c1/a/zarr.json", b"12345")
    storage.write("t/data/c1/a/c/0", b"1")
    storage.write("t/data/c1/a/c/0", b"22")  # a plain overwrite
    assert storage.list_recursive("t/data/c1") == {"a/c/0": (2, pytest.approx(time.time(), abs=60)),
                                                   "a/zarr.json": (5, pytest.approx(time.time(), abs=60))}
    assert storage.stat("t/data/c1/a/c/0")[0] == 2 and storage.stat("t/data/c1/a/c/1") is None
    assert storage.tree("t/data/c1")[0] == 7 and storage.tree("t/data/c2") is None
    storage.delete_prefix("t/data/c1")
    assert storage.list("t/") == [] and storage.tree("t/data/c1") is None
    with pytest.raises(FileNotFoundError):
        storage.read("t/data/c1/a/zarr.json")
    spec = storage.kvstore("t/data/c1/a")
    assert spec["driver"] == "s3" and spec["bucket"] == "lake-tests" and spec["path"].endswith("/t/data/c1/a/")
    assert spec["endpoint"] == s3_env.endpoint


@pytest.mark.parametrize("case", ["no bucket", "no credentials", "unreachable endpoint"])
def test_object_store_errors_are_one_line_with_exit_2(s3_env, monkeypatch, capsys, tmp_path, case):
    uri = s3_env.new_root()
    if case == "no bucket":
        uri = "s3://no-such-bucket-here/lake"
        expect = "bucket does not exist"
    elif case == "no credentials":
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(key)
        monkeypatch.delenv("AWS_ENDPOINT_URL")  # real AWS: obstore looks for a role at the metadata endpoint
        expect = "no credentials found"
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
        expect = "endpoint is unreachable"
    src = npz_shard(tmp_path / "a.npz", 0)
    for argv in (["lake", "ls", "--lake", uri], ["lake", "verify", "--lake", uri],
                 ["lake", "ingest", "--lake", uri, "--table", "t", "--source", f"npz:{src}"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], (argv, err)
        assert "testing" not in err[0]  # the (dummy) secret never appears


def _codecs(lake, fragment, name="image"):
    """The inner-chunk codecs of one of a fragment's arrays, from its zarr.json in the bucket."""
    meta = json.loads(lake.storage.read(f"t/{fragment['arrays'][name]['path']}/zarr.json"))
    return [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]]


def test_ingest_append_time_travel_verify_and_gc_on_s3(s3_env, tmp_path, capsys):
    uri = s3_env.new_root()
    lake = Lake(uri, target_shard_bytes=1024)
    first = ingest(lake, "t", npz_source(npz_shard(tmp_path / "a.npz", 0)))
    assert first.created and lake.versions("t") == [1]
    # the appended fragments in the raw layout (an object-store lake defaults to zstd): both read back alike
    raw_lake = Lake(uri, target_shard_bytes=1024, compression="none")
    second = ingest(raw_lake, "t", npz_source(npz_shard(tmp_path / "b.npz", 1)), mode="append")
    assert lake.versions("t") == [1, 2]
    assert [_codecs(lake, f) for f in second.version.fragments("train")] == [["bytes", "zstd", "crc32c"],
                                                                             ["bytes", "crc32c"]]
    old, new = lake.table("t", 1), lake.table("t", 2)
    assert old.num_examples("train") + 48 == new.num_examples("train") == 96
    x = np.load(tmp_path / "a.npz")["x"]
    assert np.array_equal(old.reader("train").read_all()["image"], x[np.arange(64) % 4 != 0])
    assert np.array_equal(new.reader("train").read_all()["image"][:48], x[np.arange(64) % 4 != 0])
    assert second.version.record["lineage"]["appended_to"] == 1
    assert lake.verify() == []
    assert main(["lake", "verify", "--lake", uri]) == 0 and "ok: 2 version(s)" in capsys.readouterr().out
    assert main(["lake", "ls", "--lake", uri]) == 0 and "t@2" in capsys.readouterr().out
    assert main(["lake", "log", "--lake", uri, "--table", "t"]) == 0 and capsys.readouterr().out.count("\n") >= 2
    assert main(["lake", "show", "--lake", uri, "--table", "t", "--version", "1"]) == 0
    assert "split train: 48 examples" in capsys.readouterr().out
    assert main(["lake", "compact", "--lake", uri, "--table", "t"]) == 0
    assert lake.versions("t") == [1, 2, 3] and lake.verify() == []
    assert [_codecs(lake, f) for f in lake.table("t").fragments("train")] == [["bytes", "zstd", "crc32c"]]
    assert main(["lake", "gc", "--lake", uri, "--grace-seconds", "0", "--force"]) == 0
    assert lake.verify() == []  # every version still reads (time travel) after gc




@pytest.mark.slow
def test_sigkill_at_random_moments_of_an_s3_ingest_leaves_the_previous_or_the_new_version(s3_env, tmp_path):
    """12 appends into an S3 lake, each SIGKILLed at a random moment: after a random number of its data objects
    reached the bucket (0 .. all), right after its record appeared, or after it exited. Moments are counted in
    objects, not seconds, so a loaded machine does not shift them. Each time the latest version is the previous or
    the new one, with exactly its rows, and verify is clean."""
    uri = s3_env.new_root()
    storage = open_storage(uri)
    ingest(Lake(uri, target_shard_bytes=1024), "t", npz_source(npz_shard(tmp_path / "base.npz", 100)))
    before = set(storage.list_recursive("t/data"))  # one uninterrupted writer: how many data objects it PUTs
    full = npz_shard(tmp_path / "full.npz", 101)
    assert subprocess.run([sys.executable, "-c", WRITER, uri, str(full)]).returncode == 0
    total = len(set(storage.list_recursive("t/data")) - before)
    rng = random.Random(13)
    targets = [rng.randint(0, total - 1) for _ in range(9)] + [total + 1, total + 2, rng.randint(0, total + 2)]
    rng.shuffle(targets)
    outcomes = []
    for k, target in enumerate(targets):
        lake = Lake(uri)
        before_version = lake.table("t")
        objects = set(storage.list_recursive("t/data"))
        src = npz_shard(tmp_path / f"s{k}.npz", k)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, uri, str(src)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        while writer.poll() is None:
            if target <= total and len(set(storage.list_recursive("t/data")) - objects) >= target:
                break  # this many of its data objects are in the bucket
            if target == total + 1 and lake.versions("t")[-1] > before_version.version:
                break  # its record was just published (marker and lease release may be pending)
            time.sleep(0.005)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        after = Lake(uri).table("t")
        assert after.version in (before_version.version, before_version.version + 1), (k, target)
        if after.version == before_version.version + 1:
            with np.load(src) as d:
                new = [img.tobytes() + bytes([lab]) for img, lab in zip(d["x"], d["y"], strict=True)]
            assert version_rows(after) == sorted(version_rows(before_version) + new)
        assert Lake(uri).verify() == [], (k, target)
        outcomes.append(after.version - before_version.version)
    assert 0 in outcomes and 1 in outcomes, (outcomes, targets, total)  # killed before the commit point and after


def _read_pickled(source, indices):
    return source.__getitems__(indices)


@pytest.mark.slow
def test_ingest_train_register_and_serve_from_an_s3_lake(s3_env, tmp_path, capsys):
    """`lake ingest --lake s3://...` → Grain batches (also from a pickled source in a spawned process) →
    `train --lake s3://...` for one epoch (the run records the lake's URI) → `registry register` into the bucket →
    the run directory deleted → `predict`, `export` and `serve` from the registry reference."""
    import json
    import multiprocessing

    from lepton_jax.data.pipeline import train_dataset
    from lepton_jax.data.source import LakeDataSource
    from lepton_jax.data.transforms import LABEL

    uri = s3_env.new_root()
    assert main(["lake", "ingest", "--lake", uri, "--table", "digits", "--source", "digits"]) == 0
    table = Lake(uri).table("digits")
    source = LakeDataSource(table.reader("train"))
    expected = table.reader("train").read_all()
    batch = next(iter(train_dataset(source, global_batch_size=32, seed=0, num_epochs=1, schema=table.schema)))
    assert [v.shape[0] for v in batch.values()] == [32, 32]
    assert sorted(batch[LABEL].tolist()) != list(range(32)) and set(batch[LABEL].tolist()) <= set(range(10))
    idx = np.array([5, 0, 1200, 7])
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        remote = pool.submit(_read_pickled, source, idx).result(timeout=120)  # the reader carries the URI
    assert np.array_equal(remote["image"], expected["image"][idx])
    assert np.array_equal(remote["label"], expected["label"][idx])
    workdir = tmp_path / "run"
    assert main(["train", "--config", "configs/digits_cnn.py", "--workdir", str(workdir), "--lake", uri,
                 "--no-progress", "--config.num_epochs=1", "--config.eval_batch_size=128"]) == 0, \
        capsys.readouterr().err
    found = [json.loads(p.read_text()) for p in workdir.rglob("*.json") if uri in p.read_text()]
    assert found, "the run does not record the s3:// lake it trained from"

    # registered into the same bucket, the run directory deleted: predict, export and serve from the bucket alone
    raw = table.reader("test").read_all()["image"][:16]
    expected = Predictor.from_workdir(workdir).predict(raw)["class"]
    assert main(["registry", "register", "--lake", uri, "--name", "digits", "--workdir", str(workdir),
                 "--promote", "production"]) == 0, capsys.readouterr().err
    shutil.rmtree(workdir)
    assert not open_storage(uri).local_path("_models") and open_storage(uri).list("_models/digits/")
    np.save(tmp_path / "x.npy", raw)
    assert main(["predict", "--lake", uri, "--model", "digits@production", "--input", str(tmp_path / "x.npy"),
                 "--output", str(tmp_path / "y.npy")]) == 0, capsys.readouterr().err
    assert np.array_equal(np.load(tmp_path / "y.npy"), expected)
    assert main(["export", "--lake", uri, "--model", "digits@production", "--output", str(tmp_path / "edge"),
                 "--platforms", "cpu"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "edge" / "manifest.json").read_text())["evaluation"]["top1_agreement"] == 1.0
    assert served_classes(ServedModel.from_registry(uri, "digits@production"), raw) == expected.tolist()


def test_gcs_roots_map_to_the_gcs_kvstore_and_unknown_schemes_are_refused():
    """GCS has no local server here: only the mapping (obstore GCSStore for records, TensorStore `gcs` for arrays)."""
    storage = open_storage("gs://my-bucket/lakes/main")
    assert isinstance(storage, ObjectStorage) and storage.uri == "gs://my-bucket/lakes/main"
    assert storage.kvstore("t/data/c/train/000000/image") == {
        "driver": "gcs", "bucket": "my-bucket", "path": "lakes/main/t/data/c/train/000000/image/"}
    assert open_storage("gcs://my-bucket").uri == "gs://my-bucket"
    for bad, message in (("s3://", "is not a bucket name"), ("s3://bkt/../x", "'.' or '..'"),
                         ("memory://lake", "is not supported")):
        with pytest.raises(LakeError, match=message):
            open_storage(bad)

