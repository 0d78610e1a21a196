"""Evaluation data: WikiText-2 raw test and STS-B dev, from ``../shared`` or ``$LWQC_SHARED``."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lwqc.ir.errors import LwqcError

WIKITEXT2_TEST = "data/wikitext2/wiki.test.raw"
STSB_DEV = "data/stsb/sts-dev.csv"


def shared_dir() -> Path:
    """``$LWQC_SHARED``, else the ``shared`` directory beside the repository."""
    if os.environ.get("LWQC_SHARED"):
        return Path(os.environ["LWQC_SHARED"])
    return Path(__file__).resolve().parents[2] / "shared"


def _shared_file(relative: str, what: str) -> Path:
    path = shared_dir() / relative
    if not path.exists():
        raise LwqcError(f"{what} not found at {path}; set LWQC_SHARED to the folder holding "
                        f"{relative} or pass --data FILE")
    return path


def wikitext2_text(path: Path | None = None) -> str:
    """WikiText-2 raw test as the usual harnesses feed it: rows (blank rows empty) joined by
    blank lines, i.e. ``"\\n\\n".join(rows)`` of the dataset's rows."""
    raw = (path or _shared_file(WIKITEXT2_TEST, "WikiText-2 raw test")).read_text("utf-8")
    return "\n\n".join(line if line.strip() else "" for line in raw.splitlines())


def read_text(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except FileNotFoundError:
        raise LwqcError(f"data file {path} does not exist") from None
    except UnicodeDecodeError:
        raise LwqcError(f"data file {path} is not UTF-8 text") from None


def stsb_pairs(path: Path | None = None) -> list[tuple[float, str, str]]:
    """STS-B (score 0-5, sentence 1, sentence 2) rows; extra columns are ignored."""
    path = path or _shared_file(STSB_DEV, "STS-B dev")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for fields in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(fields) >= 7:
                rows.append((float(fields[4]), fields[5], fields[6]))
    if not rows:
        raise LwqcError(f"{path} holds no STS-B rows (tab-separated, 7 fields)")
    return rows
