"""Sweeps evaluate plans against cached float outputs and resume from their results file."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from lwqc.ir.spec import AsymmetricSpec, KeepSpec
from lwqc.plots import plot_pareto
from lwqc.sweep import Sweeper, sweep_policies

pytestmark = pytest.mark.slow
ANALYSES = "zd,entropy,calib{samples=2,seq_len=64},lim"


@pytest.fixture(scope="module")
def sweeper(ref_llama_dir, tmp_path_factory):
    return Sweeper(str(ref_llama_dir), tmp_path_factory.mktemp("sweep"), windows=2,
                   analyses=ANALYSES)


def test_keeping_every_site_float_reproduces_the_float_model(sweeper):
    result = sweeper.evaluate({s: KeepSpec() for s in sweeper.graph.sites})
    assert result["ppl"] == result["ppl_fp"]
    assert result["kld"] == pytest.approx(0.0, abs=1e-12)
    assert result["top1_agreement"] == 1.0
    assert result["avg_bits_physical"] == 32.0


def test_dropping_a_block_changes_the_model_and_is_undone_afterwards(sweeper):
    kept = {s: KeepSpec() for s in sweeper.graph.sites}
    dropped = sweeper.evaluate(kept, dropped=(3,))
    assert dropped["kld"] > 1e-3
    assert sweeper.evaluate(kept)["kld"] == pytest.approx(0.0, abs=1e-12)


def test_points_resume_from_the_results_file(sweeper, ref_llama_dir):
    specs = {s: AsymmetricSpec(8) for s in sweeper.graph.sites}
    first = sweeper.point("u8", lambda: sweeper.evaluate(specs), policy="uniform", budget=8.0)
    lines = (sweeper.out / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["point"] == "u8"

    def must_not_run():
        raise AssertionError("a finished point was computed again")

    again = Sweeper(str(ref_llama_dir), sweeper.out, windows=2, analyses=ANALYSES)
    assert again.point("u8", must_not_run) == first
    assert 0 <= first["kld"] < 1e-3
    # lazy: the recorded point comes back without the analyses; a new plan runs them first
    lazy = Sweeper(str(ref_llama_dir), sweeper.out, windows=2, analyses=ANALYSES, lazy=True)
    assert lazy.point("u8", must_not_run) == first
    assert not any(site.stats for site in lazy.graph)
    assert set(lazy.plan("policy-lim{bits=6}").values()) and all(
        "lim" in block.stats for block in lazy.graph.blocks)


def test_policy_sweep_writes_tables_and_a_plot(sweeper):
    rows = sweep_policies(sweeper, ["lim", "random"], [3.0], seeds=2)
    names = {r["point"] for r in rows}
    assert {"lim-matmul-b3.0", "random-matmul-b3.0-s0", "random-matmul-b3.0-s1",
            "uniform-b3.0"} <= names
    assert all(r["avg_bits_physical"] <= r["budget"] for r in rows if "budget" in r
               and r["budget"] < 8)
    plotted = [r for r in rows if "budget" in r and r["budget"] < 8]
    plot_pareto(plotted, sweeper.out / "pareto.png", "test")
    import matplotlib.image

    image = matplotlib.image.imread(sweeper.out / "pareto.png")
    assert image.shape[:2] == (495, 1320)  # 12 x 4.5 inches at 110 dpi
    # the first curve is drawn in matplotlib's first colour (#1f77b4), solid
    first_colour = np.array([0x1F, 0x77, 0xB4]) / 255
    drawn = np.abs(image[..., :3] - first_colour).max(axis=-1) < 0.03
    assert drawn.sum() > 100
    table = {r["point"]: r for r in csv.DictReader((sweeper.out / "results.csv").open())}
    assert set(table) == names
    for row in rows:
        written = table[row["point"]]
        assert written["policy"] == row["policy"]
        assert float(written["avg_bits_physical"]) == pytest.approx(row["avg_bits_physical"])
        assert float(written["kld"]) == pytest.approx(row["kld"])
    lim = table["lim-matmul-b3.0"]
    assert 2.0 < float(lim["avg_bits_physical"]) <= 3.0
    assert np.isfinite(float(lim["ppl"])) and float(lim["kld"]) > 0


def test_encoder_sweeps_measure_sts_and_keeping_float_costs_nothing(minilm_dir, tmp_path):
    sweeper = Sweeper(str(minilm_dir), tmp_path, windows=1, seq_len=128,
                      analyses="zd,entropy,calib{samples=2,seq_len=64},lim")
    kept = sweeper.evaluate({s: KeepSpec() for s in sweeper.graph.sites})
    assert kept["spearman"] == kept["spearman_fp"] > 0.8
    assert kept["quality_loss"] == 0.0 and kept["damage"] == pytest.approx(0.0, abs=1e-9)
    two_bit = sweeper.evaluate({s: AsymmetricSpec(2, 128) for s in sweeper.graph.sites})
    assert two_bit["damage"] > 0.01 and two_bit["quality_loss"] > 0


def test_ray_workers_give_the_local_numbers(sweeper, ref_llama_dir, tmp_path):
    pytest.importorskip("ray")
    from lwqc.executors import parse_executor

    local = {r["point"]: r for r in sweep_policies(sweeper, ["lim", "random"], [3.0], seeds=1)}
    remote = Sweeper(str(ref_llama_dir), tmp_path / "ray", windows=2, analyses=ANALYSES)
    rows = sweep_policies(remote, ["lim", "random"], [3.0], seeds=1,
                          executor=parse_executor("ray", workers=2))
    assert {r["point"] for r in rows} == {"lim-matmul-b3.0", "random-matmul-b3.0-s0",
                                          "uniform-b3.0"}
    for row in rows:
        expected = local[row["point"]]
        assert row["avg_bits_physical"] == expected["avg_bits_physical"]
        for key in ("ppl", "kld", "top1_agreement"):
            assert row[key] == pytest.approx(expected[key], rel=1e-6)
    # recorded as they came back, and a rerun finds every point there
    assert len((tmp_path / "ray" / "results.jsonl").read_text().splitlines()) == 3
    again = Sweeper(str(ref_llama_dir), tmp_path / "ray", windows=2, analyses=ANALYSES)
    assert set(again.results) == {r["point"] for r in rows}
