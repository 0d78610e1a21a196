"""Float-offset sites on MatMulNBits plus a group-sum correction: ORT computes with exactly the
format's weights, from nothing but the format's own arrays."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
import onnxruntime as ort
import pytest

from lwqc.backends import matmul_nbits, offset_nbits
from lwqc.backends.onnx_formats import SiteRewrite
from lwqc.ir.capabilities import PACKED_STORAGE
from lwqc.ir.spec import FloatOffsetDqSpec, FloatOffsetSpec, make_spec, row_mix
from lwqc.passes.quantizers import quantize_weight


def test_float_offset_and_affine_groups_of_a_power_of_two_without_outliers_fit():
    rng = np.random.default_rng(0)
    float_weight = rng.normal(size=(8, 64)).astype(np.float32)

    def quantized(spec):
        return quantize_weight(float_weight, spec, clip="minmax")

    assert offset_nbits.fits(quantized(FloatOffsetDqSpec(4, 32)))
    assert offset_nbits.fits(quantized(FloatOffsetSpec(3, 16)))
    assert not offset_nbits.fits(quantized(FloatOffsetSpec(4, 8)))  # below MatMulNBits' 16
    assert not offset_nbits.fits(quantized(FloatOffsetSpec(4, None)))  # per row
    assert not offset_nbits.fits(quantized(FloatOffsetDqSpec(4, 32, outliers=0.02)))
    assert offset_nbits.fits(quantized(make_spec(2, "rtn-asym", group_size=32)))
    assert offset_nbits.fits(quantized(make_spec(3, "rtn-sym", group_size=16)))
    assert not offset_nbits.fits(quantized(make_spec(3, "rtn-asym", group_size=32,
                                                     outliers=0.02)))
    assert not offset_nbits.fits(quantized(make_spec(3, "codebook")))
    assert [offset_nbits.container(b) for b in (2, 3, 4, 8)] == [4, 4, 4, 8]
    # affine weights (zero points, no correction) never share a kernel with float offsets
    assert offset_nbits.kernel_key(quantized(make_spec(3, "rtn-asym", group_size=32))) == (
        32, 4, True)
    assert offset_nbits.kernel_key(quantized(FloatOffsetDqSpec(3, 32))) == (32, 4, False)


def _site_graph(weights, in_features: int, accuracy_level: int, rank: int | None = 2,
                bias: np.ndarray | None = None):
    """One MatMulNBits with its correction for ``weights`` (sites side by side), reading an
    activation of ``rank`` (None: unknown); outputs the product, then the rows of site ``i``
    at the indices ``rows<i>`` (``[1, n]``, as an embedding reads token ids), looked up in the
    kernel's arrays."""
    shape = None if rank is None else ir.Shape([*["m"] * (rank - 1), in_features])
    activation = ir.Value(name="A", type=ir.TensorType(ir.DataType.FLOAT), shape=shape)
    indices = [ir.Value(name=f"rows{i}", type=ir.TensorType(ir.DataType.INT64),
                        shape=ir.Shape([1, f"n{i}"])) for i in range(len(weights))]
    anchor = ir.node("Identity", [activation])
    graph = ir.Graph([activation, *indices], [], nodes=[anchor],
                     opset_imports={"": 25})  # uint2
    sites = [(SiteRewrite(graph, f"w{i}", anchor, False, PACKED_STORAGE.code_bits, {}), w)
             for i, w in enumerate(weights)]
    shared = sites[0][0] if len(sites) == 1 else SiteRewrite(
        graph, "shared", anchor, False, PACKED_STORAGE.code_bits, {})
    bias_value = None if bias is None else ir.Value(
        name="bias", const_value=ir.tensor(bias), type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape(list(bias.shape)))
    if bias_value is not None:
        graph.register_initializer(bias_value)
    output, lookups = offset_nbits.lower(shared, sites, activation, accuracy_level,
                                         bias_value)
    graph.outputs.append(output)
    graph.outputs.extend(lookups[rewrite.site_id](anchor, rows)
                         for (rewrite, _), rows in zip(sites, indices, strict=True))
    graph.remove(anchor)
    model = ir.Model(graph, ir_version=13)
    model.opset_imports[matmul_nbits.DOMAIN] = 1
    return model


def _computing_ops(value: ir.Value) -> set[str]:
    """The ops of every node that ``value`` is computed by."""
    ops, pending = set(), [value.producer()]
    while pending:
        node = pending.pop()
        if node is not None:
            ops.add(node.op_type)
            pending.extend(v.producer() for v in node.inputs if v is not None)
    return ops


