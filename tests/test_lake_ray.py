"""Ingest on a Ray cluster (``--executor ray``): a local single-node Ray instance on 127.0.0.1, started and stopped
here; the ingest CLI joins it as a separate driver process, as it would join a multi-node cluster."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from lepton_jax.cli import main
from lepton_jax.lake import Lake

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:os.fork:RuntimeWarning")]


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """The GCS address of a local Ray instance (2 CPUs) for this module's tests; on loopback only where Ray is first
    imported here (see lepton_jax.lake.ray_executor). Ray's workers inherit the environment of ``ray.init``, so the
    local S3 server's endpoint and credentials are set for the module before it starts."""
    from lepton_jax.lake.ray_executor import SINGLE_MACHINE

    if "ray" not in sys.modules:
        os.environ.setdefault(SINGLE_MACHINE, "0")
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_server.env.items():
            env.setenv(key, value)
        env.delenv("AWS_PROFILE", raising=False)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


@pytest.fixture(params=["local", "s3"])
def lake_root(request, tmp_path, ray_cluster, s3_server):
    """The lake's root URI: a local directory, and a fresh prefix in the local S3 server's bucket."""
    if request.param == "local":
        return str(tmp_path / "lake")
    return s3_server.new_root()


def _image_folder(folder):
    """3 labels x 7 PNGs (distinct), plus rows for the quarantine: a text file, a broken PNG, an exact copy of an
    image in another chunk (duplicate) and one under another label (conflicting labels), an image of a label outside
    the label names."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = {}
    for label in ("cat", "dog", "eel", "fox"):
        (folder / label).mkdir(parents=True)
        for i in range(7 if label != "fox" else 1):
            images[label, i] = rng.integers(0, 256, (6, 5), dtype=np.uint8)
            Image.fromarray(images[label, i]).save(folder / label / f"{i}.png")
    (folder / "cat" / "notes.txt").write_text("not an image")
    (folder / "dog" / "broken.png").write_bytes(b"\x89PNG broken")
    Image.fromarray(images["cat", 1]).save(folder / "eel" / "copy_of_cat1.png")
    Image.fromarray(images["dog", 2]).save(folder / "dog" / "z_copy_of_dog2.png")
    return folder


def _ray(root, table, source, address, *extra):
    cmd = [sys.executable, "-m", "lepton_jax.cli", "lake", "ingest", "--lake", root, "--table", table,
           "--source", source, "--splits", "train=0.5,test=0.5", "--executor", "ray", "--ray-address", address,
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def test_ray_ingest_gives_the_content_of_a_single_process_ingest(ray_cluster, lake_root, tmp_path, capsys):
    folder = _image_folder(tmp_path / "images")
    args = ["--source", f"images:{folder}", "--chunk", "6", "--label-names", "cat,dog,eel"]
    assert main(["lake", "ingest", "--lake", lake_root, "--table", "serial", "--splits", "train=0.5,test=0.5",
                 *args]) == 0
    capsys.readouterr()
    # the CLI as a separate driver joining the running cluster by address, as on a multi-node cluster
    done = _ray(lake_root, "onray", f"images:{folder}", ray_cluster, "--chunk", "6", "--label-names", "cat,dog,eel",
                "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert "committed" in done.stdout and "version 1" in done.stdout
    lake = Lake(lake_root)
    one, ray_tv = lake.table("serial"), lake.table("onray")
    chunks = one.record["lineage"]["source"]["chunks"]
    assert chunks == 5  # more chunks than tasks in flight
    assert f"ran 5 chunk task(s) on the Ray cluster at {ray_cluster}: 1 node(s)" in done.stdout
    assert "at most 2 in flight" in done.stdout
    assert one.splits == ray_tv.splits
    for s in one.splits:
        a, b = one.record["splits"][s], ray_tv.record["splits"][s]
        assert a["content_sha256"] == b["content_sha256"] and a["num_examples"] == b["num_examples"]
        # per-fragment row hashes (the example digests the dedup index uses), in split order
        assert [f["row_hashes"]["sha256"] for f in one.fragments(s)] == \
               [f["row_hashes"]["sha256"] for f in ray_tv.fragments(s)]
        got, want = ray_tv.reader(s).read_all(), one.reader(s).read_all()
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert ray_tv.record["stats"] == one.record["stats"]
    assert ray_tv.record["lineage"] == one.record["lineage"]
    quarantine = one.quarantine()
    assert quarantine == ray_tv.quarantine()
    assert {e["id"]: e["reason"] for e in quarantine} == {
        "cat/notes.txt": "not_an_image", "dog/broken.png": "unreadable", "fox/0.png": "label_domain",
        "dog/z_copy_of_dog2.png": "duplicate", "eel/copy_of_cat1.png": "conflicting_labels",
        "cat/1.png": "conflicting_labels"}
    assert lake.verify() == []

    # a chunk task that fails: one line naming the chunk and the source, exit 2, nothing published or left behind
    # (the CLI in this process: it uses the Ray instance this process has initialised)
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(1)
    for k in range(2):
        np.savez(shards / f"part{k}.npz", x=rng.integers(0, 256, (10, 4, 4), dtype=np.uint8), y=rng.integers(0, 2, 10))
    (shards / "part9.npz").write_bytes(b"garbage")
    capsys.readouterr()
    assert main(["lake", "ingest", "--lake", lake_root, "--table", "bad", "--source", f"npz:{shards}",
                 "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: chunk 2 of file://") and "part9.npz" in err, err
    assert lake.versions("bad") == [] and "bad" not in lake.storage.list("")

