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
    layout   processes × devices per process (and machine) the number was measured on, printed beside the verdict
    machine  the hardware the quoted number was recorded on, as ``lepton_jax.tracking.machine()["label"]`` writes it
             (CPU model and the ISA XLA compiled for, e.g. ``AMD EPYC (AVX2)``; default ``unknown``); a mismatch
             on another machine reads "recorded on X, this is Y" (results can move with the CPU's ISA)
    step     the ``reproduce.sh`` step that writes the artifact

``[[group]]`` tables give shared keys (doc, artifact, step, layout, …) to the ``[[group.claim]]`` tables under them.

Whole tables and pasted outputs are compared at once:

    [[table]]  a Markdown table in ``doc`` (found by its header row, ``header``, exactly once) against the table with
               the same header in ``artifact``: same rows in the same order, every cell equal as text, except the
               columns named in ``rel_tolerance`` (a table: column name = relative slack)
    [[block]]  ``lines`` lines of ``doc`` starting at the line that starts with ``start`` against the artifact's lines
               from its line starting with ``start``: the text between numbers must be equal (white space aside) and
               each number within ``rel_tolerance``; lines matching a regex in ``skip`` are not compared, and parts
               matching a regex in ``ignore`` (e.g. the per-run samples beside a median) are cut from both sides;
               with ``after``, the doc's block is the first one below the line starting with ``after``

``[[exempt]]`` names a bold text (``text``, with its ``**``) that is not a measured number (a heading, a format
name, a setting) and says why (``reason``).

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
BOLD = re.compile(r"\*\*[^*\n]+?\*\*")  # left to right, so a closing ** never opens another
UNKNOWN_MACHINE = "unknown"


def this_machine() -> str:
    """This machine's label (CPU model and the ISA XLA compiles for here), as run.json records it."""
    from lepton_jax.tracking import machine

    return machine()["label"]


def machine_note(recorded: str, here: str) -> str:
    """Why a number may differ here: empty when the claim was recorded on this machine."""
    if recorded == here:
        return ""
    if recorded == UNKNOWN_MACHINE:
        return f"recorded on an unknown machine (the claim names none), this is {here}"
    return f"recorded on {recorded}, this is {here}"


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
    machine: str = UNKNOWN_MACHINE
    spans: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class TableClaim:
    id: str
    doc: str
    header: str
    artifact: str
    step: str
    layout: str
    rel_tolerance: dict[str, float] = field(default_factory=dict)
    machine: str = UNKNOWN_MACHINE
    spans: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class BlockClaim:
    id: str
    doc: str
    start: str
    lines: int
    artifact: str
    step: str
    layout: str
    rel_tolerance: float = 0.0
    skip: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    after: str = ""
    machine: str = UNKNOWN_MACHINE
    spans: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Exempt:
    doc: str
    text: str
    reason: str


@dataclass
class Verdict:
    claim: Claim | TableClaim | BlockClaim
    status: str  # ok | mismatch | missing | doc
    quoted: str = ""
    measured: str = ""
    detail: str = ""
    fix: tuple[int, int, str] | None = None  # (start, end, text): what --update writes over the doc's span


def _raw_claims(data: dict) -> list[dict]:
    """``[[claim]]`` tables, and ``[[group.claim]]`` tables with their group's keys filled in."""
    raws = list(data.get("claim", []))
    for group in data.get("group", []):
        shared = {k: v for k, v in group.items() if k != "claim"}
        raws.extend({**shared, **raw} for raw in group.get("claim", []))
    return raws


def load_claims(path: Path) -> list[Claim]:
    """Reads the ``[[claim]]`` (and grouped) tables of a TOML file; an unknown or missing key is an error naming the
    claim."""
    data = tomllib.loads(path.read_text())
    claims = []
    for i, raw in enumerate(_raw_claims(data)):
        try:
            claim = Claim(**raw)
        except TypeError as e:
            raise SystemExit(f"{path}: claim #{i + 1} ({raw.get('id', '?')}): {e}") from None
        if (claim.json is None) == (claim.pattern is None):
            raise SystemExit(f"{path}: claim {claim.id}: give exactly one of 'json' and 'pattern'")
        if "{value}" not in claim.text:
            raise SystemExit(f"{path}: claim {claim.id}: 'text' needs a {{value}} placeholder")
        claims.append(claim)
    for kind, cls in (("table", TableClaim), ("block", BlockClaim)):
        for i, raw in enumerate(data.get(kind, [])):
            try:
                claims.append(cls(**raw))
            except TypeError as e:
                raise SystemExit(f"{path}: {kind} #{i + 1} ({raw.get('id', '?')}): {e}") from None
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"{path}: duplicate claim ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    return claims


def load_exempt(path: Path) -> list[Exempt]:
    """The ``[[exempt]]`` tables: bold texts that are not measured numbers, each with a reason."""
    out = []
    for i, raw in enumerate(tomllib.loads(path.read_text()).get("exempt", [])):
        try:
            out.append(Exempt(**raw))
        except TypeError as e:
            raise SystemExit(f"{path}: exempt #{i + 1}: {e}") from None
        if not out[-1].reason.strip():
            raise SystemExit(f"{path}: exempt #{i + 1}: give a reason")
    return out


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


def _norm(line: str) -> str:
    return " ".join(line.split())


def _table_at(text: str, header: str) -> list[tuple[int, int, list[str]]]:
    """The Markdown tables in ``text`` whose header row is ``header`` (white space aside): for each, the character span
    and its rows (header and separator excluded) as (start, end, cells)."""
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    found = []
    for i, line in enumerate(lines):
        if _norm(line) != _norm(header):
            continue
        rows, j = [], i + 2
        while j < len(lines) and lines[j].lstrip().startswith("|"):
            rows.append((offsets[j], offsets[j + 1], [c.strip() for c in lines[j].strip().strip("|").split("|")]))
            j += 1
        found.append((offsets[i], offsets[j], rows))
    return found


def _cells_equal(quoted: str, measured: str, slack: float | None) -> bool:
    if slack is None:
        return quoted == measured
    q, m = re.findall(NUMBER, quoted), re.findall(NUMBER, measured)
    if len(q) != len(m) or re.sub(NUMBER, "#", quoted) != re.sub(NUMBER, "#", measured):
        return False
    return all(abs(float(a.replace(",", "")) - float(b.replace(",", ""))) <= slack * abs(float(b.replace(",", "")))
               for a, b in zip(q, m, strict=True))


def check_table(claim: TableClaim, root: Path, docs: dict[str, str]) -> Verdict:
    """Compares a Markdown table in a doc with the artifact's table of the same header, cell by cell."""
    text = docs.setdefault(claim.doc, (root / claim.doc).read_text() if (root / claim.doc).exists() else "")
    found = _table_at(text, claim.header)
    if len(found) != 1:
        return Verdict(claim, "doc", detail=f"table header found {len(found)} times in {claim.doc} (needs exactly 1)")
    start, end, rows = found[0]
    claim.spans.append((start, end))
    cells = sum(len(r[2]) for r in rows)
    if not (root / claim.artifact).exists():
        return Verdict(claim, "missing", f"{cells} cells",
                       detail=f"{claim.artifact} missing (reproduce.sh {claim.step})")
    theirs = _table_at((root / claim.artifact).read_text(), claim.header)
    if len(theirs) != 1:
        return Verdict(claim, "missing", f"{cells} cells",
                       detail=f"{claim.artifact}: table header found {len(theirs)} times")
    columns = [c.strip() for c in claim.header.strip().strip("|").split("|")]
    ours, measured = [r[2] for r in rows], [r[2] for r in theirs[0][2]]
    problems = []
    if len(ours) != len(measured):
        problems.append(f"{len(ours)} rows quoted, {len(measured)} measured")
    for n, (a, b) in enumerate(zip(ours, measured, strict=False)):
        for col, qa, mb in zip(columns, a, b, strict=False):
            if not _cells_equal(qa, mb, claim.rel_tolerance.get(col)):
                problems.append(f"row {n + 1} ({a[0]}) {col}: quoted {qa}, measured {mb}")
    status = "mismatch" if problems else "ok"
    fix = None
    if rows and theirs[0][2]:  # the doc's rows replaced by the artifact's rows, header kept
        their_rows = theirs[0][2]
        fix = (rows[0][0], rows[-1][1], (root / claim.artifact).read_text()[their_rows[0][0]:their_rows[-1][1]])
    return Verdict(claim, status, f"{cells} cells", f"{len(measured)} rows", "; ".join(problems[:5]) +
                   (f"; … {len(problems) - 5} more" if len(problems) > 5 else ""), fix)


def _block(text: str, start: str, count: int, after: str = "") -> tuple[int, int, list[str]] | None:
    lines = text.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if after and line.startswith(after)), 0)
    hits = [i for i, line in enumerate(lines) if i >= first and line.startswith(start)]
    if not hits or (len(hits) > 1 and not after):
        return None
    i = hits[0]
    begin = sum(len(line) for line in lines[:i])
    chosen = lines[i:i + count]
    return begin, begin + sum(len(line) for line in chosen), [line.rstrip("\n") for line in chosen]


