#!/usr/bin/env bash
# Reproduces the gateway figures of the README: `agentmesh up` on the
# embedded defaults (local provider, no artificial latency), then the same
# task straight to the agent service and through the gateway (routed to an
# agent node, and answered from the response cache), open loop at 500 and
# 2,500 requests/s and closed loop at concurrency 32, then the routed path
# of a second suite with API keys, rate limits and budgets on, with the
# gateway's own time per task read from agentmesh_gateway_overhead_seconds.
#
#   cargo build --release -p agentmesh
#   tests/bench/gateway-overhead.sh [seconds per run] [output dir]
#   PARTS=auth tests/bench/gateway-overhead.sh …   # only the auth off/on pair
set -euo pipefail
seconds=${1:-15}
out=${2:-$(mktemp -d)}
bin=${BENCH_BIN:-target/release/agentmesh}
data=$(mktemp -d)
mkdir -p "$out"
export AGENTMESH_AGENT_SERVICE__LOCAL__LATENCY_MS=0
export AGENTMESH_AGENT_SERVICE__LOCAL__JITTER_MS=0
export AGENTMESH_LOG=${AGENTMESH_LOG:-warn}
"$bin" up --data-dir "$data" --log-format json >"$out/up.log" 2>&1 &
up=$!
trap 'kill "$up" 2>/dev/null; wait "$up" 2>/dev/null; rm -rf "$data"' EXIT
wait_serving() { # gRPC address; up to 30 s
  for _ in $(seq 1 150); do
    "$bin" bench --target "$1" --rpc health -n 1 >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "no answer from $1" >&2
  return 1
}
wait_serving 127.0.0.1:50051
metrics=http://127.0.0.1:9464/metrics
run() { # label, then bench flags
  local label=$1
  shift
  printf '%-34s ' "$label"
  "$bin" bench "$@" -d "${seconds}s" --connections 4 --json >"$out/$label.json" 2>/dev/null || true
  python3 - "$out/$label.json" <<'PY' || cat "$out/$label.json"
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency_us"]
h = r.get("histogram") or {}
extra = f"  overhead p50 {h.get('p50_us') or 0:.1f} µs p99 {h.get('p99_us') or 0:.1f} µs" if h else ""
print(f"{r['rps']:8.0f} req/s  p50 {l['p50']:6d} µs  p99 {l['p99']:6d} µs  p99.9 {l['p999']:6d} µs  errors {sum(r['errors'].values())}{extra}")
PY
}
# Warm both paths (connections, pools, JIT-free but caches).
"$bin" bench --target 127.0.0.1:50052 --rpc agent.execute -d 2s >/dev/null 2>&1 || true
"$bin" bench --target 127.0.0.1:50051 --rpc gateway.execute -d 2s >/dev/null 2>&1 || true
overhead=(--metrics-url "$metrics" --histogram agentmesh_gateway_overhead_seconds)
parts=${PARTS:-main auth}
if [[ " $parts " == *" main "* ]]; then
# The bench sends the same task every time. With the local provider every
# task is deterministic, so by default the gateway answers repeats from the
# response cache (gateway -> cache service); --cache-policy bypass sends
# every call on to an agent node (gateway -> agent), the path to compare
# with calling the agent directly.
for rate in 500 2500; do
  run "agent.execute-rate-$rate" --target 127.0.0.1:50052 --rpc agent.execute --rate "$rate" -c 2000
  run "gateway.routed-rate-$rate" --target 127.0.0.1:50051 --rpc gateway.execute --rate "$rate" -c 2000 \
    --cache-policy bypass "${overhead[@]}"
  run "gateway.cached-rate-$rate" --target 127.0.0.1:50051 --rpc gateway.execute --rate "$rate" -c 2000 \
    "${overhead[@]}"
done
run agent.execute-c32 --target 127.0.0.1:50052 --rpc agent.execute -c 32
run gateway.routed-c32 --target 127.0.0.1:50051 --rpc gateway.execute -c 32 --cache-policy bypass \
  "${overhead[@]}"
run gateway.cached-c32 --target 127.0.0.1:50051 --rpc gateway.execute -c 32 "${overhead[@]}"
fi

if [[ " $parts " == *" auth "* ]]; then
# Keys, rate limits and budgets: a second suite with auth on (a user key,
# limits and a daily budget high enough never to refuse), the routed path
# again, to compare with the auth-off runs above.
auth_data=$(mktemp -d)
admin_key="bench-admin-$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
AGENTMESH_GATEWAY__AUTH__MODE=on AGENTMESH_GATEWAY__AUTH__BOOTSTRAP_ADMIN_KEY="$admin_key" \
  AGENTMESH_DEFAULTS__LIMITS__USER_RPS=1000000 AGENTMESH_DEFAULTS__LIMITS__USER_BURST=1000000 \
  AGENTMESH_DEFAULTS__BUDGET__TOKENS_PER_DAY=1000000000000 \
  "$bin" up --data-dir "$auth_data" --gateway-port 51051 --agent-port 51052 --config-port 51053 \
  --audit-port 51054 --cache-port 51055 --admin-port 9465 --log-format json >"$out/up-auth.log" 2>&1 &
auth_up=$!
trap 'kill "$up" "$auth_up" 2>/dev/null; wait "$up" "$auth_up" 2>/dev/null; rm -rf "$data" "$auth_data"' EXIT
wait_serving 127.0.0.1:51051
"$bin" keys create --gateway http://127.0.0.1:51051 --api-key "$admin_key" --name bench \
  --project bench --json >"$out/key.json" 2>"$out/key.err" || { cat "$out/key.err"; exit 1; }
key=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["secret"])' "$out/key.json")
"$bin" bench --target 127.0.0.1:51051 --rpc gateway.execute --cache-policy bypass --api-key "$key" \
  -d 2s >/dev/null 2>&1 || true
for rate in 500 2500; do
  run "gateway.routed-noauth-rate-$rate" --target 127.0.0.1:50051 --rpc gateway.execute --rate "$rate" \
    -c 2000 --cache-policy bypass "${overhead[@]}"
  run "gateway.routed-auth-rate-$rate" --target 127.0.0.1:51051 --rpc gateway.execute --rate "$rate" \
    -c 2000 --cache-policy bypass --api-key "$key" \
    --metrics-url http://127.0.0.1:9465/metrics --histogram agentmesh_gateway_overhead_seconds
done
fi
echo "reports in $out"
