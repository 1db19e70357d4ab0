"""Communication accounting: the bytes a compiled program moves through collectives, read from its HLO text.

The count reported everywhere in lepton_jax is the **payload per device**: for each collective instruction in the
compiled (SPMD-partitioned, per-device) program, the bytes of its operands, i.e. what one device contributes to that
collective each time the program runs. An all-reduce of a float32 parameter tree therefore counts the tree's bytes
once (not the ~2(n-1)/n a ring implementation puts on each link), an all-gather counts the local shard it sends,
a reduce-scatter the full local buffer it reduces. Asynchronous pairs (``all-reduce-start`` / ``all-reduce-done``)
are counted once, at the start. A collective inside a loop or a conditional is counted once per appearance in the
text, so programs whose collectives run a data-dependent number of times (a sync inside ``lax.cond``) must be
compiled and counted separately.

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
    """``(opcode, operand bytes per device)`` for every collective instruction in ``hlo_text``, in text order.

    Operands are resolved by name to the shapes they were defined with (compiled HLO prints operands without their
    shapes); ``-start`` variants are reported under the base opcode and ``-done`` halves are skipped.
    """
    shapes: dict[str, str] = {}
    found: list[tuple[str, str]] = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, rest = match.groups()
        parts = _split_instruction(rest)
        if parts is None:
            continue
        shape, opcode, operands = parts
        shapes[name] = shape
        base = opcode.removesuffix("-start")
        if base in COLLECTIVES and not opcode.endswith("-done"):
            found.append((base, operands))
    out = []
    for opcode, operands in found:
        names = _OPERAND.findall(operands)
        # operands by name; an older printer inlines their shapes instead
        nbytes = sum(shape_bytes(shapes.get(n, "")) for n in names) if names else shape_bytes(operands)
        out.append((opcode, nbytes))
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
