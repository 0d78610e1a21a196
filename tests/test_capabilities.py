"""Backend capabilities: policies are offered only what the target stores, charged at its sizes;
anything else is refused before work is done."""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest

from conftest import ArrayWeights
from lwqc.backends.onnxruntime import LowerOnnxPass
from lwqc.backends.torch_eager import LowerTorchPass
from lwqc.ir.accounting import totals
from lwqc.ir.capabilities import PACKED_STORAGE, Capabilities
from lwqc.ir.errors import PipelineError, PlanError
from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.ir.spec import AsymmetricSpec
from lwqc.passes.base import Pass, PassKind
from lwqc.passes.manager import PassManager
from lwqc.registry import parse

AFFINE_4_8 = Capabilities(backend="toy", widths={"affine": (4, 8)}, containers={4: 4, 8: 8})
# stores 3-bit codes (and zero points) in 4-bit containers, unlike the default packed storage
CONTAINER_3 = Capabilities(backend="container", widths={"affine": (2, 3, 4, 8)},
                           containers={2: 2, 3: 4, 4: 4, 8: 8})


def _lowering(capabilities: Capabilities) -> Pass:
    class ToyLowering(Pass):
        name = f"lower-{capabilities.backend}"
        kind = PassKind.TRANSFORM

        def run(self, graph, context):
            pass

    ToyLowering.capabilities = capabilities
    return ToyLowering()


def _graph() -> Graph:
    rng = np.random.default_rng(0)
    arrays = {f"layers.{b}.{name}": rng.standard_normal((16, 64)).astype(np.float32)
              for b in range(4) for name in ("a", "b")}
    sites = {s: MatmulSite(s, "mlp", int(s.split(".")[1]), (16, 64), s, order)
             for order, s in enumerate(arrays)}
    blocks = [Block(b, f"layers.{b}", [f"layers.{b}.a", f"layers.{b}.b"]) for b in range(4)]
    return Graph("toy", "toy", sites, blocks, nx.DiGraph(), source=ArrayWeights(arrays))


def test_greedy_solver_only_uses_widths_the_target_stores():
    graph = _graph()
    PassManager([*parse("zd,policy-zd{bits=7,group_size=16}"), _lowering(AFFINE_4_8)]).run(graph)
    widths = {spec.bits for spec in graph.plan.specs.values()}
    assert widths <= {4, 8} and widths == {4, 8}  # 2 bits would fit the budget but is not stored
    assert graph.plan.budget["widths"] == [4, 8]


def test_a_width_the_target_cannot_store_is_refused_naming_the_backend():
    graph = _graph()
    manager = PassManager([*parse("policy-uniform{width=2}"), _lowering(AFFINE_4_8)])
    with pytest.raises(PlanError, match="backend toy cannot store w2g128 rtn-asym"):
        manager.run(graph)


def test_a_format_the_target_cannot_store_is_refused():
    graph = _graph()
    manager = PassManager([*parse("policy-uniform{width=4,scheme=codebook}"),
                           _lowering(AFFINE_4_8)])
    with pytest.raises(PlanError, match="cannot store w4 codebook"):
        manager.run(graph)


def test_an_applied_plan_is_checked_against_the_target(tmp_path):
    from lwqc.ir.plan_json import plan_document, write_plan

    graph = _graph()
    PassManager(parse("zd,policy-uniform{width=2,group_size=16}")).run(graph)
    path = tmp_path / "plan.json"
    write_plan(path, plan_document(graph))
    again = _graph()
    manager = PassManager([*parse(f"apply-plan{{file={json.dumps(str(path))}}}"),
                           _lowering(AFFINE_4_8)])
    with pytest.raises(PlanError, match="site layers.0.a: backend toy cannot store"):
        manager.run(again)


def test_container_storage_charges_three_bit_codes_at_four_bits_packed_at_three():
    graph = _graph()
    PassManager([*parse("policy-uniform{width=3,group_size=16}"),
                 _lowering(CONTAINER_3)]).run(graph)
    # per site: 16 * 64 codes in 4-bit containers, 16 * 4 groups of fp32 scales and zero
    # points in 4-bit containers
    container = 16 * 64 * 4 // 8 + 64 * 4 + 64 * 4 // 8
    assert container == 512 + 256 + 32
    assert totals(graph, graph.plan.specs).bytes == 8 * container
    packed = _graph()
    PassManager(parse("policy-uniform{width=3,group_size=16}")).run(packed)  # no lowering
    # the default storage packs codes and zero points at 3 bits: 1024 * 3 / 8 and 64 * 3 / 8
    per_site = 16 * 64 * 3 // 8 + 64 * 4 + 64 * 3 // 8
    assert per_site == 384 + 256 + 24
    assert totals(packed, packed.plan.specs).bytes == 8 * per_site
    # the difference is one bit per code and per zero point
    assert 8 * (container - per_site) == 16 * 64 + 64


def test_lowerings_that_store_differently_cannot_share_a_pipeline():
    with pytest.raises(PipelineError, match="store different formats"):
        PassManager([*parse("policy-uniform{width=4}"), _lowering(AFFINE_4_8),
                     _lowering(CONTAINER_3)]).run(_graph())


def test_onnx_and_torch_store_the_same_specs_at_the_same_sizes():
    onnx, torch = LowerOnnxPass.capabilities, LowerTorchPass.capabilities
    assert onnx.same_storage(torch)
    for spec in (AsymmetricSpec(3, 32), AsymmetricSpec(2, None), AsymmetricSpec(4, 128)):
        assert onnx.bytes((8, 576), spec, 32) == torch.bytes((8, 576), spec, 32)


def test_matmul_nbits_padding_is_charged():
    # 576 inputs in groups of 128: MatMulNBits pads the fifth block to 128 codes and packs
    # each row's five 4-bit zero points into three bytes; 3-bit codes (no MatMulNBits) are
    # charged at the format's own size
    onnx = LowerOnnxPass.capabilities
    assert onnx.bytes((8, 576), AsymmetricSpec(4, 128), 32) == 8 * 5 * 128 // 2 + 8 * 5 * 4 + 8 * 3
    assert PACKED_STORAGE.bytes((8, 576), AsymmetricSpec(4, 128), 32) == (
        8 * 576 // 2 + 8 * 5 * 4 + 8 * 5 // 2)
    assert onnx.bytes((8, 576), AsymmetricSpec(3, 128), 32) == PACKED_STORAGE.bytes(
        (8, 576), AsymmetricSpec(3, 128), 32)
