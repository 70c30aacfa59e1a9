"""What an optimised XLA program says: its instructions, the kernels and collectives of a step, the
bytes its kernels read and write, and the convolutions and products left in float32.
"""

import collections
import dataclasses
import math
import re
from typing import Any

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    result: str  # its type, e.g. 'bf16[128,54,54,96]{3,2,1,0}'
    opcode: str
    operands: tuple[str, ...]  # names
    attributes: str
    computation: str


def _array_bytes(text: str) -> int:
    return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(text))


def _split_operands(rest: str) -> tuple[str, str]:
    """The text inside an instruction's parentheses, and what follows them."""
    depth = 1
    for index, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return rest[:index], rest[index + 1:]
    return rest, ""


def parse_hlo(hlo_text: str) -> list[Instruction]:
    """Every instruction of an HLO module's text, with the computation it is in ('ENTRY' for the entry)."""
    instructions, computation = [], ""
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and "{" in line:
            computation = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
            continue
        match = _INSTRUCTION.match(line)
        if match:
            name, result, opcode, rest = match.groups()
            operands, attributes = _split_operands(rest)
            instructions.append(Instruction(name, result, opcode, tuple(re.findall(r"%([\w.\-]+)", operands)),
                                            attributes, computation))
    return instructions


def program_facts(hlo_text: str) -> dict[str, Any]:
    """Kernels (by kind), collectives (count and bytes) and the bytes that the kernels read and write,
    in the ENTRY computation of an optimised per-device HLO module."""
    instructions = parse_hlo(hlo_text)
    types = {instruction.name: instruction.result for instruction in instructions}
    kernels = dict.fromkeys(("cudnn", "gemm_fusions", "cublas", "other_fusions", "copies", "transposes",
                             "collectives", "other"), 0)
    collectives: dict[str, dict[str, int]] = {}
    cudnn_calls, moved = [], 0
    for instruction in instructions:
        opcode = instruction.opcode
        if instruction.computation != "ENTRY" or opcode in _FREE or opcode.endswith("-done"):
            continue
        moved += _array_bytes(instruction.result) + sum(_array_bytes(types.get(name, "")) for name in instruction.operands)
        base = opcode.removesuffix("-start")
        if base in COLLECTIVES:
            kernels["collectives"] += 1
            entry = collectives.setdefault(base, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += _array_bytes(instruction.result)
        elif opcode == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', instruction.attributes)
            target = target.group(1) if target else ""
            kind = "cudnn" if target.startswith("__cudnn") else "cublas" if target.startswith("__cublas") else "other"
            kernels[kind] += 1
            if kind == "cudnn":
                window = re.search(r"window=\{size=([\dx]+)", instruction.attributes)
                activation = re.search(r'"activation_mode":"k(\w+)"', instruction.attributes)
                cudnn_calls.append({"target": target, "window": window.group(1) if window else "",
                                    "activation": activation.group(1) if activation else "",
                                    "operands": [_ARRAY.search(types.get(name, "")).group(0)
                                                 for name in instruction.operands if _ARRAY.search(types.get(name, ""))],
                                    "op_name": _op_name(instruction)})
        elif opcode == "fusion":
            gemm = "kind=kCustom" in instruction.attributes and re.search("gemm|triton", instruction.attributes)
            kernels["gemm_fusions" if gemm else "other_fusions"] += 1
        elif opcode == "copy":
            kernels["copies"] += 1
        elif opcode == "transpose":
            kernels["transposes"] += 1
        else:
            kernels["other"] += 1
    kernels["total"] = sum(kernels.values())
    return {"kernels": kernels, "collectives": collectives, "bytes_moved": moved, "cudnn_calls": cudnn_calls,
            "opcodes": dict(collections.Counter(instruction.opcode for instruction in instructions)),
            "entry_parameters": {instruction.name: instruction.result for instruction in instructions
                                 if instruction.computation == "ENTRY" and instruction.opcode == "parameter"}}


def _op_name(instruction: Instruction) -> str:
    """The JAX code an instruction came from, as its metadata names it."""
    origin = re.search(r'op_name="([^"]+)"', instruction.attributes)
    return origin.group(1) if origin else ""


def f32_compute(hlo_text: str) -> list[str]:
    """The convolutions and matrix products of the module (in any computation, fusions included)
    with a float32 operand, each as 'name (op_name of the JAX code that made it)'."""
    instructions = parse_hlo(hlo_text)
    types = {instruction.name: instruction.result for instruction in instructions}
    found = []
    for instruction in instructions:
        computes = instruction.opcode in ("dot", "convolution") or (
            instruction.opcode == "custom-call" and re.search(r'custom_call_target="__(cudnn|cublas)', instruction.attributes))
        if computes and any(types.get(name, "").startswith("f32[") for name in instruction.operands):
            found.append(f"{instruction.name} ({_op_name(instruction) or 'no op_name'})")
    return found
