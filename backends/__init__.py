"""Backends lower packed weights to ONNX Runtime or eager torch. Importing registers them."""

from lwqc.backends import onnxruntime, torch_eager  # noqa: F401  (modules register passes)
