"""alignment/ uses other libraries through their public APIs; each exception is commented and its library pinned.

A private name (`_x`, not `__x__`) of lightning, transformers, datasets, bitsandbytes, peft, torch, ... is found in
four ways: a private module or name imported from a library; `super()._x`; `self._x` in a class derived from a
library class whose source names `_x`; `obj._x` where `_x` is defined nowhere in alignment/; and `def _x` that
overrides a library base class's member. Each must carry, on its line or up to three lines above, the marker
`# private API, checked on <package> <version>: <why>`, and pyproject.toml must cap that package's version.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alignment"
MARKER = re.compile(r"# private API, checked on ([\w-]+) [\d.]+:")
PRIVATE = re.compile(r"^_(?!_)\w*$")


def defined_names(trees: list[ast.AST]) -> set[str]:
    """Names alignment/ defines itself: functions, classes, variables, self.attributes, arguments."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):  # fmt: skip
                names.add(node.attr)
    return names


def library_bases(cls: type) -> list[type]:
    return [base for base in cls.__mro__[1:] if base is not object and not base.__module__.startswith("alignment")]


@cache
def library_source(base: type) -> str:
    try:
        return inspect.getsource(base)
    except (OSError, TypeError):
        return ""


def private_uses(source: str, module: object, own_names: set[str]) -> list[tuple[int, str]]:
    """(line, what) for each private name of another library that `source` (the text of `module`) touches."""
    tree = ast.parse(source)
    found = []
    classes = {node: getattr(module, node.name, None) for node in tree.body if isinstance(node, ast.ClassDef)}
    for class_node, cls in classes.items():
        bases = library_bases(cls) if isinstance(cls, type) else []
        for node in ast.walk(class_node):
            if isinstance(node, ast.FunctionDef) and PRIVATE.match(node.name):
                if any(node.name in vars(base) for base in bases):
                    found.append((node.lineno, f"def {node.name} overrides {bases[0].__name__}'s"))
            if (isinstance(node, ast.Attribute) and PRIVATE.match(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in ("self", "cls")):  # fmt: skip
                if any(re.search(rf"\b{node.attr}\b", library_source(base)) for base in bases):
                    found.append((node.lineno, f"self.{node.attr} of {bases[0].__name__}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module != "__future__":
            parts = [*node.module.split("."), *(alias.name for alias in node.names)]
            if not node.module.startswith("alignment") and any(PRIVATE.match(part) for part in parts):
                found.append((node.lineno, f"from {node.module} import {', '.join(a.name for a in node.names)}"))
        if isinstance(node, ast.Attribute) and PRIVATE.match(node.attr):
            target = node.value
            if isinstance(target, ast.Call) and isinstance(target.func, ast.Name) and target.func.id == "super":
                found.append((node.lineno, f"super().{node.attr}"))
            elif not (isinstance(target, ast.Name) and target.id in ("self", "cls")) and node.attr not in own_names:
                found.append((node.lineno, ast.unparse(node)))
    return sorted(set(found))


def unmarked(source: str, uses: list[tuple[int, str]]) -> list[tuple[int, str]]:
    lines = source.splitlines()
    return [(line, what) for line, what in uses if not any(map(MARKER.search, lines[max(0, line - 4) : line]))]


def package_sources() -> list[tuple[Path, str, object]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out.append((path, path.read_text(), importlib.import_module(name)))
    return out


def test_alignment_touches_no_private_name_of_another_library_unmarked():
    sources = package_sources()
    own = defined_names([ast.parse(text) for _, text, _ in sources])
    problems = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path, text, module in sources
        for line, what in unmarked(text, private_uses(text, module, own))
    ]
    assert not problems, "private names of other libraries, without a '# private API, checked on ...' comment:\n" + (
        "\n".join(problems)
    )


def test_every_marked_exception_is_pinned_in_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text()
    marked = {match.group(1) for path in PACKAGE.rglob("*.py") for match in MARKER.finditer(path.read_text())}
    for package in marked:
        requirement = re.search(rf'"{re.escape(package)}(\[[^\]]*\])?([^"]*)"', pyproject)
        assert requirement and "<" in requirement.group(2), f"{package}: no upper version bound in pyproject.toml"


SLIPS = """
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.overrides.distributed import _IndexBatchSamplerWrapper
from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector


def sampler_flag(trainer):
    return trainer._accelerator_connector.use_distributed_sampler


class Saver(ModelCheckpoint):
    def _save_checkpoint(self, trainer, filepath):
        super()._save_checkpoint(trainer, filepath)
        return self._last_global_step_saved

    def mine(self):
        self._counter = 1
        return self._counter


class Marked(ModelCheckpoint):
    # private API, checked on lightning 2.6: no public hook around the write
    def _save_checkpoint(self, trainer, filepath):
        pass
"""


def test_the_check_finds_each_kind_of_private_use(tmp_path, monkeypatch):
    """What a new private access looks like to the check: each is found, a marked one is let through."""
    path = tmp_path / "slips.py"
    path.write_text(SLIPS)
    spec = importlib.util.spec_from_file_location("slips", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "slips", module)
    spec.loader.exec_module(module)
    own = defined_names([ast.parse(SLIPS)])
    found = unmarked(SLIPS, private_uses(SLIPS, module, own))
    whats = [what for _, what in found]
    assert any(what.startswith("from lightning.pytorch.overrides.distributed import") for what in whats)
    assert any("import _AcceleratorConnector" in what for what in whats)
    assert "trainer._accelerator_connector" in whats
    assert "def _save_checkpoint overrides ModelCheckpoint's" in whats
    assert "super()._save_checkpoint" in whats
    assert "self._last_global_step_saved of ModelCheckpoint" in whats
    assert not any("_counter" in what for what in whats)  # the class's own attribute
    marked_line = SLIPS.splitlines().index("    def _save_checkpoint(self, trainer, filepath):", 20) + 1
    assert marked_line not in [line for line, _ in found]
    assert len(found) == 6, found


@pytest.mark.parametrize("package", ["lightning", "transformers", "torch", "peft", "datasets", "bitsandbytes"])
def test_dependencies_have_a_floor_and_a_ceiling(package):
    pyproject = (ROOT / "pyproject.toml").read_text()
    requirement = re.search(rf'"{package}(\[[^\]]*\])?([^"]*)"', pyproject)
    assert requirement and ">=" in requirement.group(2) and "<" in requirement.group(2).replace("<=", ""), package
