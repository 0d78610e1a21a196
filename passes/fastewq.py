"""FastEWQ (arXiv 2503.04704): EWQ's block decisions predicted from metadata alone.

1. Features of block i of n, read from the graph without touching a weight: relative position
   i / (n - 1), the number of blocks n, log10 of the block's parameter count, and the block's
   parameters over the mean block's.
2. Classes: the outcome of EWQ's threshold rule (k = 0.65) on full entropies, ``LO`` (quantized
   aggressively), ``HI``, ``KEEP`` (float).
3. The classifier: a random forest trained by ``tools/train_fastewq.py`` on full-EWQ decisions of
   the models at hand, shipped as ``fastewq_forest.json`` (per tree: children, feature,
   threshold, leaf class distribution); its prediction is the mean of the trees' leaf
   distributions.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from lwqc.ir.graph import Graph

FEATURES = ("position", "blocks", "log10_params", "relative_params")
LO, HI, KEEP = 0, 1, 2
CLASSES = ("lo", "hi", "keep")
FOREST_FILE = Path(__file__).with_name("fastewq_forest.json")
LEAF = -1  # children index of a leaf


def features(block_params: list[int]) -> np.ndarray:
    """``[blocks, len(FEATURES)]`` features of blocks with these parameter counts, in order."""
    count = len(block_params)
    params = np.asarray(block_params, np.float64)
    position = np.arange(count) / max(count - 1, 1)
    return np.stack([position, np.full(count, float(count)), np.log10(params),
                     params / params.mean()], axis=1)


def graph_features(graph: Graph) -> np.ndarray:
    return features([sum(graph.sites[s].params for s in block.sites) for block in graph.blocks])


@dataclasses.dataclass(frozen=True)
class Tree:
    left: np.ndarray
    right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    value: np.ndarray  # [nodes, classes], class shares at each node

    def leaf_values(self, rows: np.ndarray) -> np.ndarray:
        node = np.zeros(len(rows), np.int64)
        while True:
            inner = self.left[node] != LEAF
            if not inner.any():
                return self.value[node]
            at = node[inner]
            go_left = rows[inner, self.feature[at]] <= self.threshold[at]
            node[inner] = np.where(go_left, self.left[at], self.right[at])


@dataclasses.dataclass(frozen=True)
class Forest:
    trees: list[Tree]
    meta: dict

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        """``[rows, 3]`` class probabilities (mean over trees)."""
        return np.mean([tree.leaf_values(rows) for tree in self.trees], axis=0)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        return self.predict_proba(rows).argmax(axis=1)

    def to_json(self) -> dict:
        return {"features": list(FEATURES), "classes": list(CLASSES), "meta": self.meta,
                "trees": [{k: getattr(t, k).tolist() for k in
                           ("left", "right", "feature", "threshold", "value")}
                          for t in self.trees]}

    @classmethod
    def from_json(cls, document: dict) -> Forest:
        if document.get("features") != list(FEATURES) or document.get("classes") != list(CLASSES):
            raise ValueError("the forest was trained on other features or classes")
        trees = [Tree(left=np.asarray(t["left"], np.int64), right=np.asarray(t["right"], np.int64),
                      feature=np.asarray(t["feature"], np.int64),
                      threshold=np.asarray(t["threshold"], np.float64),
                      value=np.asarray(t["value"], np.float64))
                 for t in document["trees"]]
        return cls(trees=trees, meta=document.get("meta", {}))


def load_forest(path: Path = FOREST_FILE) -> Forest:
    return Forest.from_json(json.loads(path.read_text()))


def expected_class(probabilities: np.ndarray) -> np.ndarray:
    """``P(hi) + 2 P(keep)``: the predicted width rank of each block, 0 (lo) to 2 (keep)."""
    return probabilities[:, HI] + 2 * probabilities[:, KEEP]


def ewq_classes(entropies: list[float], k: float = 0.65) -> list[int]:
    """EWQ's threshold rule on block entropies: below mu - k sd LO, up to mu + k sd HI,
    above KEEP (the entropy policy's rule, as labels)."""
    scores = np.asarray(entropies, np.float64)
    mu, sigma = scores.mean(), scores.std()
    return [LO if h < mu - k * sigma else HI if h <= mu + k * sigma else KEEP for h in scores]


def last_blocks_baseline(count: int, share: float) -> list[int]:
    """The trivial rule FastEWQ is read against: the last ``share`` of blocks LO, others HI."""
    first_lo = count - math.floor(share * count + 1e-9)
    return [LO if i >= first_lo else HI for i in range(count)]
