#!/usr/bin/env bash
# Creates .venv-adapters (repo root) with AdapterHub's `adapters` and the transformers it
# pins, for the bottleneck-adapter parity tests (tests/test_peft_adapters.py and others run
# tests/adapterhub_ref*.py inside it). Every version comes from constraints/adapterhub.txt.
#
# * Idempotent: an existing venv that finished (.ready holds the sha256 of the constraints
#   file it was built from) and imports the pinned adapters is kept; a half-built one, or
#   one built from other pins, is removed and rebuilt.
# * Offline-safe except PyPI: torch is pinned (torch==2.13.0), which pip takes from the
#   local CPU wheel (/opt/wheels, pip's find-links), so no CUDA packages are downloaded.
# * The venv ignores itself for git (.venv-adapters/.gitignore = '*').
#
# Usage: bash .ci/adapterhub_env.sh      (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-adapters"
PY="${PYTHON:-python3}"
PINS="$ROOT/constraints/adapterhub.txt"
WHEELS="${TORCH_WHEEL_DIR:-/opt/wheels}"
pin() { sed -n "s/^$1==//p" "$PINS"; }
ADAPTERS_VERSION="$(pin adapters)"
PINS_SHA="$(sha256sum "$PINS" | cut -d' ' -f1)"

check() {
  "$VENV/bin/python" - <<PYEOF
import adapters, torch, transformers
assert adapters.__version__ == "$ADAPTERS_VERSION", adapters.__version__
print("adapters", adapters.__version__, "transformers", transformers.__version__, "torch", torch.__version__)
PYEOF
}

if [[ -f "$VENV/.ready" && "$(cat "$VENV/.ready")" == "$PINS_SHA" ]] && check >/dev/null 2>&1; then
  echo "adapterhub_env: $VENV is ready"; check; exit 0
fi

start=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
FIND=()
if [[ -d "$WHEELS" ]]; then FIND=(--find-links "$WHEELS"); fi
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
if ! ls "$WHEELS"/torch-"$(pin torch)"*cpu*-"$PYTAG"-*.whl >/dev/null 2>&1; then
  echo "adapterhub_env: WARNING: no local CPU torch wheel for $PYTAG in $WHEELS; pip will take torch $(pin torch) from PyPI (large CUDA download)" >&2
fi

# torch first, alone, so that adapters/transformers see it satisfied
"${PIP[@]}" install -q "${FIND[@]}" -c "$PINS" torch
"${PIP[@]}" install -q "${FIND[@]}" -c "$PINS" adapters transformers torch safetensors numpy

check
echo "$PINS_SHA" > "$VENV/.ready"
echo "adapterhub_env: created $VENV in $(( $(date +%s) - start )) s"
