"""Passes: analyses annotate, policies plan, transforms quantize. ``PASSES`` lists them all."""

from lwqc.passes.analyses import ANALYSES
from lwqc.passes.apply_plan import ApplyPlanPass
from lwqc.passes.base import Pass
from lwqc.passes.calibration import CalibrationPass
from lwqc.passes.policy_claq import ClaqPolicy
from lwqc.passes.policy_entropy import EntropyPolicy
from lwqc.passes.policy_fastewq import FastEwqPolicy
from lwqc.passes.policy_lim import LimPolicy
from lwqc.passes.policy_llamacpp import LlamaCppPolicy
from lwqc.passes.policy_random import RandomPolicy
from lwqc.passes.policy_sensitivity import SensitivityPolicy
from lwqc.passes.policy_uniform import UniformPolicy
from lwqc.passes.policy_zd import ZDPolicy
from lwqc.passes.quantize import QuantizePass

__all__ = ["PASSES"]

PASSES: tuple[type[Pass], ...] = (
    *ANALYSES, CalibrationPass,
    ClaqPolicy, EntropyPolicy, FastEwqPolicy, LimPolicy, LlamaCppPolicy, RandomPolicy,
    SensitivityPolicy, UniformPolicy, ZDPolicy, ApplyPlanPass,
    QuantizePass,
)
