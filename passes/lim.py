"""LIM, layer input modification (arXiv 2406.17415), from calibration activations.

1. For block i take the residual-stream hidden state entering it (h_in, the block module's
   input) and leaving it (h_out, its output).
2. cos_t = cos(h_in[t], h_out[t]) per token t, averaged over tokens and samples
   (``skip_first=true`` drops position 0, whose attention-sink norms dominate).
3. LIM_i = -mean cos_t: higher = the block changes the stream more = more important
   (the ranking of ShortGPT's block influence 1 - cos).
4. Sites inherit their block's LIM; sites outside blocks (lm_head) get the highest LIM of
   any block, so ranking keeps them with the most important blocks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from lwqc.ir.annotations import Annotation
from lwqc.ir.graph import Graph
from lwqc.passes.base import Option, Pass, PassContext, PassKind, boolean

BATCH = 4


def token_cosines(h_in: torch.Tensor, h_out: torch.Tensor) -> np.ndarray:
    """Cosine of each token's input and output hidden state, ``[batch, seq]`` float64."""
    a, b = h_in.double(), h_out.double()
    dot = (a * b).sum(-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return (dot / norms.clamp_min(torch.finfo(torch.float64).tiny)).numpy()


@dataclasses.dataclass(frozen=True)
class LimStat(Annotation):
    key = "lim"
    lim: float
    tokens: int

    def importance(self) -> float:
        return self.lim


class LimPass(Pass):
    """Annotate every block (and site) with its LIM score."""

    name = "lim"
    kind = PassKind.ANALYSIS
    requires = ("calibration",)
    provides = ("site.lim", "block.lim")
    options = {"skip_first": Option(boolean, False, "drop token position 0")}

    def run(self, graph: Graph, context: PassContext) -> None:
        assert graph.calibration is not None
        first = 1 if self.values["skip_first"] else 0
        sums = np.zeros(len(graph.blocks))
        count = 0
        windows = graph.calibration
        for start in context.progress(range(0, len(windows), BATCH), desc=self.name):
            batch = windows[start : start + BATCH]
            taps = {
                block.module: _accumulate(sums, block.index, first)
                for block in graph.blocks
            }
            graph.source.run(batch, taps)
            count += batch.shape[0] * (batch.shape[1] - first)
        lim = -sums / count
        for block in graph.blocks:
            graph.annotate_block(block.index, LimStat(self.name, float(lim[block.index]), count))
        top = float(lim.max()) if len(lim) else 0.0
        for site in graph:
            value = top if site.block is None else float(lim[site.block])
            graph.annotate_site(site.id, LimStat(self.name, value, count))


def _accumulate(sums: np.ndarray, index: int, first: int):
    def callback(h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        sums[index] += token_cosines(h_in, h_out)[:, first:].sum()

    return callback
