"""Dependencies point one way (driver -> backends -> passes -> ir), and passes stay apart.

Every ``.py`` file of the four packages is read as an AST (nothing is imported to scan it), so
imports inside functions, under ``TYPE_CHECKING`` and relative imports all count.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from lwqc import backends, passes

REPO = Path(__file__).resolve().parents[1]

LAYERS = {"ir": 0, "passes": 1, "backends": 2, "driver": 3}
# modules that hold no pass of the tables (shared machinery any pass module may import)
INFRASTRUCTURE_EXAMPLES = tuple(
    f"lwqc.passes.{m}" for m in ("base", "manager", "pipeline", "policy", "budget", "solver",
                                 "analyses", "quantizers", "rtn", "float_offset", "kmeans")
) + ("lwqc.backends.onnx_formats",)


def package_dirs() -> dict[str, Path]:
    """``[tool.setuptools.package-dir]`` of pyproject.toml: package name -> directory."""
    # read by hand: tomllib is not in Python 3.10, which lwqc supports
    text = (REPO / "pyproject.toml").read_text()
    section = re.search(r"^\[tool\.setuptools\.package-dir\]\n(.*?)(?=^\[|\Z)", text,
                        re.MULTILINE | re.DOTALL)
    assert section, "pyproject.toml has no [tool.setuptools.package-dir]"
    mapping = dict(re.findall(r'^"([\w.]+)"\s*=\s*"([^"]+)"', section.group(1), re.MULTILINE))
    return {package: REPO / directory for package, directory in mapping.items()}


def module_name(path: Path, dirs: dict[str, Path]) -> str:
    """The module a file is imported as: the deepest mapped package directory holding it."""
    best = max((p for p, d in dirs.items() if path.is_relative_to(d)),
               key=lambda p: len(dirs[p].parts))
    parts = list(path.relative_to(dirs[best]).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([best, *parts])


def project_modules() -> dict[str, Path]:
    """Every module of the project (module name -> file)."""
    dirs = package_dirs()
    modules = {}
    for directory in dirs.values():
        for path in sorted(directory.rglob("*.py")):
            modules[module_name(path, dirs)] = path
    return modules


def layer(module: str) -> str | None:
    """Which layer a module belongs to; None outside the project."""
    parts = module.split(".")
    if parts[0] != "lwqc":
        return None
    if len(parts) > 1 and parts[1] in ("ir", "passes", "backends"):
        return parts[1]
    return "driver"


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # the module imported (``from M import n``: ``M.n`` if that is a module)
    text: str


def imports_of(module: str, source: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import in ``source`` (any depth), resolved to absolute module names."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(node.lineno, alias.name, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".")
                if not is_package:
                    package.pop()
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                # ``from lwqc import backends`` imports lwqc.backends; ``from lwqc import X``
                # of a name that is no module takes it from lwqc's driver package all the same
                if candidate in known or (base == "lwqc" and alias.name != "*"):
                    target = candidate
                else:
                    target = base
                found.append(Import(node.lineno, target, ast.unparse(node)))
    return found


def upward_imports(module: str, source: str, is_package: bool, known: set[str]) -> list[Import]:
    """Imports of ``module`` that reach a layer above its own."""
    own = LAYERS[layer(module)]
    return [i for i in imports_of(module, source, is_package, known)
            if layer(i.target) is not None and LAYERS[layer(i.target)] > own]


def _parse_args(module: str, path: Path) -> tuple[str, str, bool]:
    return module, path.read_text(), path.name == "__init__.py"


# -- the scanner, on hand-written sources --------------------------------------------------------

KNOWN = {"lwqc", "lwqc.ir", "lwqc.ir.graph", "lwqc.passes", "lwqc.passes.base",
         "lwqc.passes.zd", "lwqc.backends", "lwqc.registry"}


def test_scanner_finds_imports_inside_functions_and_from_package_imports():
    source = (
        "import numpy as np\n"
        "from lwqc.ir.graph import Graph\n"
        "def f():\n"
        "    from lwqc import backends\n"
        "    import lwqc.registry\n"
        "class C:\n"
        "    def g(self):\n"
        "        from lwqc.passes import base\n"
    )
    found = upward_imports("lwqc.ir.text", source, False, KNOWN)
    assert [(i.line, i.target) for i in found] == [
        (4, "lwqc.backends"), (5, "lwqc.registry"), (8, "lwqc.passes.base")]


def test_scanner_resolves_relative_imports_against_the_module_package():
    source = "from . import zd\nfrom .. import registry\nfrom .base import Pass\n"
    found = imports_of("lwqc.passes.lim", source, False, KNOWN)
    assert [i.target for i in found] == ["lwqc.passes.zd", "lwqc.registry", "lwqc.passes.base"]
    # in a package's __init__ the package itself is the anchor of ``.``
    found = imports_of("lwqc.passes", "from . import zd\n", True, KNOWN)
    assert [i.target for i in found] == ["lwqc.passes.zd"]


def test_scanner_allows_imports_down_and_sideways():
    source = "from lwqc.ir.graph import Graph\nfrom lwqc.passes.base import Pass\nimport os\n"
    assert upward_imports("lwqc.passes.zd", source, False, KNOWN) == []
    assert upward_imports("lwqc.backends.onnxruntime", source, False, KNOWN) == []
    driver = "from lwqc import backends\nfrom lwqc.registry import parse\n"
    assert upward_imports("lwqc.compile", driver, False, KNOWN) == []
    assert [i.target for i in upward_imports("lwqc.backends.x", driver, False, KNOWN)] == [
        "lwqc.registry"]


def test_layer_of_a_module_name():
    assert layer("lwqc.ir.formats.affine") == "ir"
    assert layer("lwqc.passes") == "passes"
    assert layer("lwqc.backends.torch_eager") == "backends"
    assert layer("lwqc.cli") == "driver"
    assert layer("lwqc") == "driver"
    assert layer("lwqcx.ir") is None
    assert layer("numpy") is None


# -- the project ---------------------------------------------------------------------------------

def test_module_names_follow_the_package_dir_mapping():
    modules = project_modules()
    assert modules["lwqc.ir.graph"] == REPO / "ir" / "graph.py"
    assert modules["lwqc.ir.formats"] == REPO / "ir" / "formats" / "__init__.py"
    assert modules["lwqc.passes.lim"] == REPO / "passes" / "lim.py"
    assert modules["lwqc.backends"] == REPO / "backends" / "__init__.py"
    assert modules["lwqc.cli"] == REPO / "lwqc" / "cli.py"
    assert {layer(m) for m in modules} == set(LAYERS)


def test_no_module_imports_a_layer_above_its_own():
    modules = project_modules()
    known = set(modules)
    offences = []
    for module, path in modules.items():
        for i in upward_imports(*_parse_args(module, path), known):
            offences.append(f"{path.relative_to(REPO)}:{i.line}: {i.text} "
                            f"({layer(module)} imports {layer(i.target)} module {i.target})")
    assert not offences, "imports against the layering:\n" + "\n".join(offences)


def pass_modules() -> set[str]:
    return {cls.__module__ for cls in (*passes.PASSES, *backends.PASSES)}


def test_pass_modules_come_from_the_pass_tables():
    modules = project_modules()
    found = pass_modules()
    assert {"lwqc.passes.lim", "lwqc.passes.policy_lim", "lwqc.passes.quantize",
            "lwqc.backends.onnxruntime"} <= found
    assert found <= set(modules)
    assert all(layer(m) in ("passes", "backends") for m in found)
    assert set(INFRASTRUCTURE_EXAMPLES) <= set(modules) - found


@pytest.mark.parametrize("module", sorted(pass_modules()))
def test_a_pass_module_imports_no_other_pass_module(module):
    modules = project_modules()
    others = pass_modules() - {module}
    path = modules[module]
    offences = [
        f"{path.relative_to(REPO)}:{i.line}: {i.text} (pass module {module} imports pass "
        f"module {i.target}; move what they share to an infrastructure module)"
        for i in imports_of(*_parse_args(module, path), set(modules))
        if i.target in others
    ]
    assert not offences, "\n".join(offences)