def check_block(claim: BlockClaim, root: Path, docs: dict[str, str]) -> Verdict:
    """Compares lines pasted into a doc (a script's output) with the artifact's lines, number by number."""
    text = docs.setdefault(claim.doc, (root / claim.doc).read_text() if (root / claim.doc).exists() else "")
    ours = _block(text, claim.start, claim.lines, claim.after)
    if ours is None:
        return Verdict(claim, "doc", detail=f"no single line starting {claim.start!r} in {claim.doc}")
    claim.spans.append(ours[:2])
    if not (root / claim.artifact).exists():
        return Verdict(claim, "missing", f"{claim.lines} lines",
                       detail=f"{claim.artifact} missing (reproduce.sh {claim.step})")
    theirs = _block((root / claim.artifact).read_text(), claim.start, claim.lines)
    if theirs is None or len(theirs[2]) != claim.lines:
        return Verdict(claim, "missing", f"{claim.lines} lines",
                       detail=f"{claim.artifact}: no single line starting {claim.start!r} followed by the block")
    problems = []
    for a, b in zip(ours[2], theirs[2], strict=True):
        if any(re.search(p, a) for p in claim.skip):
            continue
        for pattern in claim.ignore:
            a, b = re.sub(pattern, "…", a), re.sub(pattern, "…", b)
        if not _cells_equal(_norm(a), _norm(b), claim.rel_tolerance):
            problems.append(f"quoted {_norm(a)!r}, measured {_norm(b)!r}")
    pasted = "".join(line + "\n" for line in theirs[2])
    return Verdict(claim, "mismatch" if problems else "ok", f"{claim.lines} lines", f"{claim.lines} lines",
                   "; ".join(problems[:3]) + (f"; … {len(problems) - 3} more" if len(problems) > 3 else ""),
                   (ours[0], ours[1], pasted))


