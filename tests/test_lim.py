"""LIM: minus the mean cosine between each block's residual input and output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lwqc.ir.hf_source import import_model
from lwqc.passes.lim import token_cosines
from lwqc.passes.manager import PassManager
from lwqc.registry import parse

pytestmark = pytest.mark.usefixtures("single_thread")


def test_token_cosines_of_parallel_antiparallel_and_orthogonal_vectors():
    h_in = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [0.0, 0.0, 4.0]]])
    h_out = torch.tensor([[[2.0, 4.0, 6.0], [-0.5, -1.0, -1.5], [0.0, 5.0, 0.0], [3.0, -2.0, 0.0]]])
    cos = token_cosines(h_in, h_out)
    assert cos.shape == (1, 4)
    assert cos.dtype == np.float64
    np.testing.assert_allclose(cos, [[1.0, -1.0, 0.0, 0.0]], atol=1e-15)


def test_token_cosines_of_a_3_4_5_example():
    # (3, 4) . (4, 3) = 24, |a| = |b| = 5 -> 24 / 25; (3, 4) . (5, 0) = 15 -> 15 / 25
    h_in = torch.tensor([[[3.0, 4.0]], [[3.0, 4.0]]])
    h_out = torch.tensor([[[4.0, 3.0]], [[5.0, 0.0]]])
    np.testing.assert_allclose(token_cosines(h_in, h_out), [[0.96], [0.6]], rtol=1e-15)


def test_token_cosines_are_per_token_over_batch_and_sequence():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 5, 8))
    expected = np.array([[np.dot(a[i, t], b[i, t]) / (np.linalg.norm(a[i, t])
                          * np.linalg.norm(b[i, t])) for t in range(5)] for i in range(3)])
    np.testing.assert_allclose(token_cosines(torch.from_numpy(a), torch.from_numpy(b)),
                               expected, rtol=1e-12)


def test_token_cosines_of_a_zero_vector_is_zero_not_nan():
    cos = token_cosines(torch.zeros(1, 1, 4), torch.ones(1, 1, 4))
    assert cos.tolist() == [[0.0]]


def test_token_cosines_ignore_scale():
    h_in = torch.tensor([[[1.0, -2.0, 0.5]]])
    h_out = torch.tensor([[[0.3, 0.1, 2.0]]])
    # powers of two scale float32 exactly
    np.testing.assert_allclose(token_cosines(1024 * h_in, h_out / 1024),
                               token_cosines(h_in, h_out), rtol=1e-15)


@pytest.fixture(scope="module")
def ref_graph(ref_llama_dir):
    graph = import_model(str(ref_llama_dir))
    rng = np.random.default_rng(11)
    # hand-made windows (no tokenizer involved): 6 samples of 40 tokens, two batches of 4
    graph.calibration = rng.integers(0, graph.source.module.config.vocab_size, (6, 40))
    graph.available.add("calibration")
    return graph


def run_lim(graph, options: str = "") -> None:
    PassManager(parse(f"lim{{{options}}}" if options else "lim")).run(graph)


def independent_cosines(graph) -> np.ndarray:
    """[blocks - 1, samples, seq] per-token cosines from HF's ``output_hidden_states``."""
    ids = torch.from_numpy(np.asarray(graph.calibration, np.int64))
    with torch.no_grad():
        out = graph.source.module(input_ids=ids, output_hidden_states=True, use_cache=False)
    states = [h.double().numpy() for h in out.hidden_states]
    assert len(states) == len(graph.blocks) + 1
    cosines = []
    for i in range(len(graph.blocks) - 1):  # the last entry has the final norm applied
        a, b = states[i], states[i + 1]
        dot = (a * b).sum(-1)
        cosines.append(dot / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))
    return np.array(cosines)


def test_lim_equals_minus_mean_cosine_from_hf_hidden_states(ref_graph):
    run_lim(ref_graph)
    cosines = independent_cosines(ref_graph)
    expected = -cosines.mean(axis=(1, 2))
    got = [ref_graph.blocks[i].stats["lim"].lim for i in range(len(expected))]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    for block in ref_graph.blocks:
        assert block.stats["lim"].tokens == 6 * 40
        assert block.stats["lim"].source == "lim"
        assert -1.0 <= block.stats["lim"].lim <= 1.0


def test_lim_skip_first_drops_position_zero(ref_graph):
    run_lim(ref_graph)
    with_first = [b.stats["lim"].lim for b in ref_graph.blocks]
    run_lim(ref_graph, "skip_first=true")
    without_first = [b.stats["lim"].lim for b in ref_graph.blocks]
    cosines = independent_cosines(ref_graph)
    expected = -cosines[:, :, 1:].mean(axis=(1, 2))
    np.testing.assert_allclose(without_first[: len(expected)], expected, atol=1e-5, rtol=0)
    # dropping position 0 changes the values (here by about 1e-3 in blocks 0 and 1)
    assert max(abs(a - b) for a, b in zip(with_first, without_first, strict=True)) > 1e-4
    assert all(b.stats["lim"].tokens == 6 * 39 for b in ref_graph.blocks)


def test_lim_sites_inherit_block_lim_and_lm_head_gets_the_max(ref_graph):
    run_lim(ref_graph)
    lims = [b.stats["lim"].lim for b in ref_graph.blocks]
    outside = [s for s in ref_graph if s.block is None]
    assert [s.id for s in outside] == ["lm_head"]
    for site in ref_graph:
        expected = max(lims) if site.block is None else lims[site.block]
        assert site.stats["lim"].lim == expected
        assert site.stats["lim"].importance() == expected
    # block 0 rewrites the embeddings far more than any later block: it holds the max
    assert max(lims) == lims[0]
    assert {"site.lim", "block.lim"} <= ref_graph.available
