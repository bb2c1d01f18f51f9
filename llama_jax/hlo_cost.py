"""What one device's compiled program costs, read from its optimised HLO: matmul FLOPs, bytes
moved through memory, and bytes sent by each collective, with loops counted as often as they
run.

XLA's own `cost_analysis()` counts a while loop's body once, so for a model whose layers are a
`scan` it reports a fraction of the FLOPs (tiny model, 4 layers: 38%). Here every computation
is costed once and multiplied by how often its callers run it: a while body by its
`known_trip_count` (or its condition's `i < N`), a conditional by its dearest branch. The work
is kept per kernel (an instruction outside fusions; a fusion is one, with its matmuls), binned
by size, for roofline.py's per-kernel step time.

What is counted:
- FLOPs: `dot`, `convolution` and library GEMM custom calls (2 x output elements x contracted
  size; a convolution's window positions that fall on input, not padding or dilation holes),
  wherever they sit (fusions included): the matmul work a roofline is about;
- bytes: operands and results of each instruction outside fusions (a fusion's inside stays in
  registers and caches), as XLA's "bytes accessed" does, and by its rules: a slice reads what
  it takes, an update in place writes the update (also where a fusion slices an operand or
  updates it as its result), so a loop over stacked weights reads one layer per trip;
  optionally leaving out on-chip memory (TPU VMEM);
- collectives: bytes each device sends, by kind and group size g: all-gather (g-1)/g of its
  result, reduce-scatter and all-to-all (g-1)/g of the operand, all-reduce twice that (a
  ring's reduce-scatter plus all-gather), collective-permute the whole operand. Groups whose
  devices lie on different slices go over DCN, the others over ICI.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
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
    "recv-done", "async-start", "async-update", "async-done", "add-dependency", "opt-barrier",
    "domain",
}  # (an async-start's wrapped computation is costed where it is called)

_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{$")
_CALLEE = re.compile(r"\b(?:calls|body|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_COMMENT = re.compile(r"/\*.*?\*/")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def size_class(amount: float) -> int:
    """The power of 4 nearest `amount`: kernels are binned by the size of their work, since a
    small pass over memory runs faster on a CPU (its caches) than a large one."""
    return 4 ** round(math.log(amount, 4)) if amount >= 1 else 1


@dataclass
class Cost:
    """Per device, per step."""

    flops: float = 0.0
    bytes: float = 0.0
    ici_bytes: float = 0.0
    dcn_bytes: float = 0.0
    collectives: dict[str, float] = field(default_factory=dict)  # kind -> bytes sent
    collective_ops: float = 0.0  # collectives run
    fp8_flops: float = 0.0  # of `flops`, those of matmuls with an fp8 operand
    # Kernels (instructions outside fusions, each fusion one) by the size classes of their
    # FLOPs and bytes, `"flops_class:bytes_class" -> [FLOPs, bytes, kernels run, fp8 FLOPs]`
    # (`":f8"` after the classes where the kernel multiplies in fp8, which a chip with fp8
    # units runs at twice the rate): what a roofline applied per kernel needs, in a form that
    # JSON keeps. Kernels share a bin only where both their FLOPs and their bytes are alike
    # (and their matmuls' precision), so the bin's max(compute, memory) is close to the sum
    # of its kernels' own.
    kernels: dict[str, list[float]] = field(default_factory=dict)

    def add(self, other: Cost, times: float = 1.0) -> None:
        self.flops += other.flops * times
        self.fp8_flops += other.fp8_flops * times
        self.bytes += other.bytes * times
        self.ici_bytes += other.ici_bytes * times
        self.dcn_bytes += other.dcn_bytes * times
        self.collective_ops += other.collective_ops * times
        for kind, sent in other.collectives.items():
            self.collectives[kind] = self.collectives.get(kind, 0.0) + sent * times
        for key, amounts in other.kernels.items():
            mine = self.kernels.setdefault(key, [0.0] * len(amounts))
            for i, amount in enumerate(amounts):
                mine[i] += amount * times

    def total(self) -> float:
        return self.flops + self.bytes + self.ici_bytes + self.dcn_bytes + self.collective_ops


@dataclass
class Instruction:
    name: str
    shape: str  # the result type as written: `f32[4,8]{1,0}` or a tuple `(f32[], s32[])`
    op: str
    operands: list[str]
    attributes: str
    root: bool = False  # its computation's result


def shape_bytes(text: str, skip_space: int | None = None) -> float:
    """Bytes of an array type or of every array in a tuple type; with `skip_space`, leaving
    out arrays that the layout places in that memory space (`{1,0:T(8,128)S(1)}`)."""
    return sum(math.prod(int(d) for d in dims.split(",") if d) * DTYPE_BYTES.get(dtype, 4)
               for dtype, dims, layout in _SHAPE.findall(text)
               if skip_space is None or f"S({skip_space})" not in layout)


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
    text = _COMMENT.sub("", line).strip()  # `/*index=5*/` before every fifth operand
    root = text.startswith("ROOT ")
    if root:
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
    return Instruction(name.lstrip("%"), shape, op.strip(), operands, rest[end + 1:], root)


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
# FLOPs


def _dot_flops(ins: Instruction, shapes: dict[str, str]) -> float:
    out = math.prod(dims_of(ins.shape))
    if ins.op == "dot":
        return 2.0 * out * _contracted(shapes.get(ins.operands[0], ""),
                                       re.search(r"lhs_contracting_dims=\{([\d,]*)\}",
                                                 ins.attributes))
    if ins.op == "convolution":
        return _convolution_flops(ins, shapes)
    if ins.op == "custom-call" and _is_matmul(ins):
        return 2.0 * out * _contracted(shapes.get(ins.operands[0], ""),
                                       re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]',
                                                 ins.attributes))
    if ins.op == "custom-call" and "cudnn_fmha_backend_config" in ins.attributes:
        return _fused_attention_flops(ins, shapes)
    return 0.0


def _fused_attention_flops(ins: Instruction, shapes: dict[str, str]) -> float:
    """A cuDNN flash-attention call's matmul FLOPs: 2 B N T S H per product over the query-key
    pairs its mask leaves (causal: each query's keys up to itself; a sliding window: at most
    that many), two products forward (Q K^T, P V), five backward (Q K^T again, dP, dV, dQ,
    dK: FlashAttention-2's count). Without them a step compiled for a GPU priced attention by
    its bytes alone, and a remat policy that runs the forward kernel twice looked free. The
    score shape [B, N, T, S] is in the call's backend config; H follows from Q (operand 0:
    B T N H elements)."""
    scores = re.search(r'"intermediate_tensor_shape":\s*\{[^{]*?"dimensions":\s*\[([^\]]*)\]',
                       ins.attributes)
    dims = [int(d.strip(' "')) for d in scores.group(1).split(",") if d.strip(' "')] \
        if scores else []
    if len(dims) != 4 or not ins.operands:
        return 0.0
    b, n, t, s = dims
    head = math.prod(dims_of(shapes.get(ins.operands[0], ""))) / max(1, b * n * t)
    mask = re.search(r'"mask_type":\s*"(\w+)"', ins.attributes)
    window = re.search(r'"sliding_window_length":\s*"?(\d+)', ins.attributes)
    reach = min(s, int(window.group(1)) if window and int(window.group(1)) > 0 else s)
    if mask and "CAUSAL" in mask.group(1):  # query q sees min(q + 1, reach) keys
        pairs = t * (t + 1) // 2 if reach >= t else reach * (reach + 1) // 2 + (t - reach) * reach
    else:
        pairs = t * reach
    target = re.search(r'custom_call_target="([^"]*)"', ins.attributes)
    products = 5 if target and "Backward" in target.group(1) else 2
    return 2.0 * b * n * pairs * head * products


def _contracted(lhs_shape: str, found: re.Match[str] | None) -> int:
    lhs = dims_of(lhs_shape)
    dims = [int(d.strip(' "')) for d in found.group(1).split(",") if d.strip(' "')] if found else []
    return math.prod(lhs[d] for d in dims if d < len(lhs))


def _convolution_flops(ins: Instruction, shapes: dict[str, str]) -> float:
    """2 x multiply-adds that touch real input: per output element, the kernel's input features
    times the window positions that land on an input element rather than on padding or on a
    hole of `lhs_dilate`. The TPU compiler writes a batched matmul as such a convolution (the
    batch as a spatial dimension, dilated so that one window position in `size` hits), where
    output size x kernel size would count the batch `size` times over."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attributes)
    if not labels or len(ins.operands) < 2:
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    lhs, rhs, out = (dims_of(shapes.get(ins.operands[0], "")),
                     dims_of(shapes.get(ins.operands[1], "")), dims_of(ins.shape))
    if (len(lhs), len(rhs), len(out)) != (len(lhs_labels), len(rhs_labels), len(out_labels)):
        return 0.0
    spatial = sorted(c for c in out_labels if c.isdigit())
    window = _window(ins.attributes, len(spatial))
    positions = 1
    for d, label in enumerate(spatial):
        size, stride, (low, _), lhs_dilate, rhs_dilate = (window[key][d] for key in (
            "size", "stride", "pad", "lhs_dilate", "rhs_dilate"))
        positions *= _hits(lhs[lhs_labels.index(label)], out[out_labels.index(label)],
                           size or rhs[rhs_labels.index(label)], stride, low, lhs_dilate,
                           rhs_dilate)
    per_position = math.prod(out) // max(1, math.prod(out[out_labels.index(c)] for c in spatial))
    return 2.0 * per_position * rhs[rhs_labels.index("i")] * positions


