"""Sensitivity of each matmul to each candidate width, at matmul granularity.

1. ``metric=output-error`` (from the ``gram`` pass): with G = sum over calibration tokens of
   x x^T for the site's input x, the relative output error of width b is
   ||(W - Q_b(W)) X||^2 / ||W X||^2 = tr(dW G dW^T) / tr(W G W^T).
2. ``metric=delta-kl`` (expensive): quantize only that site to width b and measure the mean
   KL(float || quantized) of the next-token distribution over the calibration tokens
   (encoders: mean 1 - cosine of the last hidden states). Results are cached on disk per
   weights hash, calibration windows and quantizer settings, so sweeps do not recompute.
   With the driver's task pool (``--executor ray``) each (site, width) is one task on a
   worker holding the float model (``DamageWorker``); the numbers are the same.
3. ``metric=kl-scaled`` (one measurement per site): the output errors of 1., each site's
   scaled so that its 4-bit value equals that site's measured delta-KL of 2. at 4 bits. The
   output error ranks widths within a site; the measurement says how much a site's output
   error costs the whole model, which the relative output error alone does not (one cached
   measurement per site instead of four).
4. ``metric=fisher`` (one backward pass per calibration batch): the second-order estimate of
   the KL each width costs, 1/2 sum_i F_i (dW G dW^T)_ii / N^2, with F_i the sum over the N
   calibration tokens of the squared gradient of a loss sampled from the model's own output
   with respect to output channel i of the site (``ModelSource.output_fisher``: the diagonal
   Fisher information of the output distribution; encoders: Gauss-Newton of the output).
   Like kl-scaled it weighs each site's output error by what it costs the whole model, but
   without running the model once per site. Sources that give no gradients (ONNX files) fall
   back to output-error under ``metric=auto``; ``auto`` is fisher wherever gradients exist.
   The metric used is recorded in each annotation, with the quantizer (scheme and group
   size) it predicts for.
5. Block value = sum of its sites' values (errors are treated as additive).
Q_b is the quantize pass's own quantizer for the given scheme, group size and clip (by
default those the sensitivity policy plans for: ``SENSITIVITY_SCHEME``,
``SENSITIVITY_GROUP_SIZES``). With several group sizes (``group_size=32+64+128``) every width
is predicted at each of them, so the policy can trade scale storage for code width; measured
delta-KL measures every (width, group size), kl-scaled scales every group size's output error
by its one measurement (4 bits, the first group size).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lwqc.ir.annotations import Annotation
from lwqc.ir.errors import LwqcError, PipelineError
from lwqc.ir.graph import Graph
from lwqc.ir.source import CAUSAL_LM
from lwqc.ir.spec import QUANT_WIDTHS, SCHEMES, make_spec
from lwqc.passes.base import Option, Pass, PassContext, PassKind, choice, group_size_list
from lwqc.passes.quantizers import (
    CLIP_MODES,
    SENSITIVITY_GROUP_SIZES,
    SENSITIVITY_SCHEME,
    quantize_weight,
    quantizer_label,
)

WIDTHS = QUANT_WIDTHS
SCALED_AT = 4  # the width kl-scaled measures
BATCH = 4


@dataclasses.dataclass(frozen=True)
class SensitivityStat(Annotation):
    """Predicted damage of each width (lower = safer) at the first group size predicted for,
    and at each further one in ``coarser``; ``importance`` is the 4-bit damage at the first."""

    key = "sensitivity"
    metric: str
    quantizer: str  # the scheme and group sizes predicted for (``quantizer_label``)
    group_size: int  # the group size of err2 ... err8
    err2: float
    err3: float
    err4: float
    err8: float
    coarser: tuple[tuple[int, float, float, float, float], ...] = ()  # (group size, errors)

    @property
    def group_sizes(self) -> tuple[int, ...]:
        return (self.group_size, *(c[0] for c in self.coarser))

    def predicts(self, scheme: str, group_sizes: tuple[int, ...]) -> bool:
        """Whether the damage of ``scheme`` at each of ``group_sizes`` is predicted."""
        return (self.quantizer == quantizer_label(scheme, self.group_sizes)
                and set(group_sizes) <= set(self.group_sizes))

    def error(self, bits: int, group_size: int | None = None) -> float:
        """The damage of ``bits`` in groups of ``group_size`` (None: the first)."""
        if bits == 16:
            return 0.0
        if group_size is None or group_size == self.group_size:
            return getattr(self, f"err{bits}")
        for size, *errors in self.coarser:
            if size == group_size:
                return errors[WIDTHS.index(bits)]
        raise PipelineError(f"sensitivity predicted {self.quantizer}, not group size "
                            f"{group_size}")

    def importance(self) -> float:
        return self.err4


def relative_row_errors(weight: np.ndarray, approx: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """(dW G dW^T)_ii / tr(W G W^T) for each row i of dW = weight - approx: the rows' shares
    of the relative output error tr(dW G dW^T) / tr(W G W^T)."""
    delta = weight.astype(np.float64) - approx
    w = weight.astype(np.float64)
    reference = float(np.sum((w @ gram) * w))
    rows = np.sum((delta @ gram) * delta, axis=1)
    return rows / reference if reference > 0 else np.zeros_like(rows)


def cache_dir() -> Path:
    return Path(os.environ.get("LWQC_CACHE", Path.home() / ".cache" / "lwqc"))


class SensitivityPass(Pass):
    """Annotate every site and block with its damage at each width in ``WIDTHS``."""

    name = "sensitivity"
    kind = PassKind.ANALYSIS
    requires = ("calibration",)
    provides = ("site.sensitivity", "block.sensitivity")
    options = {
        "metric": Option(choice("auto", "fisher", "output-error", "delta-kl", "kl-scaled"),
                         "auto", "what is measured (auto: fisher where the source gives "
                         "gradients, else output-error)"),
        "group_size": Option(group_size_list, SENSITIVITY_GROUP_SIZES,
                             "quantizer group size(s), e.g. 32+64+128"),
        "scheme": Option(choice(*SCHEMES), SENSITIVITY_SCHEME, "quantizer scheme"),
        "clip": Option(choice(*CLIP_MODES), "mse", "quantizer range choice"),
    }

    def quantized(self, graph: Graph, site_id: str, bits: int,
                  group_size: int | None = None) -> np.ndarray:
        v = self.values
        spec = make_spec(bits, v["scheme"], group_size=group_size or v["group_size"][0])
        return quantize_weight(graph.weight(site_id), spec, v["clip"],
                               graph.grams.get(site_id)).dequantize()

    def run(self, graph: Graph, context: PassContext) -> None:
        metric = self.values["metric"]
        fisher = None
        if metric in ("auto", "fisher"):
            fisher = self._fisher(graph, context)
            if fisher is None and metric == "fisher":
                raise PipelineError("sensitivity{metric=fisher} needs the gradients of a torch "
                                    "model; an ONNX input gives none: use metric=output-error")
            metric = "output-error" if fisher is None else "fisher"
        sizes = self.values["group_size"]
        graph.row_damage = {}
        if fisher is not None:
            errors = self._fisher_errors(graph, context, fisher)
        elif metric == "output-error":
            errors = self._output_errors(graph, context)
        elif metric == "delta-kl":
            pairs = [(b, g) for g in sizes for b in WIDTHS]
            errors = {s: [e[i : i + len(WIDTHS)] for i in range(0, len(e), len(WIDTHS))]
                      for s, e in self._measured(graph, context, pairs).items()}
        else:
            measured = self._measured(graph, context, [(SCALED_AT, sizes[0])])
            errors = {}
            for site_id, per_size in self._output_errors(graph, context).items():
                at = per_size[0][WIDTHS.index(SCALED_AT)]
                scale = measured[site_id][0] / at if at > 0 else 0.0
                errors[site_id] = [[scale * e for e in per_width] for per_width in per_size]
                for rows in graph.row_damage[site_id].values():
                    rows *= scale
        quantizer = quantizer_label(self.values["scheme"], sizes)

        def stat(per_size: list[list[float]]) -> SensitivityStat:
            first, *further = per_size
            return SensitivityStat(self.name, metric, quantizer, sizes[0], *first,
                                   tuple((g, *e) for g, e in zip(sizes[1:], further,
                                                                 strict=True)))

        for site_id, per_size in errors.items():
            graph.annotate_site(site_id, stat(per_size))
        for block in graph.blocks:
            graph.annotate_block(block.index,
                                 stat(np.sum([errors[s] for s in block.sites], axis=0).tolist()))

    @property
    def measures(self) -> bool:
        """Whether the pass runs the model per site (delta-kl, kl-scaled)."""
        return self.values["metric"] in ("delta-kl", "kl-scaled")

    def required(self) -> tuple[str, ...]:
        if self.values["metric"] != "delta-kl" or self.values["clip"] == "output":
            return (*self.requires, "grams")
        return self.requires

    def _fisher(self, graph: Graph, context: PassContext) -> dict[str, np.ndarray] | None:
        """Per site, the output channels' summed squared gradients over the calibration
        windows (None: the source gives no gradients)."""
        windows = graph.calibration
        sums: dict[str, np.ndarray] = {}
        for start in context.progress(range(0, len(windows), BATCH), desc=f"{self.name} fisher"):
            batch = graph.source.output_fisher(windows[start : start + BATCH], list(graph.sites),
                                               seed=start)
            if batch is None:
                return None
            for site_id, values in batch.items():
                sums[site_id] = sums.get(site_id, 0) + values
        return sums

    def _fisher_errors(self, graph: Graph, context: PassContext,
                       fisher: dict[str, np.ndarray]) -> dict[str, list[list[float]]]:
        """Per site, per group size, per width: the Fisher-weighted output error."""
        tokens = graph.calibration.size

        def row_errors(site_id: str, bits: int, group_size: int) -> np.ndarray:
            weight, gram = graph.weight(site_id).astype(np.float64), graph.grams[site_id]
            delta = weight - self.quantized(graph, site_id, bits, group_size)
            return 0.5 * fisher[site_id] * np.sum((delta @ gram) * delta, axis=1) / tokens**2

        return self._per_size(graph, context, row_errors)

    def _output_errors(self, graph: Graph, context: PassContext) -> dict[str, list[list[float]]]:
        """Per site, per group size, per width: the relative output error."""

        def row_errors(site_id: str, bits: int, group_size: int) -> np.ndarray:
            return relative_row_errors(graph.weight(site_id),
                                       self.quantized(graph, site_id, bits, group_size),
                                       graph.grams[site_id])

        return self._per_size(graph, context, row_errors)

    def _per_size(self, graph: Graph, context: PassContext,
                  row_errors: Callable[[str, int, int], np.ndarray]
                  ) -> dict[str, list[list[float]]]:
        """Per site, per group size, per width: the summed row errors (each row's kept in
        ``graph.row_damage``)."""
        errors = {}
        for site in context.progress(graph, total=len(graph.sites), desc=self.name):
            rows = {(b, g): row_errors(site.id, b, g)
                    for g in self.values["group_size"] for b in WIDTHS}
            graph.row_damage[site.id] = rows
            errors[site.id] = [[float(rows[b, g].sum()) for b in WIDTHS]
                               for g in self.values["group_size"]]
        return errors

    def _cache_file(self, graph: Graph, pairs: list[tuple[int, int]]) -> Path:
        key = hashlib.sha256()
        key.update(f"{pairs}|".encode())
        key.update(graph.weights_sha256.encode())
        windows = np.ascontiguousarray(graph.calibration)
        key.update(f"{windows.shape}|{windows.dtype}|".encode())
        key.update(windows.tobytes())
        settings = {k: v for k, v in self.values.items() if k not in ("metric", "group_size")}
        key.update(json.dumps(settings, sort_keys=True).encode())
        return cache_dir() / f"sensitivity-{key.hexdigest()[:24]}.json"

    def _measured(self, graph: Graph, context: PassContext,
                  pairs: list[tuple[int, int]]) -> dict[str, list[float]]:
        """Per site, the measured damage of each (width, group size) in ``pairs``."""
        path = self._cache_file(graph, pairs)
        if path.exists():
            cached = json.loads(path.read_text())
            if set(cached) == set(graph.sites):
                return cached
        if context.pool is None:
            reference = Damage(graph)
            errors = {
                site.id: [reference.of({site.id: self.quantized(graph, site.id, b, g)})
                          for b, g in pairs]
                for site in context.progress(graph, total=len(graph.sites), desc=self.name)
            }
        else:  # one task per (site, pair); the pool's workers hold the float model
            tasks = ((site.id, i, self.quantized(graph, site.id, b, g))
                     for site in graph for i, (b, g) in enumerate(pairs))
            found: dict[tuple[str, int], float] = {}
            setup = (graph.model_id, graph.weights_sha256, graph.calibration)
            for site_id, index, value in context.progress(
                    context.pool.map(DamageWorker, setup, "measure", tasks),
                    total=len(graph.sites) * len(pairs), desc=self.name):
                found[site_id, index] = value
            errors = {site.id: [found[site.id, i] for i in range(len(pairs))] for site in graph}
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(errors))
        temporary.replace(path)
        return errors


class DamageWorker:
    """A remote worker's state for measured sensitivity: the float model, read again from
    its id, and its outputs on the calibration windows."""

    def __init__(self, model_id: str, weights_sha256: str, windows: np.ndarray) -> None:
        from lwqc.ir.frontends import import_model

        graph = import_model(model_id)
        if graph.weights_sha256 != weights_sha256:
            raise LwqcError(f"the model at {model_id} on this worker is not the one being "
                            "compiled (its weights differ)")
        graph.calibration = windows
        self.damage = Damage(graph)

    def measure(self, site_id: str, key: int, weight: np.ndarray) -> tuple[str, int, float]:
        """The damage of ``weight`` at ``site_id``, returned with the caller's ``key``."""
        return site_id, key, self.damage.of({site_id: weight})


class Damage:
    """Mean KL(float || changed) per token over the calibration windows (encoders: mean
    1 - cosine of last hidden states) for the model with some site weights substituted."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.windows = graph.calibration
        self.causal = graph.source.kind == CAUSAL_LM
        self.reference = [self._outputs(self.windows[s : s + BATCH])
                          for s in range(0, len(self.windows), BATCH)]

    def _outputs(self, batch: np.ndarray) -> torch.Tensor:
        out = self.graph.source.run(batch).double()
        return torch.log_softmax(out, -1) if self.causal else out

    def of(self, weights: dict[str, np.ndarray]) -> float:
        total, count = 0.0, 0
        with self.graph.source.substituted(weights):
            for index, start in enumerate(range(0, len(self.windows), BATCH)):
                changed = self._outputs(self.windows[start : start + BATCH])
                reference = self.reference[index]
                if self.causal:
                    per_token = (reference.exp() * (reference - changed)).sum(-1)
                else:
                    per_token = 1 - torch.nn.functional.cosine_similarity(reference, changed, -1)
                total += float(per_token.sum())
                count += per_token.numel()
        return total / count
