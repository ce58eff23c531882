"""The products (``dot`` instructions) of a compiled XLA module's text: their operands' dtypes (:func:`products`)
and, for batched ones, their canonical (batch, m, k, n) sizes (:func:`batched_products`).

No side effects on import: ``profile_step.py``, ``cell_products.py`` and the tests that guard XLA:CPU's choice of
GEMM read it.
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass

NAME = r"[\w.\-]+"
DEFINITION = re.compile(rf"%?(?P<name>{NAME})(?: = |: )(?P<dtype>[a-z]+\d*)\[")  # instruction or parameter
DOT = re.compile(rf"^\s*(?:ROOT )?%(?P<name>{NAME}) = (?P<shape>\S+) dot\(%(?P<lhs>{NAME}), %(?P<rhs>{NAME})\)")
SOURCE = re.compile(rf'^\s*(?:ROOT )?%(?P<name>{NAME}) = [^\n]*op_name="(?P<op_name>[^"]*)"', re.MULTILINE)
CONTRACTED = re.compile(r"(?P<side>lhs|rhs)_contracting_dims=\{(?P<dims>[\d,]*)\}")
FUSED_COMPUTATION_PREFIXES = ("%fused_computation", "%wrapped_")


@dataclass(frozen=True)
class Product:
    """One ``dot``: its result shape, operands (name → dtype), contracted axes per side, whether it sits inside a
    fused computation (a YNNPACK/XNNPACK fusion) or stands alone (XLA hands it to Eigen), and whether XLA
    upcast it: an operand converted to float32 by an instruction that XLA attributes to the product itself
    (a conversion the program asked for carries its own ``convert_element_type`` source instead)."""

    name: str
    shape: str
    operands: dict[str, str]
    contracted: dict[str, str]
    fused: bool
    upcast: bool


def products(hlo_text: str) -> list[Product]:
    """Every ``dot`` in ``Compiled.as_text()`` output, in order."""
    dtypes = {m["name"]: m["dtype"] for m in DEFINITION.finditer(hlo_text)}
    sources = {m["name"]: m["op_name"] for m in SOURCE.finditer(hlo_text)}
    found, fused = [], False
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():  # a computation's header or closing brace
            fused = line.startswith(FUSED_COMPUTATION_PREFIXES)
            continue
        match = DOT.match(line)
        if match:
            operands = {name: dtypes.get(name, "?") for name in (match["lhs"], match["rhs"])}
            contracted = {m["side"]: m["dims"] for m in CONTRACTED.finditer(line)}
            upcast = any(
                dtype == "f32" and "convert" in name and sources.get(name, "").endswith("dot_general")
                for name, dtype in operands.items()
            )
            found.append(Product(match["name"], match["shape"], operands, contracted, fused, upcast))
    return found


BATCHED_SHAPE = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = [a-z]+\d*\[(?P<dims>[\d,]*)\]")
OPERANDS = re.compile(r"dot\(%(?P<lhs>[\w.\-]+), %(?P<rhs>[\w.\-]+)\)")
DOT_DIMS = re.compile(r"(?P<key>(?:lhs|rhs)_(?:batch|contracting)_dims)=\{(?P<dims>[\d,]*)\}")


def batched_products(hlo_text: str) -> collections.Counter:
    """{(batch, m, k, n): occurrences} of the products with batch dimensions in a compiled module's text."""
    shapes = {}
    for line in hlo_text.splitlines():
        match = BATCHED_SHAPE.match(line)
        if match:
            shapes[match["name"]] = [int(d) for d in match["dims"].split(",") if d]
    found: collections.Counter = collections.Counter()
    for line in hlo_text.splitlines():
        dot = OPERANDS.search(line)
        if not dot or " dot(" not in line:
            continue
        dims = {m["key"]: [int(d) for d in m["dims"].split(",") if d] for m in DOT_DIMS.finditer(line)}
        if not dims.get("lhs_batch_dims"):
            continue
        lhs, rhs = shapes[dot["lhs"]], shapes[dot["rhs"]]
        batch = _size(lhs, dims["lhs_batch_dims"])
        k = _size(lhs, dims["lhs_contracting_dims"])
        m = _size(lhs, _free_axes(len(lhs), dims["lhs_batch_dims"] + dims["lhs_contracting_dims"]))
        n = _size(rhs, _free_axes(len(rhs), dims["rhs_batch_dims"] + dims["rhs_contracting_dims"]))
        found[(batch, m, k, n)] += 1
    return found


def _size(shape: list[int], axes: list[int]) -> int:
    return math.prod(shape[a] for a in axes)


def _free_axes(rank: int, used: list[int]) -> list[int]:
    return [a for a in range(rank) if a not in used]
