"""plan.json: writing, reading back, validation of corrupt files, and a fuzz of read_plan."""

import copy
import dataclasses
import json
import random

import networkx as nx
import pytest

from lwqc.ir.annotations import Annotation
from lwqc.ir.errors import PlanError
from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.ir.plan import Plan
from lwqc.ir.plan_json import (
    SCHEMA,
    graph_from_document,
    plan_document,
    read_artifact_plan,
    read_plan,
    specs_from_document,
    write_plan,
)
from lwqc.ir.spec import (
    AsymmetricSpec,
    CodebookSpec,
    FloatOffsetDqSpec,
    FloatOffsetSpec,
    KeepSpec,
    RowMixSpec,
    SymmetricSpec,
)


@dataclasses.dataclass(frozen=True)
class ToyScore(Annotation):
    key = "toy"
    value: float
    count: int


SHAPES = {
    "layers.0.q": (8, 16),
    "layers.0.up": (32, 16),
    "layers.1.q": (8, 16),
    "layers.1.up": (32, 16),
    "lm_head": (20, 16),
}

SPECS = {
    "layers.0.q": RowMixSpec(bits=4, parts=(AsymmetricSpec(4, 8), FloatOffsetDqSpec(3, 8)),
                             rows="01100110"),
    "layers.0.up": SymmetricSpec(2, None, outliers=0.01),
    "layers.1.q": FloatOffsetSpec(3, 16, outliers=0.05),
    "layers.1.up": CodebookSpec(2, outliers=0.02),
    "lm_head": KeepSpec(),
}


def _graph() -> Graph:
    sites = {}
    for order, (site_id, shape) in enumerate(SHAPES.items()):
        block = int(site_id.split(".")[1]) if site_id.startswith("layers") else None
        role = site_id.rsplit(".", 1)[-1]
        sites[site_id] = MatmulSite(site_id, role, block, shape, f"fuse.{site_id}", order)
    blocks = [
        Block(0, "layers.0", ["layers.0.q", "layers.0.up"]),
        Block(1, "layers.1", ["layers.1.q", "layers.1.up"]),
    ]
    dataflow = nx.DiGraph()
    dataflow.add_edges_from(zip(list(SHAPES), list(SHAPES)[1:], strict=False))
    graph = Graph("toy/model", "ToyForCausalLM", sites, blocks, dataflow, keep_bits=16,
                  weights_sha256="ab" * 32, pipeline="uniform", excluded=[("embed", "embedding")])
    for i, site_id in enumerate(SHAPES):
        graph.annotate_site(site_id, ToyScore("toy-pass", 0.5 * i, i))
    graph.annotate_block(0, ToyScore("toy-pass", 1.25, 7))
    graph.annotate_block(1, ToyScore("toy-pass", -2.0, 3))
    graph.plan = Plan(specs=dict(SPECS), policy="hand", budget={"avg_bits": 4.0, "scheme": "mix"},
                      notes=["made by hand"])
    return graph


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "plan.json"
    write_plan(path, plan_document(_graph()))
    return path


# --------------------------------------------------------------------------- round trip


def test_plan_document_round_trips_through_write_and_read(tmp_path):
    document = plan_document(_graph())
    path = tmp_path / "plan.json"
    write_plan(path, document)
    assert path.read_text().endswith("}\n")
    read = read_plan(path)
    assert read == document
    assert read["schema"] == SCHEMA
    assert list(read["sites"]) == list(SHAPES)  # execution order is kept


