"""The layers of src/order_viewer kept, as the imports of every module say them (read with ast, not
run): each layer imports only the layers above it, and the settings object reaches only the
composition root and the entrypoints, which hand the other parts values."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import order_viewer

PACKAGE = Path(order_viewer.__file__).parent

# What each layer may import of the package (a module of a layer may import its own layer).
ALLOWED = {
    "domain": {"domain"},
    "service": {"domain", "service"},
    "adapters": {"domain", "service", "adapters", "config"},
    "entrypoints": {"domain", "service", "adapters", "config", "bootstrap", "entrypoints"},
    "bootstrap": {"domain", "service", "adapters", "config"},
    # The settings are parsed by the parsers of the parts that use them (trusted proxies).
    "config": {"domain", "service", "adapters"},
}
# Only these take the whole Settings; every other part receives values.
SETTINGS_READERS = {"bootstrap", "config", "entrypoints"}


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, ast.parse(path.read_text(encoding="utf-8"))


def imports_of(tree: ast.Module) -> Iterator[str]:
    """The package's modules a module imports, and `order_viewer.config.Settings` if it does."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("order_viewer"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("order_viewer"):
            module = node.module or ""
            if module == "order_viewer":  # from order_viewer import bootstrap
                yield from (f"{module}.{alias.name}" for alias in node.names)
                continue
            yield module
            yield from (
                f"{module}.{alias.name}" for alias in node.names if alias.name == "Settings"
            )


def layer_of(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def broken_rules() -> list[str]:
    broken = []
    for module, tree in modules():
        layer = layer_of(module)
        for imported in set(imports_of(tree)):
            if imported == "order_viewer.config.Settings":
                if layer not in SETTINGS_READERS:
                    broken.append(f"{module} takes the whole Settings")
            elif layer in ALLOWED and layer_of(imported) not in ALLOWED[layer]:
                broken.append(f"{module} ({layer}) imports {imported}")
    return sorted(broken)


def test_every_module_imports_only_the_layers_above_it() -> None:
    assert broken_rules() == []


def test_every_module_is_in_a_known_layer() -> None:
    layers = {layer_of(module) for module, _ in modules()} - {""}
    assert layers == set(ALLOWED)


@pytest.mark.parametrize(
    ("module", "source", "problem"),
    [
        (
            "order_viewer.domain.x",
            "from order_viewer.service.ports import ConsumedMessage",
            "imports",
        ),
        ("order_viewer.service.x", "from order_viewer.adapters.cache import OrderCache", "imports"),
        ("order_viewer.service.x", "import order_viewer.config", "imports"),
        ("order_viewer.adapters.x", "from order_viewer.bootstrap import start", "imports"),
        ("order_viewer.adapters.x", "from order_viewer.entrypoints import cli", "imports"),
        ("order_viewer.adapters.x", "from order_viewer.config import Settings", "Settings"),
    ],
)
def test_the_rules_catch_a_broken_import(
    module: str, source: str, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        f"{__name__}.modules", lambda: iter([(module, ast.parse(source))]), raising=True
    )
    broken = broken_rules()
    assert len(broken) == 1
    assert problem in broken[0]
