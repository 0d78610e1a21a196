"""Write an artifact directory atomically: build it in a sibling temp dir, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from lwqc.ir.errors import LwqcError
from lwqc.ir.onnx_source import DECODER_SIDE_FILES

PLAN_FILE = "plan.json"
MODEL_FILE = "model.onnx"
PACKED_FILE = "packed.safetensors"
REPORT_FILE = "report.md"
# What the GenAI model builder writes beside a decoder (its config and the tokenizer's files).
DECODER_FILES = frozenset(DECODER_SIDE_FILES)
# Everything lwqc writes into an output directory (compile and analyze); only a directory
# holding nothing else may be replaced.
OWN_FILES = frozenset({PLAN_FILE, MODEL_FILE, f"{MODEL_FILE}.data", "model.vmfb", PACKED_FILE,
                       REPORT_FILE, "blocks.csv", "sites.csv", "validate.csv", "scores.png",
                       *DECODER_FILES})


def check_output(out: Path) -> None:
    """Refuse an output path that cannot hold an artifact, before any work is done."""
    if out.exists() and not out.is_dir():
        raise LwqcError(f"output path {out} is a file; choose a directory for -o")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES)
        if foreign:
            raise LwqcError(f"output directory {out} holds files lwqc did not write "
                            f"({foreign[0]}); choose another -o")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While active, SIGTERM raises ``KeyboardInterrupt`` like Ctrl-C (so cleanup runs); the
    previous handler comes back on exit. Only the main thread may set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        # None: the previous handler was not set from Python; the default is the best guess
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; on success it replaces ``out``, on failure it vanishes
    (with any parent directories it had to create). SIGTERM counts as a failure, like Ctrl-C."""
    check_output(out)
    with _sigterm_interrupts():
        yield from _atomic_directory(out)


def _atomic_directory(out: Path) -> Iterator[Path]:
    created = next((p for p in reversed(out.parents) if not p.exists()), None)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise LwqcError(
            f"cannot write to {out.parent}: {exc.strerror}; choose another -o"
        ) from None
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(retired / out.name)
            staging.rename(out)
            shutil.rmtree(retired)
        else:
            staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
        if created is not None and not out.exists():
            shutil.rmtree(created, ignore_errors=True)  # parents this compile made
