"""Collectives per decode step, read from the compiled decode program's HLO text.

The engine's decode program is one `while` loop of up to `decode_steps` iterations, so
one decode step is one run of the loop body: we count the collectives reachable from
the body computation (through fusions, calls and reducers). Collectives inside
`conditional` branches (sampling filters, penalties, top-n logprobs: they run only when
a batch asks for them) and inside nested loops (trip count unknown) are reported apart,
and so are those outside the loop (once per device call, not per step).

Bytes are per device, from the partitioned HLO shapes: the larger of a collective's
operands and results, i.e. the full buffer of an all-reduce, the gathered output of an
all-gather, the input of a reduce-scatter, the buffer an all-to-all or permute moves.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping

import numpy as np

KINDS: tuple[str, ...] = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)
# Opcode spellings of each kind (async pairs count once, at -start).
_KIND_OF = {k: k for k in KINDS}
_KIND_OF.update({f"{k}-start": k for k in KINDS})
_KIND_OF["ragged-all-to-all"] = "all-to-all"

_ITEMSIZE = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z]*)?)\[([0-9,]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_SINGLE_REF = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_LIST_REF = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# The three spellings of replica groups in HLO text, and permute pairs.
_IOTA = r"\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?"
_GROUPS_LIST = re.compile(r"(?:replica_groups|source_target_pairs)=\{((?:\{[0-9,]*\},?)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=" + _IOTA)
_GROUPS_MESH = re.compile(
    r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\((\[[0-9,]+\](?:T\([0-9,]+\))?|[0-9,]+)"
    r"\))?\s*\{([^}]*)\}"
)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _iota(dims: str, perm: str | None) -> np.ndarray:
    shape = _ints(dims)
    ids = np.arange(int(np.prod(shape))).reshape(shape)
    return ids.transpose(_ints(perm)).reshape(-1) if perm else ids.reshape(-1)


def replica_groups(attrs: str, num_devices: int) -> list[list[int]] | None:
    """The device groups of a collective (permute pairs count as groups); None when the
    attribute is missing or spelled in a way this parser does not know."""
    m = _GROUPS_LIST.search(attrs)
    if m:
        groups = [_ints(g) for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
        return groups or [list(range(num_devices))]  # {} = every device in one group
    m = _GROUPS_IOTA.search(attrs)
    if m:
        shape = _ints(m.group(1))
        return _iota(m.group(2), m.group(3)).reshape(shape[0], -1).tolist()
    m = _GROUPS_MESH.search(attrs)
    if m:
        axes = re.findall(r"'([^']+)'=([0-9]+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        ids = m.group(2)
        if ids is None:
            devices = np.arange(int(np.prod(sizes)))
        elif ids.startswith("["):
            dims, _, perm = ids[1:].partition("]")
            devices = _iota(dims, perm[2:-1] if perm else None)
        else:
            devices = np.asarray(_ints(ids))
        chosen = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(3))]
        rest = [i for i in range(len(names)) if i not in chosen]
        grid = devices.reshape(sizes).transpose(rest + chosen)
        return grid.reshape(-1, int(np.prod([sizes[i] for i in chosen]))).tolist()
    return None


def group_axes(groups: list[list[int]] | None, mesh_axes: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes a collective's groups span: the axes along which the coordinates
    of its members differ (device i of the program is the mesh's i-th device)."""
    if groups is None or not mesh_axes:
        return ("?",)
    names, sizes = list(mesh_axes), list(mesh_axes.values())
    varying: set[str] = set()
    for group in groups:
        if len(group) > 1 and max(group) < int(np.prod(sizes)):
            coords = np.array(np.unravel_index(group, sizes))
            varying |= {n for n, row in zip(names, coords, strict=True) if len(set(row)) > 1}
    return tuple(n for n in names if n in varying)


