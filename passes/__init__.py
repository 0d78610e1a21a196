"""Passes: analyses annotate, policies plan, transforms quantize. Importing registers them."""

from lwqc.passes import (  # noqa: F401  (each module registers its passes)
    apply_plan,
    calibration,
    entropy,
    lim,
    outliers,
    policy_entropy,
    policy_lim,
    policy_llamacpp,
    policy_random,
    policy_sensitivity,
    policy_uniform,
    policy_zd,
    quantize,
    sensitivity,
    zd,
)
