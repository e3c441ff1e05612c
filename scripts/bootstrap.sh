#!/usr/bin/env bash
# Create .venv with Lethe and everything it needs (idempotent; re-runs when pyproject.toml changes).
#
# torch: the package asks for a range (torch>=2.2,<3) that GPU users satisfy with their CUDA build.
# Here we install the CPU build first (`torch==2.13.0` resolves to the local CPU wheel on this
# machine kind), so the range is already met and pip does not pull a multi-GB CUDA build.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
stamp="$venv/.lethe-bootstrap"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "torch==${LETHE_TORCH_VERSION:-2.13.0}"
"$venv/bin/python" -m pip install -q -e ".[ml,dev,bench]"
echo "$want" >"$stamp"