def test_plan_document_records_each_site_spec_and_shape(tmp_path):
    document = plan_document(_graph())
    entry = document["sites"]["layers.1.q"]
    assert entry["bits"] == 3
    assert entry["group_size"] == 16
    assert entry["outliers"] == 0.05
    assert entry["scheme"] == "float-offset"
    assert entry["shape"] == [8, 16]
    assert entry["params"] == 128
    assert entry["block"] == 1
    assert entry["fusion_group"] == "fuse.layers.1.q"
    assert entry["scores"] == {"toy": {"source": "toy-pass", "value": 1.0, "count": 2}}
    # 128 codes packed at 3 bits = 48 bytes; 8 groups of 16 -> 64 bytes of scale and offset;
    # floor(0.05 * 128) = 6 outliers of 6 bytes
    assert entry["bytes"] == 48 + 64 + 36
    # kept lm_head at keep_bits 16
    assert document["sites"]["lm_head"]["bytes"] == 20 * 16 * 2
    assert "outliers" not in document["sites"]["layers.0.q"]
    # row-mix: rows 0, 3, 4, 7 as w4g8 rtn-asym (4 x 16 codes at 4 bits = 32 bytes, 4 x 2
    # groups of a float32 scale and a 4-bit zero point = 32 + 4 bytes), rows 1, 2, 5, 6 as
    # w3g8 float-offset-dq (64 codes at 3 bits = 24 bytes, 2 x 8 6-bit codes = 12 bytes, one
    # super-group: 4 rows x 2 float16 steps = 16 bytes), the order 8 x uint16
    assert document["sites"]["layers.0.q"]["parts"][1] == {"bits": 3, "group_size": 8,
                                                           "scheme": "float-offset-dq"}
    assert document["sites"]["layers.0.q"]["rows"] == "01100110"
    assert document["sites"]["layers.0.q"]["bytes"] == (32 + 36) + (24 + 12 + 16) + 16
    assert document["model"] == {"id": "toy/model", "architecture": "ToyForCausalLM",
                                 "weights_sha256": "ab" * 32, "keep_bits": 16}
    assert document["excluded"] == [{"tensor": "embed", "why": "embedding"}]
    assert document["blocks"][1] == {"index": 1, "module": "layers.1",
                                     "sites": ["layers.1.q", "layers.1.up"],
                                     "scores": {"toy": {"source": "toy-pass", "value": -2.0,
                                                        "count": 3}}}
    assert document["totals"]["bytes"] == sum(e["bytes"] for e in document["sites"].values())


def test_specs_from_document_equal_the_plan_specs(plan_file):
    specs = specs_from_document(read_plan(plan_file))
    assert specs == SPECS
    assert [type(s) for s in specs.values()] == [type(s) for s in SPECS.values()]


def test_graph_from_document_reproduces_sites_blocks_and_specs(plan_file):
    original = _graph()
    document = read_artifact_plan(plan_file)
    graph = graph_from_document(document)
    assert list(graph.sites) == list(original.sites)
    for site_id, site in original.sites.items():
        rebuilt = graph.sites[site_id]
        assert (rebuilt.role, rebuilt.block, rebuilt.shape, rebuilt.fusion_group, rebuilt.order) \
            == (site.role, site.block, site.shape, site.fusion_group, site.order)
        assert rebuilt.stats["toy"].values() == site.stats["toy"].values()
        assert rebuilt.stats["toy"].source == "toy-pass"
    assert [(b.index, b.module, b.sites) for b in graph.blocks] == [
        (b.index, b.module, b.sites) for b in original.blocks]
    assert graph.blocks[0].stats["toy"].values() == {"value": 1.25, "count": 7}
    assert (graph.model_id, graph.architecture, graph.keep_bits, graph.weights_sha256) == (
        original.model_id, original.architecture, 16, "ab" * 32)
    assert graph.plan.specs == SPECS
    assert (graph.plan.policy, graph.plan.budget, graph.plan.notes) == (
        "hand", {"avg_bits": 4.0, "scheme": "mix"}, ["made by hand"])


def test_document_of_the_rebuilt_graph_matches_the_original(plan_file):
    # the rebuilt graph carries everything but the pipeline text and excluded tensors
    document = read_plan(plan_file)
    again = plan_document(graph_from_document(document))
    for key in ("pipeline", "excluded"):
        document.pop(key)
        again.pop(key)
    assert again == document


def test_plan_document_without_a_plan_raises_plan_error():
    graph = _graph()
    graph.plan = None
    with pytest.raises(PlanError, match="no plan"):
        plan_document(graph)


# --------------------------------------------------------------------------- corruption


def _rewrite(path, edit):
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def _bad_spec(document):
    document["sites"]["layers.1.up"]["bits"] = 5


