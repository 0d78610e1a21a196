import io
import math
import time

import networkx as nx
import numpy as np
import pytest

from conftest import ArrayWeights
from lwqc.ir.annotations import Annotation
from lwqc.ir.formats import AffineWeight
from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.ir.plan import Plan
from lwqc.ir.spec import SymmetricSpec
from lwqc.ir.text import print_ir
from lwqc.passes.base import (
    MissingRequirementError,
    Pass,
    PassContractError,
    PassKind,
    PlanningPass,
)
from lwqc.passes.entropy import EntropyPass
from lwqc.passes.manager import PassManager
from lwqc.passes.policy_entropy import EntropyPolicy
from lwqc.passes.policy_zd import ZDPolicy
from lwqc.passes.zd import ZDPass
from lwqc.registry import parse


def _graph():
    spike = np.array([[0.0, 0.0, 0.0, 0.0, 10.0]] * 2, dtype=np.float32)
    ramp = np.tile(np.arange(1.0, 11.0, dtype=np.float32), (2, 1)).reshape(4, 5)
    arrays = {"layers.0.a": spike, "layers.0.b": ramp, "head": np.zeros((2, 5), np.float32)}
    sites = {
        site_id: MatmulSite(site_id, "mlp", 0 if site_id.startswith("layers") else None,
                            array.shape, site_id, order)
        for order, (site_id, array) in enumerate(arrays.items())
    }
    blocks = [Block(0, "layers.0", ["layers.0.a", "layers.0.b"])]
    dataflow = nx.DiGraph([("layers.0.a", "layers.0.b"), ("layers.0.b", "head")])
    return Graph("toy-model", "toy", sites, blocks, dataflow, source=ArrayWeights(arrays))


@pytest.mark.parametrize("pipeline, missing, needer", [
    ("policy-entropy{bits=4}", "site.entropy", "policy-entropy"),
    ("zd,policy-entropy{ratio=0.5}", "site.entropy", "policy-entropy"),
    ("entropy,policy-zd{bits=4}", "site.zd", "policy-zd"),
    ("quantize", "plan", "quantize"),
])
def test_check_names_missing_requirement_and_pass(pipeline, missing, needer):
    manager = PassManager(parse(pipeline))
    with pytest.raises(MissingRequirementError) as info:
        manager.check(set())
    message = str(info.value)
    assert f"pass '{needer}' needs {missing}" in message
    assert f"before '{needer}'" in message


def test_check_accepts_requirement_provided_earlier_or_already_available():
    PassManager([EntropyPass(), EntropyPolicy(bits=4)]).check(set())
    PassManager([EntropyPolicy(bits=4)]).check({"site.entropy", "block.entropy"})


def test_check_rejects_requirement_provided_only_later():
    manager = PassManager([EntropyPolicy(bits=4), EntropyPass()])
    with pytest.raises(MissingRequirementError, match="site.entropy"):
        manager.check(set())


def test_run_checks_requirements_before_running_anything():
    graph = _graph()
    manager = PassManager([ZDPass(), EntropyPolicy(bits=4)])
    with pytest.raises(MissingRequirementError):
        manager.run(graph)
    assert "zd" not in graph.sites["head"].stats
    assert manager.timings == []


def test_run_annotates_records_pipeline_and_available_keys():
    graph = _graph()
    manager = PassManager([ZDPass(), EntropyPass()])
    assert manager.run(graph) is graph
    assert graph.pipeline == "zd{block=mean},entropy{method=softmax}"
    assert {"site.zd", "block.zd", "site.entropy", "block.entropy"} <= graph.available
    assert graph.sites["layers.0.a"].stats["zd"].zd == pytest.approx(0.2)
    assert graph.sites["layers.0.b"].stats["zd"].zd == pytest.approx(0.4)
    assert graph.blocks[0].stats["zd"].zd == pytest.approx(0.3)
    assert graph.sites["head"].stats["entropy"].entropy == pytest.approx(math.log(10), abs=1e-12)


