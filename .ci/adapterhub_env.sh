#!/usr/bin/env bash
# Creates .venv-adapters (repo root) with AdapterHub's `adapters==1.3.0` and the
# transformers it pins (~=4.57.6), for the bottleneck-adapter parity tests
# (tests/test_peft_adapters.py runs tests/adapterhub_ref.py inside it).
#
# * Idempotent: an existing venv that finished (marker file .ready) and imports
#   adapters 1.3.0 is kept; a half-built one is removed and rebuilt.
# * Offline-safe except PyPI: torch is installed first as `torch==2.13.0`, which
#   pip takes from the local CPU wheel (/opt/wheels, pip's find-links), so no
#   CUDA packages are downloaded; adapters/transformers then see torch satisfied.
# * The venv ignores itself for git (.venv-adapters/.gitignore = '*').
#
# Usage: bash .ci/adapterhub_env.sh      (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-adapters"
PY="${PYTHON:-python3}"
ADAPTERS_VERSION="1.3.0"
TRANSFORMERS_SPEC="transformers==4.57.6"   # adapters 1.3.0 requires transformers~=4.57.6
TORCH_SPEC="torch==2.13.0"
WHEELS="${TORCH_WHEEL_DIR:-/opt/wheels}"

check() {
  "$VENV/bin/python" - <<EOF
import adapters, torch, transformers
assert adapters.__version__ == "$ADAPTERS_VERSION", adapters.__version__
print("adapters", adapters.__version__, "transformers", transformers.__version__, "torch", torch.__version__)
EOF
}

if [[ -f "$VENV/.ready" ]] && check >/dev/null 2>&1; then
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
if ! ls "$WHEELS"/torch-2.13.0*cpu*-"$PYTAG"-*.whl >/dev/null 2>&1; then
  echo "adapterhub_env: WARNING: no local CPU torch wheel for $PYTAG in $WHEELS; pip will take $TORCH_SPEC from PyPI (large CUDA download)" >&2
fi

"${PIP[@]}" install -q "${FIND[@]}" "$TORCH_SPEC"
"${PIP[@]}" install -q "${FIND[@]}" "adapters==$ADAPTERS_VERSION" "$TRANSFORMERS_SPEC" "$TORCH_SPEC" safetensors numpy

check
touch "$VENV/.ready"
echo "adapterhub_env: created $VENV in $(( $(date +%s) - start )) s"
