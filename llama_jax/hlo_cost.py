"""What one device's compiled program costs, read from its optimised HLO: matmul FLOPs, bytes
moved through memory, and bytes sent by each collective, with loops counted as often as they
run.

XLA's own `cost_analysis()` counts a while loop's body once, so for a model whose layers are a
`scan` it reports a fraction of the FLOPs (tiny model, 4 layers: 38%). Here every computation
is costed once and multiplied by how often its callers run it: a while body by its
`known_trip_count`, a conditional by its dearest branch. `plan` turns the three figures into a
predicted step time with the chip's peak FLOP/s, memory and interconnect bandwidths.

What is counted:
- FLOPs: `dot`, `convolution` and library GEMM custom calls (2 x output elements x contracted
  size), wherever they sit (fusions included): the matmul work a roofline is about;
- bytes: operands and results of each instruction outside fusions (a fusion's inside stays in
  registers and caches), as XLA's "bytes accessed" does;
- collectives: bytes each device sends, by kind and group size g: all-gather (g-1)/g of its
  result, reduce-scatter and all-to-all (g-1)/g of the operand, all-reduce twice that (a
  ring's reduce-scatter plus all-gather), collective-permute the whole operand. Groups whose
  devices lie on different slices go over DCN, the others over ICI.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
    "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e3m4": 1,
    "f8e8m0fnu": 1, "f4e2m1fn": 0.5, "token": 0, "tuple": 0, "opaque": 0,
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Instructions that move no data of their own (or whose data is counted where it is used).
_NO_TRAFFIC = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
    "call", "after-all", "partition-id", "replica-id", "iota", "copy-done", "send-done",
    "recv-done", "async-done", "add-dependency", "opt-barrier", "domain",
}

_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{$")
_CALLEE = re.compile(r"\b(?:calls|body|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclass
class Cost:
    """Per device, per step."""

    flops: float = 0.0
    bytes: float = 0.0
    ici_bytes: float = 0.0
    dcn_bytes: float = 0.0
    collectives: dict[str, float] = field(default_factory=dict)  # kind -> bytes sent

    def add(self, other: Cost, times: float = 1.0) -> None:
        self.flops += other.flops * times
        self.bytes += other.bytes * times
        self.ici_bytes += other.ici_bytes * times
        self.dcn_bytes += other.dcn_bytes * times
        for kind, sent in other.collectives.items():
            self.collectives[kind] = self.collectives.get(kind, 0.0) + sent * times

    def total(self) -> float:
        return self.flops + self.bytes + self.ici_bytes + self.dcn_bytes


@dataclass
class Instruction:
    name: str
    shape: str  # the result type as written: `f32[4,8]{1,0}` or a tuple `(f32[], s32[])`
    op: str
    operands: list[str]
    attributes: str


def shape_bytes(text: str) -> float:
    """Bytes of an array type or of every array in a tuple type."""
    return sum(math.prod(int(d) for d in dims.split(",") if d) * DTYPE_BYTES.get(dtype, 4)
               for dtype, dims in _SHAPE.findall(text))


def dims_of(text: str) -> list[int]:
    found = _SHAPE.search(text)
    return [int(d) for d in found.group(2).split(",") if d] if found else []


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one opened at `start`."""
    opening, closing = text[start], {"(": ")", "{": "}", "[": "]"}[text[start]]
    depth = 0
    for i in range(start, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == closing:
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


def parse_instruction(line: str) -> Instruction | None:
    text = line.strip()
    if text.startswith("ROOT "):
        text = text[5:]
    name, eq, rest = text.partition(" = ")
    if not eq or " " in name:
        return None
    if rest.startswith("("):
        end = _closing(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op, paren, rest = rest.partition("(")
    if not paren:
        return None
    end = _closing("(" + rest, 0) - 1
    operands = [o.strip().split(" ")[-1].lstrip("%") for o in _split_top(rest[:end]) if o.strip()]
    return Instruction(name.lstrip("%"), shape, op.strip(), operands, rest[end + 1:])


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Computations by name, and the entry computation's name."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            if m := _HEADER.match(line):
                current = m.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.startswith("}"):
            current = None
        elif (instruction := parse_instruction(line)) is not None:
            computations[current].append(instruction)
    return computations, entry


# ---------------------------------------------------------------------------------------------
# Replica groups: which devices each collective joins


def replica_groups(attributes: str, devices: int) -> list[list[int]]:
    """The device groups of a collective, from any of XLA's notations: explicit
    `{{0,1},{2,3}}`, iota `[2,4]<=[8]` / `[2,4]<=[4,2]T(1,0)`, or the mesh form
    `mesh['axis_0'=4,'axis_1'=2] {'axis_0'}` (with an optional `device_ids=(...)`). No
    groups written: every device in one group."""
    m = re.search(r"replica_groups=", attributes)
    if not m:
        return [list(range(devices))]
    text = attributes[m.end():]
    if text.startswith("{"):
        body = text[:_closing(text, 0) + 1]
        groups = [[int(x) for x in g.split(",") if x.strip()]
                  for g in re.findall(r"\{([\d,\s]*)\}", body[1:-1])]
        return [g for g in groups if g] or [list(range(devices))]
    if text.startswith("["):
        iota = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
        if iota:
            shape = [int(x) for x in iota.group(1).split(",")]
            ids = _iota(iota.group(2), iota.group(3))
            return ids.reshape(shape[0], -1).tolist()
    if text.startswith("mesh["):
        axes = re.match(r"mesh\[([^\]]*)\]", text)
        names = re.findall(r"'([^']+)'=(\d+)", axes.group(1))
        sizes = [int(s) for _, s in names]
        ids_text = re.search(r"device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\)", text)
        ids = (_iota(ids_text.group(1), ids_text.group(2)) if ids_text
               else np.arange(math.prod(sizes))).reshape(sizes)
        chosen = re.search(r"\{([^}]*)\}", text[axes.end():])
        over = re.findall(r"'([^']+)'", chosen.group(1)) if chosen else []
        order = [n for n, _ in names]
        keep = [i for i, n in enumerate(order) if n not in over]
        vary = [order.index(n) for n in over]
        size = math.prod(sizes[i] for i in vary) if vary else 1
        return np.transpose(ids, keep + vary).reshape(-1, size).tolist()
    return [list(range(devices))]


def _iota(dims_text: str, perm_text: str | None) -> np.ndarray:
    dims = [int(x) for x in dims_text.split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if perm_text:
        ids = ids.transpose([int(x) for x in perm_text.split(",")])
    return ids.reshape(-1)


# ---------------------------------------------------------------------------------------------
# Costing


def _dot_flops(ins: Instruction, shapes: dict[str, str]) -> float:
    out = math.prod(dims_of(ins.shape))
    if ins.op == "dot":
        lhs = dims_of(shapes.get(ins.operands[0], ""))
        found = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attributes)
        contracted = [int(d) for d in found.group(1).split(",") if d] if found else []
        return 2.0 * out * math.prod(lhs[d] for d in contracted if d < len(lhs))
    if ins.op == "convolution":
        rhs = dims_of(shapes.get(ins.operands[1], ""))
        labels = re.search(r"dim_labels=\w*_(\w+)->", ins.attributes)
        if not labels or len(labels.group(1)) != len(rhs):
            return 0.0
        kernel = labels.group(1)  # e.g. `io` or `01io`: input features and spatial sizes
        return 2.0 * out * math.prod(size for size, label in zip(rhs, kernel, strict=True)
                                     if label == "i" or label.isdigit())
    if ins.op == "custom-call" and re.search(r'custom_call_target="[^"]*(gemm|matmul)',
                                             ins.attributes, re.IGNORECASE):
        lhs = dims_of(shapes.get(ins.operands[0], ""))
        found = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attributes)
        contracted = [int(d.strip(' "')) for d in found.group(1).split(",")] if found else []
        return 2.0 * out * math.prod(lhs[d] for d in contracted if d < len(lhs))
    return 0.0


def _sent_bytes(ins: Instruction, shapes: dict[str, str], group: int) -> float:
    kind = ins.op.removesuffix("-start")
    operand = sum(shape_bytes(shapes.get(o, "")) for o in ins.operands)
    if group <= 1 and kind != "collective-permute":
        return 0.0
    share = (group - 1) / group
    if kind == "all-gather":
        result = shape_bytes(ins.shape) if not ins.op.endswith("-start") else operand * group
        return share * result
    if kind in ("reduce-scatter", "all-to-all"):
        return share * operand
    if kind == "all-reduce":
        return 2 * share * operand
    return operand  # collective-permute


def _counted_trips(condition: list[Instruction]) -> float:
    """A loop's trip count from its condition `i < N` (N a constant; the counter starts at
    0, as JAX's scans and fori_loops do) where XLA wrote no `known_trip_count` (the TPU
    compiler does not); 1 when the condition is anything else."""
    constants = {ins.name: ins.operands[0] for ins in condition if ins.op == "constant"}
    for ins in condition:
        if ins.op == "compare" and "direction=LT" in ins.attributes and len(ins.operands) == 2:
            bound = constants.get(ins.operands[1], "")
            if bound.lstrip("-").isdigit():
                return float(max(int(bound), 1))
    return 1.0


def program_cost(text: str, devices: int, slice_of: Sequence[int] | None = None) -> Cost:
    """One device's cost of the compiled SPMD program `text` (`compiled.as_text()`) over
    `devices` devices; `slice_of[i]`: the slice of its i-th device (multi-slice TPU), for DCN."""
    computations, entry = parse_module(text)
    fused = {callee for instructions in computations.values() for ins in instructions
             if ins.op == "fusion" for callee in _CALLEE.findall(ins.attributes)}

    @functools.cache
    def cost_of(name: str) -> Cost:
        total = Cost()
        instructions = computations.get(name, [])
        shapes = {ins.name: ins.shape for ins in instructions}
        for ins in instructions:
            total.flops += _dot_flops(ins, shapes)
            kind = ins.op.removesuffix("-start")
            if kind in COLLECTIVES:
                groups = replica_groups(ins.attributes, devices)
                sent = _sent_bytes(ins, shapes, max(len(g) for g in groups))
                total.collectives[kind] = total.collectives.get(kind, 0.0) + sent
                crosses = slice_of is not None and any(
                    len({slice_of[i] for i in g if i < len(slice_of)}) > 1 for g in groups)
                if crosses:
                    total.dcn_bytes += sent
                else:
                    total.ici_bytes += sent
            elif name not in fused and ins.op not in _NO_TRAFFIC and not ins.op.endswith("-done"):
                total.bytes += shape_bytes(ins.shape) + sum(
                    shape_bytes(shapes.get(o, "")) for o in ins.operands)
            if ins.op == "conditional":
                branches = _BRANCHES.search(ins.attributes)
                names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")]
                         if branches else _CALLEE.findall(ins.attributes))
                dearest = max((cost_of(b) for b in names), key=Cost.total, default=Cost())
                total.add(dearest)
                continue
            times = 1.0
            if ins.op == "while":
                trip = _TRIP.search(ins.attributes)
                condition = re.search(r"\bcondition=%?([\w.\-]+)", ins.attributes)
                times = float(trip.group(1)) if trip else _counted_trips(
                    computations.get(condition.group(1), []) if condition else [])
            for callee in _CALLEE.findall(ins.attributes):
                if ins.op in ("reduce", "reduce-window", "scatter", "select-and-scatter", "sort",
                              "all-reduce", "all-reduce-start", "reduce-scatter", "map"):
                    continue  # a per-element combiner, not a program
                if callee in computations:
                    total.add(cost_of(callee), times)
        return total

    return cost_of(entry)
