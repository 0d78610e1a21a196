"""The analysis bundle, defined once: compile, analyze and sweep all build their analyses here.

1. The weight analyses (cheap, data-free) always run and are recorded in every plan.
2. Calibrated analyses are those whose pass requires ``calibration``; when any is wanted, the
   calibration pass runs first, then the wanted ones and the calibrated analyses they need
   (``gram`` for output-error sensitivity), in bundle order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lwqc.passes.base import Pass
from lwqc.passes.calibration import CalibrationPass
from lwqc.passes.entropy import EntropyPass
from lwqc.passes.gram import GramPass
from lwqc.passes.lim import LimPass
from lwqc.passes.outliers import OutliersPass
from lwqc.passes.sensitivity import SensitivityPass
from lwqc.passes.zd import ZDPass

ANALYSES: tuple[type[Pass], ...] = (ZDPass, EntropyPass, OutliersPass, LimPass, GramPass,
                                    SensitivityPass)
WEIGHT_ANALYSES = tuple(cls for cls in ANALYSES if "calibration" not in cls.requires)
CALIBRATED_ANALYSES = tuple(cls for cls in ANALYSES if "calibration" in cls.requires)


def calibrated(keys: Iterable[str]) -> list[str]:
    """Names of the calibrated analyses providing any of ``keys`` (``site.lim``, ...)."""
    wanted = set(keys)
    return [cls.name for cls in CALIBRATED_ANALYSES if wanted & set(cls.provides)]


def analysis_passes(
    calibrated_names: Iterable[str] = (),
    calibration: dict[str, Any] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> list[Pass]:
    """Weight analyses, then calibration and the named calibrated analyses; ``options`` maps
    an analysis name to its option values (None values are left at their defaults)."""
    options = options or {}

    def build(cls: type[Pass]) -> Pass:
        return cls(**_given(options.get(cls.name, {})))

    passes = [build(cls) for cls in WEIGHT_ANALYSES]
    names = set(calibrated_names)
    unknown = names - {cls.name for cls in CALIBRATED_ANALYSES}
    if unknown:
        raise ValueError(f"not a calibrated analysis: {sorted(unknown)[0]}")
    while True:  # add the calibrated analyses that the wanted ones need
        needed = {key for cls in CALIBRATED_ANALYSES if cls.name in names
                  for key in build(cls).required()}
        more = set(calibrated(needed)) - names
        if not more:
            break
        names |= more
    if names:
        passes.append(CalibrationPass(**_given(calibration or {})))
        passes += [build(cls) for cls in CALIBRATED_ANALYSES if cls.name in names]
    return passes


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
