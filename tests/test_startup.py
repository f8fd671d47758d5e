"""Short commands start fast: they import only what they use (checked in a fresh interpreter,
where nothing else has imported the heavy libraries yet)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO
from tests.helpers import EXAMPLES

HEAVY = ("pandas", "pandera", "pyarrow", "numpy", "alembic", "sqlalchemy", "httpx")

PROBE = r"""
import contextlib, io, json, sys
from etl.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:sys.argv.index("--")])
heavy = sys.argv[sys.argv.index("--") + 1:]
print(json.dumps({"code": code, "loaded": sorted(m for m in heavy if m in sys.modules)}))
"""


# what `labsync --help` must not import: the heavy libraries, each loaded only by the commands
# that use them, and rich, whose help layout alone doubled the command's start-up
NOT_FOR_HELP = ("pandas", "pandera", "sqlalchemy", "httpx", "pydantic", "pyarrow", "numpy", "alembic",
                "fsspec", "cryptography", "jinja2", "tenacity", "rich")
# the console script `labsync` (pyproject's [project.scripts]), as pip writes it
ENTRY_POINT = "import sys; from etl.cli import main; sys.exit(main())"


def imported_by(*argv: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv, "--", *HEAVY], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_help_imports_none_of_the_heavy_libraries():
    got = imported_by("--help")
    assert got == {"code": 0, "loaded": []}


def test_validate_without_recording_needs_no_warehouse_or_http():
    got = imported_by("validate", str(EXAMPLES / "orders.csv"), "--no-record")
    assert got["code"] == 0
    assert set(got["loaded"]) == {"pandas", "pandera", "pyarrow", "numpy"}


def test_help_under_importtime_loads_none_of_the_heavy_libraries():
    """`labsync --help` as a user runs it, in a fresh interpreter under `-X importtime`, which
    names every module the process imports: none of them belongs to a heavy library."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", ENTRY_POINT, "--help"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Usage: labsync [OPTIONS] COMMAND" in proc.stdout
    modules = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    assert {"etl.cli", "etl.airflow.storage", "typer"} <= modules  # the listing is the real one
    loaded = sorted({m.split(".")[0] for m in modules} & set(NOT_FOR_HELP))
    assert loaded == [], f"labsync --help imports {loaded}; import them inside the commands that use them"


def test_help_lists_each_command_with_its_whole_first_sentence():
    """Plain (click) help, not rich's: each command's first paragraph is shown whole in the
    command list, never cut short with `...`."""
    proc = subprocess.run([sys.executable, "-c", ENTRY_POINT, "--help"], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"}, check=True)
    from etl import cli

    listing = proc.stdout.split("Commands:", 1)[1]
    shown = " ".join(listing.split())
    for name, command in cli.command().commands.items():
        first = " ".join(command.help.split("\n\n", 1)[0].split())
        assert f"{name} {first}" in shown, (name, first, listing)
    assert not [line for line in listing.splitlines() if line.rstrip().endswith("...")], listing
