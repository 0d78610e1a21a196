"""Quality at equal size: lwqc plans on ref-llama-6L against the baselines of BASELINES.md.

Every configuration is evaluated the way BASELINES.md measured (WikiText-2 raw test joined
with blank lines, the first 64 windows of 512 tokens, KL(float || quantized) per token), on
the eager torch module holding the same PackedWeights as the ONNX artifact. Physical bits
count codes, fp32 scales and zero points as lwqc stores them (zero points at the code width,
3-bit codes in a 4-bit container); BASELINES.md counts 8-bit zero points and tight 3-bit.

Writes ``bench/quality.json`` and ``bench/quality.md``.
Usage: python tools/bench_quality.py [MODEL_DIR] [--out-dir bench] [--windows 64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

from lwqc.ir.errors import LwqcError
from lwqc.sweep import Sweeper

REPO = Path(__file__).resolve().parents[1]
# (label, policy pass text, BASELINES.md row: (phys bpw, delta-PPL %, KLD) or None)
CONFIGS = (
    ("uniform 8-bit g128", "policy-uniform{width=8}", (8.31, 0.03, 0.00006)),
    ("uniform 4-bit g32", "policy-uniform{width=4,group_size=32}", (5.25, 0.43, 0.0120)),
    ("uniform 4-bit g128", "policy-uniform{width=4}", (4.31, 1.08, 0.0175)),
    ("uniform 3-bit g32", "policy-uniform{width=3,group_size=32}", (4.25, 3.20, 0.0522)),
    ("uniform 3-bit g128", "policy-uniform{width=3}", (3.31, 4.23, 0.0832)),
    ("uniform 2-bit g32", "policy-uniform{width=2,group_size=32}", (3.25, 16.9, 0.295)),
    ("uniform 2-bit g128", "policy-uniform{width=2}", (2.31, 36.9, 0.464)),
    ("llama.cpp rule 8/4 g128", "policy-llamacpp", (4.63, 1.28, 0.0167)),
    ("entropy, --bits 4.5", "policy-entropy{bits=4.5}", None),
    ("sensitivity (measured), --bits 4.5", "policy-sensitivity{bits=4.5}", None),
    ("sensitivity (measured), --bits 4.0", "policy-sensitivity{bits=4.0}", None),
    ("sensitivity (measured), --bits 3.5", "policy-sensitivity{bits=3.5}", None),
    ("sensitivity (measured), --bits 3.0", "policy-sensitivity{bits=3.0}", None),
    ("sensitivity (measured), --bits 2.5", "policy-sensitivity{bits=2.5}", None),
    ("lim, --bits 3.5", "policy-lim{bits=3.5}", None),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(REPO.parent / "shared/models/ref-llama-6L"))
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench")
    parser.add_argument("--windows", type=int, default=64)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            sweeper = Sweeper(args.model, Path(scratch), windows=args.windows)
        except LwqcError as exc:
            print(f"bench_quality: error: {exc}", file=sys.stderr)
            return 2
        rows = []
        for label, policy, baseline in CONFIGS:
            result = sweeper.evaluate(sweeper.plan(policy))
            rows.append({"config": label, "pipeline": sweeper.graph.pipeline, **result,
                         "baseline": None if baseline is None else
                         dict(zip(("avg_bits_physical", "delta_ppl_percent", "kld"), baseline,
                                  strict=True))})
            print(f"{label}: {result['avg_bits_physical']:.3f} bpw, "
                  f"{100 * result['delta_ppl']:+.2f} %, KLD {result['kld']:.4f}", file=sys.stderr)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": Path(args.model).name, "windows": args.windows, "seq_len": 512,
            "analyses": sweeper.analyses, "ppl_fp": rows[0]["ppl_fp"]}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "quality.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        f"# Quality at equal size: {meta['model']}, {args.windows} WikiText-2 windows of 512 "
        f"tokens, float PPL {meta['ppl_fp']:.2f}", "",
        f"Measured {meta['date']}; calibration for LIM and measured sensitivity: "
        f"`{meta['analyses']}`. Baseline columns are BASELINES.md (ONNX Runtime's RTN "
        "quantizer; its bpw counts 8-bit zero points and tight 3-bit).", "",
        "| configuration | lwqc bpw | lwqc ΔPPL | lwqc KLD | baseline bpw | baseline ΔPPL | "
        "baseline KLD |", "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = row["baseline"]
        cells = ["", "", ""] if base is None else [
            f"{base['avg_bits_physical']:.2f}", f"{base['delta_ppl_percent']:+.2f} %",
            f"{base['kld']:.4f}"]
        lines.append(f"| {row['config']} | {row['avg_bits_physical']:.2f} | "
                     f"{100 * row['delta_ppl']:+.2f} % | {row['kld']:.4f} | {' | '.join(cells)} |")
    (args.out_dir / "quality.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