def test_full_pipeline_plans_by_zd_ratio_and_packs_every_site():
    graph = _graph()
    # zd: a 0.2, b 0.4, head 0.0 -> b (20 of 40 weights) is least important and goes low;
    # a would take the low share to 30 / 40 > 0.5
    PassManager(parse("zd,policy-zd{ratio=0.5},quantize")).run(graph)
    assert {s: spec.bits for s, spec in graph.plan.specs.items()} == {
        "layers.0.a": 8, "layers.0.b": 4, "head": 8,
    }
    assert graph.plan.policy == "policy-zd"
    assert set(graph.packed) == {"layers.0.a", "layers.0.b", "head"}
    assert graph.packed["layers.0.b"].spec.bits == 4
    assert {"plan", "packed"} <= graph.available


class _PlanningAnalysis(Pass):
    name = "sneaky-analysis"
    kind = PassKind.ANALYSIS

    def run(self, graph, context):
        graph.plan = Plan({s: SymmetricSpec(8) for s in graph.sites}, policy="sneaky", budget={})


class _PackingAnalysis(Pass):
    name = "packing-analysis"
    kind = PassKind.ANALYSIS

    def run(self, graph, context):
        graph.packed["head"] = AffineWeight(
            SymmetricSpec(8), np.zeros((2, 5), np.int8), np.ones((2, 1), np.float32), None
        )


def test_analysis_pass_that_writes_a_plan_breaks_the_contract():
    with pytest.raises(PassContractError, match="analysis pass 'sneaky-analysis' changed"):
        PassManager([_PlanningAnalysis()]).run(_graph())


def test_analysis_pass_that_packs_a_weight_breaks_the_contract():
    with pytest.raises(PassContractError, match="packing-analysis"):
        PassManager([_PackingAnalysis()]).run(_graph())


class _FooStat(Annotation):
    key = "foo"


class _LazyFoo(Pass):
    name = "lazy-foo"
    kind = PassKind.ANALYSIS
    provides = ("site.foo",)

    def run(self, graph, context):
        pass


class _PartialFoo(Pass):
    name = "partial-foo"
    kind = PassKind.ANALYSIS
    provides = ("site.foo",)

    def run(self, graph, context):
        graph.annotate_site("head", _FooStat(self.name))


class _LazyBlockFoo(Pass):
    name = "lazy-block-foo"
    kind = PassKind.ANALYSIS
    provides = ("block.foo",)

    def run(self, graph, context):
        for site in graph:
            graph.annotate_site(site.id, _FooStat(self.name))


class _HonestFoo(Pass):
    name = "honest-foo"
    kind = PassKind.ANALYSIS
    provides = ("site.foo", "block.foo")

    def run(self, graph, context):
        for site in graph:
            graph.annotate_site(site.id, _FooStat(self.name))
        for block in graph.blocks:
            graph.annotate_block(block.index, _FooStat(self.name))


def test_pass_declaring_site_annotation_without_writing_it_breaks_the_contract():
    with pytest.raises(PassContractError, match="'lazy-foo' declares site.foo"):
        PassManager([_LazyFoo()]).run(_graph())


def test_pass_annotating_only_some_sites_breaks_the_contract():
    with pytest.raises(PassContractError, match="'partial-foo' declares site.foo"):
        PassManager([_PartialFoo()]).run(_graph())


def test_pass_declaring_block_annotation_without_writing_it_breaks_the_contract():
    with pytest.raises(PassContractError, match="declares block.foo"):
        PassManager([_LazyBlockFoo()]).run(_graph())


def test_pass_that_writes_what_it_declares_passes_the_contract():
    graph = PassManager([_HonestFoo()]).run(_graph())
    assert all("foo" in site.stats for site in graph)
    assert "foo" in graph.blocks[0].stats


class _NoPlanPolicy(PlanningPass):
    name = "no-plan"

    def run(self, graph, context):
        pass


class _PartialPlanPolicy(PlanningPass):
    name = "partial-plan"

    def run(self, graph, context):
        graph.plan = Plan({"head": SymmetricSpec(8)}, policy=self.name, budget={})


def test_policy_that_writes_no_plan_breaks_the_contract():
    with pytest.raises(PassContractError, match="declares 'plan' but wrote none"):
        PassManager([_NoPlanPolicy()]).run(_graph())


def test_policy_whose_plan_misses_sites_breaks_the_contract():
    with pytest.raises(PassContractError, match="does not cover every site"):
        PassManager([_PartialPlanPolicy()]).run(_graph())


