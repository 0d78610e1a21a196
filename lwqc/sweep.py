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
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lwqc.backends import torch_eager
from lwqc.evaluate import encoder_metrics, language_model_metrics
from lwqc.executors import Executor, LocalExecutor
from lwqc.ir.accounting import totals
from lwqc.ir.datasets import wikitext2_text
from lwqc.ir.errors import LwqcError
from lwqc.ir.formats import WeightFormat
from lwqc.ir.hf_source import import_model
from lwqc.ir.onnx_source import is_onnx_file
from lwqc.ir.source import CAUSAL_LM
from lwqc.ir.spec import QuantSpec
from lwqc.passes.analyses import CALIBRATED_ANALYSES, analysis_passes
from lwqc.passes.budget import BUDGET_OPTIONS
from lwqc.passes.gptq import GptqSettings
from lwqc.passes.manager import PassManager
from lwqc.passes.pipeline import format_pipeline
from lwqc.passes.quantizers import quantize_weight
from lwqc.registry import parse

# A sweep compares policies under one quantizer: the budget driver's default (rtn-asym in groups
# of 128), for the sensitivity policy too, whose own default differs. It calibrates on 16
# windows, not the compile's 64: its measured sensitivity runs the model once per site and
# width over them.
COMMON_QUANTIZER = {"scheme": BUDGET_OPTIONS["scheme"].default,
                    "group_size": BUDGET_OPTIONS["group_size"].default}
COMMON_QUANTIZER_TEXT = ",".join(f"{k}={v}" for k, v in sorted(COMMON_QUANTIZER.items()))
SWEEP_CALIBRATION = {"samples": 16}
ANALYSES = format_pipeline(analysis_passes(
    [cls.name for cls in CALIBRATED_ANALYSES], calibration=SWEEP_CALIBRATION,
    options={"sensitivity": {"metric": "delta-kl", **COMMON_QUANTIZER}}))


class Sweeper:
    """One analysed model and the evaluation machinery shared by all points of a sweep."""

    def __init__(self, model: str, out: Path | None, windows: int = 16, seq_len: int = 512,
                 analyses: str = ANALYSES, lazy: bool = False) -> None:
        """``lazy``: run the analyses only when a point is computed (a sweep whose points are
        all recorded rewrites its tables without them)."""
        if windows < 1 or seq_len < 2:
            raise LwqcError("a sweep needs at least one window of at least 2 tokens")
        if is_onnx_file(model):
            raise LwqcError("lwqc sweep evaluates its points in torch: give it the transformers "
                            "model or GGUF file, not an ONNX export")
        self.graph = import_model(model)
        self.causal = self.graph.source.kind == CAUSAL_LM
        self.analyses = analyses
        self._analysed = False
        if not lazy:
            self._analyse()
        if self.causal:
            self.tokens = self.graph.source.tokenize(wikitext2_text())
        else:
            self.tokenizer = self.graph.source.tokenizer()
        self.windows, self.seq_len = windows, seq_len
        self._float_outputs: dict[bytes, np.ndarray] = {}
        self._packed: dict[tuple, WeightFormat] = {}
        self.model = model
        self.out = out
        self.results: dict[str, dict[str, Any]] = {}
        if out is not None:  # None: a worker that evaluates points and records nothing
            out.mkdir(parents=True, exist_ok=True)
            self.results_path = out / "results.jsonl"
            self.results = self._load()

    def _analyse(self) -> None:
        if not self._analysed:
            PassManager(parse(self.analyses)).run(self.graph)
            self._analysed = True

    def settings(self) -> dict[str, Any]:
        """What makes two sweeps' points comparable (and lets a worker rebuild this one)."""
        return {"model": self.model, "windows": self.windows, "seq_len": self.seq_len,
                "analyses": self.analyses}

    def _load(self) -> dict[str, dict[str, Any]]:
        """Earlier results of a sweep with the same settings (a torn last line is dropped)."""
        settings = {"model": self.graph.model_id, "weights_sha256": self.graph.weights_sha256,
                    "analyses": self.analyses, "windows": self.windows, "seq_len": self.seq_len,
                    "sites": sorted(self.graph.sites)}
        assert self.out is not None
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
            self._float_outputs[key] = _run(self.graph.source.eager_module(), inputs, self.causal)
        return self._float_outputs[key]

    def packed(self, site_id: str, spec: QuantSpec, clip: str = "mse",
               gptq: GptqSettings | None = None) -> WeightFormat:
        key = (site_id, spec, clip, gptq)
        if key not in self._packed:
            self._analyse()
            self._packed[key] = quantize_weight(self.graph.weight(site_id), spec, clip,
                                                self.graph.grams.get(site_id), gptq)
        return self._packed[key]

    def plan(self, policy: str) -> dict[str, QuantSpec]:
        """The specs a policy pass (pipeline text of one pass) chooses."""
        self._analyse()
        self.graph.plan = None
        self.graph.available.discard("plan")
        PassManager(parse(policy)).run(self.graph)
        return dict(self.graph.plan.specs)

    def evaluate(self, specs: dict[str, QuantSpec], dropped: tuple[int, ...] = (),
                 windows: int | None = None, clip: str = "mse",
                 gptq: GptqSettings | None = None) -> dict[str, Any]:
        packed = {s: self.packed(s, spec, clip, gptq) for s, spec in specs.items()
                  if not spec.kept}
        module = torch_eager.build(self.graph.source.eager_module(), packed)

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
            self.record(name, labels, compute())
        return self.results[name]

    def record(self, name: str, labels: dict[str, Any], result: dict[str, Any]) -> None:
        """Append point ``name``'s result to the results file."""
        row = {"point": name, **labels, **result}
        with self.results_path.open("a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
        self.results[name] = row

    def evaluate_policy(self, policy: str) -> dict[str, Any]:
        """Plan with one policy pass (pipeline text) and evaluate the plan."""
        return self.evaluate(self.plan(policy))

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


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    name: str
    policy: str  # the policy pass, as pipeline text
    labels: dict[str, Any]


def sweep_points(policies: list[str], budgets: list[float], seeds: int,
                 granularity: str = "matmul") -> list[SweepPoint]:
    """Every policy at every ``--bits`` budget (random: ``seeds`` seeds), plus uniform."""
    points = []
    for budget in budgets:
        for policy in policies:
            for seed in range(seeds if policy == "random" else 1):
                text = f"policy-{policy}{{bits={budget},granularity={granularity}"
                if policy == "sensitivity":
                    text += f",{COMMON_QUANTIZER_TEXT}"
                text += f",seed={seed}}}" if policy == "random" else "}"
                name = f"{policy}-{granularity}-b{budget}" + (f"-s{seed}" if policy == "random"
                                                              else "")
                points.append(SweepPoint(name, text, {"policy": policy, "budget": budget,
                                                      "seed": seed, "granularity": granularity}))
        points.append(SweepPoint(f"uniform-b{budget}", f"policy-uniform{{bits={budget}}}",
                                 {"policy": "uniform", "budget": budget, "seed": 0,
                                  "granularity": "matmul"}))
    return points


def sweep_policies(sweeper: Sweeper, policies: list[str], budgets: list[float], seeds: int,
                   granularity: str = "matmul", executor: Executor | None = None
                   ) -> list[dict[str, Any]]:
    """Evaluate every point of the sweep not in the results file yet, on ``executor`` (here,
    one after another, by default); returns every row."""
    pending = [p for p in sweep_points(policies, budgets, seeds, granularity)
               if p.name not in sweeper.results]
    (executor or LocalExecutor()).run(sweeper, pending)
    return sweeper.write_tables()
