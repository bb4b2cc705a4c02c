"""The replay engine's shape, read from the source with ast (nothing imported): it reads
events only as records or neutral columns (never a file format), the recording decoder
uses the block layout's public names, and one ring's replay state changes only through
its own methods. No kernel needed."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "kvmtrace"
ENGINE = ROOT / "analysis" / "replay"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module as written, with leading dots; names) of every from-import of a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            out.append(("." * node.level + (node.module or ""), [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_engine_reads_no_file_format() -> None:
    files = sorted(ENGINE.glob("*.py"))
    assert {p.name for p in files} >= {"engine.py", "ringstate.py", "bulk.py", "colfeed.py"}
    bad = [(p.name, mod) for p in files for mod, _ in _imports(p)
           if mod.lstrip(".").startswith("source") or "kvmtrace.source" in mod]
    assert bad == []


def test_decoder_imports_no_private_names() -> None:
    for name in ("recording_decode.py", "recording_codec.py", "recording.py"):
        private = [(mod, n) for mod, names in _imports(ROOT / "source" / name)
                   for n in names if n.startswith("_") and not n.startswith("__")]
        assert private == [], name


def _rooted_at(node: ast.expr, name: str) -> int:
    """Depth of an attribute chain ``name.a.b`` (0 when it is not rooted at ``name``)."""
    depth = 0
    while isinstance(node, ast.Attribute):
        node, depth = node.value, depth + 1
    return depth if isinstance(node, ast.Name) and node.id == name else 0


def test_ring_state_changed_only_by_its_methods() -> None:
    """Outside ringstate.py no module assigns to a FastRing's attributes (``ring.x = ``,
    ``ring.res.n += ``) or calls methods of its parts (``ring.res.stalls.add()``)."""
    found = []
    for path in sorted(ENGINE.glob("*.py")):
        if path.name == "ringstate.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            for t in targets:
                for el in t.elts if isinstance(t, ast.Tuple) else [t]:
                    if _rooted_at(el, "ring"):
                        found.append((path.name, node.lineno, ast.unparse(el)))
            if isinstance(node, ast.Call) and _rooted_at(node.func, "ring") >= 2:
                found.append((path.name, node.lineno, ast.unparse(node.func)))
    assert found == []
