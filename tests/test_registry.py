"""The model registry in the lake: register, list, show, promote, resolve; exclusive-create versions; the CLI."""

import threading

import numpy as np
import pytest

from lepton_jax.cli import main
from lepton_jax.serve.registry import Registry, RegistryError


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
    assert (registry.root / "digits" / "00000001.json").is_file()


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
