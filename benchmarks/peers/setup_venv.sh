#!/usr/bin/env bash
# Build benchmarks/peers/.venv (gitignored) with the pinned neural-tangents stack, once.
# Usage: benchmarks/peers/setup_venv.sh [python]   (default python3; needs a Python that
# jaxlib 0.4.23 / tensorflow 2.15.1 ship wheels for: 3.9–3.11)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PY="${1:-python3}"
if [ -f "$VENV/.installed" ]; then exit 0; fi
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet \
    jax==0.4.23 jaxlib==0.4.23 numpy==1.26.4 tensorflow==2.15.1 neural-tangents==0.6.5
touch "$VENV/.installed"
