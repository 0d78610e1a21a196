"""What passes and backends may ask of a model: the ``ModelSource`` protocol.

Every frontend (an HF directory or hub id, a GGUF file, an ONNX file) implements it;
nothing in lwqc reaches into a frontend's own objects.
1. ``weight(site_id)``: the float weight of a site, ``[out, in]`` float32.
2. ``tokenize(text)``: token ids with the model's own tokenizer (calibration, evaluation);
   ``tokenizer()``: that tokenizer itself (batches with padding, chat templates).
3. ``run(input_ids, taps)``: the float model's first output on ``[batch, seq]`` ids; ``taps``
   maps a block's module name or a site id to ``callback(input, output)``, called with that
   block's residual-stream input and output, or that site's input activation and output.
4. ``substituted(weights)``: a context in which ``run`` uses other site weights.
   ``output_fisher(input_ids, site_ids, seed)``: per output channel of each site, the summed
   squared gradients of a loss sampled from the model's own output (None where the source
   gives no gradients).
5. ``float_onnx()`` / ``eager_module()``: the float graphs the lowerings start from;
   ``transformers_directory(scratch)``: the float model as a transformers directory (its own,
   or one written into ``scratch``), for tools that read one (the GenAI model builder);
   ``decoder_files()``: when the float ONNX graph is a KV-cache decoder already (an ONNX file
   the GenAI builder wrote), its ``genai_config.json`` and tokenizer files, else nothing.
   Each site's node in ``float_onnx()`` names its site: ``lwqc.site`` metadata, or torch's
   ``pkg.torch.onnx.name_scopes`` holding the site id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    import onnx_ir

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"

Tap = Callable[[torch.Tensor, torch.Tensor], None]


class ModelSource(Protocol):
    model_id: str
    kind: str  # CAUSAL_LM or ENCODER
    weights_sha256: str

    def weight(self, site_id: str) -> np.ndarray: ...

    def tokenize(self, text: str) -> np.ndarray: ...

    def tokenizer(self) -> Any: ...

    def run(self, input_ids: np.ndarray, taps: dict[str, Tap] | None = None) -> torch.Tensor: ...

    def substituted(
        self, weights: dict[str, np.ndarray]
    ) -> contextlib.AbstractContextManager[None]: ...

    def output_fisher(self, input_ids: np.ndarray, site_ids: list[str],
                      seed: int) -> dict[str, np.ndarray] | None: ...

    def float_onnx(self) -> onnx_ir.Model: ...

    def eager_module(self) -> torch.nn.Module: ...

    def transformers_directory(self, scratch: Path) -> Path: ...

    def decoder_files(self) -> dict[str, bytes]: ...
