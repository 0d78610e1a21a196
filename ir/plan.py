"""The plan: one QuantSpec per site, persisted as ``plan.json`` (schema ``lwqc.plan/1``)."""

from __future__ import annotations

import dataclasses
import json
from fractions import Fraction
from pathlib import Path
from typing import Any

from lwqc.ir.annotations import RecordedAnnotation
from lwqc.ir.errors import PlanError
from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.ir.packed import KEEP_BITS, QUANT_WIDTHS, SCHEMES, physical_bytes

SCHEMA = "lwqc.plan/1"


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What a policy decides for one site: width, group size and scheme."""

    bits: int
    group_size: int = 128
    scheme: str = "rtn-asym"

    def __post_init__(self) -> None:
        if self.bits not in (*QUANT_WIDTHS, KEEP_BITS):
            raise PlanError(f"unsupported width {self.bits}: choose one of {QUANT_WIDTHS} or 16")
        if self.bits != KEEP_BITS and self.scheme not in SCHEMES:
            raise PlanError(f"unknown scheme {self.scheme!r}: choose one of {SCHEMES}")
        if self.group_size < 1:
            raise PlanError(f"group size must be positive, got {self.group_size}")

    @property
    def kept(self) -> bool:
        return self.bits == KEEP_BITS

    def label(self) -> str:
        return "keep" if self.kept else f"w{self.bits}g{self.group_size} {self.scheme}"

    def to_json(self) -> dict[str, Any]:
        if self.kept:
            return {"bits": KEEP_BITS, "group_size": None, "scheme": "keep"}
        return {"bits": self.bits, "group_size": self.group_size, "scheme": self.scheme}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantSpec:
        if not isinstance(data, dict):
            raise PlanError("a site entry must be an object with bits, group_size and scheme")
        bits = data.get("bits")
        if not _is_int(bits):
            raise PlanError(f"bits must be an integer, got {bits!r}")
        if bits == KEEP_BITS:
            return cls(bits=KEEP_BITS)
        if not _is_int(data.get("group_size")):
            raise PlanError(f"group_size must be an integer, got {data.get('group_size')!r}")
        return cls(bits=bits, group_size=data["group_size"], scheme=data.get("scheme"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def site_bytes(site: MatmulSite, spec: QuantSpec, keep_bits: int) -> int:
    """Physical bytes of one site under ``spec``."""
    return physical_bytes(site.shape, spec.bits, spec.group_size, spec.scheme, keep_bits)


@dataclasses.dataclass
class Plan:
    """Specs per site plus how they were chosen (policy, budget, notes for the report)."""

    specs: dict[str, QuantSpec]
    policy: str
    budget: dict[str, Any]
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Totals:
    params: int
    bytes: int
    bytes_float: int
    avg_bits_physical: float
    avg_bits_logical: float
    params_by_bits: dict[int, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "bytes": self.bytes,
            "bytes_float": self.bytes_float,
            "avg_bits_physical": round(self.avg_bits_physical, 6),
            "avg_bits_logical": round(self.avg_bits_logical, 6),
            "params_by_bits": {str(b): n for b, n in sorted(self.params_by_bits.items())},
        }


def totals(graph: Graph, specs: dict[str, QuantSpec]) -> Totals:
    """Size of the quantizable weights under ``specs`` (scales and zero points included)."""
    params = graph.total_params
    nbytes = sum(site_bytes(graph.sites[s], spec, graph.keep_bits) for s, spec in specs.items())
    logical = sum(
        (graph.keep_bits if spec.kept else spec.bits) * graph.sites[s].params
        for s, spec in specs.items()
    )
    by_bits: dict[int, int] = {}
    for s, spec in specs.items():
        by_bits[spec.bits] = by_bits.get(spec.bits, 0) + graph.sites[s].params
    return Totals(
        params=params,
        bytes=nbytes,
        bytes_float=params * graph.keep_bits // 8,
        avg_bits_physical=float(Fraction(8 * nbytes, params)),
        avg_bits_logical=float(Fraction(logical, params)),
        params_by_bits=by_bits,
    )


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
            "bytes": site_bytes(site, spec, graph.keep_bits),
            "scores": _annotations_json(site.stats),
        }
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
        "counted": "the weights of all matmul sites below (biases, norms and embeddings excluded)",
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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(
            f"plan file {path} is not valid JSON ({exc}); restore it or recompile"
        ) from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise PlanError(f"plan file {path} is not an {SCHEMA} document (missing or wrong 'schema')")
    sites = document.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise PlanError(f"plan file {path} has no 'sites' table")
    for site_id, entry in sites.items():
        try:
            QuantSpec.from_json(entry)
        except PlanError as exc:
            raise PlanError(f"plan file {path}: site {site_id}: {exc}") from None
    return document


_ARTIFACT_FIELDS = {
    "model": ("id", "architecture", "weights_sha256", "keep_bits"),
    "site": ("role", "block", "shape", "fusion_group", "scores"),
    "block": ("index", "module", "sites", "scores"),
}


def read_artifact_plan(path: Path) -> dict[str, Any]:
    """``read_plan`` plus the fields a compiled artifact's plan carries (for show and eval)."""
    document = read_plan(path)
    missing = [k for k in ("model", "policy", "budget", "blocks", "totals") if k not in document]
    model = document.get("model", {})
    missing += [f"model.{k}" for k in _ARTIFACT_FIELDS["model"] if k not in model]
    for site_id, entry in document["sites"].items():
        missing += [f"sites.{site_id}.{k}" for k in _ARTIFACT_FIELDS["site"] if k not in entry]
    for block in document.get("blocks", []):
        missing += [f"blocks[].{k}" for k in _ARTIFACT_FIELDS["block"] if k not in block]
    if missing:
        raise PlanError(f"plan file {path} lacks {missing[0]}: it is not a complete lwqc "
                        "artifact; recompile")
    return document


def specs_from_document(document: dict[str, Any]) -> dict[str, QuantSpec]:
    return {site_id: QuantSpec.from_json(entry) for site_id, entry in document["sites"].items()}


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
