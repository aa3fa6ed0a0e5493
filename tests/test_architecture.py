"""The package's architecture holds: imports run one way between subpackages, and no module
imports itself back through others, counting imports inside functions (docs/architecture.md).

Imports under `if TYPE_CHECKING:` are types only and never run, so they are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import engram

PACKAGE = Path(engram.__file__).parent

# Rank of each part of the package: a module may import only from its own rank or a lower one.
RANKS = {
    "engram.errors": 0, "engram.args": 0, "engram.limits": 0, "engram.tensors": 0, "engram.dtypes": 0, "engram.fast": 0,
    "engram.data": 0, "engram.untrusted": 0,
    "engram.addressing": 1,
    "engram.storage": 2,
    "engram.serving": 3,
    "engram.release": 4,
    "engram.opening": 5,
    "engram.making": 6,
    "engram.offload": 7,
    "engram.layers": 8,
    "engram.quality": 8,
    "engram.distributed": 9,
    "engram.integrations": 10,
    "engram.cli": 11,
    "engram": 12,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def rank(name: str) -> int:
    while name not in RANKS:
        name = name.rpartition(".")[0]
    return RANKS[name]


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The engram modules `name` imports at run time, at the top or inside functions."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("engram"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            if not base.startswith("engram"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def wrong_way(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (rank {rank(a)}) imports {b} (rank {rank(b)})"
                  for a, deps in g.items() for b in deps if rank(b) > rank(a))


def loops(g: dict[str, set[str]]) -> list[str]:
    """One import loop per back edge of a depth-first walk, as "a -> b -> a"."""
    state: dict[str, int] = {}
    found: list[str] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                path = trail + [node]
                found.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, trail + [node])
        state[node] = 2

    for name in sorted(g):
        if name not in state:
            visit(name, [])
    return found


def test_imports_run_one_way() -> None:
    wrong = wrong_way(graph())
    assert not wrong, "imports against the direction of docs/architecture.md:\n" + "\n".join(wrong)


def test_no_import_loops() -> None:
    found = loops(graph())
    assert not found, "import loops:\n" + "\n".join(found)


def test_every_module_has_a_rank() -> None:
    for name in modules():
        rank(name)   # KeyError for a module outside every ranked part


def test_the_checks_find_a_planted_wrong_way_import_and_loop() -> None:
    g = graph()
    g["engram.addressing.spec"] = g["engram.addressing.spec"] | {"engram.serving.table"}
    assert wrong_way(g) == ["engram.addressing.spec (rank 1) imports engram.serving.table (rank 3)"]
    g = graph()
    g["engram.addressing.primes"] = g["engram.addressing.primes"] | {"engram.addressing.spec"}
    assert loops(g) == ["engram.addressing.spec -> engram.addressing.primes -> engram.addressing.spec"]


def test_dir_lists_the_lazy_public_names() -> None:
    listed = dir(engram)
    assert [name for name in engram.__all__ if name not in listed] == []
    assert "distributed" in listed and "Table" in listed


def test_init_stays_small() -> None:
    assert len((PACKAGE / "__init__.py").read_text().splitlines()) <= 90


def test_no_library_or_tools_file_over_400_lines() -> None:
    tools = PACKAGE.parent / "tools"
    files = list(PACKAGE.rglob("*.py")) + (list(tools.glob("*.py")) if tools.is_dir() else [])
    long = {str(p.relative_to(PACKAGE.parent)): n for p in files if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"files over 400 lines: {long}"
