"""Gated promotion and rollback in the model registry: the gate scores candidate and incumbent on the same pinned rows
with eval's metric code, refuses a degraded candidate, is never decided against a stale incumbent; rollbacks undo
promotions like a stack; every stage move is one create-if-absent entry, on local and S3 lakes; the CLI."""

import threading

import jax
import numpy as np
import pytest

from lepton_jax.cli import main
from lepton_jax.lake import Lake
from lepton_jax.serve import Predictor
from lepton_jax.serve.gate import Gate
from lepton_jax.serve.lake_params import write_tree
from lepton_jax.serve.registry import PromotionRefused, Registry, RegistryError


@pytest.fixture(scope="module")
def source(trained_run, tmp_path_factory):
    """The shared run registered once: its record, its parameters, and the same parameters zeroed (a degraded
    candidate: every logit equal, so every prediction is class 0)."""
    registry = Registry(tmp_path_factory.mktemp("gate-source"))
    entry = registry.register("digits", trained_run[0])
    params = jax.tree.map(np.asarray, Predictor.from_registry(entry).params)
    return entry.record, params, jax.tree.map(np.zeros_like, params)


def add_version(registry: Registry, record: dict, params) -> int:
    """``record`` published again in ``registry`` with ``params`` stored beside it; its version number."""
    manifest = write_tree(registry.storage, registry.new_params_key("digits"), params)
    return registry.add("digits", {**record, "params": manifest}).version


def fake_versions(registry: Registry, n: int) -> None:
    """``n`` records without parameters (enough to move stages; nothing here loads them)."""
    for i in range(n):
        registry.add("m", {"i": i})


def test_if_better_refuses_a_degraded_candidate_promotes_a_good_one_and_rollback_restores(any_root, source,
                                                                                         trained_run):
    record, good_params, bad_params = source
    registry = Registry(any_root)
    good, bad = add_version(registry, record, good_params), add_version(registry, record, bad_params)

    first = registry.promote("digits", good, if_better=True)  # the stage is empty: promoted, and says so
    comparison = first["comparison"]
    assert first["gated"] and comparison["incumbent"] is None and comparison["decision"] == "promote"
    assert (comparison["table"], comparison["table_version"], comparison["split"]) == ("digits", 1, "test")
    # the gate's metric is eval's: the value equals the run's own test accuracy (the training loop's evaluation)
    assert comparison["candidate"] == {"version": good, "value": pytest.approx(trained_run[1]["test_accuracy"])}
    test_rows = Lake(record["data"]["lake"]).table("digits", 1).num_examples("test")
    assert comparison["num_examples"] == test_rows and comparison["candidate"]["value"] > 0.5

    why = (rf"refused to promote digits@{bad} accuracy 0\.\d+ < production's digits@{good} 0\.\d+ - tolerance 0 on "
           rf"table digits v1 split test \({test_rows} rows\); production still holds digits@{good}")
    with pytest.raises(PromotionRefused, match=why) as refused:
        registry.promote("digits", bad, if_better=True)
    assert refused.value.comparison["decision"] == "refuse"
    assert refused.value.comparison["candidate"]["value"] < 0.2  # all class 0
    assert [h["version"] for h in registry.history("digits", "production")] == [good]  # nothing written
    with pytest.raises(PromotionRefused):  # a tolerance short of the gap still refuses
        registry.promote("digits", bad, if_better=True, tolerance=0.5)

    ungated = registry.promote("digits", bad)  # plain promote moves the stage as before; the entry says ungated
    assert not ungated["gated"] and ungated["comparison"] is None and ungated["previous"] == good
    better = registry.promote("digits", good, if_better=True)
    assert better["comparison"]["incumbent"]["version"] == bad and better["previous"] == bad
    assert better["comparison"]["candidate"]["value"] > better["comparison"]["incumbent"]["value"]

    back = registry.rollback("digits", "production")  # undoes the latest promotion: good -> bad
    assert (back["rollback"], back["from"], back["to"], back["sequence"]) == (True, good, bad, 4)
    assert registry.resolve("digits@production").version == bad
    # a second rollback would undo the promotion of bad, restoring good: the version just rolled back from
    with pytest.raises(RegistryError, match=rf"no earlier version to roll back to \(it holds digits@{bad}; "
                                            rf"digits@{good} just rolled back from \(restore with --to\)\)"):
        registry.rollback("digits")
    again = registry.rollback("digits", to=good)
    assert (again["from"], again["to"]) == (bad, good) and registry.stages("digits") == {"production": good}
    with pytest.raises(RegistryError, match=rf"no earlier version to roll back to \(it holds digits@{good}\)"):
        registry.rollback("digits")
    history = registry.history("digits", "production")
    assert [(h["version"], h["rollback"]) for h in history] == [(good, False), (bad, False), (good, False),
                                                                (bad, True), (good, True)]
    assert [h["sequence"] for h in history] == [1, 2, 3, 4, 5]


