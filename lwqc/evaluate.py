"""``lwqc eval``: the compiled artifact against its float model.

Causal LMs: perplexity over non-overlapping windows (every token but each window's first is
predicted; NLL summed over all of them), KL(float || quantized) of the next-token
distribution per predicted token, and top-1 agreement. Encoders: STS-B Spearman of the cosine
of mean-pooled, L2-normalised embeddings, and the cosine to the float embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lwqc.artifacts import MODEL_FILE, PACKED_FILE, PLAN_FILE
from lwqc.backends import onnx_rewrite as ort_backend
from lwqc.backends import torch_eager
from lwqc.backends.decoder_session import DecoderSession, is_decoder
from lwqc.ir.datasets import read_text, stsb_pairs, wikitext2_text
from lwqc.ir.errors import LwqcError
from lwqc.ir.formats import WeightFormat
from lwqc.ir.hf_load import load_model, weights_sha256
from lwqc.ir.onnx_source import is_onnx_file, open_onnx, session_feeds
from lwqc.ir.plan_json import read_artifact_plan, specs_from_document
from lwqc.ir.source import CAUSAL_LM

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]
BATCH = 4


def _torch_runner(module: torch.nn.Module, output: str) -> Runner:
    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            result = module(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        return result[output].numpy()

    return run


def _ort_runner(path: Path, output: str) -> Runner:
    if is_decoder(path.parent):
        decoder = DecoderSession(path.parent)
        return lambda inputs: decoder.prefill(inputs["input_ids"])
    session = ort_backend.session(path)

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        return session.run([output], session_feeds(session, inputs["input_ids"], inputs))[0]

    return run


def quantized_runner(out: Path, module: torch.nn.Module | None, output: str,
                     backend: str | None, quantized_sites: set[str]) -> tuple[Runner, str]:
    """The artifact's runner: its ONNX model, or the eager module holding its weights (read
    from model.onnx or packed.safetensors; every site in ``quantized_sites`` must be there).
    ``module`` None: the float model is an ONNX file, so only ONNX Runtime runs it."""
    onnx_path = out / MODEL_FILE
    backend = backend or ("onnx" if onnx_path.exists() else "torch")
    if backend == "onnx":
        if not onnx_path.exists():
            raise LwqcError(f"{out} holds no {MODEL_FILE}; evaluate with --backend torch")
        return _ort_runner(onnx_path, output), backend
    if module is None:
        raise LwqcError(f"{out} was compiled from an ONNX file: it runs in ONNX Runtime only "
                        "(--backend onnx)")
    packed = artifact_weights(out, quantized_sites)
    return _torch_runner(torch_eager.build(module, packed), output), backend


def artifact_weights(out: Path, quantized_sites: set[str]) -> dict[str, WeightFormat]:
    """The packed weights an artifact holds (``model.onnx``, else ``packed.safetensors``);
    every site in ``quantized_sites`` must be there."""
    onnx_path, packed_path = out / MODEL_FILE, out / PACKED_FILE
    if onnx_path.exists():
        return ort_backend.read_packed(onnx_path, quantized_sites)
    if packed_path.exists():
        return torch_eager.read_packed(packed_path, quantized_sites)
    raise LwqcError(f"{out} holds neither {MODEL_FILE} nor {PACKED_FILE}")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def language_model_metrics(
    tokens: np.ndarray, seq_len: int, windows: int | None, float_run: Runner, quant_run: Runner
) -> dict[str, Any]:
    return language_model_comparison(tokens, seq_len, windows, float_run, {"q": quant_run})["q"]


def language_model_comparison(
    tokens: np.ndarray, seq_len: int, windows: int | None, float_run: Runner,
    quant_runs: dict[str, Runner],
) -> dict[str, dict[str, Any]]:
    """Metrics of several quantized runners against one float run (computed once per batch)."""
    available = len(tokens) // seq_len
    if available == 0:
        raise LwqcError(f"the data has {len(tokens)} tokens, fewer than one window of {seq_len}")
    count = available if windows is None else min(windows, available)
    nll_fp = 0.0
    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0} for name in quant_runs}
    predicted = 0
    for start in range(0, count, BATCH):
        stop = min(start + BATCH, count)
        ids = tokens[start * seq_len : stop * seq_len].reshape(stop - start, seq_len)
        targets = ids[:, 1:, None]
        lp_fp = _log_softmax(float_run({"input_ids": ids})[:, :-1])
        nll_fp -= np.take_along_axis(lp_fp, targets, axis=-1).sum()
        p_fp = np.exp(lp_fp)
        for name, run in quant_runs.items():
            lp_q = _log_softmax(run({"input_ids": ids})[:, :-1])
            acc = sums[name]
            acc["nll"] -= np.take_along_axis(lp_q, targets, axis=-1).sum()
            acc["kl"] += (p_fp * (lp_fp - lp_q)).sum()
            acc["agree"] += np.count_nonzero(lp_fp.argmax(-1) == lp_q.argmax(-1))
        predicted += targets.size
    ppl_fp = math.exp(nll_fp / predicted)
    results = {}
    for name, acc in sums.items():
        ppl = math.exp(acc["nll"] / predicted)
        results[name] = {
            "ppl": ppl, "ppl_fp": ppl_fp, "delta_ppl": (ppl - ppl_fp) / ppl_fp,
            "kld": acc["kl"] / predicted, "top1_agreement": acc["agree"] / predicted,
            "windows": count, "seq_len": seq_len, "predicted_tokens": predicted,
        }
    return results


def _embed(tokenizer, sentences: list[str], run: Runner, seq_len: int) -> np.ndarray:
    chunks = []
    for start in range(0, len(sentences), 64):
        batch = tokenizer(sentences[start : start + 64], padding=True, truncation=True,
                          max_length=seq_len, return_tensors="np")
        inputs = {"input_ids": batch["input_ids"].astype(np.int64),
                  "attention_mask": batch["attention_mask"].astype(np.int64)}
        hidden = run(inputs).astype(np.float64)
        mask = inputs["attention_mask"][..., None]
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1)
        chunks.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(chunks)


def encoder_metrics(tokenizer, seq_len: int, float_run: Runner, quant_run: Runner) -> dict:
    from scipy.stats import spearmanr

    pairs = stsb_pairs()
    gold = np.array([score for score, _, _ in pairs])
    sentences = [s for _, a, b in pairs for s in (a, b)]
    result: dict[str, Any] = {"pairs": len(pairs)}
    embeddings = {}
    for name, run in (("fp", float_run), ("q", quant_run)):
        e = _embed(tokenizer, sentences, run, seq_len)
        embeddings[name] = e
        cos = (e[0::2] * e[1::2]).sum(1)
        result["spearman_fp" if name == "fp" else "spearman"] = float(spearmanr(cos, gold)[0])
    result["cosine_to_fp"] = float((embeddings["fp"] * embeddings["q"]).sum(1).mean())
    return result


def evaluate(out: Path, data: str | None = None, seq_len: int = 512, windows: int | None = None,
             backend: str | None = None) -> dict[str, Any]:
    """Metrics of the artifact at ``out`` against its float model (see module docstring)."""
    if not (out / PLAN_FILE).exists():
        raise LwqcError(f"{out} is not an lwqc artifact (no {PLAN_FILE}); run lwqc compile first")
    if seq_len < 2:
        raise LwqcError("--seq-len must be at least 2")
    if windows is not None and windows < 1:
        raise LwqcError("--windows must be at least 1")
    document = read_artifact_plan(out / PLAN_FILE)
    model_id = document["model"]["id"]
    if is_onnx_file(model_id):
        source = open_onnx(model_id)
        module, kind, context, digest = None, source.kind, None, source.weights_sha256
        tokenizers = source.tokenizer
    else:
        loaded = load_model(model_id)
        module, kind, context = loaded.module, loaded.kind, loaded.context_length
        digest, tokenizers = weights_sha256(module), loaded.tokenizer
    if context is not None and seq_len > context:
        raise LwqcError(f"--seq-len {seq_len} exceeds the model's context of {context} tokens")
    if digest != document["model"]["weights_sha256"]:
        raise LwqcError(f"the float model at {model_id} changed since this artifact was compiled")
    output = "logits" if kind == CAUSAL_LM else "last_hidden_state"
    quantized = {s for s, spec in specs_from_document(document).items() if not spec.kept}
    quant_run, used = quantized_runner(out, module, output, backend, quantized)
    float_run = (_ort_runner(Path(model_id), output) if module is None
                 else _torch_runner(module, output))
    tokenizer = tokenizers()
    result: dict[str, Any] = {
        "model": model_id, "backend": used, "policy": document["policy"],
        "avg_bits_physical": document["totals"]["avg_bits_physical"],
        "bytes": document["totals"]["bytes"],
    }
    if kind == CAUSAL_LM:
        if data in (None, "wikitext2"):
            text, result["data"] = wikitext2_text(), "wikitext2-test"
        elif data == "stsb":
            raise LwqcError("stsb evaluates sentence encoders; this is a causal LM")
        else:
            text, result["data"] = read_text(Path(data)), data
        tokens = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
        result.update(language_model_metrics(tokens, seq_len, windows, float_run, quant_run))
    else:
        if data not in (None, "stsb"):
            raise LwqcError("encoders are evaluated on STS-B: use --data stsb")
        result["data"] = "stsb-dev"
        result.update(encoder_metrics(tokenizer, seq_len, float_run, quant_run))
    return result


def format_result(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']}  backend {result['backend']}  policy {result['policy']}",
             f"physical bits/weight {result['avg_bits_physical']:.4f}"]
    if "ppl" in result:
        lines += [
            f"{result['data']}: {result['windows']} windows x {result['seq_len']} tokens",
            f"perplexity {result['ppl']:.4f} (float {result['ppl_fp']:.4f}, "
            f"{100 * result['delta_ppl']:+.3f} %)",
            f"KL(float || quantized) {result['kld']:.6f} nats/token, "
            f"top-1 agreement {100 * result['top1_agreement']:.2f} %",
        ]
    else:
        lines += [
            f"STS-B dev ({result['pairs']} pairs): Spearman {result['spearman']:.4f} "
            f"(float {result['spearman_fp']:.4f})",
            f"cosine to float embeddings {result['cosine_to_fp']:.6f}",
        ]
    return "\n".join(lines)
