"""The importer lifts sites, roles, blocks, fusion groups and dataflow from the traced graph."""

from __future__ import annotations

import sys

import networkx as nx
import numpy as np
import pytest

from conftest import REPO, save_tiny_model
from lwqc.ir.errors import ModelLoadError
from lwqc.ir.hf_source import import_model

LLAMA_LIKE_ROLES = ["q", "k", "v", "o", "gate", "up", "down"]
EXPECTED = {
    # arch: (roles of block 0 in execution order, sites outside blocks, fused groups of block 0)
    "llama": (LLAMA_LIKE_ROLES, ["lm_head"], {"q+k+v", "gate+up"}),
    "qwen2": (LLAMA_LIKE_ROLES, ["lm_head"], {"q+k+v", "gate+up"}),
    "mistral": (LLAMA_LIKE_ROLES, ["lm_head"], {"q+k+v", "gate+up"}),
    "gemma": (LLAMA_LIKE_ROLES, ["lm_head"], {"q+k+v", "gate+up"}),  # tied to the embeddings
    "phi3": (["qkv", "o", "gate_up", "down"], ["lm_head"], set()),
    "gpt2": (["qkv", "o", "fc_in", "fc_out"], ["lm_head"], set()),  # lm_head tied to wte
    "bert": (["q", "k", "v", "o", "fc_in", "fc_out"], ["pooler.dense"], {"q+k+v"}),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_tiny_architectures_lift_sites_blocks_and_groups(arch, tmp_path):
    graph = import_model(str(save_tiny_model(arch, tmp_path)))
    roles, outside, fused = EXPECTED[arch]
    assert len(graph.blocks) == 2
    for block in graph.blocks:
        assert [graph.sites[s].role for s in block.sites] == roles
        assert all(graph.sites[s].block == block.index for s in block.sites)
    assert [s.id for s in graph if s.block is None] == outside
    groups = {s.fusion_group.split(":")[1] for s in graph if ":" in s.fusion_group and s.block == 0}
    assert groups == fused
    assert nx.is_directed_acyclic_graph(graph.dataflow)
    # every site's weight comes back in [out, in] order with its declared shape
    for site in graph:
        assert graph.weight(site.id).shape == site.shape


def test_gpt2_conv1d_weight_is_transposed_to_out_in(tmp_path):
    import torch

    graph = import_model(str(save_tiny_model("gpt2", tmp_path)))
    site = graph.sites["transformer.h.0.mlp.c_fc"]
    stored = graph.source.module.get_parameter("transformer.h.0.mlp.c_fc.weight")
    assert tuple(stored.shape) == (64, 256)  # Conv1D keeps [in, out]
    assert site.shape == (256, 64)
    np.testing.assert_array_equal(graph.weight(site.id), stored.detach().numpy().T)
    assert isinstance(stored, torch.nn.Parameter)


def test_tied_lm_head_is_one_site_serving_the_embedding(tmp_path):
    graph = import_model(str(save_tiny_model("gemma", tmp_path)))
    head = graph.sites["lm_head"]
    assert (head.role, head.tied, head.block) == ("lm_head", "model.embed_tokens.weight", None)
    table = graph.source.module.get_parameter("model.embed_tokens.weight").detach().numpy()
    np.testing.assert_array_equal(graph.weight("lm_head"), table)
    assert "model.embed_tokens.weight" not in dict(graph.excluded)  # counted as the head
    untied = import_model(str(save_tiny_model("llama", tmp_path / "llama")))
    assert untied.sites["lm_head"].tied is None


def test_dataflow_links_blocks_in_execution_order(tiny_llama_dir):
    graph = import_model(str(tiny_llama_dir))
    flow = graph.dataflow
    prefix = "model.layers.0."
    # q, k, v read the normed residual stream; o reads attention of q, k, v
    assert set(flow.predecessors(prefix + "self_attn.o_proj")) == {
        prefix + "self_attn.q_proj", prefix + "self_attn.k_proj", prefix + "self_attn.v_proj"
    }
    assert set(flow.predecessors(prefix + "mlp.down_proj")) == {
        prefix + "mlp.gate_proj", prefix + "mlp.up_proj"
    }
    # the residual stream carries o and down of block 0 into block 1's q
    assert {prefix + "self_attn.o_proj", prefix + "mlp.down_proj"} <= set(
        flow.predecessors("model.layers.1.self_attn.q_proj")
    )
    assert list(nx.topological_sort(graph.block_dataflow())) == [
        "model.layers.0", "model.layers.1", "lm_head"
    ]


def test_ref_llama_6l_has_43_sites_in_6_blocks(ref_llama_dir):
    graph = import_model(str(ref_llama_dir))
    assert len(graph.blocks) == 6 and len(graph.sites) == 43
    assert graph.total_params == 6 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 768 * 256) + 4096 * 256
    assert graph.sites["model.layers.5.mlp.down_proj"].shape == (256, 768)


