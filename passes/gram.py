"""Input Gram matrices per site from calibration activations: G = sum over tokens of x x^T.

1. One pass of the float model over the calibration windows (batches of 4), a tap on every
   site's module receiving its input activation x.
2. Sites reading the same activation (one fusion group: q/k/v, gate/up) share one G.
3. Accumulated in float64; one block's activations are in memory at a time.
G is what output-error sensitivity, output-weighted clip search and GPTQ's Hessian
(H = 2 G, arXiv 2210.17323) are made of.
"""

from __future__ import annotations

import numpy as np
import torch

from lwqc.ir.graph import Graph
from lwqc.passes.base import Pass, PassContext, PassContractError, PassKind

BATCH = 4


class GramPass(Pass):
    """Attach each site's input Gram matrix to the graph (``graph.grams``)."""

    name = "gram"
    kind = PassKind.ANALYSIS
    requires = ("calibration",)
    provides = ("grams",)

    def run(self, graph: Graph, context: PassContext) -> None:
        assert graph.calibration is not None
        shared: dict[str, np.ndarray] = {}
        for site in graph:
            if site.fusion_group not in shared:
                shared[site.fusion_group] = np.zeros((site.shape[1], site.shape[1]))
        readers = {}  # one tap per shared input: the group's first site
        for site in graph:
            readers.setdefault(site.fusion_group, site.id)

        def tap(group: str):
            def callback(x: torch.Tensor, _: torch.Tensor) -> None:
                flat = x.reshape(-1, x.shape[-1]).double()
                shared[group] += (flat.T @ flat).numpy()
            return callback

        windows = graph.calibration
        taps = {site_id: tap(group) for group, site_id in readers.items()}
        for start in context.progress(range(0, len(windows), BATCH), desc=self.name):
            graph.source.run(windows[start : start + BATCH], taps)
        graph.grams = {site.id: shared[site.fusion_group] for site in graph}

    def ensures(self, graph: Graph) -> None:
        super().ensures(graph)
        if set(graph.grams) != set(graph.sites):
            raise PassContractError(f"pass '{self.name}' did not attach every site's Gram matrix")