def check(claim: Claim | TableClaim | BlockClaim, root: Path, docs: dict[str, str]) -> Verdict:
    """Compares one quoted number (or table, or pasted block) with its artifact."""
    if isinstance(claim, TableClaim):
        return check_table(claim, root, docs)
    if isinstance(claim, BlockClaim):
        return check_block(claim, root, docs)
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
    return Verdict(claim, "ok" if ok else "mismatch", quoted, shown, fix=(*found[0].span(1), shown))


def unchecked_bold_numbers(root: Path, docs: dict[str, str], claims: list, exempt: list[Exempt] = ()) -> list[str]:
    """Bold numbers in README.md and docs/*.md that no claim's matched text covers and no exemption names."""
    covered: dict[str, list[tuple[int, int]]] = {}
    for c in claims:
        covered.setdefault(c.doc, []).extend(c.spans)
    exempted = {(e.doc, e.text) for e in exempt}
    out = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        rel = str(path.relative_to(root))
        text = docs.setdefault(rel, path.read_text())
        for m in BOLD.finditer(text):
            if not re.search("[0-9]", m.group(0)) or (rel, m.group(0)) in exempted:
                continue
            if not any(a <= m.start() < b or a < m.end() <= b for a, b in covered.get(rel, [])):
                line = text.count("\n", 0, m.start()) + 1
                out.append(f"{rel}:{line}: {m.group(0)}")
    return out


