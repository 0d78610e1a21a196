"""ZD policy (arXiv 2406.17415): smaller z-score fraction = more important = more bits."""

from __future__ import annotations

from lwqc.passes.policy import PolicyPass


class ZDPolicy(PolicyPass):
    name = "policy-zd"
    score_key = "zd"
