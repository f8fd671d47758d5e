#!/usr/bin/env bash
# Create or refresh the project's virtualenv. Uses uv when it can get it, plain venv + pip otherwise.
set -euo pipefail
venv=${1:-.venv}
py=${PYTHON:-python3}
if ! command -v uv >/dev/null 2>&1; then
  "$py" -m pip install --quiet --user uv >/dev/null 2>&1 || "$py" -m pip install --quiet uv >/dev/null 2>&1 || true
  export PATH="$HOME/.local/bin:$PATH"
fi
if command -v uv >/dev/null 2>&1; then
  [ -x "$venv/bin/python" ] || uv venv --quiet "$venv" --python "$py"
  uv pip install --quiet --python "$venv/bin/python" -e '.[dev]'
else
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet -e '.[dev]'
fi
echo "labsync: virtualenv ready in $venv"
