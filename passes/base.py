"""The pass contract: a declared kind, declared annotations in and out, typed options.

A pass is a class with one method, ``run(graph, context)``. It declares what it requires and
provides (``site.entropy``, ``block.entropy``, ``plan``, ``packed``, ``lowered.onnx``); the
manager checks the requirements before anything runs and calls the pass's own ``ensures``
after it ran, so a pass cannot lie about what it did. Options are declared once, parsed from
the pipeline text and validated with a clear error. A lowering pass declares the
``capabilities`` of its backend; the manager makes them the graph's target before the policy
runs.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, Protocol, TypeVar

from lwqc.ir.capabilities import Capabilities
from lwqc.ir.errors import PipelineError
from lwqc.ir.graph import Graph
from lwqc.ir.spec import QUANT_WIDTHS, WIDTHS

T = TypeVar("T")


class PassKind(enum.Enum):
    ANALYSIS = "analysis"  # writes annotations, never changes graph, plan or packed weights
    POLICY = "policy"  # writes the plan
    TRANSFORM = "transform"  # quantizes or lowers


class PassContractError(PipelineError):
    """A pass did not provide what it declared, or an analysis changed the graph."""


class MissingRequirementError(PipelineError):
    """A pass needs an annotation that no earlier pass in the pipeline provides."""


def choice(*allowed: str) -> Callable[[str], str]:
    """An option parser accepting one of ``allowed``."""

    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return text

    parse.__name__ = "|".join(allowed)
    return parse


def option_text(value: Any) -> str:
    """An option value as pipeline text (``true``, ``2+4+8``, ``4.5``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "+".join(map(str, value))
    return repr(value) if isinstance(value, float) else str(value)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("a seed is a non-negative integer")
    return value


def boolean(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError("expected true or false")
    return text == "true"


def width_list(text: str) -> tuple[int, ...]:
    """``2+4+8``: widths joined by ``+`` (commas separate options in pipeline text)."""
    widths = tuple(sorted({int(part) for part in text.split("+")}))
    if any(w not in WIDTHS for w in widths):
        raise ValueError(f"widths are drawn from {', '.join(map(str, QUANT_WIDTHS))}, 16")
    return widths


def group_size_list(text: str) -> tuple[int, ...]:
    """``32+64+128``: group sizes joined by ``+``, ascending (one alone is a list of one)."""
    return tuple(sorted({positive_int(part) for part in text.split("+")}))


@dataclasses.dataclass(frozen=True)
class Option:
    """A typed pass option: ``parse`` turns pipeline text into the value."""

    parse: Callable[[str], Any]
    default: Any = None
    help: str = ""
    multiple: bool = False


class TaskPool(Protocol):
    """Workers elsewhere (a Ray cluster) that a pass may hand independent tasks to.

    ``map`` builds ``worker(*setup)`` once on each worker, calls ``getattr(worker,
    method)(*task)`` for every task (tasks are drawn lazily as workers free up) and yields the
    results in completion order."""

    def map(self, worker: Callable[..., Any], setup: tuple, method: str,
            tasks: Iterable[tuple]) -> Iterator[Any]: ...


class PassContext:
    """What the manager lends a running pass: progress reporting, and the driver's task pool
    (``None``: everything runs in this process)."""

    def __init__(self, show_progress: bool = False, pool: TaskPool | None = None) -> None:
        self.show_progress = show_progress
        self.pool = pool

    def progress(self, items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
        if not self.show_progress:
            yield from items
            return
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, leave=False, unit="site")


class Pass(abc.ABC):
    """Base of all passes. Subclasses set ``name``, ``kind`` and implement ``run``."""

    name: ClassVar[str] = ""
    kind: ClassVar[PassKind]
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[dict[str, Option]] = {}
    capabilities: ClassVar[Capabilities | None] = None  # lowerings: what the backend stores

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise PipelineError(
                f"pass '{self.name}' has no option {unknown[0]!r} (its options: {known})"
            )
        self.values = {name: opt.default for name, opt in self.options.items()}
        for name, value in values.items():
            self.values[name] = self._checked(name, value)
        self.validate()

    def _checked(self, name: str, value: Any) -> Any:
        """The value as its option's parser reads the value's pipeline text: options given
        from Python are held to the same checks as options given as text."""
        option = self.options[name]
        if value is None:
            return None
        items = value if option.multiple else [value]
        try:
            parsed = [option.parse(option_text(item)) for item in items]
        except ValueError as exc:
            raise PipelineError(f"pass '{self.name}' option {name}={value!r}: {exc}") from None
        return parsed if option.multiple else parsed[0]

    def validate(self) -> None:  # noqa: B027  (an optional hook, not an abstract method)
        """Check option combinations; raise ``PipelineError`` with the fix."""

    def required(self) -> tuple[str, ...]:
        """What must be available before this pass runs (may depend on options)."""
        return self.requires

    @abc.abstractmethod
    def run(self, graph: Graph, context: PassContext) -> None:
        """Do the pass's work on ``graph``: annotate, plan, quantize or lower."""

    def ensures(self, graph: Graph) -> None:
        """After ``run``: raise ``PassContractError`` unless the pass wrote what it provides.
        The base checks annotations and lowered models; passes with other products extend it."""
        for key in self.provides:
            scope, _, name = key.partition(".")
            if scope in ("site", "block") and not _annotated(graph, scope, name):
                raise PassContractError(f"pass '{self.name}' declares {key} but did not write it")
            if scope == "lowered" and name not in graph.lowered:
                raise PassContractError(f"pass '{self.name}' declares {key} but lowered nothing")

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.values == other.values  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"<pass {self.name} {self.values}>"


def _annotated(graph: Graph, scope: str, name: str) -> bool:
    if scope == "site":
        return all(name in site.stats for site in graph)
    return all(name in block.stats for block in graph.blocks)


class PlanningPass(Pass):
    """Base of passes that write the plan (policies, apply-plan): the plan must cover every
    site, and every spec must be one the graph's target can store."""

    kind = PassKind.POLICY
    provides = ("plan",)

    def ensures(self, graph: Graph) -> None:
        super().ensures(graph)
        if graph.plan is None:
            raise PassContractError(f"pass '{self.name}' declares 'plan' but wrote none")
        if set(graph.plan.specs) != set(graph.sites):
            raise PassContractError(
                f"pass '{self.name}' wrote a plan that does not cover every site")
        for site_id, spec in graph.plan.specs.items():
            graph.target.check(spec, f"site {site_id}")


def registry_of(classes: Iterable[type[Pass]]) -> dict[str, type[Pass]]:
    """Pass classes by name; two passes may not share a name."""
    table: dict[str, type[Pass]] = {}
    for cls in classes:
        if cls.name in table:
            raise RuntimeError(f"two passes are named {cls.name!r}")
        table[cls.name] = cls
    return table
