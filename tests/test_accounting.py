"""Size accounting of a plan on a hand-built graph, every number by closed form."""

import dataclasses
from fractions import Fraction

import networkx as nx
import pytest

from lwqc.ir.accounting import site_bytes, totals
from lwqc.ir.capabilities import PACKED_STORAGE, Capabilities
from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.ir.spec import (
    QUANT_WIDTHS,
    AsymmetricSpec,
    CodebookSpec,
    FloatOffsetSpec,
    KeepSpec,
    SymmetricSpec,
)

SHAPES = {"a": (4, 8), "b": (16, 8), "c": (4, 8), "d": (16, 8), "e": (10, 8), "f": (4, 8)}
SPECS = {
    "a": AsymmetricSpec(4, 4),
    "b": SymmetricSpec(8, None),
    "c": FloatOffsetSpec(3, 8, outliers=0.1),
    "d": CodebookSpec(2, outliers=0.05),
    "e": KeepSpec(),
    "f": AsymmetricSpec(4, 8),
}
# bytes per site (codes and zero points at their own width: 3-bit codes cost 3 bits)
QUANTIZED_BYTES = {
    "a": 16 + 8 * 4 + 4,  # 32 codes * 4 bits; 4 rows * 2 groups: scales, 8 zero points * 4 bits
    "b": 128 + 16 * 4,  # 128 one-byte codes; one scale per row, no zero points
    "c": 12 + 4 * 8 + 3 * 6,  # 32 codes * 3 bits; 4 groups * (scale + offset); floor(3.2) = 3
    "d": 32 + 8 * 4 * 2 + 6 * 6,  # 128 codes * 2 bits; 8 columns * 4 fp16; floor(6.4) = 6
    "f": 16 + 4 * 4 + 2,  # 32 codes * 4 bits; 4 groups: scales, 4 zero points * 4 bits
}
PARAMS = 32 + 128 + 32 + 128 + 80 + 32


def _graph(keep_bits=32, target=PACKED_STORAGE):
    sites = {
        s: MatmulSite(s, "r", 0 if s != "e" else None, shape, s, order)
        for order, (s, shape) in enumerate(SHAPES.items())
    }
    blocks = [Block(0, "layers.0", [s for s in SHAPES if s != "e"])]
    return Graph("m", "toy", sites, blocks, nx.DiGraph(), keep_bits=keep_bits, target=target)


def test_site_bytes_of_each_scheme_by_hand():
    graph = _graph()
    for site_id, expected in QUANTIZED_BYTES.items():
        assert site_bytes(graph, site_id, SPECS[site_id]) == expected, site_id
    assert site_bytes(graph, "e", KeepSpec()) == 80 * 4


def test_site_bytes_of_a_kept_weight_follow_the_graph_keep_bits():
    assert site_bytes(_graph(keep_bits=16), "e", KeepSpec()) == 80 * 2
    assert site_bytes(_graph(keep_bits=32), "e", KeepSpec()) == 80 * 4


def test_site_bytes_use_the_graph_target():
    # a target storing 3-bit codes in 4-bit containers: 32 codes * 4 bits = 16 bytes instead
    # of the default packed 32 * 3 bits = 12
    loose = Capabilities(
        backend="loose",
        widths={"affine": QUANT_WIDTHS, "float-offset": QUANT_WIDTHS, "codebook": QUANT_WIDTHS},
        containers={2: 2, 3: 4, 4: 4, 8: 8},
    )
    graph = _graph(target=loose)
    assert site_bytes(graph, "c", SPECS["c"]) == 16 + 32 + 18
    assert site_bytes(_graph(), "c", SPECS["c"]) == 12 + 32 + 18
    # 3-bit zero points follow the container too: "a" at 3 bits has 8 groups; packed, 32
    # codes * 3 bits = 12 bytes, 8 zero points * 3 bits = 3 bytes; in 4-bit containers 16 + 4
    three = AsymmetricSpec(3, 4)
    assert site_bytes(_graph(), "a", three) == 12 + 8 * 4 + 3
    assert site_bytes(graph, "a", three) == 16 + 8 * 4 + 4
    # widths whose container is the same cost the same on both targets
    assert site_bytes(graph, "a", SPECS["a"]) == QUANTIZED_BYTES["a"]
    assert totals(graph, SPECS).bytes == totals(_graph(), SPECS).bytes + 4


@pytest.mark.parametrize("keep_bits", [32, 16])
def test_totals_of_a_mixed_plan_by_closed_form(keep_bits):
    result = totals(_graph(keep_bits), SPECS)
    kept_bytes = 80 * keep_bits // 8
    nbytes = sum(QUANTIZED_BYTES.values()) + kept_bytes
    assert nbytes == 472 + kept_bytes
    assert result.params == PARAMS == 432
    assert result.bytes == nbytes
    assert result.bytes_float == 432 * keep_bits // 8
    assert result.avg_bits_physical == pytest.approx(8 * nbytes / 432, rel=1e-15)
    # logical bits: the spec's width per weight, a kept weight at the keep width
    logical = 4 * 32 + 8 * 128 + 3 * 32 + 2 * 128 + keep_bits * 80 + 4 * 32
    assert result.avg_bits_logical == pytest.approx(logical / 432, rel=1e-15)
    # params by spec width: the two 4-bit sites add up; kept weights count under 16
    assert result.params_by_bits == {4: 64, 8: 128, 3: 32, 2: 128, 16: 80}


def test_totals_to_json_rounds_and_sorts_widths():
    data = totals(_graph(32), SPECS).to_json()
    assert data == {
        "params": 432,
        "bytes": 792,
        "bytes_float": 1728,
        "avg_bits_physical": round(8 * 792 / 432, 6),
        "avg_bits_logical": round(4192 / 432, 6),
        "params_by_bits": {"2": 128, "3": 32, "4": 64, "8": 128, "16": 80},
    }
    assert list(data["params_by_bits"]) == ["2", "3", "4", "8", "16"]


def test_totals_of_an_all_kept_plan_is_the_float_size():
    graph = _graph(16)
    result = totals(graph, dict.fromkeys(SHAPES, KeepSpec()))
    assert result.bytes == result.bytes_float == 432 * 2
    assert result.avg_bits_physical == result.avg_bits_logical == 16.0
    assert result.params_by_bits == {16: 432}


def test_totals_of_a_uniform_8bit_plan_without_groups():
    # per row one float32 scale: 1 byte per weight plus 4 bytes per row
    specs = dict.fromkeys(SHAPES, SymmetricSpec(8, None))
    rows = sum(shape[0] for shape in SHAPES.values())
    result = totals(_graph(), specs)
    assert result.bytes == 432 + 4 * rows
    assert result.avg_bits_physical == float(Fraction(8 * (432 + 4 * rows), 432))
    assert result.avg_bits_logical == 8.0


def test_adding_outliers_costs_six_bytes_per_reserved_weight():
    base = totals(_graph(), SPECS).bytes
    more = dict(SPECS, b=dataclasses.replace(SPECS["b"], outliers=0.25))  # floor(32) = 32
    assert totals(_graph(), more).bytes == base + 32 * 6
