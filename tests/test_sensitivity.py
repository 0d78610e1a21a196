"""Sensitivity: relative output error and measured delta-KL per site and width."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lwqc.ir.accounting import totals
from lwqc.ir.errors import PipelineError
from lwqc.ir.hf_source import import_model
from lwqc.ir.spec import AsymmetricSpec, FloatOffsetDqSpec, SymmetricSpec
from lwqc.passes.manager import PassManager
from lwqc.passes.quantizers import quantize_weight
from lwqc.passes.sensitivity import WIDTHS, Damage, relative_row_errors
from lwqc.passes.solver import make_units
from lwqc.registry import parse

pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------- relative_row_errors


def test_relative_output_error_with_diagonal_gram_by_hand():
    # G = diag(1, 4): tr(dW G dW^T) = sum_ij dW_ij^2 g_j
    weight = np.array([[1.0, 2.0], [3.0, -1.0]])
    approx = np.array([[1.5, 2.0], [3.0, 0.0]])
    gram = np.diag([1.0, 4.0])
    # dW = [[-0.5, 0], [0, -1]] -> 0.25 * 1 + 1 * 4 = 4.25
    # W  -> (1 + 9) * 1 + (4 + 1) * 4 = 30
    assert relative_row_errors(weight, approx, gram).sum() == pytest.approx(4.25 / 30, rel=1e-15)


def test_relative_output_error_with_off_diagonal_gram_equals_norms_on_activations():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 6))
    weight = rng.standard_normal((4, 6))
    approx = weight + 0.1 * rng.standard_normal((4, 6))
    direct = np.linalg.norm((weight - approx) @ x.T) ** 2 / np.linalg.norm(weight @ x.T) ** 2
    assert relative_row_errors(weight, approx, x.T @ x).sum() == pytest.approx(direct, rel=1e-12)


def test_relative_output_error_is_zero_when_approx_is_the_weight():
    weight = np.array([[0.5, -1.25, 3.0]], dtype=np.float32)
    assert relative_row_errors(weight, weight.astype(np.float64), np.eye(3)).sum() == 0.0


def test_relative_output_error_of_zero_reference_is_zero():
    # inputs never reach the weight's columns: nothing to compare against
    weight = np.array([[1.0, 2.0]])
    gram = np.zeros((2, 2))
    assert relative_row_errors(weight, np.zeros((1, 2)), gram).sum() == 0.0


def test_relative_output_error_ignores_columns_without_input_energy():
    weight = np.array([[1.0, 7.0]])
    approx = np.array([[1.0, -100.0]])  # only the column with zero input is wrong
    assert relative_row_errors(weight, approx, np.diag([2.0, 0.0])).sum() == 0.0


# ---------------------------------------------------------------- the pass on a tiny llama

SAMPLES, SEQ = 6, 24


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    graph = import_model(str(tiny_llama_dir))
    graph.calibration = np.random.default_rng(3).integers(0, 128, (SAMPLES, SEQ))
    graph.available.add("calibration")
    return graph


def run(graph, pipeline: str) -> None:
    PassManager(parse(pipeline)).run(graph)


# predictions at three group sizes, for the policy's choice among them
OUTPUT_ERROR = "gram,sensitivity{metric=output-error,group_size=32+64+128}"


@pytest.fixture(scope="module")
def output_error(tiny):
    run(tiny, OUTPUT_ERROR)
    return {s.id: s.stats["sensitivity"] for s in tiny}, [b.stats["sensitivity"]
                                                          for b in tiny.blocks]


def test_output_error_decreases_with_width_at_every_site(tiny, output_error):
    sites, _ = output_error
    assert set(sites) == set(tiny.sites)
    for site_id, stat in sites.items():
        assert stat.metric == "output-error"
        assert stat.err2 > stat.err4 > stat.err8 >= 0.0, site_id
        assert stat.err3 > stat.err8, site_id  # 3-bit may tie with 4-bit, never beats 8-bit
        assert stat.error(16) == 0.0
        assert stat.importance() == stat.err4
        # 8-bit RTN of a random init is tiny; 2-bit is a large share of the output
        assert stat.err8 < 1e-3 < stat.err2 < 1.0, site_id


def test_block_output_error_is_the_sum_of_its_sites(tiny, output_error):
    sites, blocks = output_error
    assert len(blocks) == 2
    for block, stat in zip(tiny.blocks, blocks, strict=True):
        assert len(block.sites) == 7
        for bits in WIDTHS:
            expected = math.fsum(sites[s].error(bits) for s in block.sites)
            assert stat.error(bits) == pytest.approx(expected, rel=1e-12)


def captured_inputs(graph, module_name: str) -> np.ndarray:
    """Inputs of one HF module over the calibration windows, ``[tokens, in]`` float64."""
    captured = []
    module = graph.source.module.get_submodule(module_name)
    handle = module.register_forward_hook(
        lambda _m, args, _out: captured.append(args[0].detach().double().reshape(
            -1, args[0].shape[-1]).numpy())
    )
    try:
        with torch.no_grad():
            graph.source.module(input_ids=torch.from_numpy(graph.calibration), use_cache=False)
    finally:
        handle.remove()
    return np.concatenate(captured)


@pytest.mark.parametrize("site_id", ["model.layers.0.self_attn.q_proj",
                                     "model.layers.1.mlp.down_proj", "lm_head"])
def test_output_error_equals_direct_computation_on_captured_activations(
    tiny, output_error, site_id
):
    sites, _ = output_error
    x = captured_inputs(tiny, site_id)
    assert x.shape == (SAMPLES * SEQ, tiny.sites[site_id].shape[1])
    weight = tiny.source.module.get_submodule(site_id).weight.detach().double().numpy()
    reference = np.linalg.norm(x @ weight.T) ** 2
    for bits in WIDTHS:
        # the default quantizer: float-offset-dq groups of 32, least-squares ranges
        q = quantize_weight(weight.astype(np.float32), FloatOffsetDqSpec(bits, 32)).dequantize()
        direct = np.linalg.norm(x @ (weight - q).T) ** 2 / reference
        assert sites[site_id].error(bits) == pytest.approx(direct, rel=1e-9), bits


def test_output_error_follows_the_quantizer_options(tiny, output_error):
    sites, _ = output_error
    site_id = "model.layers.1.self_attn.o_proj"
    x = captured_inputs(tiny, site_id)
    weight = tiny.weight(site_id).astype(np.float64)
    run(tiny, "gram,sensitivity{metric=output-error,group_size=32,scheme=rtn-sym,clip=minmax}")
    try:
        stat = tiny.sites[site_id].stats["sensitivity"]
        for bits in WIDTHS:
            q = quantize_weight(weight.astype(np.float32), SymmetricSpec(bits, 32),
                                "minmax").dequantize()
            direct = np.linalg.norm(x @ (weight - q).T) ** 2 / np.linalg.norm(x @ weight.T) ** 2
            assert stat.error(bits) == pytest.approx(direct, rel=1e-9)
        assert stat.err4 != sites[site_id].err4
    finally:
        run(tiny, OUTPUT_ERROR)


# ---------------------------------------------------------------- fisher


def test_head_fisher_is_the_closed_form_of_sampled_cross_entropy(tiny):
    # d CE / d logits = softmax - onehot(label), labels drawn as the source draws them
    ids = tiny.calibration[:3]
    fisher = tiny.source.output_fisher(ids, ["lm_head"], seed=11)["lm_head"]
    with torch.no_grad():
        logits = tiny.source.module(input_ids=torch.from_numpy(ids), use_cache=False).logits
    flat = logits.float().reshape(-1, logits.shape[-1])
    p = torch.softmax(flat, -1)
    labels = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(11))[:, 0]
    grad = p.double() - torch.nn.functional.one_hot(labels, p.shape[-1]).double()
    np.testing.assert_allclose(fisher, grad.square().sum(0).numpy(), rtol=1e-5, atol=1e-9)


def test_inner_site_fisher_equals_the_gradient_of_an_added_perturbation(tiny):
    # independent route: a zero tensor added to the site's output, differentiated directly
    ids = tiny.calibration[:2]
    site_id = "model.layers.1.mlp.up_proj"
    fisher = tiny.source.output_fisher(ids, [site_id], seed=5)[site_id]
    module = tiny.source.module
    with torch.no_grad():
        logits = module(input_ids=torch.from_numpy(ids), use_cache=False).logits.float()
    flat = logits.reshape(-1, logits.shape[-1])
    labels = torch.multinomial(torch.softmax(flat, -1), 1,
                               generator=torch.Generator().manual_seed(5))[:, 0]
    delta = torch.zeros(2, ids.shape[1], tiny.sites[site_id].shape[0], requires_grad=True)
    handle = module.get_submodule(site_id).register_forward_hook(
        lambda m, args, output: output + delta)
    try:
        out = module(input_ids=torch.from_numpy(ids), use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), labels,
                                                 reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
    finally:
        handle.remove()
    expected = grad.double().square().reshape(-1, grad.shape[-1]).sum(0).numpy()
    np.testing.assert_allclose(fisher, expected, rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in module.parameters())  # no parameter gradient kept


def test_fisher_errors_follow_their_formula_and_predict_measured_kl(tiny):
    run(tiny, "gram,sensitivity{metric=fisher,clip=minmax,scheme=rtn-asym,group_size=128}")
    try:
        windows = tiny.calibration
        sums = {}
        for start in range(0, len(windows), 4):
            for site_id, values in tiny.source.output_fisher(
                    windows[start : start + 4], list(tiny.sites), seed=start).items():
                sums[site_id] = sums.get(site_id, 0) + values
        damage = Damage(tiny)
        ratios = []
        for site in tiny:
            stat = site.stats["sensitivity"]
            assert stat.metric == "fisher"
            weight = tiny.weight(site.id).astype(np.float64)
            x = captured_inputs(tiny, site.id)
            for bits in WIDTHS:
                q = quantize_weight(tiny.weight(site.id), AsymmetricSpec(bits, 128),
                                    "minmax").dequantize()
                per_channel = ((x @ (weight - q).T) ** 2).sum(0)  # (dW G dW^T)_ii
                expected = 0.5 * sums[site.id] @ per_channel / windows.size**2
                assert stat.error(bits) == pytest.approx(expected, rel=1e-6)
            q = quantize_weight(tiny.weight(site.id), AsymmetricSpec(3, 128), "minmax")
            ratios.append(stat.err3 / damage.of({site.id: q.dequantize()}))
        # a second-order estimate of the KL the quantized site causes: the right size
        assert 0.7 < float(np.median(ratios)) < 1.4 and 0.3 < min(ratios) < max(ratios) < 2
    finally:
        run(tiny, OUTPUT_ERROR)


def test_encoder_fisher_is_zero_where_the_output_does_not_depend_on_a_site(tmp_path):
    from conftest import save_tiny_model

    graph = import_model(str(save_tiny_model("bert", tmp_path)))
    ids = np.random.default_rng(4).integers(0, 100, (2, 12))
    fisher = graph.source.output_fisher(ids, list(graph.sites), seed=0)
    assert set(fisher) == set(graph.sites)
    pooler = [s for s in graph.sites if "pooler" in s]
    assert pooler and all(np.array_equal(fisher[s], np.zeros(graph.sites[s].shape[0]))
                          for s in pooler)
    assert all(np.all(fisher[s] > 0) for s in graph.sites if s not in pooler)


def test_fisher_is_the_default_where_gradients_exist(tiny):
    run(tiny, "gram,sensitivity")
    try:
        assert {s.stats["sensitivity"].metric for s in tiny} == {"fisher"}
    finally:
        run(tiny, OUTPUT_ERROR)


# ---------------------------------------------------------------- delta-KL


def parameters(graph) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in graph.source.module.named_parameters()}


def test_damage_of_no_change_is_zero(tiny):
    assert Damage(tiny).of({}) == 0.0


def test_damage_of_the_float_weights_themselves_is_zero(tiny):
    damage = Damage(tiny)
    same = {s: tiny.weight(s).copy() for s in ["model.layers.0.mlp.up_proj", "lm_head"]}
    assert damage.of(same) == pytest.approx(0.0, abs=1e-12)


def test_damage_restores_the_weights_and_grows_with_coarser_widths(tiny):
    before = parameters(tiny)
    damage = Damage(tiny)
    site_id = "model.layers.1.mlp.gate_proj"
    values = {}
    for bits in (2, 8):
        q = quantize_weight(tiny.weight(site_id), AsymmetricSpec(bits, 128)).dequantize()
        values[bits] = damage.of({site_id: q.astype(np.float32)})
        after = parameters(tiny)
        assert before.keys() == after.keys()
        for name in before:
            assert torch.equal(before[name], after[name]), name
    assert values[2] > values[8] > 0.0
    # restored: the unchanged model again shows no damage
    assert damage.of({}) == 0.0


def test_damage_is_mean_kl_of_next_token_distributions(tiny):
    site_id = "model.layers.0.self_attn.v_proj"
    changed = np.zeros_like(tiny.weight(site_id))  # zero the value projection
    ids = torch.from_numpy(tiny.calibration)
    module = tiny.source.module
    with torch.no_grad():
        p = torch.softmax(module(input_ids=ids, use_cache=False).logits.double(), -1)
        param = module.get_submodule(site_id).weight
        saved = param.detach().clone()
        param.data.zero_()
        try:
            q = torch.softmax(module(input_ids=ids, use_cache=False).logits.double(), -1)
        finally:
            param.data.copy_(saved)
    expected = float((p * (p.log() - q.log())).sum(-1).mean())
    assert Damage(tiny).of({site_id: changed}) == pytest.approx(expected, rel=1e-6)


def test_delta_kl_results_are_cached_and_read_back(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("LWQC_CACHE", str(tmp_path))
    try:
        check_delta_kl_cache(tiny, tmp_path)
    finally:
        # leave the output-error annotations for later tests
        run(tiny, OUTPUT_ERROR)


def check_delta_kl_cache(tiny, tmp_path) -> None:
    run(tiny, "sensitivity{metric=delta-kl,group_size=32+64}")
    files = list(tmp_path.glob("sensitivity-*.json"))
    assert len(files) == 1
    cached = json.loads(files[0].read_text())
    assert set(cached) == set(tiny.sites)
    for site_id, measured in cached.items():  # widths 2, 3, 4, 8 in groups of 32, then of 64
        stat = tiny.sites[site_id].stats["sensitivity"]
        assert stat.metric == "delta-kl"
        assert stat.quantizer == "float-offset-dq g32+64" and stat.group_size == 32
        assert measured == [stat.err2, stat.err3, stat.err4, stat.err8, *stat.coarser[0][1:]]
        assert stat.coarser[0][0] == 64
        assert [stat.error(b, 64) for b in (2, 3, 4, 8)] == measured[4:]
        assert stat.err2 > stat.err8 >= 0.0, site_id
    # the second run reads the file: an edited value comes back in the annotation
    cached["lm_head"][2] = 123.5
    files[0].write_text(json.dumps(cached))
    run(tiny, "sensitivity{metric=delta-kl,group_size=32+64}")
    assert tiny.sites["lm_head"].stats["sensitivity"].err4 == 123.5
    assert list(tmp_path.glob("sensitivity-*.json")) == files
    # other quantizer settings are another cache entry
    run(tiny, "sensitivity{metric=delta-kl,group_size=16}")
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 2
    assert tiny.sites["lm_head"].stats["sensitivity"].err4 != 123.5


def test_ray_workers_measure_the_local_numbers(tiny, monkeypatch, tmp_path):
    """Each (site, width) a task on a 2-worker local Ray cluster whose workers read the model
    again from its id: the local measurements, cached the same way."""
    pytest.importorskip("ray")
    from lwqc.executors import RayPool

    try:
        monkeypatch.setenv("LWQC_CACHE", str(tmp_path / "local"))
        run(tiny, "sensitivity{metric=delta-kl}")
        local = {s.id: s.stats["sensitivity"] for s in tiny}
        monkeypatch.setenv("LWQC_CACHE", str(tmp_path / "ray"))
        PassManager(parse("sensitivity{metric=delta-kl}"), pool=RayPool(workers=2)).run(tiny)
        for site in tiny:
            remote = site.stats["sensitivity"]
            for bits in WIDTHS:
                assert remote.error(bits) == pytest.approx(local[site.id].error(bits),
                                                           rel=1e-6, abs=1e-12), site.id
        cached = [json.loads(p.read_text()) for p in (tmp_path / "ray").glob("*.json")]
        assert len(cached) == 1 and set(cached[0]) == set(tiny.sites)
    finally:
        # leave the output-error annotations for later tests
        run(tiny, OUTPUT_ERROR)


def test_kl_scaled_keeps_output_error_ratios_and_the_measured_4_bit_damage(
        tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("LWQC_CACHE", str(tmp_path))
    try:
        run(tiny, OUTPUT_ERROR)
        output = {s.id: s.stats["sensitivity"] for s in tiny}
        run(tiny, "sensitivity{metric=delta-kl}")
        measured = {s.id: s.stats["sensitivity"] for s in tiny}
        run(tiny, "sensitivity{metric=kl-scaled}")
        for site in tiny:
            scaled = site.stats["sensitivity"]
            assert scaled.metric == "kl-scaled"
            assert scaled.err4 == pytest.approx(measured[site.id].err4, rel=1e-12)
            ratio = scaled.err4 / output[site.id].err4
            for bits in (2, 3, 8):
                assert scaled.error(bits) == pytest.approx(ratio * output[site.id].error(bits),
                                                           rel=1e-12)
        # the 4-bit measurement alone is cached, apart from the four-width one
        assert len(list(tmp_path.glob("sensitivity-*.json"))) == 2
    finally:
        run(tiny, OUTPUT_ERROR)


# ---------------------------------------------------------------- policy-sensitivity


def physical_bytes(shape, bits, group_size=32):
    """float-offset-dq (the policy's default quantizer) written out for this test: codes at
    their width (3 bits: eight to three bytes), 6-bit scale and offset codes four to three
    bytes, two float16 steps per row and super-group of 8 groups."""
    out_features, in_features = shape
    groups = -(-in_features // group_size)
    count = out_features * in_features
    codes = -(-count // 8) * 3 if bits == 3 else -(-count * bits // 8)
    parameter_codes = 2 * -(-out_features * groups // 4) * 3
    steps = 2 * out_features * -(-groups // 8) * 2
    return codes + parameter_codes + steps


def best_by_dynamic_program(costs, losses, capacity):
    """Least total loss choosing one option per unit with summed cost <= capacity."""
    best = np.zeros(capacity + 1)  # best[c]: least loss of the units so far within c bytes
    for unit_costs, unit_losses in zip(costs, losses, strict=True):
        nxt = np.full(capacity + 1, np.inf)
        for c, loss in zip(unit_costs, unit_losses, strict=True):
            if c <= capacity:
                nxt[c:] = np.minimum(nxt[c:], best[: capacity + 1 - c] + loss)
        best = nxt
    return best[capacity]


def plan_of(graph, pipeline: str) -> dict[str, int]:
    graph.plan = None
    graph.available.discard("plan")
    run(graph, pipeline)
    return {s: spec.bits for s, spec in graph.plan.specs.items()}


def choices_of(graph) -> dict[str, tuple[int, int]]:
    """The plan's (width, group size) per site."""
    return {s: (spec.bits, spec.group_size) for s, spec in graph.plan.specs.items()}


def loss_of(graph, choices: dict[str, tuple[int, int]]) -> float:
    assert all(graph.sites[s].stats["sensitivity"].metric == "output-error" for s in choices)
    return sum(graph.sites[s].stats["sensitivity"].error(b, g) for s, (b, g) in choices.items())


def used_bits(graph, choices: dict[str, tuple[int, int]]) -> int:
    return 8 * sum(physical_bytes(graph.sites[s].shape, b, g) for s, (b, g) in choices.items())


GROUP_SIZES = (32, 64, 128)  # those the fixture predicts for
SIZES = "group_size=32+64+128"


def candidates(widths) -> list[tuple[int, int]]:
    return [(w, g) for w in widths for g in GROUP_SIZES]


# float-offset-dq at 64 and 128 inputs costs its width + 0.625 to 0.875 bits in groups of 32,
# + 0.31 to 0.5 in groups of 64 or 128
@pytest.mark.parametrize("budget", [3.0, 3.5, 4.5, 5.5, 7.0, 9.0])
def test_policy_sensitivity_matches_brute_force_at_layer_granularity(
    tiny, output_error, budget
):
    plan_of(tiny,
            f"policy-sensitivity{{bits={budget},granularity=layer,widths=2+3+4+8,{SIZES}}}")
    chosen = choices_of(tiny)
    capacity = Fraction(str(budget)) * tiny.total_params
    assert used_bits(tiny, chosen) <= capacity
    units = make_units(tiny, "layer")
    assert [u.name for u in units] == ["model.layers.0", "model.layers.1", "lm_head"]
    best = math.inf
    for combo in itertools.product(candidates((2, 3, 4, 8)), repeat=len(units)):
        plan = {s: c for u, c in zip(units, combo, strict=True) for s in u.sites}
        if used_bits(tiny, plan) <= capacity:
            best = min(best, loss_of(tiny, plan))
    assert best < math.inf
    assert loss_of(tiny, chosen) == pytest.approx(best, rel=1e-12, abs=1e-15)
    for unit in units:  # one width and group size per block
        assert len({chosen[s] for s in unit.sites}) == 1


@pytest.mark.parametrize("budget", [3.0, 3.6, 4.5, 5.5, 7.5])
def test_policy_sensitivity_is_optimal_at_matmul_granularity(tiny, output_error, budget):
    widths = (2, 3, 4, 8)
    bits = plan_of(tiny, f"policy-sensitivity{{bits={budget},widths=2+3+4+8,{SIZES}}}")
    capacity = Fraction(str(budget)) * tiny.total_params
    assert used_bits(tiny, choices_of(tiny)) <= capacity
    assert set(bits.values()) <= set(widths)
    assert len(set(bits.values())) >= 2  # these budgets force a mixed plan
    assert_optimal(tiny, candidates(widths), capacity)


def test_policy_sensitivity_plans_among_its_own_group_sizes(tiny, output_error):
    """Predictions for 32, 64 and 128; the policy offered 32 and 64 uses only those."""
    bits = plan_of(tiny, "policy-sensitivity{bits=3.6,widths=2+3+4+8,group_size=32+64}")
    assert {g for _, g in choices_of(tiny).values()} <= {32, 64}
    assert_optimal(tiny, [(w, g) for w in (2, 3, 4, 8) for g in (32, 64)],
                   Fraction("3.6") * tiny.total_params)
    assert len(set(bits.values())) >= 2


def test_policy_sensitivity_by_default_plans_groups_of_32(tiny):
    run(tiny, "gram,sensitivity{metric=output-error}")
    try:
        bits = plan_of(tiny, "policy-sensitivity{bits=3.6,widths=2+3+4+8}")
        assert set(choices_of(tiny).values()) == {(b, 32) for b in bits.values()}
        assert tiny.sites["lm_head"].stats["sensitivity"].quantizer == "float-offset-dq g32"
        assert_optimal(tiny, [(w, 32) for w in (2, 3, 4, 8)], Fraction("3.6") * tiny.total_params)
    finally:
        run(tiny, OUTPUT_ERROR)


@pytest.mark.parametrize("budget", [3.0, 3.6, 4.5, 5.5, 7.5])
def test_policy_sensitivity_mixes_the_two_rungs_around_the_budget(tiny, output_error, budget):
    capacity = Fraction(str(budget)) * tiny.total_params
    fitting = [w for w in (2, 3, 4, 8)  # at the cheapest group size
               if used_bits(tiny, dict.fromkeys(tiny.sites, (w, 128))) <= capacity]
    ladder = [fitting[-1], {2: 3, 3: 4, 4: 8}[fitting[-1]]]
    bits = plan_of(tiny, f"policy-sensitivity{{bits={budget},{SIZES}}}")
    assert tiny.plan.budget["widths"] == ladder
    assert set(bits.values()) == set(ladder)
    assert used_bits(tiny, choices_of(tiny)) <= capacity
    assert_optimal(tiny, candidates(ladder), capacity)


def assert_optimal(graph, choices, capacity: Fraction) -> None:
    """The plan's summed loss is the least of any plan over ``choices`` (width, group size)
    within ``capacity``."""
    sites = list(graph.sites.values())
    costs = [[physical_bytes(s.shape, b, g) for b, g in choices] for s in sites]
    losses = [[s.stats["sensitivity"].error(b, g) for b, g in choices] for s in sites]
    best = best_by_dynamic_program(costs, losses, int(capacity // 8))
    assert loss_of(graph, choices_of(graph)) == pytest.approx(best, rel=1e-9, abs=1e-15)


def test_policy_sensitivity_with_room_for_everything_takes_the_widest_width(tiny, output_error):
    bits = plan_of(tiny, f"policy-sensitivity{{bits=9,widths=2+3+4+8,{SIZES}}}")
    assert set(bits.values()) == {8}
    # without widths, a budget between the uniform 8-bit plan and float mixes both
    bits = plan_of(tiny, f"policy-sensitivity{{bits=20,{SIZES}}}")
    assert tiny.plan.budget["widths"] == [8, 16]
    assert set(bits.values()) == {8, 16}
    assert 8 * totals(tiny, tiny.plan.specs).bytes <= 20 * tiny.total_params


def test_cache_key_tells_window_shapes_apart(tmp_path, monkeypatch):
    from lwqc.ir.graph import Graph
    from lwqc.passes.sensitivity import SensitivityPass

    monkeypatch.setenv("LWQC_CACHE", str(tmp_path))
    tokens = np.arange(64, dtype=np.int64)
    graph = Graph("m", "a", {}, [], None, weights_sha256="0" * 64)
    sensitivity = SensitivityPass(metric="delta-kl")
    graph.calibration = tokens.reshape(1, 64)
    four = [(b, 32) for b in (2, 3, 4, 8)]
    one = sensitivity._cache_file(graph, four)
    graph.calibration = tokens.reshape(8, 8)
    assert sensitivity._cache_file(graph, four) != one
    assert sensitivity._cache_file(graph, [(4, 32)]) != sensitivity._cache_file(graph, four)
    assert sensitivity._cache_file(graph, [(4, 32)]) != sensitivity._cache_file(graph, [(4, 64)])


def test_policy_refuses_predictions_for_another_quantizer(tiny, output_error):
    assert {s.stats["sensitivity"].quantizer for s in tiny} == {"float-offset-dq g32+64+128"}
    with pytest.raises(PipelineError, match="sensitivity predicted the damage of "
                       "float-offset-dq g32\\+64\\+128 and policy-sensitivity plans rtn-asym g128"):
        plan_of(tiny, "policy-sensitivity{bits=4.5,scheme=rtn-asym,group_size=128}")
    with pytest.raises(PipelineError, match="plans float-offset-dq g16\\+32:"):
        plan_of(tiny, "policy-sensitivity{bits=4.5,group_size=16+32}")
    with pytest.raises(PipelineError, match="solver=greedy.* plans one group size"):
        plan_of(tiny, f"policy-sensitivity{{bits=4.5,solver=greedy,{SIZES}}}")
    assert tiny.sites["lm_head"].stats["sensitivity"].error(4, 32) > 0
    with pytest.raises(PipelineError, match="not group size 16"):
        tiny.sites["lm_head"].stats["sensitivity"].error(4, 16)
