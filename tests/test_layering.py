"""The layering: stages never import the pipeline, Ray, MLflow, config or the environment;
the shared records import nothing of the project; the store package has no import cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import REPO

STAGES = sorted((REPO / "stages").glob("*.py"))
FORBIDDEN = ("pipeline", "ray", "mlflow", "tomllib", "dotenv")


def imports(path: Path) -> set[str]:
    """Top-level module names a file imports, at any depth of its code."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def environment_reads(path: Path) -> list[int]:
    """Lines that read the environment (os.environ, os.getenv)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "os" and n.attr in ("environ", "getenv", "putenv")]


@pytest.mark.parametrize("path", STAGES, ids=[p.name for p in STAGES])
def test_a_stage_imports_no_pipeline_ray_mlflow_or_config(path):
    bad = sorted(m for m in imports(path) if m.split(".")[0] in FORBIDDEN)
    assert not bad, f"{path.name} imports {bad}"
    assert not environment_reads(path), f"{path.name} reads the environment at lines {environment_reads(path)}"


def test_the_shared_records_depend_on_nothing_of_the_project():
    third_party = {m.split(".")[0] for m in imports(REPO / "stages" / "records.py")}
    assert third_party <= {"__future__", "dataclasses", "enum", "typing", "numpy", "pydantic"}, third_party


def test_the_store_package_has_no_cycle_and_no_private_imports():
    folder = REPO / "pipeline" / "store"
    graph = {p.stem: {m.rsplit(".", 1)[-1] for m in imports(p) if m.startswith("pipeline.store.")}
             for p in folder.glob("*.py")}
    for module, deps in graph.items():  # depth-first: no module reaches itself
        seen, todo = set(), list(deps)
        while todo:
            dep = todo.pop()
            assert dep != module, f"import cycle through pipeline.store.{module}"
            if dep not in seen:
                seen.add(dep)
                todo += graph.get(dep, ())
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        private = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith(
            "pipeline.") for a in n.names if a.name.startswith("_")]
        assert not private, f"{path.name} imports private names {private}"
