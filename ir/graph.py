"""The lwqc IR: matmul sites, transformer blocks and the dataflow between them."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np

from lwqc.ir.annotations import Annotation, annotation_key
from lwqc.ir.capabilities import PACKED_STORAGE, Capabilities

if TYPE_CHECKING:
    from lwqc.ir.formats import WeightFormat
    from lwqc.ir.plan import Plan
    from lwqc.ir.source import ModelSource


@dataclasses.dataclass
class MatmulSite:
    """One weight-bearing matmul; ``id`` is the qualified module name of its weight."""

    id: str
    role: str
    block: int | None
    shape: tuple[int, int]  # (out_features, in_features)
    fusion_group: str
    order: int
    stats: dict[str, Annotation] = dataclasses.field(default_factory=dict)
    tied: str | None = None  # the embedding table sharing this weight (one array serves both)

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclasses.dataclass
class Block:
    """A transformer layer; its residual-stream input and output are the module's input/output."""

    index: int
    module: str
    sites: list[str]
    stats: dict[str, Annotation] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Graph:
    """Sites and blocks in execution order, site-to-site dataflow, and what passes produced.

    ``available`` holds the keys of everything the passes have provided so far
    (``site.entropy``, ``plan``, ``packed``, ``lowered.onnx``); the pass manager checks
    declared requirements against it. Products go stale together: a new plan drops the packed
    weights and lowered models made from the old one, new packed weights drop lowered models.
    ``target`` is what the pipeline's lowering can store (budgets are charged at its sizes).
    """

    model_id: str
    architecture: str
    sites: dict[str, MatmulSite]
    blocks: list[Block]
    dataflow: nx.DiGraph
    keep_bits: int = 32
    weights_sha256: str = ""
    pipeline: str = ""
    excluded: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    source: ModelSource | None = None
    calibration: np.ndarray | None = None  # token windows [samples, seq_len]
    # Gram matrix sum(x x^T) of each site's input over the calibration tokens, float64
    # [in, in]; sites reading the same activation share one array (not persisted)
    grams: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # predicted damage of each output row of a site at each (width, group size), float64
    # [out], where the sensitivity analysis predicts per row (not persisted)
    row_damage: dict[str, dict[tuple[int, int], np.ndarray]] = dataclasses.field(
        default_factory=dict)
    target: Capabilities = PACKED_STORAGE
    lowered: dict[str, Any] = dataclasses.field(default_factory=dict)
    available: set[str] = dataclasses.field(default_factory=set)
    _plan: Plan | None = dataclasses.field(default=None, repr=False)
    _packed: dict[str, WeightFormat] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def plan(self) -> Plan | None:
        return self._plan

    @plan.setter
    def plan(self, plan: Plan | None) -> None:
        self._plan = plan
        self.packed = {}
        self.available.discard("packed")

    @property
    def packed(self) -> dict[str, WeightFormat]:
        return self._packed

    @packed.setter
    def packed(self, packed: dict[str, WeightFormat]) -> None:
        self._packed = packed
        self.lowered = {}
        self.available = {key for key in self.available if not key.startswith("lowered.")}

    def __iter__(self) -> Iterator[MatmulSite]:
        return iter(self.sites.values())

    @property
    def total_params(self) -> int:
        return sum(site.params for site in self)

    def weight(self, site_id: str) -> np.ndarray:
        """The float weight of a site, ``[out, in]`` float32."""
        if self.source is None:
            raise RuntimeError("this graph was read back from an artifact and holds no weights")
        return self.source.weight(site_id)

    def annotate_site(self, site_id: str, annotation: Annotation) -> None:
        self.sites[site_id].stats[annotation_key(annotation)] = annotation
        self.available.add(f"site.{annotation_key(annotation)}")

    def annotate_block(self, index: int, annotation: Annotation) -> None:
        self.blocks[index].stats[annotation_key(annotation)] = annotation
        self.available.add(f"block.{annotation_key(annotation)}")

    def block_dataflow(self) -> nx.DiGraph:
        """The dataflow contracted to blocks (sites outside blocks keep their own node)."""
        def unit(site_id: str) -> str:
            block = self.sites[site_id].block
            return site_id if block is None else self.blocks[block].module

        contracted = nx.DiGraph()
        contracted.add_nodes_from(dict.fromkeys(unit(s) for s in self.sites))
        for a, b in self.dataflow.edges:
            if unit(a) != unit(b):
                contracted.add_edge(unit(a), unit(b))
        return contracted
