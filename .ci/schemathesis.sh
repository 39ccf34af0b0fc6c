#!/usr/bin/env bash
# Fuzzes a live `gsync serve` against its own /openapi.json with schemathesis
# (a public OpenAPI fuzzer): every response must have a declared status, the
# declared content type and a body that matches the declared schema, and no
# request may get a 5xx. Bounded: a fixed seed, examples per operation and a
# time budget. The server runs without an admin token, so the admin routes
# answer their declared 404.
set -euo pipefail
cd "$(dirname "$0")/.."

ST_VERSION=4.32.5
TARGET="${CARGO_TARGET_DIR:-target}"
VENV="${ST_VENV:-$TARGET/schemathesis-venv}"
if ! python3 -m venv --help >/dev/null 2>&1; then
  echo "schemathesis.sh needs python3 with venv (apt-get install python3-venv)" >&2
  exit 1
fi
if ! "$VENV/bin/st" --version 2>/dev/null | grep -qF "$ST_VERSION"; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "schemathesis==$ST_VERSION"
fi

cargo build -q --locked -p gsync
work="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

token="st-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
"$TARGET/debug/gsync" serve --listen 127.0.0.1:0 --in-memory --token "ci:$token" \
  >"$work/stdout" 2>"$work/stderr" &
pid=$!
url=""
for _ in $(seq 300); do
  url="$(sed -n 's/^listening on //p' "$work/stdout")"
  [ -n "$url" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/stderr" >&2; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { echo "gsync serve did not start" >&2; exit 1; }

timeout 900 "$VENV/bin/st" run "$url/openapi.json" \
  --checks status_code_conformance,content_type_conformance,response_schema_conformance,not_a_server_error \
  --header "Authorization: Bearer $token" \
  --max-examples "${ST_MAX_EXAMPLES:-50}" --max-time "${ST_MAX_TIME:-180}" \
  --seed 1 --generation-database none --no-color --workers 1 \
  --report-dir "$work/report"