def update_docs(root: Path, verdicts: list[Verdict]) -> None:
    """Writes each mismatched claim's measured text over its span in the doc (last span first, so offsets hold)."""
    by_doc: dict[str, list[tuple[int, int, str]]] = {}
    for v in verdicts:
        if v.status == "mismatch" and v.fix is not None:
            by_doc.setdefault(v.claim.doc, []).append(v.fix)
    for doc, fixes in by_doc.items():
        text = (root / doc).read_text()
        done_until = len(text) + 1
        for start, end, new in sorted(set(fixes), reverse=True):
            if end > done_until:  # overlaps a span already rewritten (a number inside an updated block)
                continue
            text, done_until = text[:start] + new + text[end:], start
        (root / doc).write_text(text)
        print(f"updated {len(fixes)} quote(s) in {doc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (docs and results/ below it)")
    parser.add_argument("--claims", type=Path, default=None, help="claims file (default: ROOT/docs/numbers.toml)")
    parser.add_argument("--only", nargs="*", default=None, help="reproduce.sh steps to check (default: all)")
    parser.add_argument("--run", action="store_true", help="run reproduce.sh for steps whose artifacts are missing")
    parser.add_argument("--strict", action="store_true", help="bold numbers that no claim covers are an error")
    parser.add_argument("--update", action="store_true",
                        help="write the measured values over the mismatched quotes (numbers, tables, pasted blocks); "
                             "then reread the prose around them (a goal met or missed may have changed)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    claims_path = args.claims or root / "docs" / "numbers.toml"
    claims, exempt = load_claims(claims_path), load_exempt(claims_path)
    if args.only is not None:
        unknown = sorted(set(args.only) - {c.step for c in claims})
        if unknown:
            print(f"error: no claim belongs to step(s) {unknown}; steps: {sorted({c.step for c in claims})}",
                  file=sys.stderr)
            return 2
        claims = [c for c in claims if c.step in args.only]
    if args.run:
        steps = sorted({c.step for c in claims if not (root / c.artifact).exists()})
        for step in steps:
            print(f"== regenerating: bash scripts/reproduce.sh {step}", flush=True)
            subprocess.run(["bash", str(root / "scripts" / "reproduce.sh"), step], cwd=root, check=True)

    docs: dict[str, str] = {}
    verdicts = [check(c, root, docs) for c in claims]
    here = this_machine()
    print(f"this machine: {here}")
    width = max((len(v.claim.id) for v in verdicts), default=10)
    for v in verdicts:
        c = v.claim
        note = machine_note(c.machine, here) if v.status == "mismatch" else ""
        if note:
            v.detail = f"{v.detail}; {note}" if v.detail else note
        mark = {"ok": "ok", "mismatch": "MISMATCH", "missing": "MISSING", "doc": "NOT QUOTED"}[v.status]
        tol, rel = getattr(c, "tolerance", None), getattr(c, "rel_tolerance", None)
        slack = (f" ±{tol:g}" if tol is not None else f" ±{100 * rel:g}%" if isinstance(rel, float) and rel else
                 f" ±{', '.join(f'{k} {100 * v:g}%' for k, v in rel.items())}" if isinstance(rel, dict) and rel
                 else "")
        print(f"{mark:10} {c.id:{width}}  quoted {v.quoted or '-':>10}  measured {v.measured or '-':>10}{slack}"
              f"  [{c.layout}]  {c.doc}{'  ' + v.detail if v.detail else ''}")
    unchecked = unchecked_bold_numbers(root, docs, claims, exempt) if args.only is None else []
    for line in unchecked:
        print(f"unchecked  {line}")
    stale = [e for e in exempt if e.text not in docs.setdefault(e.doc, (root / e.doc).read_text()
                                                              if (root / e.doc).exists() else "")]
    for e in stale:
        print(f"NOT QUOTED exemption {e.text!r} is not in {e.doc} (remove it from the claims file)")
    if args.update:
        update_docs(root, verdicts)
    bad = [v for v in verdicts if v.status != "ok"] + stale
    missing = sorted({v.claim.step for v in bad if isinstance(v, Verdict) and v.status == "missing"})
    if missing:
        print(f"artifacts missing: run `bash scripts/reproduce.sh STEP` for {', '.join(missing)}")
    print(f"{len(verdicts) - len(bad) + len(stale)} of {len(verdicts)} quoted numbers match their artifacts"
          f"{f'; {len(unchecked)} bold numbers unchecked' if unchecked else ''}")
    return 1 if bad or (args.strict and unchecked) else 0


if __name__ == "__main__":
    sys.exit(main())
