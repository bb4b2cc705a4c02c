"""The package's layers: imports only go down a floor, and packages on one floor form no
cycle. Read from the source with ast (nothing is imported), so it covers imports inside
functions and under TYPE_CHECKING as well.

Floors, low to high, in :data:`FLOORS` (kvmtrace/__init__.py holds only ``__version__``
and counts as 0): errors, core; host; bpf, source, model, vmm; analysis; views; commands;
cli, testing; ``__main__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "kvmtrace"

FLOORS = {
    "": 0,  # kvmtrace/__init__.py, __main__ excepted below
    "errors": 0,
    "core": 0,
    "host": 1,
    "bpf": 2,
    "source": 2,
    "model": 2,
    "vmm": 2,
    "analysis": 3,
    "views": 4,
    "commands": 5,
    "cli": 6,
    "testing": 6,
    "__main__": 7,
}

def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every kvmtrace import in one module."""
    is_pkg = path.name == "__init__.py"
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import module` names a module: count the module itself
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return [(line, m) for line, m in found if m == "kvmtrace" or m.startswith("kvmtrace.")]


def _part(module: str) -> str:
    """The top-level package (or module) of kvmtrace a dotted name lies in."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FLOORS else ""


def _edges() -> dict[tuple[str, str], list[str]]:
    """(from part, to part) -> where, for imports between different parts."""
    edges: dict[tuple[str, str], list[str]] = {}
    for name, path in _modules():
        src = _part(name)
        for line, mod in _imports(name, path):
            dst = _part(mod)
            if dst != src:
                edges.setdefault((src, dst), []).append(f"{path.relative_to(ROOT.parent)}:{line}")
    return edges


def test_every_part_has_a_floor():
    tops = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    tops.discard("__init__")
    assert not tops - set(FLOORS), f"give these a floor: {sorted(tops - set(FLOORS))}"


def test_imports_go_down():
    up = [f"{src or 'kvmtrace'} (floor {FLOORS[src]}) -> {dst} (floor {FLOORS[dst]}): "
          + ", ".join(sorted(set(where)))
          for (src, dst), where in sorted(_edges().items()) if FLOORS[dst] > FLOORS[src]]
    assert not up, "imports that go up a floor:\n" + "\n".join(up)


def test_no_package_cycles():
    graph: dict[str, set[str]] = {}
    for src, dst in _edges():
        graph.setdefault(src, set()).add(dst)

    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            n = todo.pop()
            if n == b:
                return True
            if n not in seen:
                seen.add(n)
                todo += graph.get(n, ())
        return False

    cycles = sorted({tuple(sorted((a, b))) for a, outs in graph.items() for b in outs
                     if reaches(b, a)})
    assert not cycles, f"package cycles: {cycles}"


@pytest.mark.parametrize("module", ["kvmtrace.core.kvm_abi", "kvmtrace.core.events",
                                    "kvmtrace.core.counters", "kvmtrace.core.sources"])
def test_core_stands_alone(module):
    path = ROOT / (module.split(".", 1)[1].replace(".", "/") + ".py")
    outside = [m for _, m in _imports(module, path)
               if _part(m) not in ("core", "errors")]
    assert not outside, f"{module} imports {outside}"
