"""The plan: one QuantSpec per site, and how it was chosen (policy, budget, notes)."""

from __future__ import annotations

import dataclasses
from typing import Any

from lwqc.ir.spec import QuantSpec


@dataclasses.dataclass
class Plan:
    """Specs per site plus how they were chosen (policy, budget, notes for the report)."""

    specs: dict[str, QuantSpec]
    policy: str
    budget: dict[str, Any]
    notes: list[str] = dataclasses.field(default_factory=list)
