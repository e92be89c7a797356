"""What a new user meets first: every script's --help, and modules that import each other in one direction only."""
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import apo
from conftest import DEADLINE_S, REPO

SCRIPTS = ["apo.py", "eval.py", "bench.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_works_and_lists_every_flag(script):
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=DEADLINE_S)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:")
    if script == "apo.py":  # one flag per Args field, each with its docstring as help (some hold a literal %)
        for field in dataclasses.fields(apo.Args):
            assert "--" + field.name.replace("_", "-") in result.stdout, field.name
        assert "trades ~30% compute" in " ".join(result.stdout.split())


def project_imports(path: Path) -> set:
    """The project modules a file imports, at its top or inside a function."""
    modules = {p.stem for p in REPO.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found & modules - {path.stem}


def test_the_modules_import_each_other_in_one_direction():
    """reward and rollout stand alone, the plumbing (data, run_folder, adamw, parallel) too, apo builds on them,
    eval and bench on apo: no cycle, so each file can be read (and imported) without the ones above it."""
    graph = {p.stem: project_imports(p) for p in REPO.glob("*.py")}
    order, done = [], set()
    while len(done) < len(graph):
        ready = sorted(m for m in graph if m not in done and graph[m] <= done)
        assert ready, f"an import cycle among {sorted(set(graph) - done)}: {graph}"
        order += ready
        done |= set(ready)
    assert graph["reward"] == set() and "eval" not in graph["apo"]
    # the plumbing stands without the method: apo.py imports it, never the other way
    assert all("apo" not in graph[m] for m in ("data", "run_folder", "adamw", "rollout", "parallel", "flags"))
