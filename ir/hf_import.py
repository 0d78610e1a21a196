"""Import a Hugging Face model: load it, trace it with torch.export, lift its matmul sites.

Sites, blocks, fusion groups and dataflow are read off the exported FX graph: a site is an
``aten.linear`` (or GPT-2's ``aten.addmm`` over a Conv1D weight) whose weight is a parameter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch

from lwqc.ir.errors import ModelLoadError, NonFiniteWeightError
from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.ir.roles import role_of

# FX targets that multiply by a weight; value = (index of the weight arg, index of the input,
# whether the weight is stored [in, out]).
_MATMUL_TARGETS = {
    "aten.linear.default": (1, 0, False),
    "aten.addmm.default": (2, 1, True),
    "aten.mm.default": (1, 0, True),
}
# Shape-only ops a fusion-group input is traced through (GPT-2 reshapes before addmm).
_VIEW_TARGETS = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"}
_EXAMPLE_BATCH, _EXAMPLE_SEQ = 2, 8


@dataclasses.dataclass
class HFSource:
    """The imported model: the eager module, its exported program and what the IR needs of it."""

    path: str
    kind: str  # "causal-lm" or "encoder"
    module: torch.nn.Module
    exported: torch.export.ExportedProgram
    weights_sha256: str
    layouts: dict[str, tuple[str, bool]]  # site id -> (parameter name, stored [in, out])

    def weight(self, site_id: str) -> np.ndarray:
        name, transposed = self.layouts[site_id]
        tensor = self.module.get_parameter(name).detach().to(torch.float32).numpy()
        return tensor.T if transposed else tensor

    def example_inputs(self, batch: int = _EXAMPLE_BATCH, seq: int = _EXAMPLE_SEQ) -> dict:
        return _example_inputs(self.kind, self.module.config.vocab_size, batch, seq)

    def tokenize(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (no special tokens), with the model's own tokenizer."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError):
            raise ModelLoadError(f"{self.path} has no tokenizer; calibration needs one") from None
        return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)

    def run(self, input_ids: np.ndarray, taps: dict[str, Callable] | None = None) -> torch.Tensor:
        """Run the float model on ``input_ids`` ``[batch, seq]``; returns its first output.

        ``taps`` maps module names to ``callback(input, output)``: each receives the module's
        first tensor input (``hidden_states``) and first tensor output, as float32 tensors.
        """
        ids = torch.from_numpy(np.asarray(input_ids, np.int64))
        inputs = {"input_ids": ids}
        if self.kind == "encoder":
            inputs["attention_mask"] = torch.ones_like(ids)
        else:
            inputs["use_cache"] = False
        handles = []
        for name, callback in (taps or {}).items():
            handles.append(self.module.get_submodule(name).register_forward_hook(
                _tap(callback), with_kwargs=True))
        try:
            with torch.no_grad():
                return self.module(**inputs)[0]
        finally:
            for handle in handles:
                handle.remove()

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


def _first_tensor(value: Any) -> torch.Tensor:
    if torch.is_tensor(value):
        return value
    return next(v for v in value if torch.is_tensor(v))


def _tap(callback: Callable) -> Callable:
    def hook(module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs.get("hidden_states")
        callback(_first_tensor(hidden_in).float(), _first_tensor(output).float())

    return hook


def _example_inputs(kind: str, vocab: int, batch: int, seq: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    if kind == "encoder":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids, "use_cache": False}


def _looks_like_path(model: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that names no file is a bad path."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1


def _is_causal_lm(config, auto_causal) -> bool:
    """Causal when the checkpoint says so (``*ForCausalLM``, ``*LMHeadModel``); encoders such
    as ``BertModel`` stay encoders even though their config also maps to a causal head."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return type(config) in auto_causal._model_mapping