CORRUPTIONS = {
    "missing schema": lambda d: d.pop("schema"),
    "wrong schema": lambda d: d.update(schema="lwqc.plan/2"),
    "no sites": lambda d: d.pop("sites"),
    "empty sites": lambda d: d.update(sites={}),
    "sites as a list": lambda d: d.update(sites=[1, 2]),
    "bad spec": _bad_spec,
    "site entry not an object": lambda d: d["sites"].update({"lm_head": "keep"}),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_read_plan_refuses_corrupt_documents_naming_the_file(plan_file, name):
    _rewrite(plan_file, CORRUPTIONS[name])
    with pytest.raises(PlanError, match="plan file .*plan.json") as info:
        read_plan(plan_file)
    assert str(plan_file) in str(info.value)


def test_read_plan_names_the_site_with_a_bad_spec(plan_file):
    _rewrite(plan_file, _bad_spec)
    with pytest.raises(PlanError, match="site layers.1.up: unsupported width 5"):
        read_plan(plan_file)


@pytest.mark.parametrize("text", ["", "{", '{"schema": "lwqc.plan/1",', "not json", "[1, 2"])
def test_read_plan_refuses_invalid_json_naming_the_file(tmp_path, text):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(PlanError, match="is not valid JSON") as info:
        read_plan(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["[]", "3", '"lwqc.plan/1"', "null", '{"sites": {}}'])
def test_read_plan_refuses_a_document_that_is_not_a_plan(tmp_path, text):
    path = tmp_path / "other.json"
    path.write_text(text)
    with pytest.raises(PlanError, match="is not an lwqc.plan/1 document"):
        read_plan(path)


def test_read_plan_refuses_invalid_utf8(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b'{"schema": "\xff\xfe"}')
    with pytest.raises(PlanError, match="is not valid JSON"):
        read_plan(path)


def test_read_plan_of_a_missing_file_names_it(tmp_path):
    path = tmp_path / "nowhere.json"
    with pytest.raises(PlanError, match=f"plan file {path} does not exist"):
        read_plan(path)


def test_read_plan_refuses_deeply_nested_json_with_plan_error(tmp_path):
    # a file read_plan cannot parse is a defect like any other: PlanError, not RecursionError
    path = tmp_path / "deep.json"
    path.write_text('{"schema": "lwqc.plan/1", "sites": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(PlanError):
        read_plan(path)


def test_read_artifact_plan_accepts_a_complete_plan(plan_file):
    assert read_artifact_plan(plan_file) == read_plan(plan_file)


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("policy"), "policy"),
    (lambda d: d.pop("totals"), "totals"),
    (lambda d: d.pop("model"), "model"),
    (lambda d: d["model"].pop("keep_bits"), "model.keep_bits"),
    (lambda d: d["model"].pop("id"), "model.id"),
    (lambda d: d["sites"]["layers.1.q"].pop("role"), "sites.layers.1.q.role"),
    (lambda d: d["sites"]["lm_head"].pop("scores"), "sites.lm_head.scores"),
    (lambda d: d["blocks"][1].pop("module"), "blocks[1].module"),
    # several missing: the top-level field is named first, then model, sites, blocks
    (lambda d: (d["blocks"][0].pop("sites"), d.pop("budget")), "budget"),
    (lambda d: (d["blocks"][0].pop("sites"), d["model"].pop("architecture")),
     "model.architecture"),
    (lambda d: (d["blocks"][0].pop("sites"), d["sites"]["layers.0.up"].pop("shape")),
     "sites.layers.0.up.shape"),
])
def test_read_artifact_plan_names_the_first_missing_field(plan_file, edit, field):
    _rewrite(plan_file, edit)
    read_plan(plan_file)  # still a valid plan to apply
    with pytest.raises(PlanError) as info:
        read_artifact_plan(plan_file)
    assert f"plan file {plan_file} lacks {field}:" in str(info.value)


# --------------------------------------------------------------------------- fuzz

FUZZ_CASES = 300