def _shuffled_rows(weights) -> dict[str, np.ndarray]:
    """Inputs of ``_site_graph``'s lookups: every row of each site, in a shuffled order."""
    return {f"rows{i}": np.random.default_rng(i).permutation(w.shape[0])[None]
            for i, w in enumerate(weights)}


def _assert_rows(looked_up: list[np.ndarray], weights, indices: dict[str, np.ndarray]) -> None:
    """Each site's looked-up rows are exactly its format's weights at those rows."""
    for i, (rows, weight) in enumerate(zip(looked_up, weights, strict=True)):
        np.testing.assert_array_equal(rows, weight.dequantize()[indices[f"rows{i}"]])


def _session(model, optimized=None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("scheme", ["float-offset", "float-offset-dq", "rtn-asym", "rtn-sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("in_features", "group_size"),
                         [(96, 32), (80, 32), (75, 16), (576, 64), (576, 128), (1536, 128)])
def test_ort_computes_with_the_formats_weights(scheme, bits, in_features, group_size, tmp_path):
    rng = np.random.default_rng(bits)
    float_weight = rng.normal(size=(24, in_features)).astype(np.float32)
    weight = quantize_weight(float_weight, make_spec(bits, scheme, group_size=group_size),
                             clip="minmax")
    expected = weight.dequantize()
    model = _site_graph([weight], in_features, accuracy_level=1)
    kernels = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(kernels) == 1 and kernels[0].attributes.get_int("bits") == (
        4 if bits <= 4 else 8)
    # unsigned codes of the kernel's width in whole blocks are stored as its B: nothing to fold
    direct = bits in (4, 8) and in_features % group_size == 0 and scheme != "rtn-sym"
    assert (kernels[0].inputs[1].name == "w0.weight_codes") == direct
    # B from 3-bit codes packed in words: byte ops on the packed bytes, nothing widened
    if bits == 3 and in_features % 2 == 0:
        assert "Cast" not in _computing_ops(kernels[0].inputs[1])
    # the file holds the format's arrays at their physical size, nothing derived from them
    stored = sum(v.const_value.nbytes for name, v in model.graph.initializers.items()
                 if name.startswith("w0.weight_"))
    assert stored == PACKED_STORAGE.bytes(weight.shape, weight.spec, 16)
    assert all(v.const_value.nbytes <= 64 for name, v in model.graph.initializers.items()
               if not name.startswith("w0.weight_"))
    optimized = tmp_path / "optimized.onnx"
    session = _session(model, optimized)
    x = rng.normal(size=(3, in_features)).astype(np.float32)
    indices = _shuffled_rows([weight])
    product, *rows = session.run(None, {"A": x, **indices})
    _assert_rows(rows, [weight], indices)
    # float32 sums in another order: within n * eps * sum |x w| of the exact product
    exact = x.astype(np.float64) @ expected.T.astype(np.float64)
    bound = in_features * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(expected).T)
    assert np.all(np.abs(product - exact) <= bound)
    # on the identity each output is one weight, rounded as in torch: code * scale + offset,
    # or (code - zero point) * scale
    affine = scheme.startswith("rtn")
    ops = [n.op_type for n in model.graph]
    assert ("MatMul" in ops) != affine  # a group-sum correction for float offsets only
    by_identity = session.run(None, {"A": np.eye(in_features, dtype=np.float32),
                                     **indices})[0]
    np.testing.assert_array_equal(by_identity.T, expected)
    # ORT folded the kernel's inputs into constants before running it
    folded = onnx.load(str(optimized))
    constants = {t.name for t in folded.graph.initializer}
    (kernel,) = [n for n in folded.graph.node if n.op_type == "MatMulNBits"]
    assert set(kernel.input[1:4]) <= constants


@pytest.mark.parametrize("rank", [3, None])
def test_sites_side_by_side_with_a_bias_at_any_rank_and_int8_activations(rank):
    rng = np.random.default_rng(7)
    spec = make_spec(3, "float-offset-dq", group_size=16)
    weights = [quantize_weight(rng.normal(size=(rows, 48)).astype(np.float32), spec,
                               clip="minmax") for rows in (24, 8, 8)]
    expected = np.concatenate([w.dequantize() for w in weights])
    bias = rng.normal(size=40).astype(np.float32)
    x = rng.normal(size=(2, 5, 48)).astype(np.float32)
    reference = x @ expected.T + bias
    # level 4 quantizes the activations to int8 per block: within 2 % of the outputs' range
    for level, tolerance in ((1, 1e-4), (4, 0.02 * np.abs(reference).max())):
        model = _site_graph(weights, 48, level, rank, bias)
        indices = _shuffled_rows(weights)
        product, *rows = _session(model).run(None, {"A": x, **indices})
        np.testing.assert_allclose(product, reference, rtol=0, atol=tolerance)
        _assert_rows(rows, weights, indices)


def test_a_tied_head_of_an_export_serves_the_embedding_from_its_own_arrays(tmp_path):
    from conftest import holds_table_at_session_start, ort_dequantized, save_tiny_model
    from lwqc.backends import onnx_rewrite
    from lwqc.ir.hf_source import import_model
    from lwqc.passes.manager import PassManager
    from lwqc.registry import parse

    graph = import_model(str(save_tiny_model("gpt2", tmp_path / "gpt2")))
    assert graph.sites["lm_head"].tied is not None
    PassManager(parse("policy-uniform{width=4,group_size=32,scheme=float-offset-dq},quantize,"
                      "lower-onnx{graph=export,accuracy_level=1},lower-torch")).run(graph)
    path = tmp_path / "model.onnx"
    onnx_rewrite.save(graph.lowered["onnx"], path)
    proto = onnx.load(str(path))
    assert sum(n.op_type == "MatMulNBits" for n in proto.graph.node) == len(graph.sites)
    vocab, hidden = graph.sites["lm_head"].shape
    table = graph.weight("lm_head")
    assert not [t for t in proto.graph.initializer  # no float copy of the table is left
                if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) == table.size
                and np.array_equal(onnx.numpy_helper.to_array(t).reshape(-1),
                                   table.reshape(-1))]
    assert "GatherBlockQuantized" in [n.op_type for n in proto.graph.node]
    # nor is one computed when the session starts: the embedding reads rows of the arrays
    assert not holds_table_at_session_start(path, tmp_path / "started.onnx",
                                            graph.packed["lm_head"].dequantize())
    module = graph.lowered["torch"]
    for site_id, weight in ort_dequantized(path).items():
        np.testing.assert_array_equal(weight, graph.packed[site_id].dequantize(), site_id)
    ids = np.random.default_rng(0).integers(0, vocab, (2, 12))
    logits = onnx_rewrite.session(path).run(["logits"], {"input_ids": ids})[0]
    import torch

    with torch.no_grad():
        expected = module(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - expected).max() < 1e-4