def _window(attributes: str, rank: int) -> dict[str, list]:
    """A convolution's `window={size=4x1 stride=3x1 pad=0_0x1_1 lhs_dilate=4x1 ...}`, each
    field one entry per spatial dimension (its default where not written)."""
    fields: dict[str, list] = {"size": [0] * rank, "stride": [1] * rank,
                               "pad": [(0, 0)] * rank, "lhs_dilate": [1] * rank,
                               "rhs_dilate": [1] * rank}
    found = re.search(r"window=\{([^}]*)\}", attributes)
    for key, value in re.findall(r"(\w+)=([\d_x]+)", found.group(1) if found else ""):
        if key == "pad":
            fields[key] = [tuple(int(v) for v in p.split("_")) for p in value.split("x")]
        elif key in fields:
            fields[key] = [int(v) for v in value.split("x")]
    return fields


@functools.cache
def _hits(in_size: int, out_size: int, size: int, stride: int, low: int, lhs_dilate: int,
          rhs_dilate: int) -> int:
    """(output position, window position) pairs of one spatial dimension that read an input
    element: the dilated input's position must be in range and not a dilation hole."""
    extent = (in_size - 1) * lhs_dilate + 1
    outer, inner = (range(out_size), np.arange(size) * rhs_dilate) if out_size <= size else (
        range(size), np.arange(out_size) * stride)
    step = stride if out_size <= size else rhs_dilate
    hits = 0
    for i in outer:
        where = inner + i * step - low
        hits += int(np.count_nonzero((where >= 0) & (where < extent) & (where % lhs_dilate == 0)))
    return hits


