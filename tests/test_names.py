"""Names say what they hold, once: no two public classes of the package share a name, and
no two modules share a file name (except that ``commands/<name>.py``, the module of
subcommand ``name``, may share it with the library module it drives). And no test imports a
tools/ script. Read with ast, nothing is imported.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "kvmtrace"


def _sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT.parent))


def public_classes() -> dict[str, list[str]]:
    """Class name -> ``file:line`` of every module-level class not starting with ``_``."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in _sources():
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                found[node.name].append(f"{_rel(path)}:{node.lineno}")
    return found


def test_public_class_names_are_unique() -> None:
    classes = public_classes()
    assert len(classes) > 20  # the walk saw the package
    twins = {name: where for name, where in classes.items() if len(where) > 1}
    assert twins == {}


def subcommands() -> set[str]:
    """The CLI's subcommand names (``kvmtrace.cli.COMMANDS``, read from the source)."""
    for node in ast.parse((ROOT / "cli.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "COMMANDS" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("kvmtrace/cli.py has no COMMANDS tuple")


def test_module_names_are_unique_outside_subcommands() -> None:
    exempt = subcommands()
    assert "workload" in exempt
    found: dict[str, list[str]] = defaultdict(list)
    for path in _sources():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        if path.parent.name == "commands" and path.stem in exempt:
            continue
        found[path.stem].append(_rel(path))
    twins = {stem: where for stem, where in found.items() if len(where) > 1}
    assert twins == {}


def test_no_test_imports_a_tools_script() -> None:
    """tools/ scripts sit on top of the tests' helpers, never under them: no tests/*.py
    imports a module named like a tools/*.py script, nor loads a file from tools/."""
    tests = ROOT.parent / "tests"
    scripts = {p.stem for p in (ROOT.parent / "tools").glob("*.py")}
    assert "soak_top" in scripts
    found = []
    for path in sorted(tests.rglob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text, str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            found += [f"{path.name}:{node.lineno} {n}" for n in names
                      if n.split(".")[0] in scripts or n.split(".")[0] == "tools"]
        if re.search(r"spec_from_file_location\([^)]*tools/", text):
            found.append(f"{path.name}: loads a file from tools/")
    assert found == []
