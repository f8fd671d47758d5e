"""The house rules of docs/architecture.md, checked on the code itself (every import counts,
lazy ones inside functions included):

- no import circles;
- a vendor package (etl/lgc, etl/rupa) talks to its vendor and nothing else: it imports no flow,
  no other vendor, no Airflow and no generic file intake;
- generic file intake (etl/intake) imports no vendor and no flow;
- Airflow is imported only under etl/airflow/ (and by the DAG files);
- the sandbox imports nothing of the clients it stands in for;
- one writer module per table: every warehouse table is inserted, updated and deleted by one
  module only; the others call that module's functions.
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


# ---- one writer module per table ---------------------------------------------------------------

WRITES = {"insert", "update", "delete"}  # sa.insert(t), postgresql.insert(t), t.update(), ...

# Known exceptions, each with its reason: (module, table) -> why it writes a table it does not own.
SHARED_WRITES = {
    # etl.claims is below every owner (intake, the ledger and checkout import it); its heartbeat
    # renews the lease (claimed_until) of an owner's claims in every table of CLAIM_TABLES
    ("etl.claims", "lgc_orders"): "the claims heartbeat renews leases",
    ("etl.claims", "batch_files"): "the claims heartbeat renews leases",
    ("etl.claims", "rupa_order_intents"): "the claims heartbeat renews leases",
    # the events task links an intent to its Rupa order (order_id); the owner, etl.checkout.intents,
    # imports the intents contract (pandas, pandera), which the events task does not load
    ("etl.checkout.events", "rupa_order_intents"): "events link an intent to its order",
    # retention (issue 23): the result owners (etl.orders.results, etl.checkout.events) import the
    # vendors' HTTP clients, which a purge must not load; a stored result is never rewritten by
    # them, and the purge only blanks the bytes of documents older than their retention
    ("etl.retention", "lgc_results"): "the retention purge blanks expired result documents",
    ("etl.retention", "lgc_result_values"): "the retention purge drops values read from them",
    ("etl.retention", "rupa_results"): "the retention purge blanks expired result files",
}


def _table_names() -> set[str]:
    tree = ast.parse((REPO / "etl" / "warehouse" / "tables.py").read_text())
    return {
        t.id
        for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name) and node.value.func.id == "Table"
        for t in node.targets if isinstance(t, ast.Name)
    }


TABLES = _table_names()


def _writer_files() -> list[Path]:
    return [p for p in (REPO / "etl").rglob("*.py")
            if "migrations" not in p.parts and "sandbox" not in p.parts]


def _callee(func: ast.expr) -> str | None:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


class _Scope:
    """What the names of one scope stand for: a table (`o = lgc_outbox`), several tables
    (`CLAIM_TABLES = (a, b)`, and a loop variable over them), or a parameter of the function."""

    def __init__(self, parent: _Scope | None = None, params: tuple[str, ...] = ()) -> None:
        self.parent = parent
        self.tables: dict[str, set[str]] = {}
        self.params = set(params)

    def lookup(self, name: str) -> set[str] | str | None:
        """The tables `name` stands for, or the parameter's name when it is one."""
        if name in self.tables:
            return self.tables[name]
        if name in self.params:
            return name
        return self.parent.lookup(name) if self.parent else None


