"""The model registry in the lake: register (parameters copied into the lake), list, show, promote, resolve;
exclusive-create versions; self-sufficient records (the run directory deleted); crash safety and gc; the CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from lepton_jax.cli import main
from lepton_jax.errors import LakeError
from lepton_jax.lake import DigitsSource, Lake, ingest
from lepton_jax.serve import Predictor
from lepton_jax.serve.lake_params import ParamsError
from lepton_jax.serve.registry import FORMAT_V1, Registry, RegistryError
from lepton_jax.serve.server import ServedModel
from tests.serving import served_classes


@pytest.fixture(scope="module")
def registry(trained_run, tmp_path_factory):
    workdir, _ = trained_run
    reg = Registry(tmp_path_factory.mktemp("reglake"))
    reg.register("digits", workdir, description="first")
    return reg


def test_register_records_checkpoint_metrics_data_schema_and_reference(registry, trained_run):
    workdir, result = trained_run
    entry = registry.get("digits", 1)
    assert entry.ref == "digits@1" and entry.workdir == workdir.resolve() and entry.step == result["best_step"]
    record = entry.record
    assert record["metrics"]["test_accuracy"] == result["test_accuracy"]
    assert record["config"]["model"]["name"] == "cnn"
    assert record["data"]["table"] == "digits" and record["data"]["version"] == 1
    assert record["input"]["example_shape"] == [8, 8, 1] and record["input"]["value_range"] == [0.0, 16.0]
    ref = entry.reference
    assert ref["split"] == "train" and ref["num_examples"] == 1257
    assert all(sum(counts) == 1257 for counts in ref["groups"].values())
    assert sum(ref["predicted_classes"]) == 1257 and len(ref["predicted_classes"]) == 10
    assert record["model"] == {"name": "cnn", "plugin": None, "num_params": record["model"]["num_params"]}
    params = record["params"]
    assert params["key"].startswith("_models/digits/_params/") and len(params["sha256"]) == 64
    assert sum(int(np.prod(leaf["shape"])) for leaf in params["leaves"]) == record["model"]["num_params"]
    root = registry.storage.root
    assert (root / "_models" / "digits" / "00000001.json").is_file()
    assert (root / params["key"] / "0000" / "zarr.json").is_file()  # zarr v3 arrays, one per leaf


def test_promote_and_resolve(registry):
    first = registry.get("digits", 1)
    second = registry.add("digits", {k: first.record[k] for k in ("checkpoint", "data", "input", "metrics")})
    assert second.version == 2
    assert registry.resolve("digits").version == 2 and registry.resolve("digits@latest").version == 2
    assert registry.resolve("digits@1").version == 1
    with pytest.raises(RegistryError, match="no version at stage 'production'"):
        registry.resolve("digits@production")
    registry.promote("digits", 1)
    assert registry.resolve("digits@production").version == 1
    entry = registry.promote("digits", 2, "production")
    assert entry["previous"] == 1 and registry.stages("digits") == {"production": 2}
    assert [h["version"] for h in registry.history("digits", "production")] == [1, 2]
    with pytest.raises(RegistryError, match="has no version 9"):
        registry.promote("digits", 9)
    with pytest.raises(RegistryError, match="has no model 'nope'"):
        registry.resolve("nope@1")
    with pytest.raises(RegistryError, match="invalid model name"):
        registry.get("../x")


def test_concurrent_registrations_get_distinct_versions(tmp_path):
    reg = Registry(tmp_path)
    results, barrier = [], threading.Barrier(8)

    def worker(i):
        barrier.wait()
        results.append(reg.add("m", {"worker": i}).version)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == list(range(1, 9))
    workers = sorted(reg.get("m", v).record["worker"] for v in range(1, 9))
    assert workers == list(range(8))  # every registration is stored once, none overwritten
    assert not list((tmp_path / "_models" / "m").glob(".publish-*"))
    assert registry_keys(tmp_path) == {f"_models/m/{v:08d}.json" for v in range(1, 9)}


def registry_keys(root):
    return {str(p.relative_to(root)) for p in (root / "_models").rglob("*") if p.is_file()}


def test_registry_cli(capsys, registry, trained_run):
    lake = registry.lake_root
    assert main(["registry", "promote", "--lake", str(lake), "digits@1", "--stage", "staging"]) == 0
    assert main(["registry", "ls", "--lake", str(lake)]) == 0
    out = capsys.readouterr().out
    assert "staging: digits@1" in out and "digits@1  step=" in out and "[staging]" in out
    assert main(["registry", "show", "--lake", str(lake), "digits@staging"]) == 0
    out = capsys.readouterr().out
    assert '"version": 1' in out and "drift reference: 1257 train examples, 4 feature groups" in out
    assert main(["registry", "show", "--lake", str(lake), "digits@canary"]) == 2
    assert "no version at stage 'canary'" in capsys.readouterr().err
    assert main(["registry", "promote", "--lake", str(lake), "digits@latest"]) == 2
    assert "NAME@VERSION" in capsys.readouterr().err
    assert np.isfinite(registry.get("digits", 1).record["metrics"]["test_accuracy"])


@pytest.fixture(scope="module")
def moved_run(trained_run, tmp_path_factory):
    """A copy of the shared run registered into a fresh lake, then deleted (``rm -rf``): only the lake is left."""
    workdir, _ = trained_run
    root = tmp_path_factory.mktemp("moved")
    copy = root / "run"
    shutil.copytree(workdir, copy)
    lake = root / "lake"
    assert main(["registry", "register", "--lake", str(lake), "--name", "digits", "--workdir", str(copy),
                 "--promote", "production"]) == 0
    shutil.rmtree(copy)
    return lake, copy


def test_registry_version_predicts_evaluates_exports_after_the_run_dir_is_deleted(moved_run, trained_run, tmp_path,
                                                                                  capsys):
    lake, copy = moved_run
    assert not copy.exists()
    workdir, _ = trained_run
    entry = Registry(lake).resolve("digits@production")
    data = entry.record["data"]
    raw = Lake(data["lake"]).table("digits", data["version"]).reader("test").read_all()["image"][:40]
    expected = Predictor.from_workdir(workdir, step=entry.step).predict(raw)
    np.save(tmp_path / "x.npy", raw)

    capsys.readouterr()
    assert main(["predict", "--lake", str(lake), "--model", "digits@production", "--input", str(tmp_path / "x.npy"),
                 "--output", str(tmp_path / "y.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "y.npy"), expected["class"])
    assert main(["eval", "--lake", str(lake), "--model", "digits@1"]) == 0
    assert "accuracy" in capsys.readouterr().out

    assert main(["export", "--lake", str(lake), "--model", "digits@production", "--output", str(tmp_path / "edge"),
                 "--platforms", "cpu"]) == 0
    manifest = json.loads((tmp_path / "edge" / "manifest.json").read_text())
    assert manifest["model"]["registry"] == "digits@1" and manifest["evaluation"]["top1_agreement"] == 1.0


def test_registry_version_serves_over_http_after_the_run_directory_is_deleted(moved_run, trained_run):
    lake, copy = moved_run
    assert not copy.exists()
    entry = Registry(lake).resolve("digits@production")
    data = entry.record["data"]
    raw = Lake(data["lake"]).table("digits", data["version"]).reader("test").read_all()["image"][:5]
    expected = Predictor.from_workdir(trained_run[0], step=entry.step).predict(raw)
    assert served_classes(ServedModel.from_registry(lake, "digits@production"), raw) == expected["class"].tolist()


def test_stored_parameters_are_checked_against_the_record(moved_run, tmp_path):
    lake, _ = moved_run
    registry = Registry(lake)
    good = registry.get("digits", 1)
    bad = registry.add("digits", {**good.record, "params": {**good.record["params"], "sha256": "0" * 64}})
    with pytest.raises(ParamsError, match=f"model digits@{bad.version}: stored parameters .* do not match the sha256"):
        Predictor.from_registry(bad)
    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    chunk = next(p for p in (copy / good.record["params"]["key"] / "0000" / "c").rglob("*") if p.is_file())
    payload = bytearray(chunk.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    chunk.write_bytes(bytes(payload))
    with pytest.raises(ParamsError, match="model digits@1: stored parameters under .* unreadable"):
        Predictor.from_registry(Registry(copy).get("digits", 1))


def test_a_record_is_never_published_for_parameters_that_are_gone(moved_run, tmp_path):
    """gc (or anything) removing a registration's parameter copy before its record: the registration fails with one
    line and publishes nothing."""
    lake, _ = moved_run
    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    registry = Registry(copy)
    good = registry.get("digits", 1)
    shutil.rmtree(copy / good.record["params"]["key"] / "0001")
    before = registry.versions("digits")
    with pytest.raises(RegistryError, match="parameters copied to .* are gone .*nothing was registered"):
        registry.add("digits", dict(good.record))
    assert registry.versions("digits") == before


def test_first_format_records_load_from_their_run_or_ask_to_re_register(registry, trained_run, tmp_path, capsys):
    workdir, _ = trained_run
    old = {k: v for k, v in registry.get("digits", 1).record.items() if k not in ("params", "model")}
    reg = Registry(tmp_path)
    for version, run in ((1, workdir), (2, tmp_path / "deleted-run")):
        record = {**old, "format": FORMAT_V1, "name": "old", "version": version,
                  "checkpoint": {**old["checkpoint"], "workdir": str(run)}}
        assert reg.storage.create(f"_models/old/{version:08d}.json", json.dumps(record).encode())
    assert Predictor.from_registry(reg.get("old", 1)).step == old["checkpoint"]["step"]
    np.save(tmp_path / "x.npy", np.zeros((1, 8, 8)))
    assert main(["predict", "--lake", str(tmp_path), "--model", "old@2", "--input", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model old@2 is an older registry record" in err and "re-register" in err


def test_crash_before_the_record_leaves_no_version_and_gc_removes_the_copy(moved_run, trained_run, tmp_path, capsys):
    """SIGKILL after the parameters are written and the record's temp file is fsynced, before it is published."""
    workdir, _ = trained_run
    lake = tmp_path / "lake"
    shutil.copytree(moved_run[0], lake)
    registry = Registry(lake)
    before = registry.versions("digits")
    env = {**os.environ, "LEPTON_LAKE_CRASH_AT": "record"}
    proc = subprocess.run([sys.executable, "-m", "lepton_jax", "registry", "register", "--lake", str(lake), "--name",
                           "digits", "--workdir", str(workdir)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert registry.versions("digits") == before  # no record: the crash left no version
    used = {registry.get("digits", v).record["params"]["key"] for v in before}
    orphans = [f"_models/digits/_params/{i}" for i in registry.storage.list("_models/digits/_params/")
               if f"_models/digits/_params/{i}" not in used]
    assert len(orphans) == 1 and (lake / orphans[0] / "0000" / "zarr.json").is_file()
    temps = [p.name for p in (lake / "_models" / "digits").glob(".publish-*")]
    assert len(temps) == 1  # the record's fsynced temp file, never linked
    for bad in (["--grace-seconds", "nan"], ["--grace-seconds", "-1"], ["--grace-seconds", "0"]):
        assert main(["registry", "gc", "--lake", str(lake), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "registry gc" in err
    assert main(["registry", "gc", "--lake", str(lake)]) == 0  # default grace: the fresh copy stays
    assert "removed 0" in capsys.readouterr().out
    assert main(["registry", "gc", "--lake", str(lake), "--grace-seconds", "0", "--force"]) == 0
    out = capsys.readouterr().out
    assert orphans[0] in out and f"_models/digits/{temps[0]}" in out
    assert not list((lake / orphans[0]).rglob("*.json")) and not list((lake / "_models" / "digits").glob(".publish-*"))
    assert registry.gc(0, force=True) == []  # nothing referenced is ever a candidate
    Predictor.from_registry(registry.get("digits", 1))  # the referenced parameters are untouched


def test_registry_gc_ages_copies_by_the_storages_clock_not_this_machines(tmp_path):
    """A parameter copy and a record's temp file written a moment ago are young however far this machine's clock
    runs ahead (gc reads the storage's clock and the storage's timestamps, not the times in their names)."""
    import time

    from lepton_jax.serve import registry as registry_module
    from lepton_jax.serve.lake_params import write_tree
    from tests.lake_data import ClockAhead

    registry = Registry(tmp_path / "lake")
    key = registry.new_params_key("m")
    write_tree(registry.storage, key, {"w": np.zeros(3, np.float32)})
    temp = f"_models/m/{registry_module.TEMP_PREFIX}{int(time.time() * 1000):013d}-0123"
    registry.storage.write(temp, b"{}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry_module, "time", ClockAhead(7200))  # the registry module's view of the clock only
        assert registry.gc(3600) == []
    assert sorted(registry.gc(0, force=True)) == sorted([key, temp])


def test_table_names_beginning_with_underscore_are_reserved(tmp_path, capsys):
    with pytest.raises(LakeError, match="table name '_models' is reserved"):
        ingest(Lake(tmp_path), "_models", DigitsSource())
    assert main(["lake", "ingest", "--lake", str(tmp_path), "--table", "_x", "--source", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reserved" in err
