#!/usr/bin/env bash
# Set up (tools/setup.sh --test) and run the whole test suite with ruff first.
# Extra arguments go to pytest. KVMTRACE_REQUIRE_KERNEL=1 turns kernel-feature skips into
# failures (.ci/run sets it).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$here/tools/setup.sh" --test
cd "$here"
.venv/bin/ruff check kvmtrace tests tools
exec .venv/bin/python -m pytest -q -rs "$@"
