"""Convert a llama2.c legacy-format checkpoint to a Hugging Face ``LlamaForCausalLM`` directory.

Usage: ``python tools/llama2c_to_hf.py IN.bin OUT_DIR``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

HEADER_INTS = 7
HEADER_BYTES = HEADER_INTS * 4


def _tensor_shapes(
    dim: int, hidden: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab: int,
    seq_len: int, shared_classifier: bool,
) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the float32 arrays in file order (RoPE tables included)."""
    head_size = dim // n_heads
    kv_dim = n_kv_heads * head_size
    shapes = [
        ("tok_embeddings", (vocab, dim)),
        ("attention_norm", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("ffn_norm", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("norm", (dim,)),
        ("freq_cis_real", (seq_len, head_size // 2)),
        ("freq_cis_imag", (seq_len, head_size // 2)),
    ]
    if not shared_classifier:
        shapes.append(("output", (vocab, dim)))
    return shapes


def read_llama2c(bin_path: Path) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Read header and weights of a llama2.c legacy checkpoint, validating its size."""
    data = Path(bin_path).read_bytes()
    if len(data) < HEADER_BYTES:
        raise ValueError(
            f"{bin_path}: file is {len(data)} bytes, too short for the {HEADER_BYTES}-byte "
            "llama2.c header (truncated or not a llama2.c checkpoint)"
        )
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = (
        int(v) for v in np.frombuffer(data, dtype="<i4", count=HEADER_INTS)
    )
    shared_classifier = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0:
        raise ValueError(f"{bin_path}: invalid llama2.c header (non-positive field)")
    if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise ValueError(
            f"{bin_path}: invalid llama2.c header: dim {dim}, n_heads {n_heads}, "
            f"n_kv_heads {n_kv_heads} need an even head size and n_heads divisible by n_kv_heads"
        )
    shapes = _tensor_shapes(
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len, shared_classifier
    )
    expected = HEADER_BYTES + 4 * sum(int(np.prod(shape)) for _, shape in shapes)
    if len(data) != expected:
        raise ValueError(
            f"{bin_path}: file size {len(data)} bytes does not match the {expected} bytes implied "
            f"by its header (dim {dim}, hidden {hidden}, layers {n_layers}, heads {n_heads}, "
            f"kv heads {n_kv_heads}, vocab {vocab}, seq_len {seq_len}); truncated or corrupt"
        )
    weights: dict[str, np.ndarray] = {}
    offset = HEADER_BYTES
    for name, shape in shapes:
        count = int(np.prod(shape))
        weights[name] = np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(shape)
        offset += 4 * count
    header = {
        "dim": dim, "hidden_dim": hidden, "n_layers": n_layers, "n_heads": n_heads,
        "n_kv_heads": n_kv_heads, "vocab_size": vocab, "seq_len": seq_len,
        "shared_classifier": int(shared_classifier),
    }
    return header, weights


def _interleaved_to_rotate_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k rows per head from llama2.c's interleaved pairs to HF's rotate-half layout."""
    rows, cols = w.shape
    head_size = rows // heads
    return w.view(heads, head_size // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def convert(bin_path: Path, out_dir: Path) -> Path:
    """Convert ``bin_path`` to an HF ``LlamaForCausalLM`` in ``out_dir``; return ``out_dir``."""
    h, w = read_llama2c(bin_path)
    n_heads, n_kv_heads = h["n_heads"], h["n_kv_heads"]
    tied = bool(h["shared_classifier"])
    config = LlamaConfig(
        vocab_size=h["vocab_size"],
        hidden_size=h["dim"],
        intermediate_size=h["hidden_dim"],
        num_hidden_layers=h["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=h["dim"] // n_heads,
        max_position_embeddings=h["seq_len"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,  # transformers 5.x folds this into rope_parameters
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.copy())

    state = {
        "model.embed_tokens.weight": t(w["tok_embeddings"]),
        "model.norm.weight": t(w["norm"]),
        "lm_head.weight": t(w["tok_embeddings"] if tied else w["output"]),
    }
    for i in range(h["n_layers"]):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = t(w["attention_norm"][i])
        state[p + "self_attn.q_proj.weight"] = _interleaved_to_rotate_half(t(w["wq"][i]), n_heads)
        state[p + "self_attn.k_proj.weight"] = _interleaved_to_rotate_half(
            t(w["wk"][i]), n_kv_heads
        )
        state[p + "self_attn.v_proj.weight"] = t(w["wv"][i])
        state[p + "self_attn.o_proj.weight"] = t(w["wo"][i])
        state[p + "post_attention_layernorm.weight"] = t(w["ffn_norm"][i])
        state[p + "mlp.gate_proj.weight"] = t(w["w1"][i])
        state[p + "mlp.down_proj.weight"] = t(w["w2"][i])
        state[p + "mlp.up_proj.weight"] = t(w["w3"][i])

    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(state, strict=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="llama2c_to_hf",
        description="Convert a llama2.c legacy .bin checkpoint to a Hugging Face Llama directory.",
    )
    parser.add_argument("bin_path", type=Path, help="llama2.c legacy checkpoint (.bin)")
    parser.add_argument("out_dir", type=Path, help="output directory for the HF model")
    args = parser.parse_args(argv)
    try:
        out = convert(args.bin_path, args.out_dir)
    except (OSError, ValueError) as exc:
        print(f"llama2c_to_hf: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
