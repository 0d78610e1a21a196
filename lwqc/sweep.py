"""Sweeps: many plans of one model, each evaluated against the float model, resumably.

The model is imported and analysed once; every point only plans, quantizes (each
(site, width) once, cached) and evaluates an eager torch module on the same data, whose float
outputs are computed once: WikiText-2 windows for causal LMs (perplexity, KL divergence),
STS-B dev for encoders (Spearman, cosine to the float embeddings). Every row also carries the
two numbers comparisons read, whatever the model: ``quality_loss`` (relative rise of
perplexity, or relative drop of Spearman) and ``damage`` (KL divergence, or 1 - cosine).
Results append to ``results.jsonl`` as each point finishes; a rerun skips the points already
there.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lwqc import backends, passes  # noqa: F401  (registers every pass)
from lwqc.backends import torch_eager
from lwqc.evaluate import encoder_metrics, language_model_metrics
from lwqc.ir.datasets import wikitext2_text
from lwqc.ir.errors import LwqcError
from lwqc.ir.hf_import import import_hf
from lwqc.ir.packed import PackedWeight
from lwqc.ir.plan import QuantSpec, totals
from lwqc.passes.manager import PassManager
from lwqc.passes.pipeline import parse_pipeline
from lwqc.passes.rtn import quantize_rtn

ANALYSES = "zd,entropy,calib,lim,sensitivity{metric=delta-kl}"


class Sweeper:
    """One analysed model and the evaluation machinery shared by all points of a sweep."""

    def __init__(self, model: str, out: Path, windows: int = 16, seq_len: int = 512,
                 analyses: str = ANALYSES) -> None:
        if windows < 1 or seq_len < 2:
            raise LwqcError("a sweep needs at least one window of at least 2 tokens")
        self.graph = import_hf(model)
        self.causal = self.graph.source.kind == "causal-lm"
        PassManager(parse_pipeline(analyses)).run(self.graph)
        self.analyses = analyses
        if self.causal:
            self.tokens = self.graph.source.tokenize(wikitext2_text())
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.graph.model_id)
        self.windows, self.seq_len = windows, seq_len
        self._float_outputs: dict[bytes, np.ndarray] = {}
        self._packed: dict[tuple, PackedWeight] = {}
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.results_path = out / "results.jsonl"
        self.results = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        """Earlier results of a sweep with the same settings (a torn last line is dropped)."""
        settings = {"model": self.graph.model_id, "weights_sha256": self.graph.weights_sha256,
                    "analyses": self.analyses, "windows": self.windows, "seq_len": self.seq_len}
        settings_path = self.out / "sweep.json"
        if settings_path.exists() and json.loads(settings_path.read_text()) != settings:
            raise LwqcError(f"{self.out} holds a sweep with other settings (see sweep.json); "
                            "choose another output directory")
        settings_path.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        if not self.results_path.exists():
            return {}
        rows = {}
        for line in self.results_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # interrupted while writing: that point is simply run again
            rows[row["point"]] = row
        return rows

    def _float_run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        ids = inputs["input_ids"]
        key = ids.tobytes() + str(ids.shape).encode()
        if key not in self._float_outputs:
            self._float_outputs[key] = _run(self.graph.source.module, inputs, self.causal)
        return self._float_outputs[key]

    def packed(self, site_id: str, spec: QuantSpec) -> PackedWeight:
        key = (site_id, spec)
        if key not in self._packed:
            self._packed[key] = quantize_rtn(self.graph.weight(site_id), spec.bits,
                                             spec.group_size, spec.scheme, clip_search=True)
        return self._packed[key]

    def plan(self, policy: str) -> dict[str, QuantSpec]:
        """The specs a policy pass (pipeline text of one pass) chooses."""
        self.graph.plan = None
        self.graph.available.discard("plan")
        PassManager(parse_pipeline(policy)).run(self.graph)
        return dict(self.graph.plan.specs)

    def evaluate(self, specs: dict[str, QuantSpec], dropped: tuple[int, ...] = (),
                 windows: int | None = None) -> dict[str, Any]:
        packed = {s: self.packed(s, spec) for s, spec in specs.items() if not spec.kept}
        module = torch_eager.build(self.graph.source.module, packed)

        def quant_run(inputs: dict[str, np.ndarray]) -> np.ndarray:
            with identity_blocks(module, [self.graph.blocks[i].module for i in dropped]):
                return _run(module, inputs, self.causal)

        if self.causal:
            metrics = language_model_metrics(self.tokens, self.seq_len, windows or self.windows,
                                             self._float_run, quant_run)
            metrics.update(quality_loss=metrics["delta_ppl"], damage=metrics["kld"])
        else:
            metrics = encoder_metrics(self.tokenizer, self.seq_len, self._float_run, quant_run)
            drop = (metrics["spearman_fp"] - metrics["spearman"]) / metrics["spearman_fp"]
            metrics.update(quality_loss=drop, damage=1.0 - metrics["cosine_to_fp"])
        size = totals(self.graph, specs)
        return {**metrics, "avg_bits_physical": size.avg_bits_physical, "bytes": size.bytes}

    def point(self, name: str, compute: Callable[[], dict[str, Any]],
              **labels: Any) -> dict[str, Any]:
        """The result of point ``name``: from an earlier run, or computed and appended now."""
        if name not in self.results:
            row = {"point": name, **labels, **compute()}
            with self.results_path.open("a") as handle:
                handle.write(json.dumps(row, sort_keys=True) + "\n")
            self.results[name] = row
        return self.results[name]

    def write_tables(self) -> list[dict[str, Any]]:
        rows = list(self.results.values())
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with (self.out / "results.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        (self.out / "results.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
        return rows


def _run(module: torch.nn.Module, inputs: dict[str, np.ndarray], causal: bool) -> np.ndarray:
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        return module(**tensors, **({"use_cache": False} if causal else {}))[0].numpy()


def metric_labels(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """Axis labels of ``quality_loss`` and ``damage`` for the kind of model the rows measure."""
    if rows and "ppl" in rows[0]:
        return "ΔPPL vs float (%)", "KL(float ‖ q) nats/token"
    return "Spearman drop vs float (%)", "1 − cosine to float embeddings"


def quality_axis(axis, rows: list[dict[str, Any]]) -> None:
    """A y axis of ``quality_loss`` in percent: symmetric log scale past 1 %, a light grid."""
    axis.set_ylabel(metric_labels(rows)[0])
    axis.set_yscale("symlog", linthresh=1.0)
    axis.grid(alpha=0.3)


def save_figure(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@contextlib.contextmanager
def identity_blocks(module: torch.nn.Module, names: list[str]) -> Iterator[None]:
    """Make the named blocks pass their residual-stream input through unchanged."""

    def skip(block, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [module.get_submodule(n).register_forward_hook(skip, with_kwargs=True)
               for n in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def plot_pareto(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Delta-PPL and KL divergence against physical bits, one curve per policy; random seeds
    as a band (min to max) around their mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_policy.setdefault(row["policy"], []).append(row)
    quality_label, damage_label = metric_labels(rows)
    metrics = (("quality_loss", 100.0, quality_label), ("damage", 1.0, damage_label))
    for axis, (metric, factor, label) in zip(axes, metrics, strict=True):
        for policy, points in sorted(by_policy.items()):
            budgets = sorted({p["budget"] for p in points})
            groups = [[p for p in points if p["budget"] == b] for b in budgets]
            x = [np.mean([p["avg_bits_physical"] for p in g]) for g in groups]
            y = [[factor * p[metric] for p in g] for g in groups]
            style = "s--" if policy == "uniform" else "o-"
            axis.plot(x, [np.mean(v) for v in y], style, label=policy, markersize=4)
            if any(len(v) > 1 for v in y):
                axis.fill_between(x, [min(v) for v in y], [max(v) for v in y], alpha=0.2)
        if metric == "quality_loss":
            axis.axhline(0.0, color="black", linewidth=0.8, label="float")
            quality_axis(axis, rows)
        else:
            axis.set_yscale("log")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
        axis.set_xlabel("physical bits per weight (scales and zero points included)")
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    save_figure(figure, path)


def sweep_policies(sweeper: Sweeper, policies: list[str], budgets: list[float], seeds: int,
                   granularity: str = "matmul") -> list[dict[str, Any]]:
    """Every policy at every ``--bits`` budget (random: ``seeds`` seeds), plus uniform."""
    for budget in budgets:
        for policy in policies:
            for seed in range(seeds if policy == "random" else 1):
                text = f"policy-{policy}{{bits={budget},granularity={granularity}"
                text += f",seed={seed}}}" if policy == "random" else "}"
                name = f"{policy}-{granularity}-b{budget}" + (f"-s{seed}" if policy == "random"
                                                              else "")
                sweeper.point(name, lambda t=text: sweeper.evaluate(sweeper.plan(t)),
                              policy=policy, budget=budget, seed=seed, granularity=granularity)
        uniform = f"policy-uniform{{bits={budget}}}"
        sweeper.point(f"uniform-b{budget}",
                      lambda t=uniform: sweeper.evaluate(sweeper.plan(t)),
                      policy="uniform", budget=budget, seed=0, granularity="matmul")
    return sweeper.write_tables()
