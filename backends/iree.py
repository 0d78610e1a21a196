"""Lower for IREE, an MLIR compiler: an ONNX model its importer reads and ``iree-compile``
builds for llvm-cpu, and the check that the compiled module computes what ONNX Runtime does.

1. ``lower-iree`` rewrites the source's float export like ``lower-onnx``'s export route, with
   standard ops on byte tensors only (``onnx_formats`` step 8): IREE miscompiles int4 tensors
   and cannot legalize a blocked ``DequantizeLinear``, and reads no ORT contrib ops
   (MatMulNBits, GroupQueryAttention), so codes are packed in uint8 and dequantized with
   ``Cast``/``Sub``/``Mul``. The file also runs in ONNX Runtime, with the same weights.
2. ``check`` imports the artifact's ONNX model to MLIR (``iree.compiler.tools.import_onnx``),
   compiles it for llvm-cpu, runs it in IREE's runtime on seeded token ids, compares the first
   output with ONNX Runtime's on the same file (float32 compute), and keeps the compiled module
   as ``model.vmfb``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lwqc.backends.onnx_formats import LoweringError
from lwqc.backends.onnx_rewrite import lower, session
from lwqc.ir.capabilities import PACKED_STORAGE, Capabilities
from lwqc.ir.errors import LwqcError
from lwqc.ir.graph import Graph
from lwqc.passes.base import Pass, PassContext, PassKind

IREE_PACKAGES = ("iree.compiler", "iree.runtime")
COMPILE_FLAGS = ("--iree-llvmcpu-target-cpu=host", "--iree-input-demote-i64-to-i32=false")
ID_RANGE = 100  # token ids of the check: below any real vocabulary's size
CAPABILITIES = Capabilities(backend="iree", widths=PACKED_STORAGE.widths,
                            containers=PACKED_STORAGE.containers)


class LowerIreePass(Pass):
    """Write the ONNX model IREE reads (the float export, weights from byte tensors).

    Every quantized site's weight is rebuilt by standard ops on byte tensors."""

    name = "lower-iree"
    kind = PassKind.TRANSFORM
    requires = ("packed",)
    provides = ("lowered.onnx",)
    capabilities = CAPABILITIES
    options = {}

    def run(self, graph: Graph, context: PassContext) -> None:
        if graph.source.decoder_files():
            raise LoweringError("the GenAI builder's decoder uses ONNX Runtime's contrib ops, "
                                "which IREE does not read; give --backend iree torch's export "
                                "or the transformers model")
        model = lower(graph, graph.source.float_onnx(), bytes_only=True,
                      capabilities=CAPABILITIES)
        foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes()
                          if n.domain not in ("", "ai.onnx")})
        if foreign:
            raise LoweringError(f"IREE reads standard ONNX ops; the model uses {foreign[0]}")
        graph.lowered["onnx"] = model


@dataclasses.dataclass
class IreeCheck:
    """IREE's output against ONNX Runtime's on the same ONNX file."""

    max_abs_diff: float
    max_abs_output: float
    tokens: int
    import_s: float
    compile_s: float
    vmfb_bytes: int


def _require_iree() -> None:
    missing = [name for name in IREE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise LwqcError(f"checking with IREE needs {', '.join(missing)}: "
                        "pip install 'lwqc[iree]'")


def _compile(model_path: Path) -> tuple[bytes, float, float]:
    """The llvm-cpu module of an ONNX file, with import and compile seconds."""
    import iree.compiler

    with tempfile.TemporaryDirectory(prefix="lwqc-iree-") as scratch:
        mlir = Path(scratch) / "model.mlir"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "iree.compiler.tools.import_onnx",
                               str(model_path), "-o", str(mlir)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise LwqcError(f"IREE's ONNX importer rejected {model_path}: {last[0][:200]}")
        imported = time.perf_counter()
        try:
            module = iree.compiler.compile_file(str(mlir), target_backends=["llvm-cpu"],
                                                extra_args=list(COMPILE_FLAGS))
        except iree.compiler.CompilerToolError as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise LwqcError(f"iree-compile cannot build {model_path}: {first}") from None
        return module, imported - start, time.perf_counter() - imported


def _run_iree(module: bytes, function: str, feeds: list[np.ndarray]) -> np.ndarray:
    import iree.runtime as rt

    config = rt.Config("local-task")
    context = rt.SystemContext(config=config)
    context.add_vm_module(rt.VmModule.copy_buffer(config.vm_instance, module))
    result = getattr(context.modules.module, function)(*feeds)
    first = result[0] if isinstance(result, (list, tuple)) else result
    return np.asarray(first.to_host())


def check(model_path: Path, tokens: int = 64) -> IreeCheck:
    """Compile an artifact's ``model.onnx`` (written by ``lower-iree``) with IREE, run it and
    ONNX Runtime on the same ids, and write the module beside it (``model.vmfb``)."""
    _require_iree()
    if not model_path.exists():
        raise LwqcError(f"{model_path.parent} holds no {model_path.name}; compile it with "
                        "--backend iree first")
    if tokens < 1:
        raise LwqcError("--tokens must be at least 1")
    model = ir.load(model_path)
    if LowerIreePass.name not in model.metadata_props.get("lwqc.pipeline", ""):
        raise LwqcError(f"{model_path} was not lowered for IREE (its codes and ops are ONNX "
                        "Runtime's); compile it with --backend iree")
    ids = np.random.default_rng(0).integers(0, ID_RANGE, (1, tokens)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "token_type_ids": np.zeros_like(ids)}
    names = [value.name for value in model.graph.inputs]
    unknown = [name for name in names if name not in feeds]
    if unknown:
        raise LwqcError(f"{model_path} takes {unknown[0]}; the check feeds "
                        f"{', '.join(feeds)} only")
    module, import_s, compile_s = _compile(model_path)
    expected = session(model_path).run(None, {name: feeds[name] for name in names})[0]
    got = _run_iree(module, model.graph.name or "main_graph", [feeds[name] for name in names])
    vmfb = model_path.with_suffix(".vmfb")
    staging = vmfb.with_name(f".{vmfb.name}.tmp")
    staging.write_bytes(module)
    os.replace(staging, vmfb)
    return IreeCheck(max_abs_diff=float(np.abs(got.reshape(expected.shape) - expected).max()),
                     max_abs_output=float(np.abs(expected).max()), tokens=tokens,
                     import_s=import_s, compile_s=compile_s, vmfb_bytes=len(module))
