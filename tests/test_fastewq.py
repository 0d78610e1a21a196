"""FastEWQ: metadata features, EWQ labels, the shipped forest read without scikit-learn, and
the policy deciding without reading a weight."""

from __future__ import annotations

import sys

import networkx as nx
import numpy as np
import pytest

from conftest import REPO
from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.ir.spec import KEEP_BITS
from lwqc.passes.fastewq import (
    HI,
    KEEP,
    LO,
    Forest,
    ewq_classes,
    features,
    last_blocks_baseline,
    load_forest,
)
from lwqc.passes.manager import PassManager
from lwqc.registry import parse


def test_features_are_position_depth_and_parameter_counts():
    np.testing.assert_allclose(features([10, 10, 20]), [
        [0.0, 3, 1.0, 0.75], [0.5, 3, 1.0, 0.75], [1.0, 3, np.log10(20), 1.5]])


def test_ewq_rule_and_the_last_blocks_baseline():
    # entropies -2, 0, 0, 2: mean 0, sd sqrt(2), thresholds at -+0.65 sqrt(2) = -+0.92
    assert ewq_classes([-2.0, 0.0, 0.0, 2.0]) == [LO, HI, HI, KEEP]
    assert last_blocks_baseline(4, 0.5) == [HI, HI, LO, LO]
    assert last_blocks_baseline(5, 0.0) == [HI] * 5 and last_blocks_baseline(3, 1.0) == [LO] * 3


def test_forest_predicts_what_scikit_learn_predicts():
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(REPO / "tools"))
    import train_fastewq

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(200, 4))
    labels = (rows[:, 0] > 0).astype(int) + (rows[:, 1] > 1).astype(int)
    forest = train_fastewq.train(rows, labels)
    from sklearn.ensemble import RandomForestClassifier

    reference = RandomForestClassifier(n_estimators=train_fastewq.TREES,
                                       max_depth=train_fastewq.DEPTH,
                                       random_state=train_fastewq.SEED).fit(rows, labels)
    test = rng.normal(size=(50, 4))
    read_back = Forest.from_json(forest.to_json())
    np.testing.assert_allclose(read_back.predict_proba(test), reference.predict_proba(test),
                               atol=1e-5)


def test_shipped_forest_loads_and_gives_probabilities():
    forest = load_forest()
    probabilities = forest.predict_proba(features([100] * 12))
    assert probabilities.shape == (12, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert "trained_on" in forest.meta


class NoWeights:
    def weight(self, site_id: str) -> np.ndarray:
        raise AssertionError("FastEWQ read a weight")


def _graph(blocks: int) -> Graph:
    sites, block_list = {}, []
    for b in range(blocks):
        ids = [f"layers.{b}.{name}" for name in ("q", "o", "up", "down")]
        for order, site_id in enumerate(ids):
            sites[site_id] = MatmulSite(id=site_id, role=site_id.split(".")[-1], block=b,
                                        shape=(64, 64), fusion_group=site_id,
                                        order=4 * b + order)
        block_list.append(Block(index=b, module=f"layers.{b}", sites=ids))
    sites["lm_head"] = MatmulSite(id="lm_head", role="lm_head", block=None, shape=(128, 64),
                                  fusion_group="lm_head", order=4 * blocks)
    graph = Graph(model_id="toy", architecture="Toy", sites=sites, blocks=block_list,
                  dataflow=nx.DiGraph())
    graph.source = NoWeights()  # type: ignore[assignment]
    return graph


def test_policy_gives_each_block_its_predicted_class_without_reading_weights():
    graph = _graph(16)
    PassManager(parse("policy-fastewq")).run(graph)
    predicted = load_forest().predict(features([4 * 64 * 64] * 16))
    widths = {LO: 4, HI: 8, KEEP: KEEP_BITS}
    for block in graph.blocks:
        for site_id in block.sites:
            assert graph.plan.specs[site_id].bits == widths[int(predicted[block.index])]
    assert graph.plan.specs["lm_head"].bits == 8


def test_policy_meets_a_budget():
    from lwqc.ir.accounting import totals

    graph = _graph(16)
    PassManager(parse("policy-fastewq{bits=4.5}")).run(graph)
    assert totals(graph, graph.plan.specs).avg_bits_physical <= 4.5
    assert graph.plan.specs["lm_head"].bits >= max(
        spec.bits for s, spec in graph.plan.specs.items() if s != "lm_head")