def shape_bytes(type_text: str) -> int:
    """Bytes of an HLO type: an array `f32[8,64]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        size = _ITEMSIZE.get(dtype, 1 if dtype.startswith("f8") else 0)
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += size * count
    return total


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    type_text: str
    opcode: str
    operands: tuple[str, ...]
    attrs: str

    def called(self) -> list[tuple[str, str]]:
        """(attribute, computation) pairs this instruction calls."""
        refs = [(a, c) for a, c in _SINGLE_REF.findall(self.attrs)]
        for attr, names in _LIST_REF.findall(self.attrs):
            refs += [(attr, n.strip().lstrip("%")) for n in names.split(",") if n.strip()]
        return refs


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _parse_instruction(line: str) -> Instruction | None:
    m = _NAME.match(line)
    if not m:
        return None
    rest = _COMMENT.sub("", line[m.end():])
    if rest.startswith("("):  # tuple type
        end = _balanced(rest, 0)
    else:
        end = rest.find(" ")
        if end < 0:
            return None
    type_text, rest = rest[:end], rest[end:].lstrip()
    paren = rest.find("(")
    if paren <= 0:
        return None
    opcode = rest[:paren].strip()
    close = _balanced(rest, paren)
    operands = tuple(
        o.strip().split(" ")[-1].lstrip("%") for o in rest[paren + 1 : close - 1].split(",")
        if o.strip()
    )
    return Instruction(m.group(1), type_text, opcode, operands, rest[close:])


@dataclasses.dataclass
class HloModule:
    computations: dict[str, list[Instruction]]
    entry: str
    types: dict[str, str]  # instruction name -> result type (names are module-unique)

    @classmethod
    def parse(cls, text: str) -> HloModule:
        computations: dict[str, list[Instruction]] = {}
        entry, current = "", None
        for line in text.splitlines():
            if current is None:
                m = _HEADER.match(line)
                if m and not line.startswith((" ", "HloModule")):
                    current = m.group(2)
                    computations[current] = []
                    entry = current if m.group(1) else entry
                continue
            if line.startswith("}"):
                current = None
                continue
            inst = _parse_instruction(line)
            if inst is not None:
                computations[current].append(inst)
        if not entry:
            raise ValueError("no ENTRY computation in the HLO text")
        types = {i.name: i.type_text for insts in computations.values() for i in insts}
        return cls(computations, entry, types)

    def collective_bytes(self, inst: Instruction) -> int:
        result = shape_bytes(inst.type_text)
        operands = sum(shape_bytes(self.types.get(o, "")) for o in inst.operands)
        if inst.opcode.endswith("-start"):
            # Async starts return (operands, outputs[, contexts]): count the outputs.
            return max(operands, result - operands)
        return max(operands, result)

    def size(self, comp: str, seen: frozenset[str] = frozenset()) -> int:
        """Instructions reachable from `comp` (to find the biggest loop)."""
        if comp in seen or comp not in self.computations:
            return 0
        insts = self.computations[comp]
        return len(insts) + sum(
            self.size(c, seen | {comp}) for i in insts for _, c in i.called()
        )

    def find_loops(self, comp: str | None = None) -> list[Instruction]:
        """`while` ops reachable from `comp` (default ENTRY) without entering a loop."""
        out = []
        for inst in self.computations.get(comp or self.entry, []):
            if inst.opcode == "while":
                out.append(inst)
                continue
            for _, called in inst.called():
                out += self.find_loops(called)
        return out


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    bytes: int
    op_name: str
    where: str  # "step" (every iteration), "conditional", "nested_loop" or "per_call"
    axes: tuple[str, ...] = ()  # mesh axes its groups span ("?" when unknown)


def _walk(mod: HloModule, comp: str, where: str, skip: str | None,
          mesh_axes: Mapping[str, int], depth: int = 0) -> Iterator[Collective]:
    if depth > 64 or comp not in mod.computations:
        return
    devices = int(np.prod(list(mesh_axes.values()))) if mesh_axes else 0
    for inst in mod.computations[comp]:
        kind = _KIND_OF.get(inst.opcode)
        if kind is not None:
            m = _OP_NAME.search(inst.attrs)
            axes = group_axes(replica_groups(inst.attrs, devices), mesh_axes)
            yield Collective(kind, mod.collective_bytes(inst), m.group(1) if m else "", where,
                             axes)
        if skip is not None and inst.name == skip:
            continue  # the decode loop itself: counted per step by the caller
        for attr, called in inst.called():
            inner = where
            if where != "per_call":
                if attr in ("branch_computations", "true_computation", "false_computation"):
                    inner = "conditional" if where == "step" else where
                elif inst.opcode == "while":
                    inner = "nested_loop"
            yield from _walk(mod, called, inner, skip, mesh_axes, depth + 1)


@dataclasses.dataclass
class DecodeCollectives:
    """Collectives of one decode step, by kind, and where every other one sits."""

    per_step: dict[str, int]
    bytes_per_step: dict[str, int]
    conditional: dict[str, int]
    nested_loop: dict[str, int]
    per_call: dict[str, int]
    items: list[Collective]

    def sources(self) -> list[dict]:
        """Collectives grouped by where they run, kind, mesh axes and the JAX op that
        produced them (its name path, minus the jit and loop-body prefix)."""
        groups: dict[tuple[str, str, str, str], list[int]] = {}
        for c in self.items:
            name = re.sub(r"^jit\([^)]*\)/(while/body/)?", "", c.op_name)
            acc = groups.setdefault((c.where, c.kind, "+".join(c.axes), name), [0, 0])
            acc[0] += 1
            acc[1] += c.bytes
        return [
            {"where": w, "kind": k, "axes": a, "op_name": n, "count": v[0], "bytes": v[1]}
            for (w, k, a, n), v in sorted(groups.items())
        ]

    def per_step_over(self, axes: tuple[str, ...]) -> dict[str, int]:
        """Per-step counts by kind of the collectives spanning exactly `axes`."""
        return _by_kind([c for c in self.items if c.axes == axes], "step")


def _by_kind(items: list[Collective], where: str, field: str = "count") -> dict[str, int]:
    out = dict.fromkeys(KINDS, 0)
    for c in items:
        if c.where == where:
            out[c.kind] += 1 if field == "count" else c.bytes
    return out


def decode_collectives(hlo_text: str,
                       mesh_axes: Mapping[str, int] | None = None) -> DecodeCollectives:
    """Count the collectives of one iteration of the decode loop in `hlo_text`.

    The decode loop is the largest `while` reachable from ENTRY. A program with no loop
    (decode_steps=1 runs the mixed step instead) counts the whole program as one step.
    `mesh_axes` (axis name -> size, in device order) names the axes each one spans.
    """
    mesh_axes = dict(mesh_axes or {})
    mod = HloModule.parse(hlo_text)
    loops = mod.find_loops()
    items: list[Collective] = []
    if loops:
        loop = max(loops, key=lambda i: mod.size(dict(i.called()).get("body", "")))
        calls = dict(loop.called())
        items += _walk(mod, calls["body"], "step", None, mesh_axes)
        items += _walk(mod, calls.get("condition", ""), "step", None, mesh_axes)
        items += _walk(mod, mod.entry, "per_call", loop.name, mesh_axes)
    else:
        items += _walk(mod, mod.entry, "step", None, mesh_axes)
    return DecodeCollectives(
        per_step=_by_kind(items, "step"),
        bytes_per_step=_by_kind(items, "step", "bytes"),
        conditional=_by_kind(items, "conditional"),
        nested_loop=_by_kind(items, "nested_loop"),
        per_call=_by_kind(items, "per_call"),
        items=items,
    )


def megatron_min_all_reduces(num_layers: int, tensor: int) -> int:
    """Megatron-LM's minimum for a dense decoder on `tensor` shards: one all-reduce after
    the row-parallel attention output projection and one after the MLP down projection,
    per layer (none without tensor parallelism)."""
    return 2 * num_layers if tensor > 1 else 0


def program_collectives(hlo_text: str, mesh_axes: Mapping[str, int] | None = None
                        ) -> tuple[dict[str, int], dict[str, int]]:
    """(count, bytes) by kind of every collective one run of the program executes once
    or more, loops and branches included: for the mixed (prefill) step, whose only loops
    are the attention's, each collective runs once per call."""
    mesh_axes = dict(mesh_axes or {})
    mod = HloModule.parse(hlo_text)
    items = list(_walk(mod, mod.entry, "per_call", None, mesh_axes))
    return _by_kind(items, "per_call"), _by_kind(items, "per_call", "bytes")
