"""Tests for tools/llama2c_to_hf.py against an independent numpy llama2.c forward pass."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import llama2c_to_hf  # noqa: E402

TOKENS = [1, 403, 407, 261, 378, 11, 72, 300, 499, 5, 260, 2]


def read_raw(path: Path) -> tuple[list[int], dict[str, np.ndarray]]:
    """Parse a llama2.c legacy file independently of the converter (float64 arrays)."""
    header = np.fromfile(path, dtype="<i4", count=7).tolist()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    head_size = dim // n_heads
    kv_dim = n_kv_heads * head_size
    flat = np.fromfile(path, dtype="<f4", offset=28).astype(np.float64)
    v = abs(vocab)
    order = [
        ("emb", (v, dim)), ("att_norm", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)), ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)), ("ffn_norm", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)), ("norm", (dim,)),
        ("cos", (seq_len * head_size // 2,)), ("sin", (seq_len * head_size // 2,)),
    ]
    if vocab < 0:
        order.append(("cls", (v, dim)))
    arrays: dict[str, np.ndarray] = {}
    pos = 0
    for name, shape in order:
        n = int(np.prod(shape))
        arrays[name] = flat[pos:pos + n].reshape(shape)
        pos += n
    assert pos == flat.size
    arrays.setdefault("cls", arrays["emb"])
    return header, arrays


def reference_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """llama2.c run.c forward pass in numpy: logits [len(tokens), vocab]."""
    (dim, _, n_layers, n_heads, n_kv_heads, _, _), w = read_raw(path)
    hs = dim // n_heads
    kv_mul = n_heads // n_kv_heads
    t = len(tokens)

    def rmsnorm(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * g

    # run.c: for i in 0..dim step 2, head_dim = i % head_size, freq = 1/10000^(head_dim/hs),
    # rotating the pair (i, i+1) by angle pos * freq.
    freq = 1.0 / 10000.0 ** (np.arange(0, hs, 2) / hs)
    angle = np.arange(t)[:, None] * freq[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]

    def rope(x: np.ndarray, heads: int) -> np.ndarray:
        x = x.reshape(t, heads, hs // 2, 2)
        x0, x1 = x[..., 0], x[..., 1]
        return np.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(t, -1)

    causal = np.tril(np.ones((t, t), dtype=bool))
    x = w["emb"][tokens]
    for layer in range(n_layers):
        xb = rmsnorm(x, w["att_norm"][layer])
        q = rope(xb @ w["wq"][layer].T, n_heads).reshape(t, n_heads, hs)
        k = rope(xb @ w["wk"][layer].T, n_kv_heads).reshape(t, n_kv_heads, hs)
        v = (xb @ w["wv"][layer].T).reshape(t, n_kv_heads, hs)
        out = np.empty((t, n_heads, hs))
        for h in range(n_heads):
            kh = h // kv_mul
            scores = q[:, h] @ k[:, kh].T / np.sqrt(hs)
            scores = np.where(causal, scores, -np.inf)
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            out[:, h] = p @ v[:, kh]
        x = x + out.reshape(t, dim) @ w["wo"][layer].T
        xb = rmsnorm(x, w["ffn_norm"][layer])
        gate = xb @ w["w1"][layer].T
        hb = gate / (1.0 + np.exp(-gate)) * (xb @ w["w3"][layer].T)
        x = x + hb @ w["w2"][layer].T
    return rmsnorm(x, w["norm"]) @ w["cls"].T


def hf_logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    """Logits of the converted model loaded back with from_pretrained."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def rope_theta(config: object) -> float:
    """RoPE base from a config (transformers 5 ``rope_parameters`` or 4.x ``rope_theta``)."""
    params = getattr(config, "rope_parameters", None)
    return params["rope_theta"] if params else config.rope_theta


def test_stories260k_matches_llama2c_reference(stories_bin: Path, tmp_path: Path) -> None:
    out = llama2c_to_hf.convert(stories_bin, tmp_path / "hf")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    model = LlamaForCausalLM.from_pretrained(out)
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (8, 4, 512)
    assert cfg.max_position_embeddings == 512 and cfg.rms_norm_eps == 1e-5
    assert rope_theta(cfg) == 10000.0
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    ref = reference_logits(stories_bin, TOKENS)
    got = hf_logits(out, TOKENS)
    diff = float(np.abs(ref - got).max())
    print(f"stories260K max abs logit diff: {diff:.3e}")
    assert diff < 1e-4
    assert (ref.argmax(-1) == got.argmax(-1)).all()


def test_truncated_file_raises(stories_bin: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(stories_bin.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"truncated\.bin.*does not match.*truncated or corrupt"):
        llama2c_to_hf.convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_reports_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "tiny.bin"
    bad.write_bytes(b"\x00" * 10)
    assert llama2c_to_hf.main([str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llama2c_to_hf: error: ") and "tiny.bin" in err[0]


def test_synthetic_separate_classifier(tmp_path: Path) -> None:
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = 16, 40, 2, 4, 2, 32, 16
    hs, kv_dim = dim // n_heads, n_kv_heads * (dim // n_heads)
    rng = np.random.default_rng(0)
    shapes = [
        (vocab, dim), (n_layers, dim), (n_layers, dim, dim), (n_layers, kv_dim, dim),
        (n_layers, kv_dim, dim), (n_layers, dim, dim), (n_layers, dim),
        (n_layers, hidden, dim), (n_layers, dim, hidden), (n_layers, hidden, dim), (dim,),
        (seq_len * hs // 2,), (seq_len * hs // 2,), (vocab, dim),
    ]
    arrays = [rng.standard_normal(s).astype("<f4") * 0.5 for s in shapes]
    path = tmp_path / "tiny.bin"
    header = [dim, hidden, n_layers, n_heads, n_kv_heads, -vocab, seq_len]
    path.write_bytes(np.array(header, "<i4").tobytes() + b"".join(a.tobytes() for a in arrays))

    out = llama2c_to_hf.convert(path, tmp_path / "hf")
    model = LlamaForCausalLM.from_pretrained(out)
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, torch.from_numpy(arrays[-1]))
    assert torch.equal(model.model.embed_tokens.weight, torch.from_numpy(arrays[0]))

    tokens = [3, 17, 0, 31, 8, 8, 22, 5, 12, 29, 1, 14]
    diff = float(np.abs(reference_logits(path, tokens) - hf_logits(out, tokens)).max())
    assert diff < 1e-4