def _paths(node, prefix=()):
    """Every path (tuple of keys and indices) to a node below the root."""
    children = node.items() if isinstance(node, dict) else (
        enumerate(node) if isinstance(node, list) else ())
    for key, child in children:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _random_value(rng, avoid):
    """A random JSON value whose type differs from ``avoid``'s."""
    makers = [
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: rng.randint(-10**6, 10**6),
        lambda: rng.choice([0.5, -3.25, 1e308, 4.0, float("nan"), float("inf")]),
        lambda: rng.choice(["", "rtn-asym", "keep", "codebook", "16", "x" * 50]),
        lambda: [rng.randint(0, 9) for _ in range(rng.randint(0, 3))],
        lambda: {"bits": rng.choice([4, "4", None]), rng.choice(["a", "scheme"]): 1},
    ]
    while True:
        value = rng.choice(makers)()
        if type(value) is not type(avoid):
            return value


def _numeric(rng, value):
    return rng.choice([-abs(value) - 1, 10**30, -(10**30), 2**63, value + 0.5, None, 0, 16,
                       float(value)])


def _structural_edit(rng, document):
    """One edit of the parsed document, in place; returns a description."""
    paths = list(_paths(document))
    # half the time aim at the spec fields, which read_plan validates
    spec_paths = [p for p in paths if len(p) == 3 and p[0] == "sites"]
    path = rng.choice(spec_paths if rng.random() < 0.5 else paths)
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    key, value = path[-1], parent[path[-1]]
    kind = rng.choice(["delete", "retype", "number", "nest"])
    if kind == "number" and not isinstance(value, (int, float)):
        kind = "retype"
    if kind == "delete":
        del parent[key]
        return f"delete {path}"
    if kind == "retype":
        parent[key] = _random_value(rng, value)
    elif kind == "number":
        parent[key] = _numeric(rng, value)
    else:
        for _ in range(rng.randint(1, 3)):
            parent[key] = [parent[key]]
    return f"{kind} {path} -> {json.dumps(parent[key])[:60]}"


GARBAGE = ['"', "{", "}", "[", "]", ",", ":", "\\", "\x00", "\u00e9", "\ud7ff", "NaN", "-", "e9",
           "\n", "true", " "]


def _text_edit(rng, text):
    kind = rng.choice(["truncate", "insert"])
    if kind == "truncate":
        cut = rng.randrange(len(text))
        return text[:cut], f"truncate at {cut}"
    at = rng.randrange(len(text))
    junk = "".join(rng.choice(GARBAGE) for _ in range(rng.randint(1, 4)))
    return text[:at] + junk + text[at:], f"insert {junk!r} at {at}"


def _fuzz(valid, tmp_path, reader):
    """Apply seeded random edits to ``valid`` and read each result with ``reader``."""
    rng = random.Random(20240607)
    path = tmp_path / "plan.json"
    failures, valid_reads = [], 0
    for case in range(FUZZ_CASES):
        document = copy.deepcopy(valid)
        edits = []
        for _ in range(rng.randint(1, 3)):
            try:
                edits.append(_structural_edit(rng, document))
            except IndexError:  # everything deleted already
                break
        text = json.dumps(document, indent=1)
        if rng.random() < 0.25:
            text, edit = _text_edit(rng, text)
            edits.append(edit)
        path.write_text(text)
        try:
            reader(path)
        except PlanError as exc:
            assert str(path) in str(exc), (edits, str(exc))
        except Exception as exc:  # any other exception is the bug sought
            failures.append(f"case {case}: {'; '.join(edits)}: {type(exc).__name__}: {exc}")
        else:
            valid_reads += 1
    return failures, valid_reads


def _read_plan_and_specs(path):
    specs_from_document(read_plan(path))


def test_fuzzed_plans_read_as_valid_plans_or_plan_errors(plan_file, tmp_path):
    valid = json.loads(plan_file.read_text())
    failures, valid_reads = _fuzz(valid, tmp_path, _read_plan_and_specs)
    assert not failures, "\n".join(failures[:20])
    # the fuzz exercises both outcomes
    assert 0 < valid_reads < FUZZ_CASES


def _read_artifact(path):
    specs_from_document(read_artifact_plan(path))


def test_fuzzed_artifact_plans_read_as_complete_plans_or_plan_errors(plan_file, tmp_path):
    valid = json.loads(plan_file.read_text())
    failures, valid_reads = _fuzz(valid, tmp_path, _read_artifact)
    assert not failures, "\n".join(failures[:20])
    assert 0 < valid_reads < FUZZ_CASES