def test_rollbacks_undo_promotions_like_a_stack(any_root):
    registry = Registry(any_root)
    fake_versions(registry, 5)
    for v in (1, 2, 3):
        registry.promote("m", v, "prod")
    assert registry.rollback("m", "prod")["to"] == 2
    assert registry.rollback("m", "prod")["to"] == 1
    registry.promote("m", 4, "prod")  # a promotion after rollbacks is undone first
    assert registry.rollback("m", "prod")["to"] == 1
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("m", "prod")
    for v in (2, 2, 3, 3):  # repeated promotions of the holder do not count: a rollback always changes the version
        registry.promote("m", v, "prod")
    assert registry.rollback("m", "prod")["to"] == 2
    registry.promote("m", 5, "prod")
    entry = registry.rollback("m", "prod", to=1)  # --to: further down the stack, undoing everything after it
    assert (entry["from"], entry["to"]) == (5, 1)
    with pytest.raises(RegistryError, match=r"m@3 is not an earlier holder .* earlier: none"):
        registry.rollback("m", "prod", to=3)  # rolled back from: no longer on the stack (promote it instead)
    for v in (1, 3, 2, 3):
        registry.promote("m", v, "canary")
    assert registry.rollback("m", "canary")["to"] == 2
    assert registry.rollback("m", "canary")["to"] == 1  # not back to 3, the version just rolled back from
    registry.promote("m", 3, "canary")  # unless promoted again
    registry.promote("m", 4, "canary")
    assert registry.rollback("m", "canary")["to"] == 3
    with pytest.raises(RegistryError, match="stage 'staging' of model 'm' holds no version"):
        registry.rollback("m", "staging")
    assert registry.stages("m") == {"prod": 1, "canary": 3}


def test_a_promotion_landing_between_the_comparison_and_the_publish_is_compared_against(tmp_path, source,
                                                                                        monkeypatch):
    """The degraded candidate passes against the empty stage; a good version lands before its entry is published;
    its create at sequence 1 fails, and the comparison is made again against the new holder: refused."""
    record, good_params, bad_params = source
    registry = Registry(tmp_path / "lake")
    good, bad = add_version(registry, record, good_params), add_version(registry, record, bad_params)
    real_compare, landed = Gate.compare, []

    def compare_then_another_promotion_lands(self, incumbent, stage):
        out = real_compare(self, incumbent, stage)
        if not landed:
            landed.append(Registry(registry.lake_root).promote("digits", good, stage))
        return out

    monkeypatch.setattr(Gate, "compare", compare_then_another_promotion_lands)
    with pytest.raises(PromotionRefused) as refused:
        registry.promote("digits", bad, if_better=True)
    assert refused.value.comparison["incumbent"]["version"] == good
    assert [h["version"] for h in registry.history("digits", "production")] == [good]


def test_racing_gated_promotions_leave_one_history_with_no_lost_entry(tmp_path, source, monkeypatch):
    """Two threads compare their candidates with the same holder, then both publish: one takes the next sequence
    number, the other's create fails, it compares again with the winner and lands after it."""
    record, good_params, bad_params = source
    registry = Registry(tmp_path / "lake")
    bad = add_version(registry, record, bad_params)
    candidates = [add_version(registry, record, good_params) for _ in range(2)]
    registry.promote("digits", bad)
    real_compare, barrier, compared = Gate.compare, threading.Barrier(2), set()

    def compare_together(self, incumbent, stage):
        out = real_compare(self, incumbent, stage)
        if self.candidate.version not in compared:  # each candidate's first comparison: both see the same holder
            compared.add(self.candidate.version)
            barrier.wait(timeout=120)
        return out

    monkeypatch.setattr(Gate, "compare", compare_together)
    results, errors = {}, []

    def promote(version):
        try:
            results[version] = Registry(registry.lake_root).promote("digits", version, if_better=True)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=promote, args=(v,)) for v in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and sorted(results) == candidates
    history = registry.history("digits", "production")
    assert [h["sequence"] for h in history] == [1, 2, 3]
    first, second = history[1]["version"], history[2]["version"]
    assert {first, second} == set(candidates)
    assert history[1]["comparison"]["incumbent"]["version"] == bad and history[1]["previous"] == bad
    assert history[2]["comparison"]["incumbent"]["version"] == first and history[2]["previous"] == first
    assert not list((tmp_path / "lake" / "_models" / "digits" / "_stages" / "production").glob(".publish-*"))


