"""Write an artifact directory atomically: build it in a sibling temp dir, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lwqc.ir.errors import LwqcError

PLAN_FILE = "plan.json"
MODEL_FILE = "model.onnx"
PACKED_FILE = "packed.safetensors"
REPORT_FILE = "report.md"


def check_output(out: Path) -> None:
    """Refuse an output path that cannot hold an artifact, before any work is done."""
    if not out.parent.is_dir():
        raise LwqcError(f"output parent directory {out.parent} does not exist; create it first")
    if out.exists() and not out.is_dir():
        raise LwqcError(f"output path {out} is a file; choose a directory for -o")
    if out.is_dir() and any(out.iterdir()) and not (out / PLAN_FILE).exists():
        raise LwqcError(f"output directory {out} is not empty and holds no lwqc artifact; "
                        "choose another -o")


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; on success it replaces ``out``, on failure it vanishes."""
    check_output(out)
    try:
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
