"""The package's shape: no import circle between its modules, and every method exported at the top level."""

import ast
from pathlib import Path

import alignment
from alignment.methods import METHODS
from alignment.methods.base import PreferenceModule

PACKAGE = Path(alignment.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, at the top or inside a function (a lazy import still ties the
    two together)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting, done = [], set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return visiting[visiting.index(node) :] + [node]
        if node in done:
            return None
        visiting.append(node)
        for target in sorted(graph[node]):
            if cycle := visit(target):
                return cycle
        visiting.pop()
        done.add(node)
        return None

    return next((cycle for node in sorted(graph) if (cycle := visit(node))), None)


def test_find_cycle_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert "alignment.cli" in graph["alignment.commands.sweep"]  # the graph sees lazy imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_every_method_is_exported_at_the_top_level():
    for name in METHODS:
        assert name in alignment.__all__
        method = getattr(alignment, name)
        assert issubclass(method, PreferenceModule) and method.__name__ == name


def test_the_cli_offers_the_training_verbs_the_help_describes():
    from alignment.cli import SUBCOMMANDS
    from alignment.usage import TRAINING_VERBS

    assert set(SUBCOMMANDS) == set(TRAINING_VERBS)


def documented_args(cls: type) -> set[str]:
    """Names in the `Args:` sections of the docstrings of `cls` and its bases, as --help reads them."""
    import re

    names: set[str] = set()
    for klass in cls.__mro__:
        doc = klass.__dict__.get("__doc__") or ""
        if "Args:" in doc:
            names |= set(re.findall(r"^\s{8}(\w+):", doc.split("Args:", 1)[1], re.M))
    return names


def init_args(cls: type) -> set[str]:
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and klass.__module__.startswith("alignment"):
            kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            params = inspect.signature(init).parameters.values()
            names |= {p.name for p in params if p.name != "self" and p.kind not in kinds}
    return names


def test_every_setting_of_every_method_and_of_the_data_has_a_help_line():
    for cls in [getattr(alignment, name) for name in METHODS] + [alignment.PreferenceDataModule]:
        missing = init_args(cls) - documented_args(cls)
        assert not missing, f"{cls.__name__}: no help for {sorted(missing)}"


def test_dpo_signature_is_explicit_and_matches_the_base():
    import inspect

    from alignment.methods.base import PreferenceModule

    dpo = inspect.signature(alignment.DPO.__init__).parameters
    kinds = {p.kind for p in dpo.values()}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds and inspect.Parameter.VAR_KEYWORD not in kinds
    for name, param in inspect.signature(PreferenceModule.__init__).parameters.items():
        assert name in dpo, f"DPO.__init__ lacks the base's {name}"
        assert (dpo[name].default, dpo[name].annotation) == (param.default, param.annotation), name
    # and every one reaches the base: the saved hyperparameters hold what was given
    module = alignment.DPO(lora_r=4, lora_alpha=8, warmup_steps=3, padding_free=True, beta=0.2, rpo_alpha=0.5)
    assert (module.hparams.lora_r, module.hparams.lora_alpha, module.hparams.warmup_steps) == (4, 8, 3)
    assert (module.hparams.padding_free, module.hparams.beta, module.hparams.rpo_alpha) == (True, 0.2, 0.5)
