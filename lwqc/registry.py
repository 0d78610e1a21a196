"""Every pass lwqc knows, by name: the passes of ``passes/`` and the lowerings of ``backends/``.

Pipelines are parsed against this table (``parse``); nothing registers itself on import.
"""

from __future__ import annotations

from lwqc import backends, passes
from lwqc.passes.base import Pass, registry_of
from lwqc.passes.pipeline import parse_pipeline

REGISTRY: dict[str, type[Pass]] = registry_of((*passes.PASSES, *backends.PASSES))
LOWERINGS = {"onnx": "lower-onnx", "iree": "lower-iree", "torch": "lower-torch"}


def parse(text: str) -> list[Pass]:
    """The passes of pipeline text ``text``."""
    return parse_pipeline(text, REGISTRY)


def policies() -> list[str]:
    return sorted(name.removeprefix("policy-") for name in REGISTRY if name.startswith("policy-"))
