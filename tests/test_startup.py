"""Short commands start fast: they import only what they use (checked in a fresh interpreter,
where nothing else has imported the heavy libraries yet)."""

from __future__ import annotations

import json
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
