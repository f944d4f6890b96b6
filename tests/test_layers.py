"""The package's shape: its layers (an import goes down, never up; data and model are side by side), no import circle
between its modules, and every method exported at the top level."""

import ast
import inspect
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
    assert "alignment.run.cli" in graph["alignment.commands.sweep"]  # the graph sees lazy imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# bottom up; a module imports from its own layer or those below it (docs/architecture.md draws them)
LAYERS = [
    ["alignment.errors", "alignment.files", "alignment.lazy"],  # shared by all
    ["alignment.logprobs", "alignment.losses", "alignment.metrics", "alignment.displacement", "alignment.judging"],
    ["alignment.hub"],  # where a base and its tokenizer come from: the hub, its cache, a .gguf file, the tiny model
    ["alignment.data", "alignment.model"],  # rows -> tokens -> batches; base -> LoRA -> log-probs (side by side)
    ["alignment.methods"],  # the LightningModules and the reference scorer
    ["alignment.run"],  # LightningCLI, checkpoints, the run directory
    ["alignment.commands"],  # report, compare, sweep, merge
    ["alignment.usage", "alignment"],  # the entry point (picks the verb) and the package's public names
]


def layer_of(module: str) -> tuple[int, str]:
    """(the layer's height, its name) of a module: the longest prefix named in LAYERS."""
    found = [(len(name), height, name) for height, names in enumerate(LAYERS) for name in names
             if module == name or module.startswith(name + ".")]  # fmt: skip
    assert found, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    _, height, name = max(found)
    return height, name


def test_every_import_goes_down_a_layer_or_stays_in_its_own():
    broken = []
    for module, targets in import_graph().items():
        height, name = layer_of(module)
        for target in targets:
            target_height, target_name = layer_of(target)
            sideways = target_height == height and target_name != name and height > 0
            if target_height > height or sideways:
                broken.append(f"{module} -> {target}")
    assert not broken, "imports that go up or sideways: " + ", ".join(sorted(broken))


def test_the_layer_check_sees_a_break():
    assert layer_of("alignment.data.module")[0] < layer_of("alignment.methods.dpo")[0]
    assert layer_of("alignment.data.rows") == (3, "alignment.data") != layer_of("alignment.model.load")


def test_every_method_is_exported_at_the_top_level():
    for name in METHODS:
        assert name in alignment.__all__
        method = getattr(alignment, name)
        assert issubclass(method, PreferenceModule) and method.__name__ == name


def test_the_cli_offers_the_training_verbs_the_help_describes():
    from alignment.run.cli import SUBCOMMANDS
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


def test_every_method_offers_every_setting_of_the_base_on_the_command_line():
    """Methods pass the base's settings through **kwargs without restating them; LightningCLI (jsonargparse) still
    offers each one, with the base's default, and the saved hyperparameters hold what was given."""
    from jsonargparse import ArgumentParser

    base = {name: p.default for name, p in inspect.signature(PreferenceModule.__init__).parameters.items()
            if name != "self"}  # fmt: skip
    for name in METHODS:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(getattr(alignment, name), "model")
        defaults = parser.get_defaults().model
        missing = [k for k in base if k not in defaults]
        assert not missing, f"{name}: --model.{missing[0]} is not offered"
        own = inspect.signature(getattr(alignment, name).__init__).parameters  # a method may set its own default
        assert {k: defaults[k] for k in base} == {k: own[k].default if k in own else v for k, v in base.items()}, name
    module = alignment.DPO(lora_r=4, lora_alpha=8, warmup_steps=3, padding_free=True, beta=0.2, rpo_alpha=0.5)
    assert (module.hparams.lora_r, module.hparams.lora_alpha, module.hparams.warmup_steps) == (4, 8, 3)
    assert (module.hparams.padding_free, module.hparams.beta, module.hparams.rpo_alpha) == (True, 0.2, 0.5)