def test_racing_rollbacks_and_promotions_keep_one_chain(any_root):
    """Threads rolling back and promoting at once: every entry that was reported written is in the history once,
    the history is one chain (each entry's previous is the entry before it), and a rollback whose stage moved under
    it wrote nothing and said so."""
    registry = Registry(any_root)
    fake_versions(registry, 8)
    for v in range(1, 7):
        registry.promote("m", v)
    barrier, written, refused = threading.Barrier(6), [], []

    def worker(i):
        barrier.wait(timeout=60)
        try:
            written.append(registry.rollback("m") if i % 2 else registry.promote("m", 7 + i % 4 // 2))
        except RegistryError as e:
            assert "while rolling back: nothing was rolled back" in str(e)
            refused.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    history = registry.history("m", "production")
    assert len(written) + len(refused) == 6 and len(history) == 6 + len(written)
    assert [h["sequence"] for h in history] == list(range(1, len(history) + 1))
    assert sorted(h["sequence"] for h in written) == [h["sequence"] for h in history[6:]]
    assert all(h["previous"] == p["version"] for p, h in zip(history, history[1:], strict=False))


def test_registry_gate_cli(tmp_path, source, capsys):
    record, good_params, bad_params = source
    lake = tmp_path / "lake"
    registry = Registry(lake)
    good, bad = add_version(registry, record, good_params), add_version(registry, record, bad_params)

    def run(*argv):
        code = main(["registry", argv[0], "--lake", str(lake), *argv[1:]])
        out = capsys.readouterr()
        return code, out.out, out.err.strip()

    code, out, _ = run("compare", f"digits@{good}", "--stage", "production")
    assert code == 0 and '"incumbent": null' in out and "stage production holds no version" in out
    code, out, _ = run("promote", f"digits@{good}", "--if-better")
    assert code == 0 and f"production: digits@{good} (was None); gate: digits@{good} accuracy" in out
    code, out, _ = run("compare", f"digits@{bad}", "--split", "dev", "--table-version", "1")
    assert code == 1 and '"split": "dev"' in out and "refuse: " in out
    code, out, err = run("promote", f"digits@{bad}", "--if-better", "--tolerance", "0.01")
    assert code == 1 and not out and len(err.splitlines()) == 1
    assert err.startswith(f"refused to promote digits@{bad} accuracy") and "table digits v1 split test" in err
    code, _, err = run("promote", f"digits@{bad}", "--tolerance", "0.01")
    assert code == 2 and "only to a gated promotion" in err
    code, _, err = run("compare", f"digits@{bad}", "--metric", "f1")
    assert code == 2 and "unknown gate metric 'f1'; use one of accuracy, macro_f1, weighted_f1" in err
    code, _, err = run("compare", f"digits@{bad}", "--metric", "macro_f1", "--tolerance", "-1")
    assert code == 2 and len(err.splitlines()) == 1 and "tolerance must be a finite number >= 0" in err
    code, out, _ = run("promote", f"digits@{bad}")
    assert code == 0 and "(ungated)" in out
    code, out, _ = run("rollback", "digits")
    assert code == 0 and f"production: rolled back from digits@{bad} to digits@{good}" in out
    code, _, err = run("rollback", "digits")
    assert code == 2 and len(err.splitlines()) == 1 and "no earlier version to roll back to" in err
    code, out, _ = run("history", "digits")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3 and "gated  accuracy" in lines[0]
    assert "vs none on table digits v1 split test" in lines[0]
    assert "ungated" in lines[1] and "rollback" in lines[2]
    assert main(["registry", "rollback", "--lake", str(lake), "nope"]) == 2
    assert "has no model 'nope'" in capsys.readouterr().err
