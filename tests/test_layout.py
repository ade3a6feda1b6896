"""The house rules that keep the package readable, checked on the source itself (ast, no imports run):
imports point one way through the rooms of the flow, no import cycle, no module over 300 lines, at most four
modules at the root of medssl/."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "medssl"

# Lowest first: a room may import from its own room and the rooms before it, never after it. The flow's
# order, with the foundations first; evaluate sits below ladder because the ladder scores with it, and
# export below evaluate because predict and evaluate load the exported model.
ROOMS = ["errors", "config", "ui", "tracking", "ingest", "cohort", "preprocess", "augment", "models", "ssl",
         "train", "export", "evaluate", "ladder", "demo", "pipeline", "cli"]


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medssl"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("medssl"))
    return found


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_imports_point_one_way_through_the_rooms():
    upward = []
    for module, targets in _graph().items():
        source = _room(module)
        for target in targets:
            room = _room(target)
            if source in ROOMS and room in ROOMS and ROOMS.index(room) > ROOMS.index(source):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports pointing up the flow:\n" + "\n".join(sorted(upward))


def test_every_room_is_known():
    rooms = {_room(m) for m in _modules()} - {None}
    assert rooms <= set(ROOMS), f"rooms missing from the layering: {rooms - set(ROOMS)}"


def test_no_import_cycle():
    graph = {m: {t for t in ts if not _is_package_of(t, m)} for m, ts in _graph().items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def _is_package_of(target: str, module: str) -> bool:
    # `from medssl.pipeline.stages import cache` names the package and its submodule: the package is not a
    # dependency of its own submodules
    return module.startswith(target + ".")


def test_no_module_over_300_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 300}
    assert not long, f"modules over 300 lines: {long}"


def test_at_most_four_modules_at_the_root():
    root = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(root) <= 4, root