class _Scan(ast.NodeVisitor):
    """The write calls of one module. `helpers` maps (module, function) to the index and name of
    the parameter holding the table the function writes (`upsert(conn, table, ...)`,
    `_insert(conn, table)`); the module's own such functions go to `found_helpers`."""

    def __init__(self, module: str, helpers: dict[tuple[str, str], tuple[int, str]]) -> None:
        self.module, self.helpers = module, helpers
        self.imported: dict[str, tuple[str, str]] = {}  # local name -> (module, name) for our functions
        self.writes: dict[str, set[int]] = {}  # table -> lines
        self.found_helpers: dict[tuple[str, str], tuple[int, str]] = {}
        self.scope = _Scope()
        self.function: ast.FunctionDef | ast.AsyncFunctionDef | None = None
        self.local_defs: set[str] = set()

    # -- names
    def resolve(self, node: ast.expr | None) -> set[str] | str | None:
        if isinstance(node, ast.Name):
            return self.scope.lookup(node.id)
        if isinstance(node, ast.Attribute) and node.attr in TABLES:  # warehouse.batch_files
            return {node.attr}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            out: set[str] = set()
            for e in node.elts:
                r = self.resolve(e)
                if isinstance(r, set):
                    out |= r
            return out or None
        return None

    def bind(self, target: ast.expr, value: ast.expr | None) -> None:
        if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)) \
                and len(target.elts) == len(value.elts):
            for t, v in zip(target.elts, value.elts, strict=True):
                self.bind(t, v)
            return
        if isinstance(target, ast.Name):
            r = self.resolve(value)
            if isinstance(r, set):
                self.scope.tables[target.id] = r
            elif self.function is not None:
                self.scope.tables.pop(target.id, None)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for a in node.names:
            local = a.asname or a.name
            if a.name in TABLES and (node.module or "").startswith("etl.warehouse"):
                self.scope.tables[local] = {a.name}
            elif node.module and node.module.startswith("etl"):
                self.imported[local] = (node.module, a.name)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.asname and a.name.startswith("etl."):
                self.imported[a.asname] = (a.name, "")

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        for t in node.targets:
            self.bind(t, node.value)

    def visit_For(self, node: ast.For) -> None:
        r = self.resolve(node.iter)
        if isinstance(r, set) and isinstance(node.target, ast.Name):
            self.scope.tables[node.target.id] = r
        self.generic_visit(node)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        a = node.args
        params = tuple(p.arg for p in a.posonlyargs + a.args + a.kwonlyargs)
        outer, outer_fn = self.scope, self.function
        self.scope, self.function = _Scope(outer, params), node
        # names bound anywhere in the function count from its first line (aliases are bound once)
        for sub in ast.walk(node):
            if isinstance(sub, ast.Assign):
                for t in sub.targets:
                    self.bind(t, sub.value)
            elif isinstance(sub, (ast.For, ast.comprehension)):  # for t in CLAIM_TABLES
                r = self.resolve(sub.iter)
                if isinstance(r, set) and isinstance(sub.target, ast.Name):
                    self.scope.tables[sub.target.id] = r
            elif isinstance(sub, ast.ImportFrom):
                self.visit_ImportFrom(sub)
        for stmt in node.body:
            self.visit(stmt)
        self.scope, self.function = outer, outer_fn

    visit_FunctionDef = visit_AsyncFunctionDef = _function  # type: ignore[assignment]

    # -- writes
    def _helper(self, func: ast.expr) -> tuple[int, str] | None:
        name = _callee(func)
        if name is None:
            return None
        if isinstance(func, ast.Name):
            if name in self.local_defs:
                return self.helpers.get((self.module, name))
            if name in self.imported:
                mod, original = self.imported[name]
                return self._helper_in(mod, original)
            return None
        if isinstance(func.value, ast.Name) and func.value.id in self.imported:  # module.helper(...)
            mod, sub = self.imported[func.value.id]
            return self._helper_in(f"{mod}.{sub}" if sub else mod, name)
        return None

    def _helper_in(self, module: str, name: str) -> tuple[int, str] | None:
        """`name` of `module`, or re-exported by it from one of its modules (`from etl.warehouse
        import upsert` is etl.warehouse.upsert.upsert)."""
        for (mod, fn), helper in self.helpers.items():
            if fn == name and (mod == module or mod.startswith(module + ".")):
                return helper
        return None

    def _written(self, node: ast.Call) -> ast.expr | None:
        """The expression naming the table this call writes, if it is a write."""
        name = _callee(node.func)
        if name in WRITES or (isinstance(node.func, ast.Name) and self._import_of(name) in WRITES):
            if isinstance(node.func, ast.Attribute) and not node.args:  # table.insert()
                return node.func.value
            return node.args[0] if node.args else None
        helper = self._helper(node.func)
        if helper is not None:
            index, param = helper
            for k in node.keywords:
                if k.arg == param:
                    return k.value
            return node.args[index] if index < len(node.args) else None
        return None

    def _import_of(self, name: str | None) -> str | None:
        return self.imported.get(name, ("", name))[1] if name else None

    def visit_Call(self, node: ast.Call) -> None:
        target = self._written(node)
        r = self.resolve(target) if target is not None else None
        if isinstance(r, set):
            for table in r:
                self.writes.setdefault(table, set()).add(node.lineno)
        elif isinstance(r, str) and self.function is not None and self.function in self._top:
            params = [p.arg for p in self.function.args.posonlyargs + self.function.args.args]
            if r in params:
                self.found_helpers[(self.module, self.function.name)] = (params.index(r), r)
        self.generic_visit(node)

    def scan(self, tree: ast.Module) -> None:
        self._top = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        self.local_defs = {n.name for n in self._top}
        self.visit(tree)