def load_module(model: str, trust_remote_code: bool = False) -> tuple[torch.nn.Module, str, str]:
    """Load ``model`` (local directory or hub id) as float32; returns (module, kind, id)."""
    import transformers

    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ModelLoadError(
                f"{model} is not a Hugging Face model directory (no config.json); "
                "pass the directory that holds config.json and *.safetensors"
            )
        model_id = str(path.resolve())
    elif _looks_like_path(model):
        raise ModelLoadError(f"model path {model} does not exist; check the path")
    else:
        model_id = model
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    common = {"trust_remote_code": trust_remote_code, "use_safetensors": True,
              "dtype": torch.float32}
    try:
        config = transformers.AutoConfig.from_pretrained(
            model_id, trust_remote_code=trust_remote_code
        )
        if _is_causal_lm(config, transformers.AutoModelForCausalLM):
            module = transformers.AutoModelForCausalLM.from_pretrained(model_id, **common)
            kind = "causal-lm"
        else:
            module, kind = transformers.AutoModel.from_pretrained(model_id, **common), "encoder"
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"cannot load {model}: {first} (lwqc loads safetensors checkpoints only)"
        ) from None
    except ValueError as exc:
        raise ModelLoadError(f"unsupported model {model}: {str(exc).splitlines()[0]}") from None
    return module.eval(), kind, model_id


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of every tensor in the state dict (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.detach().contiguous().cpu().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export(module: torch.nn.Module, kind: str) -> torch.export.ExportedProgram:
    """Trace with ``torch.export(strict=False)``, batch and sequence length dynamic."""
    inputs = _example_inputs(kind, module.config.vocab_size, _EXAMPLE_BATCH, _EXAMPLE_SEQ)
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


def lift(source: HFSource, model_id: str) -> Graph:
    """Build the IR from the exported program of ``source``."""
    module = source.module
    ep = source.exported
    param_of = ep.graph_signature.inputs_to_parameters
    tied = _tied_parameters(module)
    site_nodes: dict[torch.fx.Node, str] = {}
    sites: dict[str, MatmulSite] = {}
    inputs_of: dict[str, torch.fx.Node] = {}
    excluded: list[tuple[str, str]] = []
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
        if param_name in tied or param_of[weight.name] != param_name:
            owner = tied.get(param_name, param_of[weight.name])
            excluded.append((site_id, f"weight tied to {owner}; stays float and is not counted"))
            continue
        tensor = module.get_parameter(param_name)
        shape = tuple(tensor.shape[::-1] if transposed else tensor.shape)
        source.layouts[site_id] = (param_name, transposed)
        sites[site_id] = MatmulSite(
            id=site_id, role=role_of(site_id), block=None, shape=shape, fusion_group=site_id,
            order=len(sites),
        )
        site_nodes[node] = site_id
        inputs_of[site_id] = _activation_root(node.args[input_index])
    if not sites:
        raise ModelLoadError(f"{model_id} has no linear layer with a weight parameter to quantize")
    for name, param in module.named_parameters():
        if param.dim() == 2 and name.removesuffix(".weight") not in sites and not any(
            name.removesuffix(".weight") == e for e, _ in excluded
        ):
            excluded.append((name, "not a matmul weight (embedding or table); stays float"))
    _check_finite(source, sites)
    blocks = _group_blocks(module, sites)
    _assign_fusion_groups(sites, inputs_of)
    return Graph(
        model_id=model_id,
        architecture=type(module).__name__,
        sites=sites,
        blocks=blocks,
        dataflow=_dataflow(ep.graph, site_nodes),
        keep_bits=32,
        weights_sha256=source.weights_sha256,
        excluded=excluded,
        source=source,
    )


def _check_finite(source: HFSource, sites: dict[str, MatmulSite]) -> None:
    for site_id in sites:
        weight = source.weight(site_id)
        bad = int(weight.size - np.count_nonzero(np.isfinite(weight)))
        if bad:
            raise NonFiniteWeightError(
                f"weight of {site_id} holds {bad} NaN/Inf values: the checkpoint is corrupt; "
                "re-export or re-download it"
            )


def _group_blocks(module: torch.nn.Module, sites: dict[str, MatmulSite]) -> list[Block]:
    """Blocks are the children of the ModuleList holding the most sites, in execution order."""
    best, best_count = "", 0
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.ModuleList) and name:
            count = sum(1 for s in sites if s.startswith(name + "."))
            if count > best_count:
                best, best_count = name, count
    if not best:
        return []
    module_of: dict[str, str] = {}
    for site_id in sites:
        if site_id.startswith(best + "."):
            index = site_id[len(best) + 1 :].split(".", 1)[0]
            module_of[site_id] = f"{best}.{index}"
    modules = list(dict.fromkeys(module_of[s] for s in sites if s in module_of))
    blocks = [Block(index=i, module=m, sites=[]) for i, m in enumerate(modules)]
    by_module = {b.module: b for b in blocks}
    for site_id, site in sites.items():
        if site_id in module_of:
            block = by_module[module_of[site_id]]
            site.block = block.index
            block.sites.append(site_id)
    return blocks


def _assign_fusion_groups(sites: dict[str, MatmulSite], inputs_of: dict) -> None:
    """Sites reading the same activation form one group, named ``prefix:role+role``."""
    members: dict[torch.fx.Node, list[str]] = {}
    for site_id, node in inputs_of.items():
        members.setdefault(node, []).append(site_id)
    for group in members.values():
        if len(group) == 1:
            continue
        prefix = os.path.commonprefix([s.split(".") for s in group])
        name = ".".join(prefix) + ":" + "+".join(sites[s].role for s in group)
        for site_id in group:
            sites[site_id].fusion_group = name


def _dataflow(graph: torch.fx.Graph, site_nodes: dict[torch.fx.Node, str]) -> nx.DiGraph:
    """Edges from each site to the sites whose input it reaches without crossing another site."""
    flow = nx.DiGraph()
    flow.add_nodes_from(site_nodes.values())
    upstream: dict[torch.fx.Node, frozenset[str]] = {}
    for node in graph.nodes:
        reach: set[str] = set()
        for parent in node.all_input_nodes:
            reach |= {site_nodes[parent]} if parent in site_nodes else upstream.get(parent, set())
        if node in site_nodes:
            flow.add_edges_from((u, site_nodes[node]) for u in sorted(reach))
        upstream[node] = frozenset(reach)
    return flow


def trace(module: torch.nn.Module, kind: str, model_id: str) -> HFSource:
    """Trace a loaded module and wrap it as the IR's weight source and runner."""
    return HFSource(path=model_id, kind=kind, module=module, exported=export(module, kind),
                    weights_sha256=weights_sha256(module), layouts={})


def import_hf(model: str, trust_remote_code: bool = False) -> Graph:
    """Load, trace and lift ``model`` into the IR."""
    module, kind, model_id = load_module(model, trust_remote_code)
    return lift(trace(module, kind, model_id), model_id)
