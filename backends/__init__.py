"""Backends lower packed weights to ONNX Runtime, IREE or eager torch. ``PASSES`` lists
their lowering passes."""

from lwqc.backends.iree import LowerIreePass
from lwqc.backends.onnxruntime import LowerOnnxPass
from lwqc.backends.torch_eager import LowerTorchPass
from lwqc.passes.base import Pass

__all__ = ["PASSES"]

PASSES: tuple[type[Pass], ...] = (LowerOnnxPass, LowerIreePass, LowerTorchPass)
