"""lwqc analyze writes every score per block and matmul, and validates them against damage."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from safetensors.numpy import load_file

from lwqc.cli import main

pytestmark = pytest.mark.slow


def test_analyze_writes_scores_and_spearman(ref_llama_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", str(ref_llama_dir), "-o", str(out), "--validate",
                 "--calib-samples", "2", "--calib-seq-len", "64"]) == 0
    printed = capsys.readouterr().out.splitlines()
    for name in ("blocks.csv", "sites.csv", "validate.csv", "scores.png"):
        assert (out / name).exists(), name
    blocks = list(csv.DictReader((out / "blocks.csv").open()))
    assert [b["unit"] for b in blocks] == [f"model.layers.{i}" for i in range(6)]
    # block ZD is the mean over its matmuls of the share of |z| > 1, from the raw weights
    weights = load_file(str(ref_llama_dir / "model.safetensors"))
    for i, block in enumerate(blocks):
        shares = []
        for name, w in weights.items():
            if name.startswith(f"model.layers.{i}.") and w.ndim == 2:
                w = w.astype(np.float64)
                shares.append(np.mean(np.abs(w - w.mean()) > w.std()))
        assert float(block["zd.zd"]) == pytest.approx(np.mean(shares), abs=1e-12)
        assert float(block["zd.importance"]) == -float(block["zd.zd"])
    sites = list(csv.DictReader((out / "sites.csv").open()))
    assert len(sites) == 43
    validate = list(csv.DictReader((out / "validate.csv").open()))
    damage = [float(r["damage"]) for r in validate]
    assert len(damage) == 6 and all(d > 0 for d in damage)
    # the printed rho of each score is the Spearman correlation of the CSV's columns
    from scipy.stats import spearmanr

    start = next(i for i, line in enumerate(printed) if line.startswith("Spearman rho"))
    rho = {line.split()[0]: float(line.split()[1]) for line in printed[start + 1 : start + 5]}
    assert set(rho) == {"zd", "entropy", "lim", "sensitivity"}
    for key, value in rho.items():
        expected = spearmanr([float(r[key]) for r in validate], damage)[0]
        assert value == pytest.approx(expected, abs=5e-4), key
