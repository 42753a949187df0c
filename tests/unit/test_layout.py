"""The package's groups depend on each other in one direction only, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "src" / "llama3_ops"

# group -> the groups it may import. "core" is the package's top-level modules (errors, cli).
ALLOWED: dict[str, set[str]] = {
    "core": {"remote", "stages", "bench", "provision", "lab"},
    "remote": set(),
    "provision": {"remote"},
    "stages": {"remote"},
    "bench": {"remote"},
    "lab": {"remote", "stages", "bench", "provision"},
}
# The base error class, __version__ and the GPU settings table (fab serve's and bench offline's defaults):
# any group may use them; they import no group.
SHARED = {"llama3_ops", "llama3_ops.errors", "llama3_ops.__version__", "llama3_ops.engine_settings"}


def group_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in ALLOWED else "core"


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if node.module == "llama3_ops")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "llama3_ops" or m.startswith("llama3_ops.")}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def edges() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        mod = module_name(path)
        if any(part.endswith(("_files", "_app", "webapp", "_standin")) for part in mod.split(".")):
            continue  # files uploaded to the host: they never import the controller's package
        for imp in imports(path):
            if imp in SHARED:
                continue
            out.append((mod, imp, str(path.relative_to(PKG.parent))))
    return out


def test_groups_import_in_one_direction() -> None:
    bad = []
    for mod, imp, where in edges():
        src, dst = group_of(mod), group_of(imp)
        if src != dst and dst not in ALLOWED[src]:
            bad.append(f"{where}: {src} -> {dst} ({imp})")
    assert not bad, "imports against the layout:\n" + "\n".join(bad)


def test_the_allowed_graph_has_no_cycle() -> None:
    seen: dict[str, int] = {}

    def visit(g: str, stack: tuple[str, ...]) -> None:
        assert g not in stack, f"cycle: {' -> '.join((*stack, g))}"
        for nxt in ALLOWED[g]:
            visit(nxt, (*stack, g))
        seen[g] = 1

    for g in ALLOWED:
        visit(g, ())


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from llama3_ops.lab import demo\n    from llama3_ops import serve\n")
    assert imports(f) == {"llama3_ops.lab", "llama3_ops", "llama3_ops.serve"}
    assert group_of("llama3_ops.remote.tunnel") == "remote" and group_of("llama3_ops.cli") == "core"


def test_no_module_is_left_at_the_top_but_the_core() -> None:
    top = sorted(p.stem for p in PKG.glob("*.py"))
    assert top == ["__init__", "__main__", "cli", "engine_settings", "errors"], top


def test_the_shared_modules_import_no_group() -> None:
    for name in ("errors", "engine_settings"):
        found = imports(PKG / f"{name}.py") - SHARED
        assert not found, (name, found)