def _scan_module(path: Path, helpers: dict) -> _Scan:
    s = _Scan(_module(path), helpers)
    s.scan(ast.parse(path.read_text(), str(path)))
    return s


def writers() -> dict[str, dict[str, list[int]]]:
    """table -> {module: lines} of every insert, update, delete and upsert of a warehouse table
    under etl/ (not the sandbox, not the migrations)."""
    files = _writer_files()
    helpers: dict[tuple[str, str], tuple[int, str]] = {}
    while True:  # helpers that write a table given to them, and helpers calling those
        found = {}
        for p in files:
            found.update(_scan_module(p, helpers).found_helpers)
        if found.keys() <= helpers.keys():
            break
        helpers.update(found)
    out: dict[str, dict[str, list[int]]] = {t: {} for t in TABLES}
    for p in files:
        s = _scan_module(p, helpers)
        for table, lines in s.writes.items():
            out[table][s.module] = sorted(lines)
    return out


WRITERS = writers()


def test_each_table_has_one_writing_module():
    shared = {t: {m: lines for m, lines in mods.items() if (m, t) not in SHARED_WRITES}
              for t, mods in WRITERS.items()}
    bad = {t: mods for t, mods in shared.items() if len(mods) > 1}
    assert bad == {}, "tables written by more than one module (module: lines):\n" + "\n".join(
        f"  {t}: " + "; ".join(f"{m} {lines}" for m, lines in sorted(mods.items())) for t, mods in sorted(bad.items()))


def _lines(module: str, text: str) -> set[int]:
    path = REPO / Path(*module.split("."))
    source = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
    return {n for n, line in enumerate(source.read_text().splitlines(), 1) if text in line}


@pytest.mark.parametrize(("module", "table", "text"), [
    ("etl.intake.records", "batch_files", "sa.update(b)"),  # b = batch_files, in the function
    ("etl.intake.records", "rejected_rows", "sa.insert(rejected_rows)"),
    ("etl.rupa.auth", "oauth_tokens", "upsert(own, oauth_tokens"),  # re-exported by etl.warehouse
    ("etl.extract.streams", "sync_state", "upsert(conn, sync_state"),
    ("etl.lgc.budget", "vendor_budget_leases", "_insert(conn, lease_t)"),  # a helper given the table
    ("etl.orders.ledger", "lgc_orders", "postgresql.insert(t) if"),  # t = lgc_orders, module level
    ("etl.orders.outbox", "lgc_outbox", "postgresql.insert(o) if"),  # o = lgc_outbox
    ("etl.orders.ledger", "lgc_orders", "sa.update(t)"),
    ("etl.claims", "lgc_orders", "_renewal(conn, t, owners)"),  # for t in CLAIM_TABLES
])
def test_the_writer_scan_sees_every_form_of_write(module, table, text):
    """The scan is not blind: aliases, dialect inserts, `upsert(conn, table)`, helpers taking
    the table, and a loop over a tuple of tables are all writes."""
    lines = _lines(module, text)
    assert lines and lines <= set(WRITERS[table].get(module, ())), (module, table, text)


def test_every_shared_write_is_still_there():
    assert [(m, t) for m, t in SHARED_WRITES if m not in WRITERS[t]] == []
