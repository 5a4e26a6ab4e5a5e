#!/usr/bin/env bash
# Re-resolves the pinned versions in constraints/ to the newest releases, then runs the
# suite on them exactly as CI does (.ci/run: fresh venvs installed from the new pins).
#
#   bash scripts/refresh_constraints.sh             # resolve, then run .ci/run
#   NO_TEST=1 bash scripts/refresh_constraints.sh   # resolve only
#
# * constraints/project.txt: peft-jax with its test extras (.ci/run, the README's test command)
# * constraints/adapterhub.txt: the AdapterHub reference venv (.ci/adapterhub_env.sh)
#
# torch stays at TORCH_VERSION (default: the current pin), because pip takes the local CPU
# wheel only for that version on these machines (a newer torch is a multi-GB CUDA build);
# set TORCH_VERSION=X.Y.Z to move it deliberately.
#
# An upgrade is a deliberate change: if the suite passes, commit constraints/ on its own
# ("constraints: refresh to the newest releases"); if it fails, the script says so and
# `git checkout constraints/` restores the tested pins.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-$(sed -n 's/^torch==//p' constraints/project.txt)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# resolve NAME DESCRIPTION PIP-ARGS...: newest releases into a fresh venv, frozen into
# constraints/NAME.txt (torch written without its local "+cpu" label, which == ignores).
resolve() {
  local name="$1" what="$2"; shift 2
  echo "refresh_constraints: resolving constraints/$name.txt (torch $TORCH_VERSION)"
  "$PY" -m venv "$tmp/$name"
  "$tmp/$name/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  "$tmp/$name/bin/python" -m pip install -q "$@"
  {
    echo "# $what"
    echo "# Exact versions, one per line, used as a pip constraints file (pip install -c constraints/$name.txt ...)."
    echo "# $("$tmp/$name/bin/python" -c 'import platform, sys; print(f"Python {sys.version_info[0]}.{sys.version_info[1]}, {platform.system()} {platform.machine()}")'), CPU torch. Resolved $(date -u +%F) from the newest releases."
    echo "# Do not edit by hand: 'bash scripts/refresh_constraints.sh' re-resolves every file in"
    echo "# constraints/ to the newest releases and runs the suite on them (see README, \"Pinned versions\")."
    "$tmp/$name/bin/python" -m pip freeze --all --exclude-editable | grep -v "^pip==" | sed 's/^torch==\(.*\)+cpu$/torch==\1/'
  } > "constraints/$name.txt"
}

resolve project "peft-jax with its test extras: what .ci/run and the README's two commands install." \
  -e "$ROOT[test]"
resolve adapterhub "The AdapterHub reference environment (.venv-adapters, made by .ci/adapterhub_env.sh)." \
  adapters safetensors numpy

echo "refresh_constraints: changed pins (- old, + new):"
git --no-pager diff -U0 -- constraints/ | grep -E '^[-+][A-Za-z0-9]' || echo "  (none: the pins are the newest releases)"

if [[ -n "${NO_TEST:-}" ]]; then
  exit 0
fi
if bash .ci/run; then
  echo "refresh_constraints: the suite passes on the refreshed pins; commit constraints/ on its own"
else
  echo "refresh_constraints: the suite FAILS on the refreshed pins; 'git checkout constraints/' restores the tested ones" >&2
  exit 1
fi
