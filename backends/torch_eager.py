"""Lower to eager torch: a copy of the model whose site linears dequantize packed weights.

The module holds the very arrays the ONNX artifact holds and dequantizes them with the
format's own formula (``WeightFormat.dequantize_tensors``). ``packed.safetensors`` stores the
same arrays (``<site>.<array>``) with each site's spec in the file's metadata.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lwqc.backends import matmul_nbits
from lwqc.ir.capabilities import PACKED_STORAGE, Capabilities
from lwqc.ir.errors import LwqcError
from lwqc.ir.formats import FORMATS, WeightFormat, format_class, load_weight
from lwqc.ir.graph import Graph
from lwqc.ir.spec import spec_from_json
from lwqc.passes.base import Pass, PassContext, PassKind

# Sizes are those of the ONNX artifact the plan describes (MatMulNBits' padded blocks
# included); the eager module and packed.safetensors hold codes unpacked, one byte each.
CAPABILITIES = Capabilities(
    backend="torch",
    widths={name: w for name, w in PACKED_STORAGE.widths.items() if name in FORMATS},
    containers=PACKED_STORAGE.containers,
    layout_bytes=matmul_nbits.layout_bytes,
)
SPECS_KEY = "lwqc.specs"


# a site's array names: the format's own, or ``p<k>.<name>`` for part k of a row-mix
ARRAY_NAME = re.compile(r"(p[0-9]+\.)?[^.]+")


def buffer_name(array: str) -> str:
    """The buffer holding a format's array (buffer names hold no dots)."""
    return array.replace(".", "_")


class PackedLinear(torch.nn.Module):
    """``y = x W^T + b`` with W dequantized from a weight format's arrays in forward."""

    def __init__(self, weight: WeightFormat, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.spec = weight.spec
        self.names = tuple(weight.arrays())
        for name, array in weight.arrays().items():
            self.register_buffer(buffer_name(name),
                                 torch.from_numpy(np.ascontiguousarray(array).copy()))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), False)

    def dequantized_weight(self) -> torch.Tensor:
        tensors = {name: getattr(self, buffer_name(name)) for name in self.names}
        return format_class(self.spec).dequantize_tensors(self.spec, tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)


def build(module: torch.nn.Module, packed: dict[str, WeightFormat]) -> torch.nn.Module:
    """A deep copy of ``module`` with every packed site replaced by a ``PackedLinear``; a
    table tied to a site's weight (the embedding of a tied head) holds the same dequantized
    weight."""
    quantized = copy.deepcopy(module).eval()
    for site_id, weight in packed.items():
        parent_name, _, child = site_id.rpartition(".")
        try:
            parent = quantized.get_submodule(parent_name) if parent_name else quantized
            original = getattr(parent, child)
        except AttributeError:
            raise LwqcError(f"the model has no linear {site_id}: the artifact was compiled for "
                            "another model; recompile") from None
        linear = PackedLinear(weight, getattr(original, "bias", None))
        shared = [p for name, p in quantized.named_parameters(remove_duplicate=False)
                  if p is original.weight and not name.startswith(f"{site_id}.")]
        setattr(parent, child, linear)
        if shared:
            with torch.no_grad():
                shared[0].copy_(linear.dequantized_weight())
    return quantized


def save_packed(packed: dict[str, WeightFormat], path: Path) -> None:
    """Write every site's arrays and spec to ``path`` (safetensors)."""
    from safetensors.numpy import save_file

    tensors = {f"{site_id}.{name}": np.ascontiguousarray(array)
               for site_id in sorted(packed) for name, array in packed[site_id].arrays().items()}
    specs = {s: packed[s].spec.to_json() for s in sorted(packed)}
    save_file(tensors, str(path), metadata={SPECS_KEY: json.dumps(specs)})


def read_packed(path: Path, expected: set[str]) -> dict[str, WeightFormat]:
    """The weights of ``save_packed``; specs come from the file's own metadata, not from the
    (editable) plan. Every site in ``expected`` must be there."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        specs = json.loads((handle.metadata() or {}).get(SPECS_KEY, "{}"))
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    packed = {}
    for site_id, entry in specs.items():
        prefix = f"{site_id}."
        arrays = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)
                  and ARRAY_NAME.fullmatch(k.removeprefix(prefix))}
        packed[site_id] = load_weight(spec_from_json(entry), arrays)
    missing = sorted(expected - set(packed))
    if missing:
        raise LwqcError(f"{path} holds no weight for site {missing[0]}: the artifact does not "
                        "match its plan; recompile")
    return packed


class LowerTorchPass(Pass):
    """Build the eager torch module that dequantizes the packed weights in forward."""

    name = "lower-torch"
    kind = PassKind.TRANSFORM
    requires = ("packed",)
    provides = ("lowered.torch",)
    capabilities = CAPABILITIES

    def run(self, graph: Graph, context: PassContext) -> None:
        graph.lowered["torch"] = build(graph.source.eager_module(), graph.packed)
