"""The llama.cpp ``use_more_bits`` heuristic as a scorer: the baseline to beat.

A site gets the higher width when its role is ``v`` or ``down`` (attention value, FFN down
projection) and its block i of n satisfies i < n/8, or i >= 7n/8, or (i - n/8) % 3 == 2.
Without a budget the rule is applied as is (``hi`` 8, ``lo`` 4); with one, those sites are
the most important and the solver spends what is left in execution order.
"""

from __future__ import annotations

from lwqc.ir.graph import Graph
from lwqc.passes.policy import PolicyPass
from lwqc.passes.solver import Unit

MORE_BITS_ROLES = ("v", "down")


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's layer rule (integer arithmetic as in its source)."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


class LlamaCppPolicy(PolicyPass):
    name = "policy-llamacpp"

    def importance(self, graph: Graph, units: list[Unit]) -> list[float]:
        n = len(graph.blocks)
        chosen = {
            site.id for site in graph
            if site.role in MORE_BITS_ROLES and site.block is not None
            and use_more_bits(site.block, n)
        }
        return [1.0 if chosen & set(u.sites) else 0.0 for u in units]

    def rule(self, graph: Graph, units: list[Unit], importance: list[float]) -> list[int]:
        lo, hi = self.rule_widths
        return [hi if score > 0 else lo for score in importance]
