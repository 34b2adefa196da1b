#!/usr/bin/env bash
# The celebctl demo on the built-in offline `tiny` model. Run it with `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
CELEBCTL=".venv/bin/celebctl"
export CELEBCTL_HOME="${CELEBCTL_HOME:-$PWD/demo-output/home}"
OUT="$PWD/demo-output"
mkdir -p "$OUT"

echo "== celebctl demo (data home: $CELEBCTL_HOME)"
$CELEBCTL --version
$CELEBCTL list
echo "== demo finished; everything is under $OUT"