def _is_matmul(ins: Instruction) -> bool:
    return ins.op == "dot" or (ins.op == "custom-call" and bool(re.search(
        r'custom_call_target="[^"]*(gemm|matmul)', ins.attributes, re.IGNORECASE)))


def _is_fp8_matmul(ins: Instruction, shapes: dict[str, str]) -> bool:
    """A matmul that multiplies fp8 operands (a dot whose operands XLA upcast first reads
    bf16 ones and is not)."""
    return _is_matmul(ins) and any(shapes.get(o, "").startswith(("f8e4m3", "f8e5m2"))
                                   for o in ins.operands)


def fp8_matmuls(text: str) -> int:
    """Matmuls of the program text (XLA dots, fused ones included, or library GEMM calls)
    with an fp8 operand: where model.quantization=fp8 really reached the kernels. Each
    written once: a loop body's once, however often it runs."""
    count = 0
    for instructions in parse_module(text)[0].values():
        shapes = {ins.name: ins.shape for ins in instructions}
        count += sum(1 for ins in instructions if _is_fp8_matmul(ins, shapes))
    return count


# ---------------------------------------------------------------------------------------------
# Memory traffic

# Instructions that read only part of their first operand: what they read is their result.
_PART_READERS = {"dynamic-slice", "slice", "gather"}
# Element-wise ops: inside a fusion XLA computes each output element from the same elements of
# the operands, so an operand is read only as far as their result is (a gather of a converted
# operand reads the gathered elements, not the whole operand).
_ELEMENTWISE = {
    "convert", "negate", "abs", "exponential", "log", "tanh", "logistic", "sqrt", "rsqrt",
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "compare", "select", "and",
    "or", "not", "clamp",
}


