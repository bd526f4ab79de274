#!/usr/bin/env bash
# The benchmark: stock mitmdump vs. the fhir-sidecar in front of nginx. Options: bench/run.sh --help
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="$here/../.venv/bin/python"
[ -x "$py" ] || py="$(command -v python3)"
exec "$py" "$here/run.py" "$@"
