"""scripts/check_numbers.py: a quoted number that differs from its artifact fails the check."""

import importlib.util
import json
import sys

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("check_numbers", ROOT / "scripts" / "check_numbers.py")
check_numbers = importlib.util.module_from_spec(_spec)
sys.modules["check_numbers"] = check_numbers  # dataclasses look their module up
_spec.loader.exec_module(check_numbers)

CLAIMS = """
[[claim]]
id = "acc"
doc = "README.md"
text = "printed **test accuracy {value}** on"
artifact = "results/run/summary.json"
json = "test_accuracy"
format = ".4f"
layout = "1 process x 1 CPU device"
step = "default"

[[claim]]
id = "speed"
doc = "docs/bench.md"
text = "gave **{value}x** the baseline ({any} per pair)"
artifact = "results/bench.txt"
pattern = "ratio ([0-9.]+)"
rel_tolerance = 0.1
layout = "1 process x 1 CPU device"
step = "bench"
"""


def _repo(tmp_path, readme="The job printed **test accuracy 0.9742** on 271 examples.\n"):
    (tmp_path / "docs").mkdir(parents=True)
    (tmp_path / "docs" / "numbers.toml").write_text(CLAIMS)
    (tmp_path / "docs" / "bench.md").write_text("Batching gave **3.2x** the baseline (3.1 per pair).\n")
    (tmp_path / "README.md").write_text(readme)
    (tmp_path / "results" / "run").mkdir(parents=True)
    (tmp_path / "results" / "run" / "summary.json").write_text(json.dumps({"test_accuracy": 0.974169}))
    (tmp_path / "results" / "bench.txt").write_text("batched 100 req/s\nratio 3.31\n")
    return tmp_path


def test_matching_numbers_pass_and_an_edited_number_fails(tmp_path, capsys):
    root = _repo(tmp_path)
    assert check_numbers.main(["--root", str(root)]) == 0
    assert "2 of 2 quoted numbers match" in capsys.readouterr().out

    (root / "README.md").write_text("The job printed **test accuracy 0.9779** on 271 examples.\n")
    assert check_numbers.main(["--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "0.9779" in out and "0.9742" in out

    # outside the 10 % slack
    (root / "docs" / "bench.md").write_text("Batching gave **3.9x** the baseline (3.1 per pair).\n")
    (root / "README.md").write_text("The job printed **test accuracy 0.9742** on 271 examples.\n")
    assert check_numbers.main(["--root", str(root)]) == 1


def test_missing_artifacts_unquoted_text_and_unchecked_bold_numbers(tmp_path, capsys):
    root = _repo(tmp_path, readme="printed **test accuracy 0.9742** on\nprinted **test accuracy 0.9742** on\n")
    (root / "results" / "bench.txt").unlink()
    assert check_numbers.main(["--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "NOT QUOTED" in out and "found 2 times" in out and "MISSING" in out

    root2 = _repo(tmp_path / "b", readme="printed **test accuracy 0.9742** on; and **12.5 s** somewhere\n")
    assert check_numbers.main(["--root", str(root2)]) == 0
    assert "README.md:1: **12.5 s**" in capsys.readouterr().out
    assert check_numbers.main(["--root", str(root2), "--strict"]) == 1


def test_every_claim_of_this_repository_is_quoted_exactly_once(tmp_path):
    claims = check_numbers.load_claims(ROOT / "docs" / "numbers.toml")
    assert claims, "docs/numbers.toml lists no claims"
    docs: dict[str, str] = {}
    for claim in claims:
        verdict = check_numbers.check(claim, ROOT, docs)
        assert verdict.status != "doc", f"{claim.id}: {verdict.detail}"