def _output_names(body: list[Instruction]) -> list[str]:
    """A fused computation's results: its root, or the root tuple's elements."""
    root = next((ins for ins in reversed(body) if ins.root), body[-1] if body else None)
    if root is None:
        return []
    return list(root.operands) if root.op == "tuple" else [root.name]


class Traffic:
    """Bytes an instruction outside fusions reads and writes in memory. As XLA's own analysis
    does, a slice reads only the part it takes and an update in place writes only the update:
    a loop over stacked layer weights reads one layer per trip, not the whole stack. A fusion
    reads each operand whole, except one that its fused computation (nested fusions included)
    only slices (the slices' bytes) or updates in place as its result (nothing read; only the
    update written)."""

    def __init__(self, computations: dict[str, list[Instruction]],
                 size: Callable[[str], float] = shape_bytes) -> None:
        self.computations = computations
        self.size = size  # the bytes of a type in the memory counted
        self._reads: dict[str, dict[int, float | None]] = {}

    def of(self, ins: Instruction, shapes: dict[str, str]) -> float:
        out = self.size(ins.shape)
        operands = [self.size(shapes.get(o, "")) for o in ins.operands]
        if ins.op in _PART_READERS:
            return 2 * out + sum(operands[1:]) * (ins.op == "gather")
        if ins.op == "dynamic-update-slice":
            return 2 * operands[1]
        if ins.op == "scatter":  # operands..., indices, updates...: reads and writes the updated
            n = (len(operands) - 1) // 2
            return 3 * sum(operands[n + 1:]) + operands[n]
        if ins.op == "copy-start":  # its result is (destination, source, context): both sides
            return out
        callee = _CALLEE.search(ins.attributes) if ins.op == "fusion" else None
        if callee and callee.group(1) in self.computations:
            body = self.computations[callee.group(1)]
            reads = self.parameter_reads(callee.group(1))
            read = sum(whole if reads.get(i) is None else min(reads[i], whole)
                       for i, whole in enumerate(operands))
            return read + out - self._not_written(body)
        return out + sum(operands)

    def parameter_reads(self, name: str) -> dict[int, float | None]:
        """Bytes the fused computation `name` reads of each parameter, by parameter number;
        None where it reads the parameter whole."""
        if name not in self._reads:
            body = self.computations.get(name, [])
            users: dict[str, list[tuple[Instruction, int]]] = {}
            for ins in body:
                for position, operand in enumerate(ins.operands):
                    users.setdefault(operand, []).append((ins, position))
            in_place = set(self._in_place(body))

            shapes = {ins.name: ins.shape for ins in body}
            outputs = set(_output_names(body))

            def read(value: str) -> float | None:
                """Bytes read of `value`, None where whole (the fusion's outputs are)."""
                if value in outputs:
                    return None
                shape = shapes.get(value, "")
                total = 0.0
                for user, position in users.get(value, []):
                    part: float | None = None
                    if user.op == "bitcast":
                        part = read(user.name)
                    elif user.op in _PART_READERS and position == 0:
                        part = self.size(user.shape)
                    elif (user.op in _ELEMENTWISE and dims_of(user.shape) == dims_of(shape)
                          and (result := read(user.name)) is not None):
                        whole_result = self.size(user.shape)
                        part = result * self.size(shape) / whole_result if whole_result else 0.0
                    elif user.op == "dynamic-update-slice" and position == 0:
                        part = 0.0 if user.name in in_place else None
                    elif user.op == "fusion" and (callee := _CALLEE.search(user.attributes)):
                        part = self.parameter_reads(callee.group(1)).get(position)
                    if part is None:
                        return None
                    total += part
                return total

            self._reads[name] = {int(ins.operands[0]): read(ins.name) for ins in body
                                 if ins.op == "parameter" and ins.operands
                                 and ins.operands[0].isdigit()}
        return self._reads[name]

    def _in_place(self, body: list[Instruction]) -> dict[str, Instruction]:
        """The fusion's results (its root, or the root tuple's elements) that are a
        dynamic-update-slice, seen through bitcasts: the buffer they update is their operand's,
        so only the update is written."""
        by_name = {ins.name: ins for ins in body}
        outputs = [by_name.get(name) for name in _output_names(body)]
        found = {}
        for output in outputs:
            update = output
            while update is not None and update.op == "bitcast" and update.operands:
                update = by_name.get(update.operands[0])
            if update is not None and update.op == "dynamic-update-slice":
                found[update.name] = update
        return found

    def _not_written(self, body: list[Instruction]) -> float:
        by_name = {ins.name: ins for ins in body}
        return sum(self.size(update.shape) - self.size(by_name[update.operands[1]].shape)
                   for update in self._in_place(body).values()
                   if len(update.operands) > 1 and update.operands[1] in by_name)


