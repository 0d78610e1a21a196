"""Text data: WikiText-2 raw test and STS-B dev for evaluation, WikiText-2 valid and
tiny-shakespeare for calibration; found in ``../shared`` or ``$LWQC_SHARED``.

Calibration never reads the evaluation split (WikiText-2 test).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lwqc.ir.errors import LwqcError

WIKITEXT2_TEST = "data/wikitext2/wiki.test.raw"
STSB_DEV = "data/stsb/sts-dev.csv"
EVALUATION_TEXTS = (WIKITEXT2_TEST, "data/wikitext2/wiki.test.tokens")
CALIBRATION_TEXTS = {
    "wikitext2-valid": "data/wikitext2/wiki.valid.tokens",
    "tinyshakespeare": "data/tinyshakespeare/input.txt",
}


def shared_dir() -> Path:
    """``$LWQC_SHARED``, else the ``shared`` directory beside the repository."""
    if os.environ.get("LWQC_SHARED"):
        return Path(os.environ["LWQC_SHARED"])
    return Path(__file__).resolve().parents[2] / "shared"  # <repo>/ir/datasets.py


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


def calibration_text(source: str) -> str:
    """A named calibration corpus, or the text of the file ``source``."""
    if source in CALIBRATION_TEXTS:
        return _shared_file(CALIBRATION_TEXTS[source], f"calibration text {source}").read_text(
            "utf-8"
        )
    text = read_text(Path(source))
    for relative in EVALUATION_TEXTS:
        evaluation = shared_dir() / relative
        if evaluation.exists() and evaluation.read_text("utf-8") == text:
            raise LwqcError(f"calibration must not use the evaluation text ({relative})")
    return text


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
