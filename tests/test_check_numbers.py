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


TABLES = """
[[group]]
doc = "docs/study.md"
artifact = "results/study.json"
step = "study"
layout = "4 devices x 1 process"

[[group.claim]]
id = "gap"
text = "leaves FedAvg {value} points below"
json = "rows.1.gap"
scale = -1
format = ".2f"

[[table]]
id = "study.table"
doc = "docs/study.md"
header = "| run | accuracy | seconds |"
artifact = "results/study.md"
rel_tolerance = {seconds = 0.5}
step = "study"
layout = "4 devices x 1 process"

[[block]]
id = "bench.output"
doc = "docs/study.md"
start = "ratio batched"
lines = 2
artifact = "results/bench.txt"
rel_tolerance = 0.1
ignore = ['\\(runs [^)]*\\)']
step = "bench"
layout = "1 process"

[[exempt]]
doc = "docs/study.md"
text = "**H = 1 is a setting**"
reason = "a heading"
"""

STUDY = """# Study
**H = 1 is a setting**

Non-IID leaves FedAvg 3.32 points below DP.

| run | accuracy | seconds |
|---|---:|---:|
| DP | 0.9742 | 10.0 |
| FedAvg | 0.9410 | 12.0 |

```
ratio batched 3.82x (runs 3.7, 3.9)
p99 2.31x
```
"""


def _study_repo(tmp_path):
    (tmp_path / "docs").mkdir(parents=True)
    (tmp_path / "docs" / "numbers.toml").write_text(TABLES)
    (tmp_path / "docs" / "study.md").write_text(STUDY)
    (tmp_path / "README.md").write_text("nothing bold\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "study.json").write_text(json.dumps({"rows": [{"gap": 0.0}, {"gap": -3.3211}]}))
    (tmp_path / "results" / "study.md").write_text(
        "provenance line\n\n| run | accuracy | seconds |\n|---|---:|---:|\n| DP | 0.9742 | 14.1 |\n"
        "| FedAvg | 0.9410 | 9.0 |\n")
    (tmp_path / "results" / "bench.txt").write_text("header\nratio batched 3.61x (runs 3.2, 3.7)\np99 2.40x\n")
    return tmp_path


def test_groups_tables_blocks_and_exemptions(tmp_path, capsys):
    root = _study_repo(tmp_path)
    assert check_numbers.main(["--root", str(root), "--strict"]) == 0, capsys.readouterr().out

    # a table cell compared exactly, one compared with its column's slack, a pasted number outside the block's slack
    for old, new in [("| FedAvg | 0.9410 |", "| FedAvg | 0.9447 |"), ("| 12.0 |", "| 19.0 |"),
                     ("p99 2.31x", "p99 2.91x"), ("FedAvg 3.32 points", "FedAvg 3.22 points")]:
        (root / "docs" / "study.md").write_text(STUDY.replace(old, new))
        assert check_numbers.main(["--root", str(root)]) == 1, old
        assert "MISMATCH" in capsys.readouterr().out

    # a row the artifact does not have
    (root / "docs" / "study.md").write_text(STUDY.replace("| FedAvg | 0.9410 | 12.0 |", "| FedAvg | 0.9410 | 12.0 |\n"
                                                                                         "| extra | 0.5 | 1 |"))
    assert check_numbers.main(["--root", str(root)]) == 1
    assert "3 rows quoted, 2 measured" in capsys.readouterr().out

    # without the exemption the bold heading counts as an unchecked number
    (root / "docs" / "study.md").write_text(STUDY)
    (root / "docs" / "numbers.toml").write_text(TABLES.split("[[exempt]]")[0])
    assert check_numbers.main(["--root", str(root), "--strict"]) == 1
    assert "unchecked  docs/study.md:2: **H = 1 is a setting**" in capsys.readouterr().out

    # an exemption whose text left the doc is an error, so the list cannot go stale
    (root / "docs" / "numbers.toml").write_text(TABLES)
    (root / "docs" / "study.md").write_text(STUDY.replace("**H = 1 is a setting**", "H = 1 is a setting"))
    assert check_numbers.main(["--root", str(root)]) == 1
    assert "exemption '**H = 1 is a setting**' is not in docs/study.md" in capsys.readouterr().out


def test_a_closing_bold_marker_never_opens_another(tmp_path, capsys):
    root = _repo(tmp_path, readme="printed **test accuracy 0.9742** on; **ceiling** the goal (0.7x) is **not met**\n")
    assert check_numbers.main(["--root", str(root), "--strict"]) == 0, capsys.readouterr().out


def test_every_exemption_of_this_repository_names_bold_text_in_its_doc():
    for exempt in check_numbers.load_exempt(ROOT / "docs" / "numbers.toml"):
        assert exempt.text.startswith("**") and exempt.text in (ROOT / exempt.doc).read_text(), exempt


def test_update_writes_the_measured_values_over_stale_quotes(tmp_path, capsys):
    root = _repo(tmp_path, readme="The job printed **test accuracy 0.9779** on 271 examples.\n")
    (root / "docs" / "bench.md").write_text("Batching gave **3.9x** the baseline (3.1 per pair).\n")
    assert check_numbers.main(["--root", str(root), "--update"]) == 1  # this run still reports what it found
    assert (root / "README.md").read_text() == "The job printed **test accuracy 0.9742** on 271 examples.\n"
    assert (root / "docs" / "bench.md").read_text() == "Batching gave **3.31x** the baseline (3.1 per pair).\n"
    capsys.readouterr()
    assert check_numbers.main(["--root", str(root)]) == 0
    assert "2 of 2 quoted numbers match" in capsys.readouterr().out


def test_a_mismatch_names_the_machine_the_claim_was_recorded_on(tmp_path, capsys, monkeypatch):
    """Issue 27: a number quoted from an AVX2 machine fails on an AVX one; the verdict says which machines."""
    monkeypatch.setattr(check_numbers, "this_machine", lambda: "AMD EPYC (AVX)")
    root = _repo(tmp_path, readme="The job printed **test accuracy 0.9779** on 271 examples.\n")
    toml = (root / "docs" / "numbers.toml").read_text()
    (root / "docs" / "numbers.toml").write_text(toml.replace('step = "default"',
                                                             'step = "default"\nmachine = "AMD EPYC (AVX2)"'))
    assert check_numbers.main(["--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "this machine: AMD EPYC (AVX)" in out
    assert "MISMATCH" in out and "recorded on AMD EPYC (AVX2), this is AMD EPYC (AVX)" in out
    (root / "docs" / "bench.md").write_text("Batching gave **9.9x** the baseline (3.1 per pair).\n")
    assert check_numbers.main(["--root", str(root)]) == 1  # a claim without a machine says so
    assert "recorded on an unknown machine (the claim names none), this is AMD EPYC (AVX)" in capsys.readouterr().out
    monkeypatch.setattr(check_numbers, "this_machine", lambda: "AMD EPYC (AVX2)")  # same machine: a plain mismatch
    assert check_numbers.main(["--root", str(root)]) == 1
    assert "recorded on AMD EPYC (AVX2)" not in capsys.readouterr().out


def test_every_claim_of_this_repository_names_its_machine_or_unknown():
    claims = check_numbers.load_claims(ROOT / "docs" / "numbers.toml")
    assert all(c.machine for c in claims)
    assert "machine =" in (ROOT / "docs" / "numbers.toml").read_text()
