"""report.md on a hand-built graph and plan: every number checked against sums done by hand.

Sites (inputs 128 each; scales float32; zero points packed at the code width):
    layers.0.q   16x128  w4 g128 rtn-asym: 1024 codes + 16 * 4 scales + 8 zp      = 1096 B
    layers.0.up  32x128  w2 g128 rtn-asym: 1024 codes + 32 * 4 scales + 8 zp      = 1160 B
    layers.1.q   16x128  w8 g64  rtn-asym: 2048 codes + 32 * 4 scales + 32 zp     = 2208 B
    layers.1.up  32x128  w3 row  rtn-sym:  1536 codes (packed at 3 bits) + 128    = 1664 B
    lm_head       8x128  kept at the model's 16-bit float                          = 2048 B
"""

from __future__ import annotations

import networkx as nx
import pytest

from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.ir.plan import Plan
from lwqc.ir.spec import AsymmetricSpec, KeepSpec, SymmetricSpec
from lwqc.passes.lim import LimStat
from lwqc.passes.manager import PassTiming
from lwqc.report import render

SITE_BYTES = {"layers.0.q": 1096, "layers.0.up": 1160, "layers.1.q": 2208,
              "layers.1.up": 1664, "lm_head": 2048}
PARAMS = {"layers.0.q": 2048, "layers.0.up": 4096, "layers.1.q": 2048, "layers.1.up": 4096,
          "lm_head": 1024}
TOTAL_PARAMS = 13312
TOTAL_BYTES = 8176
FLOAT_BYTES = 2 * TOTAL_PARAMS  # 16-bit model
LOGICAL_BITS = 4 * 2048 + 2 * 4096 + 8 * 2048 + 3 * 4096 + 16 * 1024  # 61440
BLOCK_LIM = (0.123456, 0.5)


def test_hand_sums_agree():
    assert sum(SITE_BYTES.values()) == TOTAL_BYTES
    assert sum(PARAMS.values()) == TOTAL_PARAMS
    assert LOGICAL_BITS == 61440


def report_graph(mode: str = "bits") -> Graph:
    shapes = {"layers.0.q": (16, 128), "layers.0.up": (32, 128), "layers.1.q": (16, 128),
              "layers.1.up": (32, 128), "lm_head": (8, 128)}
    sites = {}
    for order, (site_id, shape) in enumerate(shapes.items()):
        block = int(site_id.split(".")[1]) if site_id.startswith("layers") else None
        role = site_id.rsplit(".", 1)[-1]
        sites[site_id] = MatmulSite(site_id, role, block, shape, site_id, order)
    blocks = [Block(0, "layers.0", ["layers.0.q", "layers.0.up"]),
              Block(1, "layers.1", ["layers.1.q", "layers.1.up"])]
    dataflow = nx.DiGraph()
    dataflow.add_edges_from(zip(list(shapes), list(shapes)[1:], strict=False))
    graph = Graph("toy/model", "llama", sites, blocks, dataflow, keep_bits=16,
                  pipeline="calib,lim,policy-lim{bits=5.5},quantize,lower-onnx",
                  excluded=[("model.embed_tokens", "an embedding, not a matmul"),
                            ("score", "tied to lm_head")])
    for block in blocks:
        graph.annotate_block(block.index, LimStat("lim", BLOCK_LIM[block.index], 64))
    for site in graph:
        value = 0.75 if site.block is None else BLOCK_LIM[site.block]
        graph.annotate_site(site.id, LimStat("lim", value, 64))
    specs = {
        "layers.0.q": AsymmetricSpec(4, group_size=128),
        "layers.0.up": AsymmetricSpec(2, group_size=128),
        "layers.1.q": AsymmetricSpec(8, group_size=64),
        "layers.1.up": SymmetricSpec(3, group_size=None),
        "lm_head": KeepSpec(),
    }
    budget = {"granularity": "matmul", "overrides": ["lm_head=16"]}
    if mode == "bits":
        budget.update(mode="bits", bits=5.5, widths=[2, 3, 4, 8], solver="greedy")
    else:
        budget.update(mode="ratio", ratio=0.4, widths=[2, 8])
    graph.plan = Plan(specs=specs, policy="policy-lim", budget=budget,
                      notes=["a note for the reader"])
    return graph


def table(report: str, heading: str) -> list[dict[str, str]]:
    """The rows of the markdown table under ``## heading`` as header -> cell."""
    lines = report.splitlines()
    start = lines.index(f"## {heading}") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    header, rule, *body = rows
    assert set(rule) == {"---"}
    return [dict(zip(header, row, strict=True)) for row in body]


def bullet_lines(report: str, heading: str | None = None) -> list[str]:
    """The ``- `` lines before the first heading (None) or under ``## heading``."""
    lines = report.splitlines()
    if heading is None:
        end = next(i for i, line in enumerate(lines) if line.startswith("## "))
        section = lines[:end]
    else:
        start = lines.index(f"## {heading}") + 1
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        section = lines[start:end]
    return [line[2:] for line in section if line.startswith("- ")]


TIMINGS = [PassTiming("calib", 0.5), PassTiming("lim", 12.25), PassTiming("lower-onnx", 3.0)]


