"""Typed per-site and per-block statistics that analysis passes write and policies read.

Every annotation records the pass that wrote it. Analyses subclass ``Annotation`` with typed
fields; ``score`` is the single number a policy ranks by (higher = more important).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar


@dataclasses.dataclass(frozen=True)
class Annotation:
    """Base of all annotations: ``key`` names the statistic, ``source`` the pass that wrote it."""

    key: ClassVar[str] = ""
    source: str

    def values(self) -> dict[str, float | int | str]:
        """The annotation's fields, without ``source``, in declaration order."""
        fields = dataclasses.fields(self)
        return {f.name: getattr(self, f.name) for f in fields if f.name != "source"}

    def importance(self) -> float:
        """The score a policy ranks by: higher means keep at more bits."""
        raise TypeError(f"annotation {self.key!r} does not define an importance score")


@dataclasses.dataclass(frozen=True)
class RecordedAnnotation(Annotation):
    """An annotation read back from an artifact: the values as stored, no behaviour."""

    name: str = ""
    recorded: tuple[tuple[str, float | int | str], ...] = ()

    def values(self) -> dict[str, float | int | str]:
        return dict(self.recorded)


def annotation_key(annotation: Annotation) -> str:
    """The key an annotation is stored under."""
    if isinstance(annotation, RecordedAnnotation):
        return annotation.name
    return annotation.key