# ---------------------------------------------------------------------------------------------
# Collectives


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


# ---------------------------------------------------------------------------------------------
# The program: every instruction's cost, times how often it runs


@dataclass
class LineItem:
    computation: str
    instruction: Instruction
    times: float  # executions per step
    cost: Cost  # of one execution, its callees not included


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


# Callees run per element (a reduction's combiner), not as programs of their own.
_COMBINING = {"reduce", "reduce-window", "scatter", "select-and-scatter", "sort", "all-reduce",
              "all-reduce-start", "reduce-scatter", "map"}


def program_items(text: str, devices: int, slice_of: Sequence[int] | None = None,
                  on_chip_space: int | None = None) -> list[LineItem]:
    """Every kernel and collective of the compiled SPMD program `text` (`compiled.as_text()`)
    over `devices` devices, with how often one step runs it: a while body as often as its trip
    count, a conditional's dearest branch once. A kernel is an instruction outside fusions (a
    fusion is one, with the FLOPs of the matmuls fused into it). `slice_of[i]`: the slice of
    the i-th device (multi-slice TPU), for DCN. `on_chip_space`: the memory space of on-chip
    memory, whose reads and writes are not memory traffic (on TPU, 1: VMEM, where the
    compiler's memory-space assignment prefetches operands; the prefetch itself is counted)."""
    computations, entry = parse_module(text)
    traffic = Traffic(computations, functools.partial(shape_bytes, skip_space=on_chip_space))

    def flops_of(ins: Instruction, shapes: dict[str, str]) -> tuple[float, float]:
        """An instruction's matmul FLOPs and, of them, those multiplied in fp8."""
        found = _dot_flops(ins, shapes)
        return found, found if _is_fp8_matmul(ins, shapes) else 0.0

    @functools.cache
    def fused_flops(name: str) -> tuple[float, float]:
        instructions = computations.get(name, [])
        shapes = {ins.name: ins.shape for ins in instructions}
        found = [flops_of(ins, shapes) for ins in instructions] + [
            fused_flops(c) for ins in instructions for c in _CALLEE.findall(ins.attributes)
            if ins.op not in _COMBINING]
        return sum(f for f, _ in found), sum(f8 for _, f8 in found)

    def own_cost(ins: Instruction, shapes: dict[str, str]) -> Cost | None:
        kind = ins.op.removesuffix("-start")
        if kind in COLLECTIVES:
            groups = replica_groups(ins.attributes, devices)
            sent = _sent_bytes(ins, shapes, max(len(g) for g in groups))
            crosses = slice_of is not None and any(
                len({slice_of[i] for i in g if i < len(slice_of)}) > 1 for g in groups)
            return Cost(ici_bytes=0.0 if crosses else sent, dcn_bytes=sent if crosses else 0.0,
                        collectives={kind: sent}, collective_ops=1.0)
        if ins.op in _NO_TRAFFIC or ins.op.endswith("-done"):
            return None
        callee = _CALLEE.search(ins.attributes) if ins.op == "fusion" else None
        flops, fp8 = fused_flops(callee.group(1)) if callee else flops_of(ins, shapes)
        moved = traffic.of(ins, shapes)
        key = f"{size_class(flops)}:{size_class(moved)}" + (":f8" if fp8 else "")
        return Cost(flops=flops, fp8_flops=fp8, bytes=moved,
                    kernels={key: [flops, moved, 1.0, fp8]})

    @functools.cache
    def own_items(name: str) -> tuple[list[LineItem], list[tuple[str, float]]]:
        """This computation's own line items (run once) and the computations it runs, with how
        often per run of it (a fusion's computation is part of its kernel)."""
        instructions = computations.get(name, [])
        shapes = {ins.name: ins.shape for ins in instructions}
        items, calls = [], []
        for ins in instructions:
            cost = own_cost(ins, shapes)
            if cost is not None:
                items.append(LineItem(name, ins, 1.0, cost))
            if ins.op == "conditional":
                branches = _BRANCHES.search(ins.attributes)
                names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")]
                         if branches else _CALLEE.findall(ins.attributes))
                names = [b for b in names if b in computations]
                if names:
                    calls.append((max(names, key=lambda b: total_of(b).total()), 1.0))
                continue
            if ins.op in _COMBINING or ins.op == "fusion":
                continue
            times = 1.0
            callees = _CALLEE.findall(ins.attributes)
            if ins.op == "while":
                trip = _TRIP.search(ins.attributes)
                condition = re.search(r"\bcondition=%?([\w.\-]+)", ins.attributes)
                times = float(trip.group(1)) if trip else _counted_trips(
                    computations.get(condition.group(1), []) if condition else [])
                callees += [condition.group(1)] if condition else []
            calls += [(callee, times) for callee in callees if callee in computations]
        return items, calls

    @functools.cache
    def total_of(name: str) -> Cost:
        total = Cost()
        items, calls = own_items(name)
        for item in items:
            total.add(item.cost)
        for callee, times in calls:
            total.add(total_of(callee), times)
        return total

    # How often each computation runs per step: callers before callees (the call graph has no
    # cycles), each passing on its own count.
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for callee, _ in own_items(name)[1]:
            visit(callee)
        order.append(name)

    visit(entry)
    runs = {name: 0.0 for name in order}
    runs[entry] = 1.0
    for name in reversed(order):
        for callee, times in own_items(name)[1]:
            runs[callee] += runs[name] * times
    return [LineItem(item.computation, item.instruction, runs[name], item.cost)
            for name in order for item in own_items(name)[0] if runs[name] > 0]


def program_cost(text: str, devices: int, slice_of: Sequence[int] | None = None,
                 on_chip_space: int | None = None) -> Cost:
    """One device's cost per step of the compiled SPMD program `text`: see `program_items`."""
    total = Cost()
    for item in program_items(text, devices, slice_of, on_chip_space):
        total.add(item.cost, item.times)
    return total
