#!/usr/bin/env bash
# Schemathesis against `lethe serve` on a throwaway SQLite home, loopback only (not part of CI).
#   ./scripts/fuzz_api.sh [max-examples per operation, default 40]
# Installs schemathesis into its own venv (.fuzz-venv, git-ignored), starts the API with an admin key,
# runs every phase with every check, and counts 5xx answers in the server's access log.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
[ -x .fuzz-venv/bin/st ] || { python3 -m venv .fuzz-venv && .fuzz-venv/bin/pip install -q schemathesis; }
home="$(mktemp -d)"
port="${LETHE_FUZZ_PORT:-8765}"
export LETHE_HOME="$home" LETHE_LOG_FORMAT=text LETHE_AUTH_FAILURE_LIMIT=1000000  # text access log; the fuzzer's bad keys must not lock it out
.venv/bin/lethe migrate >/dev/null
key="$(.venv/bin/lethe keys create --scope admin | grep -o 'lethe_[A-Za-z0-9_-]*' | head -1)"
.venv/bin/lethe serve --port "$port" >"$home/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$home"' EXIT
for _ in $(seq 120); do curl -sf -o /dev/null "http://127.0.0.1:$port/healthz" && break; sleep 0.5; done
status=0
.fuzz-venv/bin/st run "http://127.0.0.1:$port/openapi.json" -H "Authorization: Bearer $key" \
    --checks all --max-examples "${1:-40}" --workers 1 || status=$?
answers="$(grep -cE '"(GET|POST|PATCH|DELETE|HEAD|PUT) [^"]*" [0-9]{3}' "$home/serve.log" || true)"
errors="$(grep -cE '"(GET|POST|PATCH|DELETE|HEAD|PUT) [^"]*" 5[0-9]{2}' "$home/serve.log" || true)"
echo "server answered $answers requests, $errors of them 5xx; schemathesis exit status $status"
[ "$errors" = "0" ]
