"""The README's recipes work verbatim on a fresh clone.

A recipe is a fenced ```bash block right after a `<!-- recipe: NAME -->` line. Each runs as one
bash script (`set -eo pipefail`: every command must succeed) in a fresh copy of the repository
(the files git knows, with their times, so `make venv` finds the virtualenv up to date; `.venv`
is linked in), with a clean environment: no LGC_/RUPA_/LABSYNC_/AIRFLOW_ variable from outside
except the free ports the recipe lets one choose. The test answers `labsync rupa authorize`'s
prompt as a person with a browser would (it opens the printed URL and pastes where it was sent).

What cannot run here is said, not hidden: `airflow standalone` runs until stopped, so the
Airflow recipe's line starting it is replaced by `airflow api-server` on the recipe's port and a
check that it answers /api/v2/monitor/health; after the recipe, `labsync inbox` processes the
file it dropped (what unpausing order_batches in the UI would do).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO

RECIPE = re.compile(r"^<!-- recipe: ([\w-]+) -->\n```bash\n(.*?)\n```", re.S | re.M)


def recipes() -> dict[str, list[str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return {name: body.splitlines() for name, body in RECIPE.findall(text)}


def test_the_readme_marks_its_recipes():
    found = recipes()
    assert set(found) == {"cli", "airflow-ui"}
    assert any(line.startswith("airflow standalone") for line in found["airflow-ui"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fresh_clone(dest: Path) -> Path:
    """The files a clone would have (tracked, plus new files not ignored), times kept."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(REPO / ".venv")
    # The venv is this checkout's, already built: the recipe's `make` must not rebuild it from the
    # clone (an editable install pointing into a temporary folder, every script's shebang too)
    # when this checkout's pyproject.toml is newer than the venv's stamp.
    for name in ("pyproject.toml", "scripts/bootstrap-venv.sh"):
        os.utime(dest / name, (0, 0))
    return dest


def _clean_env(**ports: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LGC_", "RUPA_", "LABSYNC_", "AIRFLOW_", "AIRFLOW__", "VIRTUAL_ENV"))}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if ".venv" not in p)
    env.update(ports)
    return env


def _answer_browser_style(url: str) -> str:
    """What a person pastes: the URL the consent page redirects to (the sandbox approves at once).
    The sandbox was started in the background a moment ago: try until it answers."""
    deadline = time.monotonic() + 60
    while True:
        try:
            answer = httpx.get(url, follow_redirects=False, timeout=5)
            assert answer.status_code == 302, answer.status_code
            return answer.headers["location"]
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run_recipe(lines: list[str], cwd: Path, env: dict, *, timeout: float) -> tuple[int, str]:
    script = cwd / ".recipe.sh"
    script.write_text("set -eo pipefail\n" + "\n".join(lines) + "\n", encoding="utf-8")
    proc = subprocess.Popen(["bash", str(script)], cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out: list[str] = []

    def read() -> None:  # until every holder of the pipe is gone (the recipe's background jobs too)
        for line in proc.stdout:
            out.append(line)
            asked = re.search(r"(https?://\S+/oauth/authorize\?\S+)", line)
            if asked:
                proc.stdin.write(_answer_browser_style(asked.group(1)) + "\n")
                proc.stdin.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        try:  # the recipe's background jobs (the sandbox) go with it
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        reader.join(30)
    assert code is not None, f"the recipe did not finish in {timeout:.0f}s:\n" + "".join(out)[-4000:]
    return code, "".join(out)


def test_cli_recipe_runs_verbatim(tmp_path):
    clone = _fresh_clone(tmp_path / "labsync")
    code, out = run_recipe(recipes()["cli"], clone, _clean_env(LABSYNC_SANDBOX_PORT=str(_free_port())),
                           timeout=300)
    assert code == 0, out
    assert "Rupa authorized" in out and "all checks passed" in out
    assert "orders.csv: 10 rows, 10 valid, 0 rejected" in out and "LetsGetChecked: accepted 10" in out
    batches = json.loads(out[out.rindex("\n[\n") + 1:])
    assert [(b["file"], b["accepted"]) for b in batches] == [("orders.csv", 10)]
    assert (clone / ".labsync" / "labsync.db").exists() and (clone / "inbox").is_dir()


@pytest.mark.airflow
def test_airflow_ui_recipe_runs_verbatim(tmp_path):
    lines = recipes()["airflow-ui"]
    (standalone,) = [i for i, line in enumerate(lines) if line.startswith("airflow standalone")]
    api_server = [
        'airflow api-server > "$AIRFLOW_HOME/api-server.log" 2>&1 &',
        "api=$!",
        'until curl -fs "http://localhost:$AIRFLOW_PORT/api/v2/monitor/health" > "$AIRFLOW_HOME/health.json"; do',
        '  kill -0 $api 2>/dev/null || { cat "$AIRFLOW_HOME/api-server.log"; exit 1; }; sleep 0.2',
        "done",
        'echo "health: $(cat "$AIRFLOW_HOME/health.json")"',
        "kill $api; wait $api || true",
    ]
    after = ["LABSYNC_INBOX_SETTLE_SECONDS=0 labsync inbox"]
    script = [*lines[:standalone], *api_server, *lines[standalone + 1:], *after]
    clone = _fresh_clone(tmp_path / "labsync")
    airflow_port = _free_port()
    env = _clean_env(LABSYNC_SANDBOX_PORT=str(_free_port()), AIRFLOW_PORT=str(airflow_port))
    code, out = run_recipe(script, clone, env, timeout=600)
    assert code == 0, out[-4000:]
    assert "Rupa authorized" in out and "all checks passed" in out
    health = json.loads(out.split("health: ", 1)[1].splitlines()[0])
    assert health["metadatabase"]["status"] == "healthy"
    assert "orders.csv: loaded (accepted 10)" in out
    assert (clone / "inbox" / "processed" / "orders.csv").exists()
    assert (clone / ".labsync" / "airflow" / "airflow.db").exists()  # AIRFLOW_HOME as the recipe set it
