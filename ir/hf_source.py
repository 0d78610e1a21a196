"""The ModelSource of a model loaded through transformers (HF directory, hub id, GGUF file).

``trace`` exports the loaded module with torch.export and hashes its weights; ``build_graph``
lifts the IR from the trace. The source answers weights, tokenization, a runner with taps,
weight substitution, and the float ONNX graph (the dynamo export of the same trace).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir
import torch

from lwqc.ir.errors import ModelLoadError, NonFiniteWeightError
from lwqc.ir.fx_lift import example_inputs, export, lift
from lwqc.ir.graph import Graph
from lwqc.ir.hf_load import LoadedModel, load_model, weights_sha256
from lwqc.ir.onnx_source import fold_weight_transposes
from lwqc.ir.source import ENCODER, Tap

ONNX_OPSET = 21


@dataclasses.dataclass
class HFSource:
    """A loaded transformers module, its exported program and the site layouts."""

    loaded: LoadedModel
    exported: torch.export.ExportedProgram
    weights_sha256: str
    layouts: dict[str, tuple[str, bool]] = dataclasses.field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    @property
    def kind(self) -> str:
        return self.loaded.kind

    @property
    def module(self) -> torch.nn.Module:
        return self.loaded.module

    def weight(self, site_id: str) -> np.ndarray:
        name, transposed = self.layouts[site_id]
        tensor = self.module.get_parameter(name).detach().to(torch.float32).numpy()
        return tensor.T if transposed else tensor

    def tokenize(self, text: str) -> np.ndarray:
        return self.loaded.tokenize(text)

    def tokenizer(self) -> Any:
        return self.loaded.tokenizer()

    def _inputs(self, input_ids: np.ndarray) -> dict[str, Any]:
        """The module's keyword inputs for ``[batch, seq]`` ids (no KV cache)."""
        ids = torch.from_numpy(np.asarray(input_ids, np.int64))
        if self.kind == ENCODER:
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return {"input_ids": ids, "use_cache": False}

    def run(self, input_ids: np.ndarray, taps: dict[str, Tap] | None = None) -> torch.Tensor:
        """Run the float model on ``input_ids`` ``[batch, seq]``; returns its first output.

        A tap on a block or a site (a module name) receives the module's first tensor input
        and first tensor output, as float32 tensors.
        """
        inputs = self._inputs(input_ids)
        handles = []
        for name, callback in (taps or {}).items():
            handles.append(self.module.get_submodule(name).register_forward_hook(
                _hook(callback), with_kwargs=True))
        try:
            with torch.no_grad():
                return self.module(**inputs)[0]
        finally:
            for handle in handles:
                handle.remove()

    def output_fisher(self, input_ids: np.ndarray, site_ids: list[str],
                      seed: int) -> dict[str, np.ndarray]:
        """Per output channel of each site, the sum over the batch's tokens of the squared
        gradient of a sampled loss with respect to the site's output (float64 ``[out]``; zeros
        for a site the output does not depend on).

        Causal LMs: the log-likelihood of next tokens drawn from the model's own prediction
        (torch ``Generator`` seeded with ``seed``), whose squared gradients estimate the Fisher
        information of the output distribution: the curvature of KL(float || perturbed).
        Encoders: the output contracted with standard normal noise, whose squared gradients
        estimate the Gauss-Newton curvature of the squared output error.
        """
        inputs = self._inputs(input_ids)
        sums: dict[str, torch.Tensor] = {}

        def keep(site_id: str) -> Callable:
            def hook(module, args, output):
                def accumulate(grad: torch.Tensor) -> None:
                    squares = grad.double().square().reshape(-1, grad.shape[-1]).sum(dim=0)
                    sums[site_id] = sums.get(site_id, 0) + squares
                tensor = _first_tensor(output)
                if tensor.requires_grad:  # else no gradient reaches it: zeros below
                    tensor.register_hook(accumulate)
            return hook

        def differentiable(module, args, output):
            return output.detach().requires_grad_()

        embeddings = self.module.get_input_embeddings()
        handles = [embeddings.register_forward_hook(differentiable)]
        handles += [self.module.get_submodule(s).register_forward_hook(keep(s))
                    for s in site_ids]
        trained = {p: p.requires_grad for p in self.module.parameters()}
        generator = torch.Generator().manual_seed(seed)
        try:  # gradients flow from the embeddings' output; no parameter keeps one
            for parameter in trained:
                parameter.requires_grad_(False)
            with torch.enable_grad():
                output = self.module(**inputs)[0].float()
                if self.kind == ENCODER:
                    noise = torch.randn(output.shape, generator=generator)
                    loss = (output * noise).sum()
                else:
                    logits = output.reshape(-1, output.shape[-1])
                    labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1,
                                               generator=generator)[:, 0]
                    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
                loss.backward()
        finally:
            for handle in handles:
                handle.remove()
            for parameter, required in trained.items():
                parameter.requires_grad_(required)
        # a site the output does not depend on (an encoder's pooler) has no gradient: zeros
        return {s: sums[s].numpy() if s in sums else np.zeros(self.weight(s).shape[0])
                for s in site_ids}

    @contextlib.contextmanager
    def substituted(self, weights: dict[str, np.ndarray]) -> Iterator[None]:
        """Temporarily replace site weights (``[out, in]`` arrays) in the float module."""
        saved = {}
        for site_id, weight in weights.items():
            name, transposed = self.layouts[site_id]
            param = self.module.get_parameter(name)
            saved[name] = param.detach().clone()
            value = torch.from_numpy(np.ascontiguousarray(weight.T if transposed else weight))
            param.data.copy_(value)
        try:
            yield
        finally:
            for name, value in saved.items():
                self.module.get_parameter(name).data.copy_(value)

    def float_onnx(self) -> onnx_ir.Model:
        """The float model as ONNX (dynamic batch and sequence), from the same trace; weight
        transposes the exporter left unfolded are folded."""
        inputs = example_inputs(self.kind, self.module.config.vocab_size)
        tensors = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
        with torch.no_grad():
            outputs = self.module(**inputs)
        names = [k for k, v in outputs.items() if torch.is_tensor(v)]
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                self.exported, (), kwargs=tensors, dynamo=True, opset_version=ONNX_OPSET,
                input_names=list(tensors), output_names=names, verbose=False,
            )
        fold_weight_transposes(program.model.graph)
        return program.model

    def eager_module(self) -> torch.nn.Module:
        return self.module

    def transformers_directory(self, scratch: Path) -> Path:
        """A transformers directory of the float model (config, weights and, when the model
        has one, its tokenizer's files): the model's own when it was loaded from one, else
        written into ``scratch``."""
        own = Path(self.model_id)
        if not self.loaded.gguf and (own / "config.json").is_file():
            return own
        self.module.save_pretrained(scratch)
        with contextlib.suppress(ModelLoadError):
            self.tokenizer().save_pretrained(scratch)
        return scratch


    def decoder_files(self) -> dict[str, bytes]:
        return {}


