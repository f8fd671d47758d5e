"""The house rules of docs/architecture.md, checked on the code itself (every import counts,
lazy ones inside functions included):

- no import circles;
- a vendor package (etl/lgc, etl/rupa) talks to its vendor and nothing else: it imports no flow,
  no other vendor, no Airflow and no generic file intake;
- generic file intake (etl/intake) imports no vendor and no flow;
- Airflow is imported only under etl/airflow/ (and by the DAG files);
- the sandbox imports nothing of the clients it stands in for.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENDORS = ("etl.lgc", "etl.rupa")
FLOWS = ("etl.orders", "etl.checkout", "etl.extract")
INTAKE = "etl.intake"


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (`from a import b` counts
    as `a.b` when that is a module of ours, else `a`)."""
    tree = ast.parse(path.read_text(), str(path))
    mod = _module(path)
    out: set[str] = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports count too: a circle is a circle
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")[: -node.level if path.name != "__init__.py" else len(mod.split(".")) - node.level + 1]
                pkg = ".".join(base + ([node.module] if node.module else []))
            else:
                pkg = node.module or ""
            for a in node.names:
                full = f"{pkg}.{a.name}"
                out.add(full if _ours(full) else pkg)
    return out


def _ours(name: str) -> bool:
    p = REPO / Path(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _sources() -> dict[str, set[str]]:
    files = [p for p in (REPO / "etl").rglob("*.py") if "migrations" not in p.parts]
    files += list((REPO / "schemas").rglob("*.py"))
    return {_module(p): _imports(p) for p in files}


GRAPH = _sources()


def _within(name: str, packages: tuple[str, ...] | str) -> bool:
    packages = (packages,) if isinstance(packages, str) else packages
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_import_graph_has_no_circle():
    ours = {m: {i for i in deps if i in GRAPH} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(ours[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(ours):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_vendor_package_imports_no_flow_no_intake_and_no_other_vendor(vendor):
    others = tuple(v for v in VENDORS if v != vendor)
    bad = {m: sorted(i for i in deps if _within(i, FLOWS + others + (INTAKE, "etl.airflow", "airflow")))
           for m, deps in GRAPH.items() if _within(m, vendor)}
    assert {m: v for m, v in bad.items() if v} == {}


def test_generic_intake_imports_no_vendor_and_no_flow():
    bad = {m: sorted(i for i in deps if _within(i, VENDORS + FLOWS + ("etl.airflow", "airflow")))
           for m, deps in GRAPH.items() if _within(m, INTAKE)}
    assert {m: v for m, v in bad.items() if v} == {}


def test_airflow_is_imported_only_under_etl_airflow():
    bad = {m: sorted(i for i in deps if _within(i, "airflow"))
           for m, deps in GRAPH.items() if not _within(m, "etl.airflow")}
    assert {m: v for m, v in bad.items() if v} == {}


def test_the_sandbox_imports_none_of_the_clients_it_stands_in_for():
    bad = {m: sorted(i for i in deps if _within(i, VENDORS + FLOWS + (INTAKE, "etl.http")))
           for m, deps in GRAPH.items() if _within(m, "etl.sandbox")}
    assert {m: v for m, v in bad.items() if v} == {}


def test_the_rules_see_lazy_imports():
    """The checker is not blind: a lazy import inside a function is an edge of the graph."""
    assert "etl.airflow.settings" in GRAPH["etl.airflow.tasks"]
