"""Test setup: 8 simulated CPU devices (set before jax is imported), a shared digits lake and one shared run."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, inherited by the xdist workers (the controller imports this
# first) and the subprocesses tests start: a CLI run in a subprocess then loads the executables an earlier test
# compiled instead of compiling them again (most of the suite's time on CPU). Fresh for every session and removed at
# its end, so no stale entry outlives a run; a size limit turns on jax's file lock, so concurrent processes never
# read an entry another is still writing.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _compile_cache = tempfile.mkdtemp(prefix="lepton-jax-test-compile-cache-")
    atexit.register(shutil.rmtree, _compile_cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _compile_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from lepton_jax.config import load_config  # noqa: E402
from lepton_jax.lake import DigitsSource, Lake, ingest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "digits_cnn.py"


def pytest_configure(config):
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices; XLA_FLAGS was set too late"


@pytest.fixture(scope="session")
def lake_root(tmp_path_factory) -> Path:
    """A lake holding the digits table (version 1), shared read-only by the session's tests."""
    root = tmp_path_factory.mktemp("lake")
    ingest(Lake(root), "digits", DigitsSource())
    return root


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A local S3 server (moto, 127.0.0.1) with one bucket, for the session; stopped at its end."""
    from tests import s3

    server, info = s3.start(tmp_path_factory.mktemp("s3"))
    yield info
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Points S3 clients (and subprocesses started by the test) at the local server, for this test only."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture(params=["local", "s3"])
def any_root(request, tmp_path) -> str:
    """A fresh, empty lake root on each backend: a local directory, and a prefix in the local S3 server's bucket."""
    if request.param == "local":
        return str(tmp_path / "lake")
    return request.getfixturevalue("s3_env").new_root()


def small_config(**overrides):
    """The default config, shortened for tests."""
    items = {"num_epochs": 3, **overrides}
    return load_config(DEFAULT_CONFIG, [f"{k}={v}" for k, v in items.items()])


@pytest.fixture(scope="session")
def trained_run(lake_root, tmp_path_factory):
    """One reduced run of the default job on all 8 devices; its workdir and returned summary."""
    from lepton_jax.train.loop import train_and_evaluate

    workdir = tmp_path_factory.mktemp("run") / "digits"
    result = train_and_evaluate(small_config(), workdir, lake_root=lake_root, progress=False)
    return workdir, result
