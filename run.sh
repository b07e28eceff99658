#!/usr/bin/env bash
# Set-up and entry point. On a fresh clone each command creates ./.venv (CPU torch 2.13.0 first, then this
# project) and runs:
#   ./run.sh demo     the demo (see README)
#   ./run.sh test     the test suite
#   ./run.sh <args>   any `sacdiff` command, e.g. ./run.sh detect scan.nii.gz --model m.pt --out out
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${SACDIFF_VENV:-$here/.venv}"
if [[ ! -x "$venv/bin/sacdiff" ]]; then
  echo "[sacdiff] setting up $venv (first run only)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # The pinned CPU build first: an unpinned torch would pull a multi-GB CUDA build.
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
  "$venv/bin/python" -m pip install -q -e "$here"
fi
if [[ "${1:-}" == "test" ]] && ! "$venv/bin/python" -c "import pytest, slicer.util, PySide6, highdicom" 2>/dev/null; then
  echo "[sacdiff] installing the test tools (pytest, slicer-core, PySide6, highdicom)" >&2
  "$venv/bin/python" -m pip install -q -e "$here[test]"
fi
cmd="${1:-demo}"
shift || true
case "$cmd" in
  test) cd "$here" && exec "$venv/bin/python" -m pytest Testing "$@" ;;
  *) exec "$venv/bin/sacdiff" "$cmd" "$@" ;;
esac
