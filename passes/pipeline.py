"""The textual pipeline form, ``zd,entropy,policy-entropy{bits=4.5},quantize,lower-onnx``.

Grammar: ``element ("," element)*``; ``element = name ["{" key=value ("," key=value)* "}"]``;
a value is bare (no ``,{}="`` characters) or double-quoted with backslash escapes. A
repeatable option is written once per value. ``format_pipeline(parse_pipeline(s))`` gives the
canonical text, which parses back to equal passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lwqc.ir.errors import PipelineError
from lwqc.passes.base import Pass, option_text

_SPECIAL = set(',{}="\\')


class _Reader:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def peek(self) -> str:
        """The next character that is not a space ("" at the end)."""
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self, expected: str) -> None:
        if self.peek() != expected:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise PipelineError(
                f"pipeline text: expected {expected!r} at position {self.pos}, found {found}: "
                f"{self.text!r}"
            )
        self.pos += 1

    def word(self) -> str:
        start = self.pos
        while self.peek() and self.peek() not in _SPECIAL:
            self.pos += 1
        return self.text[start : self.pos].strip()

    def value(self) -> str:
        if self.peek() != '"':
            return self.word()
        self.take('"')
        chars = []
        while self.pos < len(self.text) and self.text[self.pos] != '"':
            if self.text[self.pos] == "\\":
                self.pos += 1
            chars.append(self.text[self.pos : self.pos + 1])
            self.pos += 1
        if self.pos >= len(self.text):
            raise PipelineError(f"pipeline text: unterminated quote in {self.text!r}")
        self.pos += 1
        return "".join(chars)


def _build(name: str, raw: list[tuple[str, str]], registry: Mapping[str, type[Pass]]) -> Pass:
    cls = registry.get(name)
    if cls is None:
        known = ", ".join(sorted(registry))
        raise PipelineError(f"unknown pass {name!r} in pipeline (known passes: {known})")
    values: dict[str, Any] = {}
    for key, text in raw:
        option = cls.options.get(key)
        if option is None:
            known = ", ".join(cls.options) or "none"
            raise PipelineError(f"pass '{name}' has no option {key!r} (its options: {known})")
        try:
            parsed = option.parse(text)
        except ValueError as exc:
            raise PipelineError(f"pass '{name}' option {key}={text!r}: {exc}") from None
        if option.multiple:
            values.setdefault(key, []).append(parsed)
        elif key in values:
            raise PipelineError(f"pass '{name}' option {key!r} given twice")
        else:
            values[key] = parsed
    return cls(**values)


def parse_pipeline(text: str, registry: Mapping[str, type[Pass]]) -> list[Pass]:
    """Parse pipeline text into configured passes of ``registry`` (name -> pass class)."""
    return [_build(name, raw, registry) for name, raw in _read(text)]


def parse_passes_named(text: str, names: Iterable[str],
                       registry: Mapping[str, type[Pass]]) -> list[Pass]:
    """The passes of pipeline text ``text`` named ``names``, configured; the others are read
    and left unbuilt (their options are not checked)."""
    wanted = set(names)
    return [_build(name, raw, registry) for name, raw in _read(text) if name in wanted]


def _read(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """Each pass of pipeline text: its name and its raw options."""
    reader = _Reader(text)
    passes = []
    while True:
        name = reader.word()
        if not name:
            raise PipelineError(
                f"pipeline text: empty pass name at position {reader.pos}: {text!r}"
            )
        raw: list[tuple[str, str]] = []
        if reader.peek() == "{":
            reader.take("{")
            while reader.peek() != "}":
                key = reader.word()
                reader.take("=")
                raw.append((key, reader.value()))
                if reader.peek() == ",":
                    reader.take(",")
                elif reader.peek() != "}":
                    reader.take("}")
            reader.take("}")
        passes.append((name, raw))
        if not reader.peek():
            return passes
        reader.take(",")


def _format_value(value: Any) -> str:
    text = option_text(value)
    if text and not (_SPECIAL & set(text)) and text == text.strip():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def format_pass(p: Pass) -> str:
    fields = []
    for key, option in p.options.items():
        value = p.values[key]
        if value is None or value == []:
            continue
        for item in value if option.multiple else [value]:
            fields.append(f"{key}={_format_value(item)}")
    return p.name + ("{" + ",".join(fields) + "}" if fields else "")


def format_pipeline(passes: list[Pass]) -> str:
    """The canonical text of a pipeline: every option that has a value, in declared order."""
    return ",".join(format_pass(p) for p in passes)
