"""Lower to eager torch: a copy of the model whose site linears dequantize PackedWeights.

The module holds the very arrays the ONNX artifact holds, and dequantizes them with the same
formula as ``DequantizeLinear``: ``(code - zero_point) * scale`` in float32.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from lwqc.ir.graph import Graph
from lwqc.ir.packed import PackedWeight
from lwqc.passes.base import Pass, PassContext, PassKind, register


class PackedLinear(torch.nn.Module):
    """``y = x W^T + b`` with W dequantized from codes, group scales and zero points."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.group_size = packed.group_size
        self.in_features = packed.shape[1]
        self.register_buffer("codes", torch.from_numpy(packed.codes.astype("int16")))
        self.register_buffer("scales", torch.from_numpy(packed.scales.copy()))
        zeros = packed.zero_points
        self.register_buffer(
            "zero_points", None if zeros is None else torch.from_numpy(zeros.astype("int16"))
        )
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), False)

    def _expand(self, per_group: torch.Tensor) -> torch.Tensor:
        expanded = per_group.repeat_interleave(self.group_size, dim=1)
        return expanded[:, : self.in_features]

    def dequantized_weight(self) -> torch.Tensor:
        codes = self.codes.to(torch.int32)
        if self.zero_points is not None:
            codes = codes - self._expand(self.zero_points).to(torch.int32)
        return codes.to(torch.float32) * self._expand(self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)


def build(module: torch.nn.Module, packed: dict[str, PackedWeight]) -> torch.nn.Module:
    """A deep copy of ``module`` with every packed site replaced by a ``PackedLinear``."""
    quantized = copy.deepcopy(module).eval()
    for site_id, weights in packed.items():
        parent_name, _, child = site_id.rpartition(".")
        parent = quantized.get_submodule(parent_name) if parent_name else quantized
        bias = getattr(getattr(parent, child), "bias", None)
        setattr(parent, child, PackedLinear(weights, bias))
    return quantized


@register
class LowerTorchPass(Pass):
    """Build the eager torch module that dequantizes the packed weights in forward."""

    name = "lower-torch"
    kind = PassKind.TRANSFORM
    requires = ("packed",)
    provides = ("lowered.torch",)

    def run(self, graph: Graph, context: PassContext) -> None:
        graph.lowered["torch"] = build(graph.source.module, graph.packed)