def test_print_ir_after_named_pass_writes_headed_ir_text():
    stream = io.StringIO()
    graph = _graph()
    PassManager([ZDPass(), EntropyPass()], print_ir_after=("zd",), ir_stream=stream).run(graph)
    reference = _graph()
    PassManager([ZDPass()]).run(reference)
    assert stream.getvalue() == "// ----- IR after zd -----\n" + print_ir(reference)
    assert "zd.zd=0.2" in stream.getvalue()
    assert "entropy." not in stream.getvalue()


def test_print_ir_after_all_writes_one_section_per_pass():
    stream = io.StringIO()
    PassManager([ZDPass(), EntropyPass()], print_ir_after=("all",), ir_stream=stream).run(_graph())
    text = stream.getvalue()
    assert text.count("// ----- IR after ") == 2
    first, second = text.split("// ----- IR after entropy -----\n")
    assert first.startswith("// ----- IR after zd -----\nlwqc.ir model=toy-model arch=toy ")
    assert "entropy." not in first
    assert "entropy.entropy=" in second
    assert second.startswith("lwqc.ir model=toy-model arch=toy sites=3 blocks=1 params=40\n")


def test_print_ir_after_unrun_pass_writes_nothing():
    stream = io.StringIO()
    PassManager([ZDPass()], print_ir_after=("entropy",), ir_stream=stream).run(_graph())
    assert stream.getvalue() == ""


class _Sleeper(Pass):
    name = "sleeper"
    kind = PassKind.ANALYSIS
    seconds = 0.05

    def run(self, graph, context):
        time.sleep(self.seconds)


def test_timings_are_recorded_per_pass_in_order():
    manager = PassManager([ZDPass(), _Sleeper(), EntropyPass(), ZDPolicy(ratio=0.5)])
    start = time.perf_counter()
    manager.run(_graph())
    wall = time.perf_counter() - start
    assert [t.name for t in manager.timings] == ["zd", "sleeper", "entropy", "policy-zd"]
    by_name = {t.name: t.seconds for t in manager.timings}
    assert by_name["sleeper"] >= _Sleeper.seconds  # the pass's own time, not a cumulative clock
    assert by_name["zd"] < _Sleeper.seconds and by_name["entropy"] < _Sleeper.seconds
    assert sum(by_name.values()) <= wall


def test_a_new_plan_drops_the_packed_weights_and_lowered_models_of_the_old_one():
    graph = _graph()
    PassManager(parse("zd,policy-zd{ratio=0.5},quantize")).run(graph)
    graph.lowered["onnx"] = object()
    graph.available.add("lowered.onnx")
    assert graph.packed and "packed" in graph.available
    PassManager(parse("policy-zd{bits=16}")).run(graph)
    assert graph.packed == {} and graph.lowered == {}
    assert "packed" not in graph.available and "lowered.onnx" not in graph.available
    PassManager(parse("quantize")).run(graph)
    graph.lowered["torch"] = object()
    graph.packed = {}
    assert graph.lowered == {}


def test_log_receives_one_line_per_pass():
    log = io.StringIO()
    PassManager([ZDPass(), EntropyPass()], log=log).run(_graph())
    lines = log.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("lwqc: zd{block=mean} ")
    assert lines[1].startswith("lwqc: entropy{method=softmax} ")
    assert all(line.endswith(" s") for line in lines)


def test_pipeline_property_is_canonical_text():
    manager = PassManager(parse("zd, policy-zd{bits=4}"))
    assert manager.pipeline == (
        "zd{block=mean},"
        "policy-zd{bits=4.0,group_size=128,scheme=rtn-asym,solver=greedy}"
    )


class _EditingAnalysis(Pass):
    name = "editing-analysis"
    kind = PassKind.ANALYSIS

    def run(self, graph, context):
        graph.plan.specs["head"] = SymmetricSpec(2)


def test_analysis_pass_that_edits_the_plan_in_place_breaks_the_contract():
    graph = _graph()
    with pytest.raises(PassContractError, match="editing-analysis"):
        PassManager(parse("zd,policy-zd{ratio=0.5}") + [_EditingAnalysis()]).run(graph)


def test_keys_of_a_pass_that_broke_its_contract_are_not_made_available():
    graph = _graph()
    with pytest.raises(PassContractError):
        PassManager([_PlanningAnalysis()]).run(graph)
    assert "plan" not in graph.available