def _first_tensor(value: Any) -> torch.Tensor:
    if torch.is_tensor(value):
        return value
    return next(v for v in value if torch.is_tensor(v))


def _hook(callback: Callable) -> Callable:
    def hook(module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs.get("hidden_states")
        callback(_first_tensor(hidden_in).float(), _first_tensor(output).float())

    return hook


def trace(loaded: LoadedModel) -> HFSource:
    """Export a loaded module and hash its weights."""
    return HFSource(loaded=loaded, exported=export(loaded.module, loaded.kind),
                    weights_sha256=weights_sha256(loaded.module))


def build_graph(source: HFSource) -> Graph:
    """The IR of a traced source; refuses NaN/Inf weights."""
    lifted = lift(source.module, source.exported, source.model_id)
    source.layouts.update(lifted.layouts)
    for site_id in lifted.sites:
        weight = source.weight(site_id)
        bad = int(weight.size - np.count_nonzero(np.isfinite(weight)))
        if bad:
            raise NonFiniteWeightError(
                f"weight of {site_id} holds {bad} NaN/Inf values: the checkpoint is corrupt; "
                "re-export or re-download it"
            )
    return Graph(
        model_id=source.model_id,
        architecture=type(source.module).__name__,
        sites=lifted.sites,
        blocks=lifted.blocks,
        dataflow=lifted.dataflow,
        keep_bits=32,
        weights_sha256=source.weights_sha256,
        excluded=lifted.excluded,
        source=source,
    )


def import_model(model: str, trust_remote_code: bool = False) -> Graph:
    """Load, trace and lift ``model`` (HF directory, hub id or GGUF file) into the IR."""
    return build_graph(trace(load_model(model, trust_remote_code)))