def test_minilm_encoder_is_lifted_as_bert_model(minilm_dir):
    from safetensors.numpy import load_file

    graph = import_model(str(minilm_dir))
    assert graph.architecture == "BertModel" and graph.source.kind == "encoder"
    assert len(graph.blocks) == 6
    assert len(graph.sites) == 6 * 6 + 1  # six linears per layer, plus the pooler
    layer = "encoder.layer.2"
    block = graph.blocks[2]
    assert block.module == layer
    assert [graph.sites[s].role for s in block.sites] == ["q", "k", "v", "o", "fc_in", "fc_out"]
    assert [graph.sites[s].shape for s in block.sites] == [(384, 384)] * 4 + [(1536, 384),
                                                                            (384, 1536)]
    q, k, v, o, fc_in, fc_out = block.sites
    group = f"{layer}.attention.self:q+k+v"
    assert graph.sites[q].fusion_group == graph.sites[k].fusion_group == group
    # attention output feeds the FFN, which feeds the next layer's q, k and v
    assert graph.dataflow.has_edge(o, fc_in) and graph.dataflow.has_edge(fc_in, fc_out)
    assert graph.dataflow.has_edge(fc_out, "encoder.layer.3.attention.self.query")
    # the weights are the checkpoint's own tensors, in [out, in] order
    stored = load_file(str(minilm_dir / "model.safetensors"))
    prefix = next(k for k in stored if k.endswith(f"{layer}.intermediate.dense.weight"))
    np.testing.assert_array_equal(graph.weight(fc_in), stored[prefix])


def test_stories260k_converts_and_imports(stories_bin, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import llama2c_to_hf

    graph = import_model(str(llama2c_to_hf.convert(stories_bin, tmp_path / "stories")))
    assert len(graph.blocks) == 5
    assert graph.sites["model.layers.0.self_attn.k_proj"].shape == (32, 64)  # 4 kv heads of 8
    assert graph.sites["lm_head"].tied == "model.embed_tokens.weight"
    assert len(graph.sites) == 5 * 7 + 1
    # w2 (FFN down, [L, dim, hidden]) read straight from the llama2.c file: header of 7 int32,
    # then embeddings, two norms and wq/wk/wv/wo/w1 before it
    dim, hidden, layers, heads, kv_heads, vocab, _ = np.fromfile(stories_bin, np.int32, 7)
    kv_dim = dim * kv_heads // heads
    floats = np.fromfile(stories_bin, np.float32, offset=7 * 4)
    start = (abs(vocab) * dim + layers * dim + layers * (2 * dim * dim + 2 * kv_dim * dim)
             + layers * dim + layers * hidden * dim)
    w2 = floats[start : start + layers * dim * hidden].reshape(layers, dim, hidden)
    for layer in range(layers):
        np.testing.assert_array_equal(graph.weight(f"model.layers.{layer}.mlp.down_proj"),
                                      w2[layer])


def test_missing_model_path_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        import_model(str(tmp_path / "no-such-model"))


def test_directory_without_config_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        import_model(str(tmp_path))