@pytest.fixture(scope="module")
def report() -> str:
    return render(report_graph(), TIMINGS)


def test_summary_counts_and_totals(report):
    physical = 8 * TOTAL_BYTES / TOTAL_PARAMS  # 65408 / 13312 = 4.9134...
    logical = LOGICAL_BITS / TOTAL_PARAMS  # 4.6154...
    assert report.splitlines()[0] == "# lwqc report: toy/model"
    summary = bullet_lines(report)
    assert summary[:7] == [
        "architecture: llama, 2 blocks, 5 matmul sites, 13,312 quantizable weights",
        "pipeline: `calib,lim,policy-lim{bits=5.5},quantize,lower-onnx`",
        "policy: policy-lim, granularity matmul, mode bits, widths [2, 3, 4, 8]",
        f"budget: 5.5 physical bits/weight; plan uses {physical:.4f} "
        f"(slack {5.5 - physical:.4f} bits/weight)",
        f"logical bits/weight {logical:.4f} (codes only; float kept at 16)",
        f"size of quantizable weights: 8,176 bytes (float: 26,624, "
        f"{FLOAT_BYTES / TOTAL_BYTES:.2f}x smaller)",
        "counted: the weights of every matmul site (scales and zero points included); "
        "biases and norms are not counted",
    ]
    assert f"{physical:.4f}" == "4.9135" and f"{logical:.4f}" == "4.6154"
    assert f"{FLOAT_BYTES / TOTAL_BYTES:.2f}" == "3.26"  # 26624 / 8176


def test_excluded_tensors_notes_and_overrides_are_listed(report):
    summary = bullet_lines(report)
    assert summary[7:] == [
        "not counted: `model.embed_tokens`: an embedding, not a matmul",
        "not counted: `score`: tied to lm_head",
        "a note for the reader",
        "overrides: lm_head=16",
    ]


def test_a_tied_head_is_said_to_serve_the_embedding():
    graph = report_graph()
    graph.sites["lm_head"].tied = "model.embed_tokens.weight"
    summary = bullet_lines(render(graph, TIMINGS))
    assert summary[7] == ("`lm_head` is tied to `model.embed_tokens.weight`: one quantized "
                          "array serves the matmul and the embedding lookup, counted once")
    assert summary[8:] == [
        "not counted: `model.embed_tokens`: an embedding, not a matmul",
        "not counted: `score`: tied to lm_head",
        "a note for the reader",
        "overrides: lm_head=16",
    ]


def test_matmul_table_has_each_sites_bytes_spec_and_score(report):
    rows = table(report, "Matmuls")
    assert [r["site"] for r in rows] == [f"`{s}`" for s in SITE_BYTES]
    assert [r["bytes"] for r in rows] == ["1,096", "1,160", "2,208", "1,664", "2,048"]
    assert [r["spec"] for r in rows] == ["w4g128 rtn-asym", "w2g128 rtn-asym", "w8g64 rtn-asym",
                                         "w3grow rtn-sym", "keep"]
    assert [r["shape"] for r in rows] == ["16x128", "32x128", "16x128", "32x128", "8x128"]
    assert [r["block"] for r in rows] == ["0", "0", "1", "1", "-"]
    assert [r["LIM"] for r in rows] == ["0.1235", "0.1235", "0.5000", "0.5000", "0.7500"]
    # only the score columns some site carries are shown
    assert "ZD" not in rows[0] and "entropy (nats)" not in rows[0]


def test_block_table_has_widths_and_bits_per_weight(report):
    rows = table(report, "Blocks")
    assert [(r["block"], r["module"], r["LIM"], r["widths"]) for r in rows] == [
        ("0", "layers.0", "0.1235", "q4 up2"),
        ("1", "layers.1", "0.5000", "q8 up3"),
    ]
    # 8 * (1096 + 1160) / 6144 = 2.9375; 8 * (2208 + 1664) / 6144 = 5.0416...
    assert [r["bits/weight"] for r in rows] == ["2.938", "5.042"]


def test_widths_section_gives_weights_and_shares_per_width(report):
    assert bullet_lines(report, "Widths") == [
        "2: 4,096 weights (30.8%)",
        "3: 4,096 weights (30.8%)",
        "4: 2,048 weights (15.4%)",
        "8: 2,048 weights (15.4%)",
        "fp: 1,024 weights (7.7%)",
    ]


def test_pass_timings_are_listed_in_order(report):
    assert bullet_lines(report, "Pass timings") == [
        "calib: 0.50 s", "lim: 12.25 s", "lower-onnx: 3.00 s"]
    assert report.endswith("- lower-onnx: 3.00 s\n")


def test_no_timings_no_timing_section_and_other_modes_show_the_plan_size():
    report = render(report_graph(mode="ratio"), [])
    assert "## Pass timings" not in report
    summary = bullet_lines(report)
    assert summary[2] == "policy: policy-lim, granularity matmul, mode ratio, widths [2, 8]"
    assert summary[3] == "plan uses 4.9135 physical bits/weight"  # 65408 / 13312
    assert not any(line.startswith("budget:") for line in summary)
