"""What every frontend derives the same way once it has found its sites: fusion groups (sites
reading one activation) and the site-to-site dataflow."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable

import networkx as nx

from lwqc.ir.graph import Block, MatmulSite


def assign_fusion_groups(sites: dict[str, MatmulSite], inputs_of: dict[str, Hashable]) -> None:
    """Sites reading the same activation form one group, named ``prefix:role+role``."""
    members: dict[Hashable, list[str]] = {}
    for site_id, activation in inputs_of.items():
        members.setdefault(activation, []).append(site_id)
    for group in members.values():
        if len(group) == 1:
            continue
        prefix = os.path.commonprefix([s.split(".") for s in group])
        name = ".".join(prefix) + ":" + "+".join(sites[s].role for s in group)
        for site_id in group:
            sites[site_id].fusion_group = name


def site_dataflow(nodes: Iterable[Hashable], parents: Callable[[Hashable], Iterable[Hashable]],
                  site_nodes: dict[Hashable, str]) -> nx.DiGraph:
    """Edges from each site to the sites whose input it reaches without crossing another site;
    ``nodes`` in topological order, ``parents(node)`` the nodes producing its inputs."""
    flow = nx.DiGraph()
    flow.add_nodes_from(site_nodes.values())
    upstream: dict[Hashable, frozenset[str]] = {}
    for node in nodes:
        reach: set[str] = set()
        for parent in parents(node):
            reach |= {site_nodes[parent]} if parent in site_nodes else upstream.get(parent, set())
        if node in site_nodes:
            flow.add_edges_from((u, site_nodes[node]) for u in sorted(reach))
        upstream[node] = frozenset(reach)
    return flow


def blocks_under(prefix: str, sites: dict[str, MatmulSite]) -> list[Block]:
    """Blocks ``<prefix>.<index>`` holding the sites named under them, in execution order
    (``sites`` in execution order); sets each such site's block. No prefix: no blocks."""
    if not prefix:
        return []
    module_of: dict[str, str] = {}
    for site_id in sites:
        if site_id.startswith(prefix + "."):
            index = site_id[len(prefix) + 1 :].split(".", 1)[0]
            module_of[site_id] = f"{prefix}.{index}"
    modules = list(dict.fromkeys(module_of[s] for s in sites if s in module_of))
    blocks = [Block(index=i, module=m, sites=[]) for i, m in enumerate(modules)]
    by_module = {b.module: b for b in blocks}
    for site_id, site in sites.items():
        if site_id in module_of:
            block = by_module[module_of[site_id]]
            site.block = block.index
            block.sites.append(site_id)
    return blocks
