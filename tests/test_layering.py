"""The package layering that the architecture promises (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "step_model": {"ray", "mlflow", "data_prep", "pipelines", "boto3", "webdataset"},
    "data_prep": {"step_model", "pipelines", "mlflow"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upper_layers(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"{package} has no source files"
    bad = {
        str(f.relative_to(REPO)): sorted(_imports(f) & FORBIDDEN[package])
        for f in files
        if _imports(f) & FORBIDDEN[package]
    }
    assert not bad, f"layering violated: {bad}"


def test_cli_commands_point_at_existing_modules() -> None:
    from pipelines.cli.app import COMMANDS

    missing = [
        module for module, _ in COMMANDS.values()
        if not (REPO / (module.replace(".", "/") + ".py")).is_file()
    ]
    assert not missing, f"step subcommands without a module: {missing}"
