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


# What each subpackage of pipelines/ may import from its siblings (module-level and lazy
# imports alike): the layers, bottom to top. `cli` and `workflow` compose everything.
PIPELINE_LAYERS = {
    "common": set(),
    "tracking": {"common"},
    "evaluate": {"common"},
    "train": {"common", "tracking", "evaluate"},
    "tune": {"common", "tracking", "evaluate"},
    "analyze": {"common", "tracking", "evaluate"},
    "predict": {"common", "tracking", "evaluate"},
    "bench": {"common", "tracking", "evaluate", "train", "predict"},
    "workflow": {"common", "tracking", "evaluate", "train", "tune", "analyze"},
    "cli": {"common", "tracking", "evaluate", "train", "tune", "workflow", "bench", "analyze",
            "predict"},
}


def _all_imports(path: Path) -> set[str]:
    """Every ``pipelines.*`` module ``path`` imports, at any depth of its code."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("pipelines."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("pipelines"):
            out.add(node.module)
            # `from pipelines.train import stages` imports the module pipelines.train.stages
            out.update(f"{node.module}.{a.name}" for a in node.names
                       if (REPO / (node.module + "." + a.name).replace(".", "/")).with_suffix(
                           ".py").is_file())
    return out


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_pipelines_subpackages_import_only_lower_layers() -> None:
    assert set(PIPELINE_LAYERS) == {p.name for p in (REPO / "pipelines").iterdir()
                                    if (p / "__init__.py").is_file()}
    bad = {}
    for package, allowed in PIPELINE_LAYERS.items():
        for f in sorted((REPO / "pipelines" / package).rglob("*.py")):
            used = {m.split(".")[1] for m in _all_imports(f) if m.count(".") >= 1}
            wrong = used - allowed - {package}
            if wrong:
                bad[str(f.relative_to(REPO))] = sorted(wrong)
    assert not bad, f"pipelines/ layering violated: {bad}"


def test_no_import_cycles_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for f in sorted((REPO / "pipelines").rglob("*.py")):
        graph[_module(f)] = {m for m in _all_imports(f) if m != _module(f)}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            assert seen.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in seen:
                visit(nxt, [*path, node])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [])


def test_only_tracking_imports_mlflow() -> None:
    """Every MLflow call of the pipeline is in pipelines/tracking/ (one place to look)."""
    users = sorted(str(f.relative_to(REPO)) for f in (REPO / "pipelines").rglob("*.py")
                   if "mlflow" in _imports(f) and "tracking" not in f.parts)
    assert not users, f"MLflow used outside pipelines/tracking/: {users}"
