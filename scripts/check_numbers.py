"""Checks every number that README.md and docs/ quote against the artifacts that reproduce.sh writes.

    .venv/bin/python scripts/check_numbers.py                 # compare the docs with results/ (exit 1 on a mismatch)
    .venv/bin/python scripts/check_numbers.py --run           # first regenerate the artifacts that are missing
    .venv/bin/python scripts/check_numbers.py --only default  # one reproduce.sh step

The claims live in docs/numbers.toml, one ``[[claim]]`` table per quoted number:

    id       a name for the number
    doc      the file that quotes it (relative to the repository root)
    text     the quoted text with ``{value}`` where the number stands; it must occur exactly once in ``doc``
             (white space matches any white space, so the text may wrap; ``{any}`` matches a number that this
             claim does not check, e.g. another cell of the same table row)
    artifact the file under the repository root that holds the measured value (written by ``reproduce.sh``)
    json     a dotted key into the artifact (JSON), or ``pattern``: a regex with one group over the artifact's text
    scale    multiplies the artifact value before comparing (100 for a percentage; default 1)
    format   how the doc prints the value (a format spec such as ".4f"); without a tolerance the printed artifact
             value must equal the quoted text exactly
    tolerance / rel_tolerance   absolute or relative slack, for measurements that vary between runs (benchmarks)
    layout   devices × processes (and machine) the number was measured on, printed beside the verdict
    step     the ``reproduce.sh`` step that writes the artifact

Bold numbers (``**…**``) in the docs that no claim covers are listed as unchecked; ``--strict`` makes them an error.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"([-+]?[0-9][0-9,]*(?:\.[0-9]+)?)"
BOLD_NUMBER = re.compile(r"\*\*[^*\n]*?[0-9][^*\n]*?\*\*")


@dataclass
class Claim:
    id: str
    doc: str
    text: str
    artifact: str
    step: str
    layout: str
    json: str | None = None
    pattern: str | None = None
    scale: float = 1.0
    format: str = "g"
    tolerance: float | None = None
    rel_tolerance: float | None = None
    spans: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Verdict:
    claim: Claim
    status: str  # ok | mismatch | missing | doc
    quoted: str = ""
    measured: str = ""
    detail: str = ""


def load_claims(path: Path) -> list[Claim]:
    """Reads the ``[[claim]]`` tables of a TOML file; an unknown or missing key is an error naming the claim."""
    data = tomllib.loads(path.read_text())
    claims = []
    for i, raw in enumerate(data.get("claim", [])):
        try:
            claim = Claim(**raw)
        except TypeError as e:
            raise SystemExit(f"{path}: claim #{i + 1} ({raw.get('id', '?')}): {e}") from None
        if (claim.json is None) == (claim.pattern is None):
            raise SystemExit(f"{path}: claim {claim.id}: give exactly one of 'json' and 'pattern'")
        if "{value}" not in claim.text:
            raise SystemExit(f"{path}: claim {claim.id}: 'text' needs a {{value}} placeholder")
        claims.append(claim)
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"{path}: duplicate claim ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    return claims


def _text_regex(text: str) -> re.Pattern:
    """The claim's text as a regex: ``{value}`` captures the number; any run of white space matches any other (so
    a quoted sentence may wrap anywhere in the Markdown source)."""
    def literal(part: str) -> str:
        words = (r"(?:[-+]?[0-9][0-9,]*(?:\.[0-9]+)?)".join(re.escape(piece) for piece in word.split("{any}"))
                 for word in re.split(r"\s+", part))
        return r"\s+".join(words)

    head, tail = text.split("{value}", 1)
    return re.compile(literal(head) + NUMBER + literal(tail))


def _measured(claim: Claim, root: Path) -> float:
    path = root / claim.artifact
    if claim.json is not None:
        value = json.loads(path.read_text())
        for key in claim.json.split("."):
            value = value[int(key)] if isinstance(value, list) else value[key]
        return float(value) * claim.scale
    match = re.search(claim.pattern, path.read_text(), flags=re.MULTILINE)
    if match is None:
        raise KeyError(f"pattern {claim.pattern!r} not found")
    return float(match.group(1).replace(",", "")) * claim.scale


def check(claim: Claim, root: Path, docs: dict[str, str]) -> Verdict:
    """Compares one quoted number with its artifact."""
    text = docs.setdefault(claim.doc, (root / claim.doc).read_text() if (root / claim.doc).exists() else "")
    found = list(_text_regex(claim.text).finditer(text))
    if len(found) != 1:
        return Verdict(claim, "doc", detail=f"text found {len(found)} times in {claim.doc} (needs exactly 1)")
    claim.spans.append(found[0].span())
    quoted = found[0].group(1)
    if not (root / claim.artifact).exists():
        return Verdict(claim, "missing", quoted, detail=f"{claim.artifact} missing (reproduce.sh {claim.step})")
    try:
        measured = _measured(claim, root)
    except (KeyError, IndexError, ValueError, json.JSONDecodeError) as e:
        return Verdict(claim, "missing", quoted, detail=f"{claim.artifact}: {e}")
    shown = format(measured, claim.format)
    quoted_value = float(quoted.replace(",", ""))
    if claim.tolerance is None and claim.rel_tolerance is None:
        ok = shown.replace(",", "") == quoted.replace(",", "")
    else:
        slack = max(claim.tolerance or 0.0, (claim.rel_tolerance or 0.0) * abs(measured))
        ok = math.isfinite(measured) and abs(quoted_value - measured) <= slack
    return Verdict(claim, "ok" if ok else "mismatch", quoted, shown)


def unchecked_bold_numbers(root: Path, docs: dict[str, str], claims: list[Claim]) -> list[str]:
    """Bold numbers in README.md and docs/*.md that no claim's matched text covers."""
    covered: dict[str, list[tuple[int, int]]] = {}
    for c in claims:
        covered.setdefault(c.doc, []).extend(c.spans)
    out = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        rel = str(path.relative_to(root))
        text = docs.setdefault(rel, path.read_text())
        for m in BOLD_NUMBER.finditer(text):
            if not any(a <= m.start() < b or a < m.end() <= b for a, b in covered.get(rel, [])):
                line = text.count("\n", 0, m.start()) + 1
                out.append(f"{rel}:{line}: {m.group(0)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (docs and results/ below it)")
    parser.add_argument("--claims", type=Path, default=None, help="claims file (default: ROOT/docs/numbers.toml)")
    parser.add_argument("--only", nargs="*", default=None, help="reproduce.sh steps to check (default: all)")
    parser.add_argument("--run", action="store_true", help="run reproduce.sh for steps whose artifacts are missing")
    parser.add_argument("--strict", action="store_true", help="bold numbers that no claim covers are an error")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    claims = load_claims(args.claims or root / "docs" / "numbers.toml")
    if args.only is not None:
        claims = [c for c in claims if c.step in args.only]
    if args.run:
        steps = sorted({c.step for c in claims if not (root / c.artifact).exists()})
        for step in steps:
            print(f"== regenerating: bash scripts/reproduce.sh {step}", flush=True)
            subprocess.run(["bash", str(root / "scripts" / "reproduce.sh"), step], cwd=root, check=True)

    docs: dict[str, str] = {}
    verdicts = [check(c, root, docs) for c in claims]
    width = max((len(v.claim.id) for v in verdicts), default=10)
    for v in verdicts:
        c = v.claim
        mark = {"ok": "ok", "mismatch": "MISMATCH", "missing": "MISSING", "doc": "NOT QUOTED"}[v.status]
        slack = (f" ±{c.tolerance:g}" if c.tolerance is not None else
                 f" ±{100 * c.rel_tolerance:g}%" if c.rel_tolerance is not None else "")
        print(f"{mark:10} {c.id:{width}}  quoted {v.quoted or '-':>10}  measured {v.measured or '-':>10}{slack}"
              f"  [{c.layout}]  {c.doc}{'  ' + v.detail if v.detail else ''}")
    unchecked = unchecked_bold_numbers(root, docs, claims) if args.only is None else []
    for line in unchecked:
        print(f"unchecked  {line}")
    bad = [v for v in verdicts if v.status != "ok"]
    print(f"{len(verdicts) - len(bad)} of {len(verdicts)} quoted numbers match their artifacts"
          f"{f'; {len(unchecked)} bold numbers unchecked' if unchecked else ''}")
    return 1 if bad or (args.strict and unchecked) else 0


if __name__ == "__main__":
    sys.exit(main())