def test_a_row_mix_of_one_kernel_runs_as_a_site_beside_another(tmp_path):
    """3-, 2- and 4-bit float-offset-dq rows in groups of 32 (codes all in 4-bit containers)
    share one MatMulNBits with an unmixed site, in row order: no Gather on the output. The file
    holds the parts' codes, the site's order and its parameters once, in row order: 20 rows of
    3 groups make 60 6-bit codes (45 bytes) per parameter and one super-group per row (20
    float16 steps), a few bytes less than the parts' parameters stored apart."""
    rng = np.random.default_rng(5)
    specs = [FloatOffsetDqSpec(3, 32), FloatOffsetDqSpec(2, 32), FloatOffsetDqSpec(4, 32)]
    choice = rng.permutation(np.arange(20) % 3)
    mixed = quantize_weight(rng.normal(size=(20, 96)).astype(np.float32),
                            row_mix(specs, choice), clip="minmax")
    plain = quantize_weight(rng.normal(size=(8, 96)).astype(np.float32), specs[2],
                            clip="minmax")
    assert offset_nbits.fits(mixed) and offset_nbits.kernel_key(mixed) == (32, 4, False)
    model = _site_graph([mixed, plain], 96, accuracy_level=1)
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulNBits") == 1
    stored = {name: value.const_value.nbytes for name, value in model.graph.initializers.items()
              if name.startswith("w0.") and ".weight_" in name}
    rows = [int((choice == k).sum()) for k in range(3)]
    codes = {f"w0.p{k}.weight_codes": -(-rows[k] * 96 * bits // 24) * 3 if bits == 3
             else rows[k] * 96 * bits // 8 for k, bits in enumerate((3, 2, 4))}
    assert stored == {**codes, "w0.weight_order": 40, "w0.weight_scale_codes": 45,
                      "w0.weight_offset_codes": 45, "w0.weight_scale_steps": 40,
                      "w0.weight_offset_steps": 40}
    assert sum(stored.values()) <= mixed.nbytes(PACKED_STORAGE.code_bits)
    optimized = tmp_path / "optimized.onnx"
    session = _session(model, optimized)
    expected = np.concatenate([mixed.dequantize(), plain.dequantize()])
    indices = _shuffled_rows([mixed, plain])
    by_identity, *rows = session.run(None, {"A": np.eye(96, dtype=np.float32), **indices})
    np.testing.assert_array_equal(by_identity.T, expected)
    _assert_rows(rows, [mixed, plain], indices)
    # the row order, like every input of the kernel, folded into constants; the Gathers left
    # read the lookups' offsets, none the kernel's output
    folded = onnx.load(str(optimized))
    constants = {t.name for t in folded.graph.initializer}
    (kernel,) = [n for n in folded.graph.node if n.op_type == "MatMulNBits"]
    assert set(kernel.input[1:4]) <= constants
    gathers = [n for n in folded.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 2 and all(n.input[0] in constants for n in gathers)


_FLOAT, _ASYM, _SYM = "float-offset-dq", "rtn-asym", "rtn-sym"


@pytest.mark.parametrize(("schemes", "kernels"), [
    ((_FLOAT,) * 4, 3), ((_ASYM,) * 4, 3), ((_SYM,) * 4, 3),
    ((_FLOAT, _ASYM, _SYM, _FLOAT), 4), ((_ASYM, _FLOAT, _FLOAT, _SYM), 4)])
def test_a_row_mix_of_three_group_sizes_is_corrected_by_one_matmul(schemes, kernels, tmp_path):
    """Rows in groups of 32, 64 and 128 (80 inputs: the wider groups' last one padded) run on
    one kernel per group size and kind (float offsets or affine), whose products are corrected
    together by one MatMul on the sums over groups of 32, the offsets of groups of 64 and 128
    repeated two and four times along them; affine rows, whose zero points the kernels hold,
    take zero offsets in it, and need no correction at all where every row is affine."""
    rng = np.random.default_rng(11)
    specs = [make_spec(bits, scheme, group_size=size) for scheme, (bits, size)
             in zip(schemes, ((3, 32), (4, 32), (2, 64), (3, 128)), strict=True)]
    choice = rng.permutation(np.arange(24) % 4)
    mixed = quantize_weight(rng.normal(size=(24, 80)).astype(np.float32),
                            row_mix(specs, choice), clip="minmax")
    assert offset_nbits.fits_rows(mixed) and not offset_nbits.fits(mixed)
    activation = ir.Value(name="A", type=ir.TensorType(ir.DataType.FLOAT),
                          shape=ir.Shape(["m", 80]))
    indices = ir.Value(name="rows0", type=ir.TensorType(ir.DataType.INT64),
                       shape=ir.Shape([1, "n"]))
    anchor = ir.node("Identity", [activation])
    graph = ir.Graph([activation, indices], [], nodes=[anchor], opset_imports={"": 25})
    rewrite = SiteRewrite(graph, "w", anchor, False, PACKED_STORAGE.code_bits, {})
    bias = rng.normal(size=24).astype(np.float32)
    bias_value = ir.Value(name="bias", const_value=ir.tensor(bias))
    graph.register_initializer(bias_value)
    output, lookup = offset_nbits.lower_rows(rewrite, mixed, activation, 1, bias_value)
    graph.outputs.extend([output, lookup(anchor, indices)])
    graph.remove(anchor)
    model = ir.Model(graph, ir_version=13)
    model.opset_imports[matmul_nbits.DOMAIN] = 1
    optimized = tmp_path / "optimized.onnx"
    session = _session(model, optimized)
    expected = mixed.dequantize()
    looked_up = _shuffled_rows([mixed])  # rows of every kernel, each where it falls
    by_identity, rows = session.run(None, {"A": np.eye(80, dtype=np.float32), **looked_up})
    np.testing.assert_array_equal(by_identity, expected.T + bias)  # each weight, then the bias
    _assert_rows([rows], [mixed], looked_up)
    x = rng.normal(size=(3, 80)).astype(np.float32)
    exact = x.astype(np.float64) @ expected.T.astype(np.float64) + bias
    bound = 80 * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(expected).T + np.abs(bias))
    assert np.all(np.abs(session.run(None, {"A": x, **looked_up})[0] - exact) <= bound)
    # what runs: the kernels, one group sum and one correcting MatMul (any float offsets), the
    # Gather into row order; the lookup reads each kernel's rows by GatherBlockQuantized, the
    # float kernels' offsets by a Gather each, after one Gather of the rows' places
    ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    corrected = int(_FLOAT in schemes)
    float_kernels = len({size for scheme, size in zip(schemes, (32, 32, 64, 128), strict=True)
                         if scheme == _FLOAT})
    assert (ops.count("MatMulNBits"), ops.count("ReduceSum"), ops.count("MatMul"),
            ops.count("Gather"), ops.count("GatherBlockQuantized"), ops.count("Where")) == (
        kernels, corrected, corrected, 2 + float_kernels, kernels, kernels - 1)
