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
    wire_bytes(compiled.as_text())                # bytes each device sends under the ring model

Payload and wire bytes differ: for a group of n devices a ring all-reduce sends 2(n-1)/n of its buffer, but an
all-gather sends (n-1) times the local shard, so gathering bfloat16 deltas at n = 4 puts as many bytes on each link as
an all-reduce of the float32 ones (:func:`wire_breakdown`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
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
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=[^{]*)?\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=")
_GROUPS = re.compile(r"replica_groups=\{\{([\d,\s]*)\}")


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


def _instructions(hlo_text: str, order: list[str]) -> Iterator[tuple[str, str, str, tuple[str, str, str]]]:
    """``(computation, name, attributes, (shape, opcode, operands))`` for every instruction of ``hlo_text``, in text
    order; appends each computation's name to ``order`` as it is met (callees are printed before their callers)."""
    current = ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("(", 1)[0]:
            current = header.group(1)
            order.append(current)
            continue
        match = _INSTRUCTION.match(line)
        parts = _split_instruction(match.group(2)) if match else None
        if parts is not None:
            yield current, match.group(1), match.group(2), parts


def _callees(attributes: str) -> list[str]:
    """The computations an instruction calls (``to_apply``/``body``/``condition``/``calls``, and branches)."""
    return _CALLEE.findall(attributes) + [c.strip().lstrip("%") for group in _BRANCHES.findall(attributes)
                                          for c in group.split(",") if c.strip()]


def _collectives(hlo_text: str) -> list[tuple[str, int, int | None]]:
    """(opcode, operand bytes x runs, group size) per collective instruction (see :func:`collective_breakdown`)."""
    shapes: dict[str, str] = {}
    found: list[tuple[str, str, str, int | None]] = []  # (opcode, operands, computation, group size)
    calls: dict[str, list[tuple[str, int]]] = {}  # computation -> [(callee, times per call)]
    order: list[str] = []
    for current, name, rest, (shape, opcode, operands) in _instructions(hlo_text, order):
        shapes[name] = shape
        trip = 1
        if opcode == "while":
            count = _TRIP_COUNT.search(rest)
            trip = int(count.group(1)) if count else 1
        calls.setdefault(current, []).extend((c, trip) for c in _callees(rest))
        base = opcode.removesuffix("-start")
        if base in COLLECTIVES and not opcode.endswith("-done"):
            found.append((base, operands, current, _group_size(rest)))
    # callees are printed before their callers and ENTRY last: propagate run counts from the end
    runs: dict[str, int] = dict.fromkeys(order, 0)
    if order:
        runs[order[-1]] = 1
    for computation in reversed(order):
        for callee, times in calls.get(computation, []):
            if callee in runs:
                runs[callee] += runs[computation] * times
    out = []
    for opcode, operands, computation, group in found:
        names = _OPERAND.findall(operands)
        # operands by name; an older printer inlines their shapes instead
        nbytes = sum(shape_bytes(shapes.get(n, "")) for n in names) if names else shape_bytes(operands)
        out.append((opcode, nbytes * max(1, runs.get(computation, 1)), group))
    return out


def loop_collectives(hlo_text: str) -> list[str]:
    """The opcodes of the collectives that run inside a while loop's body or condition (at any depth): a gradient
    accumulation loop should have none (its reduction belongs after the loop, once per step)."""
    calls: dict[str, list[str]] = {}
    loop_roots: set[str] = set()
    found: list[tuple[str, str]] = []  # (opcode, computation)
    order: list[str] = []
    for current, _, rest, (_, opcode, _) in _instructions(hlo_text, order):
        callees = _callees(rest)
        calls.setdefault(current, []).extend(callees)
        if opcode == "while":
            loop_roots.update(callees)
        base = opcode.removesuffix("-start")
        if base in COLLECTIVES and not opcode.endswith("-done"):
            found.append((base, current))
    looped = set(loop_roots)
    for computation in reversed(order):  # callers are printed after their callees: walk from ENTRY down
        if computation in looped:
            looped.update(calls.get(computation, []))
    return [opcode for opcode, computation in found if computation in looped]


def collective_breakdown(hlo_text: str) -> list[tuple[str, int]]:
    """``(opcode, operand bytes per device)`` for every collective instruction in ``hlo_text``, in text order, each
    multiplied by the number of times it runs (the trip counts of the loops around it).

    Operands are resolved by name to the shapes they were defined with (compiled HLO prints operands without their
    shapes); ``-start`` variants are reported under the base opcode and ``-done`` halves are skipped.
    """
    return [(opcode, nbytes) for opcode, nbytes, _ in _collectives(hlo_text)]


def _group_size(attributes: str) -> int | None:
    """Devices per replica group of a collective: ``replica_groups={{0,1,2,3},...}``, the iota form
    ``replica_groups=[groups,size]<=[...]`` or the mesh form ``replica_groups=mesh['axis_0'=4,...] {'axis_0'}``;
    collective-permute pairs count as groups of 2; None when absent."""
    mesh = _MESH_GROUPS.search(attributes)  # newer printer: the mesh's axes, then the axes the collective spans
    if mesh:
        sizes = {name: int(n) for name, n in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        size = 1
        for name in re.findall(r"'([^']+)'", mesh.group(2)):
            size *= sizes.get(name, 1)
        return size
    iota = _IOTA_GROUPS.search(attributes)
    if iota:
        return int(iota.group(1).split(",")[-1])
    explicit = _GROUPS.search(attributes)
    if explicit:
        first = explicit.group(1)
        return len([x for x in first.split(",") if x.strip()]) if first.strip() else None
    if "source_target_pairs=" in attributes:
        return 2
    return None


def ring_bytes(opcode: str, payload: float, group: int | None) -> float:
    """Bytes one device sends for a collective with operand bytes ``payload`` over a group of ``group`` devices,
    with ring algorithms: all-reduce 2(n-1)/n of its buffer (reduce-scatter + all-gather), all-gather (n-1) times
    its shard, reduce-scatter and all-to-all (n-1)/n of the buffer, collective-permute/broadcast the buffer."""
    if group is None or group <= 1:
        return float(payload) if group is None else 0.0
    n = group
    if opcode == "all-reduce":
        return 2 * (n - 1) / n * payload
    if opcode == "all-gather":
        return (n - 1) * payload
    if opcode in ("reduce-scatter", "all-to-all", "ragged-all-to-all"):
        return (n - 1) / n * payload
    return float(payload)


def wire_breakdown(hlo_text: str) -> list[dict[str, Any]]:
    """Per collective: opcode, payload bytes per device (as :func:`collective_breakdown`), group size and the bytes a
    device sends under the ring model (:func:`ring_bytes`). Payload compares what each device contributes; the ring
    bytes are what crosses its link, which for an all-gather grows with the group size."""
    return [{"opcode": op, "payload_bytes": nbytes, "group_size": group,
             "ring_wire_bytes": ring_bytes(op, nbytes, group)} for op, nbytes, group in _collectives(hlo_text)]


def wire_bytes(hlo_text: str) -> int:
    """Total bytes a device sends through the collectives of ``hlo_text`` under the ring model."""
    return round(sum(row["ring_wire_bytes"] for row in wire_breakdown(hlo_text)))


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
