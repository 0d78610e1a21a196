"""language_model_metrics with hand-made logits: perplexity, KL and top-1 in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lwqc.evaluate import format_result, language_model_metrics
from lwqc.ir.errors import LwqcError

V = 4
P = np.array([0.5, 0.25, 0.125, 0.125])  # argmax 0
Q = np.array([0.125, 0.125, 0.25, 0.5])  # argmax 3


def fixed(probabilities: np.ndarray, calls: list | None = None):
    """A runner predicting the same next-token distribution at every position (as logits
    shifted by a constant, which softmax ignores; float64, so closed forms hold to 1e-9)."""

    def run(inputs):
        ids = inputs["input_ids"]
        if calls is not None:
            calls.append(ids.copy())
        return np.broadcast_to(np.log(probabilities) + 3.0, (*ids.shape, V)).copy()

    return run


def uniform(vocab: int):
    def run(inputs):
        return np.zeros((*inputs["input_ids"].shape, vocab), np.float32)

    return run


def test_identical_runners_agree_perfectly():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(V, V)).astype(np.float32)

    def run(inputs):  # logits depend on the token, as a real model's do
        return table[inputs["input_ids"]]

    tokens = rng.integers(0, V, size=50)
    result = language_model_metrics(tokens, 8, None, run, run)
    assert result["ppl"] == result["ppl_fp"]
    assert result["delta_ppl"] == 0.0
    assert result["kld"] == 0.0
    assert result["top1_agreement"] == 1.0
    assert result["ppl"] > 1.0


@pytest.mark.parametrize("vocab", [2, 7, 128])
def test_uniform_logits_have_perplexity_equal_to_the_vocabulary(vocab):
    tokens = np.arange(40) % vocab
    result = language_model_metrics(tokens, 10, None, uniform(vocab), uniform(vocab))
    assert result["ppl"] == pytest.approx(vocab, rel=1e-12)
    assert result["ppl_fp"] == pytest.approx(vocab, rel=1e-12)


def test_two_known_distributions_give_their_kl_perplexities_and_no_agreement():
    # every target is token 0: float assigns it 1/2, quantized 1/8
    tokens = np.zeros(30, np.int64)
    result = language_model_metrics(tokens, 5, None, fixed(P), fixed(Q))
    # KL(P || Q) = 1/2 ln 4 + 1/4 ln 2 + 1/8 ln 1/2 + 1/8 ln 1/4 = 7/8 ln 2
    assert result["kld"] == pytest.approx(7 / 8 * math.log(2), rel=1e-9)
    assert result["ppl_fp"] == pytest.approx(2.0, rel=1e-12)
    assert result["ppl"] == pytest.approx(8.0, rel=1e-12)
    assert result["delta_ppl"] == pytest.approx(3.0, rel=1e-12)
    assert result["top1_agreement"] == 0.0


def test_kl_is_taken_from_float_to_quantized():
    tokens = np.zeros(10, np.int64)
    p = np.array([0.7, 0.1, 0.1, 0.1])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    forward = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    backward = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q, strict=True))
    assert abs(forward - backward) > 0.01  # the two directions differ here
    result = language_model_metrics(tokens, 5, None, fixed(p), fixed(q))
    assert result["kld"] == pytest.approx(forward, rel=1e-9)


def test_each_windows_first_token_is_not_predicted_and_the_tail_is_dropped():
    # windows of 4: [3, 0, 0, 1] twice, then a short tail [2, 2] that fits no window;
    # predicted targets are 0, 0, 1 per window: -ln P = ln 2, ln 2, ln 4 -> 4 ln 2 per window
    tokens = np.array([3, 0, 0, 1, 3, 0, 0, 1, 2, 2])
    calls = []
    result = language_model_metrics(tokens, 4, None, fixed(P, calls), fixed(P))
    assert result["windows"] == 2
    assert result["predicted_tokens"] == 6
    assert result["seq_len"] == 4
    assert result["ppl_fp"] == pytest.approx(2 ** (4 / 3), rel=1e-12)
    assert [c.tolist() for c in calls] == [[[3, 0, 0, 1], [3, 0, 0, 1]]]


@pytest.mark.parametrize(("windows", "expected"), [(None, 9), (1, 1), (4, 4), (5, 5), (9, 9),
                                                   (50, 9)])
def test_window_count_and_batches(windows, expected):
    seq_len = 3
    tokens = np.arange(9 * seq_len + 2) % V  # 9 whole windows and a 2-token tail
    calls = []
    result = language_model_metrics(tokens, seq_len, windows, fixed(P, calls), fixed(P))
    assert result["windows"] == expected
    assert result["predicted_tokens"] == expected * (seq_len - 1)
    # windows are consecutive, non-overlapping, in batches of at most 4
    assert [c.shape[0] for c in calls] == [min(4, expected - s) for s in range(0, expected, 4)]
    seen = np.concatenate(calls).ravel()
    assert seen.tolist() == tokens[: expected * seq_len].tolist()
    assert all(c.dtype == np.int64 for c in calls)


def test_fewer_tokens_than_one_window_is_a_user_error():
    with pytest.raises(LwqcError, match="the data has 7 tokens, fewer than one window of 8"):
        language_model_metrics(np.zeros(7, np.int64), 8, None, fixed(P), fixed(P))


def test_format_result_prints_the_language_model_numbers():
    tokens = np.zeros(30, np.int64)
    result = {"model": "toy/model", "backend": "onnx", "policy": "policy-lim",
              "avg_bits_physical": 4.28125, "data": "wikitext2-test",
              **language_model_metrics(tokens, 5, None, fixed(P), fixed(Q))}
    assert format_result(result).splitlines() == [
        "model toy/model  backend onnx  policy policy-lim",
        "physical bits/weight 4.2812",
        "wikitext2-test: 6 windows x 5 tokens",
        "perplexity 8.0000 (float 2.0000, +300.000 %)",
        f"KL(float || quantized) {7 / 8 * math.log(2):.6f} nats/token, top-1 agreement 0.00 %",
    ]
    assert f"{7 / 8 * math.log(2):.6f}" == "0.606504"


def test_format_result_prints_the_encoder_numbers():
    result = {"model": "toy/bert", "backend": "torch", "policy": "policy-zd",
              "avg_bits_physical": 3.5, "pairs": 1500, "spearman": 0.81234, "spearman_fp": 0.8201,
              "cosine_to_fp": 0.9987654}
    assert format_result(result).splitlines() == [
        "model toy/bert  backend torch  policy policy-zd",
        "physical bits/weight 3.5000",
        "STS-B dev (1500 pairs): Spearman 0.8123 (float 0.8201)",
        "cosine to float embeddings 0.998765",
    ]
