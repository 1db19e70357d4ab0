"""Communication accounting: the bytes a compiled program moves through collectives, read from its HLO text.

The count reported everywhere in lepton_jax is the **payload per device**: for each collective instruction in the
compiled (SPMD-partitioned, per-device) program, the bytes of its operands, i.e. what one device contributes to that
collective each time the program runs. An all-reduce of a float32 parameter tree therefore counts the tree's bytes
once (not the ~2(n-1)/n a ring implementation puts on each link), an all-gather counts the local shard it sends,
a reduce-scatter the full local buffer it reduces. Asynchronous pairs (``all-reduce-start`` / ``all-reduce-done``)
are counted once, at the start. A collective inside a ``while`` loop (``lax.scan``, ``fori_loop``) counts once per
iteration: the loop's ``known_trip_count`` (nested loops multiply); a loop without a known trip count counts once.
Both branches of a conditional are counted, so programs whose collectives run a data-dependent number of times (a
sync inside ``lax.cond``) must be compiled and counted separately.

Usage::

    compiled = jax.jit(step).lower(state, batch).compile()
    collective_bytes(compiled.as_text())          # int
    collective_breakdown(compiled.as_text())      # [(opcode, bytes), ...]
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")

DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
    "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLEE = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string such as ``f32[3,3,1,32]{3,2,1,0}`` or a tuple ``(f32[2], bf16[4])``."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        if dtype.startswith("f8"):
            total += size
        elif dtype in DTYPE_BYTES:
            total += size * DTYPE_BYTES[dtype]
    return int(total)


def _split_instruction(rest: str) -> tuple[str, str, str] | None:
    """(result shape, opcode, operand text) of an instruction's right-hand side."""
    rest = rest.strip()
    if rest.startswith("("):  # tuple-shaped result: find the matching parenthesis
        depth = 0
        end = 0
        for end, ch in enumerate(rest):  # noqa: B007 (end is used after the loop)
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        shape, rest = rest[: end + 1], rest[end + 1:].strip()
    else:
        shape, _, rest = rest.partition(" ")
    match = re.match(r"([\w\-]+)\(", rest)
    if not match:
        return None
    depth, start = 0, match.end() - 1
    for j in range(start, len(rest)):
        depth += rest[j] == "("
        depth -= rest[j] == ")"
        if depth == 0:
            return shape, match.group(1), rest[start + 1: j]
    return shape, match.group(1), rest[start + 1:]


def collective_breakdown(hlo_text: str) -> list[tuple[str, int]]:
    """``(opcode, operand bytes per device)`` for every collective instruction in ``hlo_text``, in text order, each
    multiplied by the number of times it runs (the trip counts of the loops around it).

    Operands are resolved by name to the shapes they were defined with (compiled HLO prints operands without their
    shapes); ``-start`` variants are reported under the base opcode and ``-done`` halves are skipped.
    """
    shapes: dict[str, str] = {}
    found: list[tuple[str, str, str]] = []  # (opcode, operands, computation)
    calls: dict[str, list[tuple[str, int]]] = {}  # computation -> [(callee, times per call)]
    order: list[str] = []
    current = ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("(", 1)[0]:
            current = header.group(1)
            order.append(current)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, rest = match.groups()
        parts = _split_instruction(rest)
        if parts is None:
            continue
        shape, opcode, operands = parts
        shapes[name] = shape
        trip = 1
        if opcode == "while":
            count = _TRIP_COUNT.search(rest)
            trip = int(count.group(1)) if count else 1
        callees = [(c, trip if opcode == "while" else 1) for c in _CALLEE.findall(rest)]
        for group in _BRANCHES.findall(rest):
            callees += [(c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip()]
        calls.setdefault(current, []).extend(callees)
        base = opcode.removesuffix("-start")
        if base in COLLECTIVES and not opcode.endswith("-done"):
            found.append((base, operands, current))
    # callees are printed before their callers and ENTRY last: propagate run counts from the end
    runs: dict[str, int] = dict.fromkeys(order, 0)
    if order:
        runs[order[-1]] = 1
    for computation in reversed(order):
        for callee, times in calls.get(computation, []):
            if callee in runs:
                runs[callee] += runs[computation] * times
    out = []
    for opcode, operands, computation in found:
        names = _OPERAND.findall(operands)
        # operands by name; an older printer inlines their shapes instead
        nbytes = sum(shape_bytes(shapes.get(n, "")) for n in names) if names else shape_bytes(operands)
        out.append((opcode, nbytes * max(1, runs.get(computation, 1))))
    return out


def collective_bytes(hlo_text: str) -> int:
    """Total operand bytes per device of all collectives in ``hlo_text`` (see the module docstring)."""
    return sum(n for _, n in collective_breakdown(hlo_text))


def compiled_bytes(compiled: Any) -> int:
    """:func:`collective_bytes` of a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``)."""
    return collective_bytes(compiled.as_text())


def summarize(hlo_text: str) -> dict[str, int]:
    """Bytes per collective opcode, e.g. ``{"all-reduce": 411_000}``."""
    totals: Counter[str] = Counter()
    for opcode, nbytes in collective_breakdown(hlo_text):
        totals[opcode] += nbytes
    return dict(totals)
