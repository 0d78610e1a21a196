"""Calibration windows: seeded contiguous slices of a tokenized calibration text."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO, SHARED, shared_path
from lwqc.ir.datasets import WIKITEXT2_TEST, calibration_text
from lwqc.ir.errors import LwqcError
from lwqc.passes.calibration import sample_windows

pytestmark = pytest.mark.usefixtures("single_thread")


def _offsets(windows: np.ndarray, tokens: np.ndarray) -> list[list[int]]:
    """Every position at which each window occurs in ``tokens`` (brute-force search)."""
    seq_len = windows.shape[1]
    slices = np.lib.stride_tricks.sliding_window_view(tokens, seq_len)
    return [np.flatnonzero((slices == w).all(axis=1)).tolist() for w in windows]


def test_sample_windows_has_requested_shape_and_int64_dtype():
    tokens = np.arange(500, dtype=np.int32)
    windows = sample_windows(tokens, samples=7, seq_len=33, seed=0)
    assert windows.shape == (7, 33)
    assert windows.dtype == np.int64


def test_sample_windows_are_contiguous_slices_at_offsets_in_range():
    n, seq_len = 300, 50
    tokens = np.arange(n) * 3 + 11  # token value encodes its position
    windows = sample_windows(tokens, samples=64, seq_len=seq_len, seed=5)
    starts = (windows[:, 0] - 11) // 3
    assert np.all(starts >= 0)
    assert np.all(starts <= n - seq_len)
    for start, window in zip(starts, windows, strict=True):
        np.testing.assert_array_equal(window, tokens[start : start + seq_len])


def test_sample_windows_reaches_both_ends_of_a_short_text():
    # 3 possible offsets (0, 1, 2) and 200 draws: both the first and the last are drawn
    tokens = np.arange(10)
    windows = sample_windows(tokens, samples=200, seq_len=8, seed=1)
    assert set(windows[:, 0].tolist()) == {0, 1, 2}


def test_sample_windows_of_text_exactly_one_window_long_is_the_text():
    tokens = np.array([9, 4, 7, 1, 3])
    windows = sample_windows(tokens, samples=3, seq_len=5, seed=123)
    np.testing.assert_array_equal(windows, np.tile(tokens, (3, 1)))


def test_sample_windows_same_seed_same_windows_other_seed_other_windows():
    tokens = np.arange(10_000)
    first = sample_windows(tokens, samples=8, seq_len=16, seed=3)
    again = sample_windows(tokens, samples=8, seq_len=16, seed=3)
    other = sample_windows(tokens, samples=8, seq_len=16, seed=4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_sample_windows_rejects_text_shorter_than_one_window():
    with pytest.raises(LwqcError, match="fewer than one window"):
        sample_windows(np.arange(15), samples=2, seq_len=16, seed=0)


def test_calibration_text_refuses_wikitext2_test_by_relative_path(monkeypatch):
    monkeypatch.delenv("LWQC_SHARED", raising=False)
    monkeypatch.chdir(REPO)
    with pytest.raises(LwqcError, match="evaluation text"):
        calibration_text("../shared/data/wikitext2/wiki.test.raw")


def test_calibration_text_refuses_wikitext2_test_under_lwqc_shared(monkeypatch, tmp_path):
    target = tmp_path / WIKITEXT2_TEST
    target.parent.mkdir(parents=True)
    target.write_text("= Robert Boulter =\n")
    monkeypatch.setenv("LWQC_SHARED", str(tmp_path))
    with pytest.raises(LwqcError, match="evaluation text"):
        calibration_text(str(target))
    # a symbolic link to the test file is the test file
    link = tmp_path / "innocent.txt"
    link.symlink_to(target)
    with pytest.raises(LwqcError, match="evaluation text"):
        calibration_text(str(link))


def test_calibration_text_reads_a_plain_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("to be or not to be\n", encoding="utf-8")
    assert calibration_text(str(path)) == "to be or not to be\n"


def test_calibration_text_of_missing_file_is_an_lwqc_error(tmp_path):
    with pytest.raises(LwqcError, match="does not exist"):
        calibration_text(str(tmp_path / "absent.txt"))


@pytest.fixture(scope="module")
def ref_graph(ref_llama_dir):
    from lwqc.ir.hf_source import import_model

    return import_model(str(ref_llama_dir))


def test_calib_pass_windows_are_slices_of_independently_tokenized_shakespeare(
    ref_graph, ref_llama_dir, monkeypatch
):
    from transformers import AutoTokenizer

    import lwqc.passes  # noqa: F401  (registers the passes)
    from lwqc.passes.manager import PassManager
    from lwqc.registry import parse

    text = shared_path("data/tinyshakespeare/input.txt").read_text("utf-8")
    monkeypatch.setenv("LWQC_SHARED", str(SHARED))
    tokenizer = AutoTokenizer.from_pretrained(ref_llama_dir)
    tokens = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)

    ref_graph.calibration = None
    ref_graph.available.discard("calibration")
    PassManager(parse("calib{source=tinyshakespeare,samples=6,seq_len=48,seed=2}")).run(
        ref_graph
    )
    windows = ref_graph.calibration
    assert "calibration" in ref_graph.available
    assert windows.shape == (6, 48)
    assert windows.dtype == np.int64
    offsets = _offsets(windows, tokens)
    assert all(offsets), "every window is a contiguous slice of the tokenized text"
    # distinct windows over a 360k-token text: the offsets are spread, not one repeated slice
    assert len({tuple(w) for w in windows.tolist()}) == 6


def test_calib_pass_on_a_text_file_is_seeded(ref_graph, ref_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    import lwqc.passes  # noqa: F401
    from lwqc.passes.manager import PassManager
    from lwqc.registry import parse

    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"line {i} squares to {i * i}." for i in range(60)), "utf-8")
    tokenizer = AutoTokenizer.from_pretrained(ref_llama_dir)
    tokens = np.asarray(tokenizer(path.read_text("utf-8"), add_special_tokens=False)["input_ids"])

    def windows(seed):
        PassManager(parse(
            f"calib{{source={path},samples=5,seq_len=12,seed={seed}}}"
        )).run(ref_graph)
        return ref_graph.calibration.copy()

    first, again, other = windows(7), windows(7), windows(8)
    assert first.shape == (5, 12)
    assert all(_offsets(first, tokens))
    assert all(_offsets(other, tokens))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_calibration_refuses_the_tokenized_test_split_and_copies_of_it(tmp_path):
    tokens = shared_path("data/wikitext2/wiki.test.tokens")
    with pytest.raises(LwqcError, match="evaluation text"):
        calibration_text(str(tokens))
    copy = tmp_path / "innocent-name.txt"
    copy.write_text(shared_path("data/wikitext2/wiki.test.raw").read_text("utf-8"))
    with pytest.raises(LwqcError, match="evaluation text"):
        calibration_text(str(copy))
