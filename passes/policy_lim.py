"""LIM policy (arXiv 2406.17415): blocks that change the residual stream more keep more bits."""

from __future__ import annotations

from lwqc.passes.policy import PolicyPass


class LimPolicy(PolicyPass):
    name = "policy-lim"
    score_key = "lim"
