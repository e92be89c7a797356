"""What a new user meets first: every script's --help, and modules that import each other in one direction only."""
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import apo
from conftest import DEADLINE_S, REPO

SCRIPTS = ["apo.py", "eval.py", "tools/bench.py"]


@pytest.mark.parametrize("script", [SCRIPTS[0], *(pytest.param(s, marks=pytest.mark.slow) for s in SCRIPTS[1:])])
def test_help_works_and_lists_every_flag(script):
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=DEADLINE_S)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:")
    if script == "apo.py":  # one flag per Args field, each with its docstring as help (some hold a literal %)
        for field in dataclasses.fields(apo.Args):
            assert "--" + field.name.replace("_", "-") in result.stdout, field.name
        assert "trades ~30% compute" in " ".join(result.stdout.split())


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)  # plumbing/data.py -> plumbing.data


SOURCES = [*REPO.glob("*.py"), *REPO.glob("plumbing/*.py"), *REPO.glob("tools/*.py")]


def project_imports(path: Path, top_level_only: bool = True) -> set:
    """The project modules a file imports: at its top (and in functions, unless `top_level_only`)."""
    modules = {module_name(p) for p in SOURCES}
    tree = ast.parse(path.read_text())
    found = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found & modules - {module_name(path), "plumbing.__init__"}


def test_the_modules_import_each_other_in_one_direction():
    """reward and rollout stand alone, the plumbing too, apo builds on them and on eval (its held-out
    evaluations), tools/ on apo: no cycle among the imports at the top of the files, so each file can be read
    (and imported) without the ones above it. The one import the other way is eval.py's command line, which
    takes training's defaults from apo.Args."""
    graph = {module_name(p): project_imports(p) for p in SOURCES}
    order, done = [], set()
    while len(done) < len(graph):
        ready = sorted(m for m in graph if m not in done and graph[m] <= done)
        assert ready, f"an import cycle among {sorted(set(graph) - done)}: {graph}"
        order += ready
        done |= set(ready)
    assert graph["reward"] == set() and "eval" in graph["apo"] and "apo" not in graph["eval"]
    # the plumbing stands without the method: apo.py imports it, never the other way, not even in a function
    plumbing = [p for p in SOURCES if p.parent.name == "plumbing"]
    assert all("apo" not in project_imports(p, top_level_only=False) for p in [*plumbing, REPO / "rollout.py"])
