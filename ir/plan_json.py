"""``plan.json`` (schema ``lwqc.plan/1``): the plan with everything needed to explain and
re-apply it; reading validates every field and fails with one ``PlanError``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lwqc.ir.accounting import site_bytes, totals
from lwqc.ir.annotations import RecordedAnnotation
from lwqc.ir.errors import PlanError
from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.ir.plan import Plan
from lwqc.ir.spec import QuantSpec, spec_from_json

SCHEMA = "lwqc.plan/1"


def _annotations_json(stats: dict) -> dict[str, Any]:
    return {
        key: {"source": a.source, **a.values()} for key, a in sorted(stats.items())
    }


def plan_document(graph: Graph) -> dict[str, Any]:
    """The JSON document of ``plan.json``: everything needed to explain and re-apply the plan."""
    plan = graph.plan
    if plan is None:
        raise PlanError("no plan: the pipeline has no policy pass")
    sites = {}
    for site in graph:
        spec = plan.specs[site.id]
        sites[site.id] = {
            **spec.to_json(),
            "role": site.role,
            "block": site.block,
            "shape": list(site.shape),
            "params": site.params,
            "fusion_group": site.fusion_group,
            "bytes": site_bytes(graph, site.id, spec),
            "scores": _annotations_json(site.stats),
        }
        if site.tied is not None:
            sites[site.id]["tied"] = site.tied
    return {
        "schema": SCHEMA,
        "model": {
            "id": graph.model_id,
            "architecture": graph.architecture,
            "weights_sha256": graph.weights_sha256,
            "keep_bits": graph.keep_bits,
        },
        "pipeline": graph.pipeline,
        "policy": plan.policy,
        "budget": plan.budget,
        "counted": "the weights of all matmul sites below (biases, norms and untied embeddings "
                   "excluded; a head tied to its embedding table is one site serving both)",
        "excluded": [{"tensor": name, "why": why} for name, why in graph.excluded],
        "notes": plan.notes,
        "blocks": [
            {"index": b.index, "module": b.module, "sites": b.sites,
             "scores": _annotations_json(b.stats)}
            for b in graph.blocks
        ],
        "sites": sites,
        "totals": totals(graph, plan.specs).to_json(),
    }


def write_plan(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")


def read_plan(path: Path) -> dict[str, Any]:
    """Read and validate a plan document; any defect is a ``PlanError`` naming the file."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"plan file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise PlanError(
            f"plan file {path} is not valid JSON ({reason}); restore it or recompile"
        ) from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise PlanError(f"plan file {path} is not an {SCHEMA} document (missing or wrong 'schema')")
    sites = document.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise PlanError(f"plan file {path} has no 'sites' table")
    for key, kind in _OPTIONAL_FIELDS.items():
        if key in document:
            _check_type(path, key, document[key], kind)
    for site_id, entry in sites.items():
        try:
            spec_from_json(entry)
        except PlanError as exc:
            raise PlanError(f"plan file {path}: site {site_id}: {exc}") from None
    return document


# Field -> the JSON type it must have ("int?" = integer or null, "shape" = two integers).
_OPTIONAL_FIELDS = {"model": "object", "policy": "string", "budget": "object",
                    "notes": "strings", "pipeline": "string"}
_ARTIFACT_FIELDS = {
    "": {"model": "object", "policy": "string", "budget": "object", "blocks": "list",
         "totals": "object"},
    "model": {"id": "string", "architecture": "string", "weights_sha256": "string",
              "keep_bits": "int"},
    "site": {"role": "string", "block": "int?", "shape": "shape", "fusion_group": "string",
             "scores": "scores", "tied": "absent or string"},
    "block": {"index": "int", "module": "string", "sites": "strings", "scores": "scores"},
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "int": _is_int,
    "int?": lambda v: v is None or _is_int(v),
    "absent or string": lambda v: v is None or isinstance(v, str),
    "shape": lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0
                                                                     for x in v),
    "scores": lambda v: isinstance(v, dict) and all(
        isinstance(f, dict) and isinstance(f.get("source"), str) for f in v.values()),
}


def _check_type(path: Path, where: str, value: Any, kind: str) -> None:
    if not _TYPES[kind](value):
        raise PlanError(f"plan file {path}: {where} is not a valid {kind} ({value!r:.40}); "
                        "restore it or recompile")


def _check_fields(path: Path, where: str, entry: Any, table: str) -> None:
    if not isinstance(entry, dict):
        raise PlanError(f"plan file {path}: {where or 'the document'} is not an object")
    for key, kind in _ARTIFACT_FIELDS[table].items():
        name = f"{where}.{key}" if where else key
        if key not in entry and kind != "absent or string":
            raise PlanError(f"plan file {path} lacks {name}: it is not a complete lwqc "
                            "artifact; recompile")
        _check_type(path, name, entry.get(key), kind)


def read_artifact_plan(path: Path) -> dict[str, Any]:
    """``read_plan`` plus the fields a compiled artifact's plan carries (for show and eval)."""
    document = read_plan(path)
    _check_fields(path, "", document, "")
    _check_fields(path, "model", document["model"], "model")
    for site_id, entry in document["sites"].items():
        _check_fields(path, f"sites.{site_id}", entry, "site")
    for position, block in enumerate(document["blocks"]):
        _check_fields(path, f"blocks[{position}]", block, "block")
    return document


def specs_from_document(document: dict[str, Any]) -> dict[str, QuantSpec]:
    return {site_id: spec_from_json(entry) for site_id, entry in document["sites"].items()}


def graph_from_document(document: dict[str, Any]) -> Graph:
    """The IR as recorded in an artifact (no weights, no dataflow edges): for ``lwqc show OUT``."""
    import networkx as nx

    sites = {}
    for order, (site_id, entry) in enumerate(document["sites"].items()):
        sites[site_id] = MatmulSite(
            id=site_id,
            role=entry["role"],
            block=entry["block"],
            shape=tuple(entry["shape"]),
            fusion_group=entry["fusion_group"],
            order=order,
            stats=_recorded(entry.get("scores", {})),
            tied=entry.get("tied"),
        )
    blocks = [
        Block(index=b["index"], module=b["module"], sites=b["sites"], stats=_recorded(b["scores"]))
        for b in document["blocks"]
    ]
    graph = Graph(
        model_id=document["model"]["id"],
        architecture=document["model"]["architecture"],
        sites=sites,
        blocks=blocks,
        dataflow=nx.DiGraph(),
        keep_bits=document["model"]["keep_bits"],
        weights_sha256=document["model"]["weights_sha256"],
    )
    graph.plan = Plan(
        specs=specs_from_document(document),
        policy=document["policy"],
        budget=document["budget"],
        notes=document.get("notes", []),
    )
    return graph


def _recorded(scores: dict[str, dict[str, Any]]) -> dict[str, RecordedAnnotation]:
    return {
        key: RecordedAnnotation(
            source=fields["source"],
            name=key,
            recorded=tuple((k, v) for k, v in fields.items() if k != "source"),
        )
        for key, fields in scores.items()
    }
