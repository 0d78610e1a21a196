"""Apply a plan from ``plan.json`` (possibly edited by hand) instead of running a policy.

1. The plan must be a valid ``lwqc.plan/1`` document made for the same weights (hash).
2. It must name exactly the model's sites; each spec is taken as written, and must be one
   the target backend stores.
"""

from __future__ import annotations

from pathlib import Path

from lwqc.ir.errors import PlanError
from lwqc.ir.graph import Graph
from lwqc.ir.plan import Plan
from lwqc.ir.plan_json import read_plan, specs_from_document
from lwqc.passes.base import Option, PassContext, PlanningPass


class ApplyPlanPass(PlanningPass):
    name = "apply-plan"
    options = {"file": Option(str, None, "path of the plan.json to apply")}

    def validate(self) -> None:
        if not self.values["file"]:
            raise PlanError("apply-plan needs file=PATH")
        read_plan(Path(self.values["file"]))  # a corrupt plan fails before any model loads

    def run(self, graph: Graph, context: PassContext) -> None:
        path = Path(self.values["file"])
        document = read_plan(path)
        recorded = document.get("model", {}).get("weights_sha256")
        if recorded != graph.weights_sha256:
            raise PlanError(
                f"plan file {path} was made for other weights (sha256 {str(recorded)[:12]}…, "
                f"this model {graph.weights_sha256[:12]}…); compile this model without --plan"
            )
        specs = specs_from_document(document)
        missing = [s for s in graph.sites if s not in specs]
        extra = [s for s in specs if s not in graph.sites]
        if missing or extra:
            what = f"lacks site {missing[0]}" if missing else f"names unknown site {extra[0]}"
            raise PlanError(f"plan file {path} {what}; it does not match this model")
        graph.plan = Plan(
            specs={s: specs[s] for s in graph.sites},
            policy=document.get("policy", "apply-plan"),
            budget={**document.get("budget", {}), "applied_from": path.name},
            notes=list(document.get("notes", [])),
        )
