"""Trace a torch module with torch.export and lift its matmul sites, blocks and dataflow.

A site is an ``aten.linear`` (or GPT-2's ``aten.addmm`` over a Conv1D weight) whose weight is
a parameter. Blocks are the children of the ModuleList holding the most sites; sites reading
the same activation form a fusion group; dataflow edges join each site to the sites its
output reaches without crossing another site.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import networkx as nx
import torch

from lwqc.ir.errors import ModelLoadError
from lwqc.ir.graph import Block, MatmulSite
from lwqc.ir.roles import role_of
from lwqc.ir.source import ENCODER
from lwqc.ir.structure import assign_fusion_groups, blocks_under, site_dataflow

# FX targets that multiply by a weight; value = (index of the weight arg, index of the input,
# whether the weight is stored [in, out]).
_MATMUL_TARGETS = {
    "aten.linear.default": (1, 0, False),
    "aten.addmm.default": (2, 1, True),
    "aten.mm.default": (1, 0, True),
}
# Shape-only ops a fusion-group input is traced through (GPT-2 reshapes before addmm).
_VIEW_TARGETS = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"}
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8


def example_inputs(kind: str, vocab: int, batch: int = EXAMPLE_BATCH,
                   seq: int = EXAMPLE_SEQ) -> dict[str, Any]:
    """Seeded random token ids (and the mask or cache flag the model kind takes)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    if kind == ENCODER:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids, "use_cache": False}


def export(module: torch.nn.Module, kind: str) -> torch.export.ExportedProgram:
    """Trace with ``torch.export(strict=False)``, batch and sequence length dynamic."""
    inputs = example_inputs(kind, module.config.vocab_size)
    max_seq = getattr(module.config, "max_position_embeddings", None) or 2048
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=max_seq)
    dynamic = {name: ({0: batch, 1: seq} if torch.is_tensor(v) else None)
               for name, v in inputs.items()}
    try:
        with torch.no_grad():
            return torch.export.export(module, (), inputs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # torch.export raises many types; all mean "cannot trace"
        first = str(exc).strip().splitlines()[0][:200]
        raise ModelLoadError(
            f"torch.export cannot trace {type(module).__name__}: {first}"
        ) from exc


@dataclasses.dataclass
class Lifted:
    """What the IR needs from a trace; ``layouts`` maps a site to (parameter, stored [in, out])."""

    sites: dict[str, MatmulSite]
    blocks: list[Block]
    dataflow: nx.DiGraph
    excluded: list[tuple[str, str]]
    layouts: dict[str, tuple[str, bool]]


def _tied_parameters(module: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> the first other name sharing the same tensor."""
    owners: dict[int, str] = {}
    tied = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in owners:
            tied[name] = owners[id(param)]
            tied.setdefault(owners[id(param)], name)
        else:
            owners[id(param)] = name
    return tied


def _activation_root(node: torch.fx.Node) -> torch.fx.Node:
    while node.op == "call_function" and str(node.target) in _VIEW_TARGETS:
        node = node.args[0]
    return node


def _module_path(node: torch.fx.Node) -> str:
    return list(node.meta["nn_module_stack"].values())[-1][0]


def lift(module: torch.nn.Module, ep: torch.export.ExportedProgram, model_id: str) -> Lifted:
    """Sites, blocks, fusion groups and dataflow of ``module`` from its exported program."""
    param_of = ep.graph_signature.inputs_to_parameters
    tied = _tied_parameters(module)
    site_nodes: dict[torch.fx.Node, str] = {}
    sites: dict[str, MatmulSite] = {}
    layouts: dict[str, tuple[str, bool]] = {}
    inputs_of: dict[str, torch.fx.Node] = {}
    excluded: list[tuple[str, str]] = []
    tied_sites: dict[str, str] = {}  # tied table -> the site that owns it
    for node in ep.graph.nodes:
        spec = _MATMUL_TARGETS.get(str(node.target)) if node.op == "call_function" else None
        if spec is None:
            continue
        weight_index, input_index, transposed = spec
        weight = node.args[weight_index]
        if not isinstance(weight, torch.fx.Node) or weight.name not in param_of:
            continue
        site_id = _module_path(node)
        param_name = f"{site_id}.weight"
        owner = tied.get(param_name)
        if param_of[weight.name] not in (param_name, owner) or owner in tied_sites:
            excluded.append((site_id, f"weight shared with {param_of[weight.name]}; stays float "
                                      "and is not counted"))
            continue
        tensor = module.get_parameter(param_name)
        shape = tuple(tensor.shape[::-1] if transposed else tensor.shape)
        layouts[site_id] = (param_name, transposed)
        sites[site_id] = MatmulSite(
            id=site_id, role=role_of(site_id), block=None, shape=shape, fusion_group=site_id,
            order=len(sites), tied=owner,
        )
        if owner is not None:
            tied_sites[owner] = site_id
        site_nodes[node] = site_id
        inputs_of[site_id] = _activation_root(node.args[input_index])
    if not sites:
        raise ModelLoadError(f"{model_id} has no linear layer with a weight parameter to quantize")
    for name, param in module.named_parameters():
        if param.dim() == 2 and name.removesuffix(".weight") not in sites and name not in \
                tied_sites and not any(name.removesuffix(".weight") == e for e, _ in excluded):
            excluded.append((name, "not a matmul weight (embedding or table); stays float"))
    blocks = _group_blocks(module, sites)
    assign_fusion_groups(sites, inputs_of)
    dataflow = site_dataflow(ep.graph.nodes, lambda node: node.all_input_nodes, site_nodes)
    return Lifted(sites, blocks, dataflow, excluded, layouts)


def _group_blocks(module: torch.nn.Module, sites: dict[str, MatmulSite]) -> list[Block]:
    """Blocks are the children of the ModuleList holding the most sites, in execution order."""
    best, best_count = "", 0
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.ModuleList) and name:
            count = sum(1 for s in sites if s.startswith(name + "."))
            if count > best_count:
                best, best_count = name, count
    return blocks_under(best, sites)
