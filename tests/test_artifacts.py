"""atomic_directory: the artifact appears whole or not at all (errors, Ctrl-C and SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import save_tiny_model
from lwqc.artifacts import atomic_directory
from lwqc.ir.errors import LwqcError


def _leftovers(parent: Path, name: str) -> list[str]:
    """Hidden staging or retired directories of ``name`` in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture
def recorded_sigterm():
    """A harmless SIGTERM handler installed for the test (the previous one restored after)."""
    calls = []

    def handler(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    yield handler, calls
    signal.signal(signal.SIGTERM, previous)


def test_success_renames_the_staging_directory_to_out(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.tmp-")
        assert not out.exists()  # nothing visible while the artifact is being built
        (staging / "plan.json").write_text("{}")
    assert (out / "plan.json").read_text() == "{}"
    assert not staging.exists()
    assert _leftovers(tmp_path, "out") == []


def test_success_replaces_an_earlier_artifact_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text("old")
    (out / "report.md").write_text("old")
    with atomic_directory(out) as staging:
        (staging / "plan.json").write_text("new")
        assert (out / "plan.json").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == ["plan.json"]
    assert (out / "plan.json").read_text() == "new"
    assert _leftovers(tmp_path, "out") == []


def test_an_exception_removes_staging_and_the_parents_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(out) as staging:
            assert staging.parent == tmp_path / "a" / "b"
            (staging / "plan.json").write_text("{}")
            raise RuntimeError("boom")
    assert not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # a/ and a/b/ are gone too


def test_an_exception_keeps_an_earlier_artifact_and_existing_parents(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as staging:
            (staging / "plan.json").write_text("new")
            raise RuntimeError("boom")
    assert (out / "plan.json").read_text() == "old"
    assert _leftovers(tmp_path, "out") == []


def test_a_foreign_directory_is_refused_before_anything_is_made(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LwqcError, match=r"holds files lwqc did not write \(notes.txt\)"):
        with atomic_directory(out):
            pytest.fail("the body must not run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigterm_handler_is_active_inside_and_the_previous_one_restored(tmp_path,
                                                                        recorded_sigterm):
    handler, calls = recorded_sigterm
    with atomic_directory(tmp_path / "out"):
        assert signal.getsignal(signal.SIGTERM) is not handler
    assert signal.getsignal(signal.SIGTERM) is handler
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out2"):
            raise RuntimeError("boom")
    assert signal.getsignal(signal.SIGTERM) is handler
    assert calls == []


def test_sigterm_inside_becomes_keyboard_interrupt_and_cleans_up(tmp_path, recorded_sigterm):
    handler, calls = recorded_sigterm
    out = tmp_path / "new" / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out) as staging:
            (staging / "plan.json").write_text("{}")
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:  # the handler runs on the next bytecode
                time.sleep(0.01)
    assert calls == []  # the previous handler never saw it
    assert signal.getsignal(signal.SIGTERM) is handler
    assert not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_outside_the_main_thread_no_handler_is_installed(tmp_path, recorded_sigterm):
    handler, _ = recorded_sigterm
    seen, errors = [], []

    def build():
        try:
            with atomic_directory(tmp_path / "out") as staging:
                seen.append(signal.getsignal(signal.SIGTERM))
                (staging / "plan.json").write_text("{}")
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=build)
    thread.start()
    thread.join()
    assert errors == []
    assert seen == [handler]
    assert (tmp_path / "out" / "plan.json").read_text() == "{}"
    assert signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.slow
def test_sigterm_during_a_compile_leaves_nothing_behind(tmp_path):
    model = save_tiny_model("llama", tmp_path / "model")
    parent = tmp_path / "artifacts"
    parent.mkdir()
    out = parent / "OUT"
    process = subprocess.Popen(
        [sys.executable, "-m", "lwqc.cli", "compile", str(model), "--policy", "uniform",
         "--width", "4", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 120
        while not _leftovers(parent, "OUT"):
            assert process.poll() is None, f"compile ended before staging: {process.stderr.read()}"
            assert time.monotonic() < deadline, "no staging directory appeared"
            time.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0, stderr
    assert "lwqc: interrupted; nothing was written" in stderr
    assert not out.exists()
    assert _leftovers(parent, "OUT") == []
    assert sorted(p.name for p in parent.iterdir()) == []
