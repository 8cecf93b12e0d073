#!/usr/bin/env bash
# Start llm-gateway in the foreground (1 worker) in front of an OpenAI-compatible upstream,
# the way the benchmark measures it: a Redis store, key `sk-bench` with limits (rpm, tpm,
# concurrency) and its user's quota set so high that they run on every request but never
# refuse, usage accounting on (it rides on the settlement), no response cache.
#
#   PORT=4500 UPSTREAM_BASE=http://127.0.0.1:9000/v1 ./run_gateway.sh
#
# REDIS_URL (e.g. redis://127.0.0.1:6379/0) uses that Redis; without it this script starts
# a private redis-server on a free loopback port and stops it when the gateway exits.
# LLM_GATEWAY overrides the executable (default: llm-gateway on PATH); LOG_LEVEL (default
# info, the CLI's default) is passed to `serve --log-level`.
# The config it writes (its path is printed to stderr) is kept in $BENCH_CONFIG_DIR (default: a
# fresh temporary folder).
set -euo pipefail

PORT="${PORT:-4500}"
UPSTREAM_BASE="${UPSTREAM_BASE:-http://127.0.0.1:9000/v1}"
dir="${BENCH_CONFIG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/llm-gateway-bench.XXXXXX")}"
mkdir -p "$dir"

if [ -z "${REDIS_URL:-}" ]; then
  command -v redis-server >/dev/null || {
    echo "run_gateway.sh: redis-server not found (apt-get install redis-server), or set REDIS_URL" >&2
    exit 1; }
  rport="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  # Started in a subshell so that it is not a child of the gateway (whose process tree the
  # benchmark measures) but stays in this process group (so a group kill stops it too).
  ( redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
      --daemonize no >"$dir/redis.log" 2>&1 & echo $! >"$dir/redis.pid" )
  gw=$$  # exec below keeps this pid: stop the private Redis once the gateway is gone
  ( ( while kill -0 "$gw" 2>/dev/null; do sleep 1; done
      kill "$(cat "$dir/redis.pid")" 2>/dev/null ) </dev/null >/dev/null 2>&1 & )
  for _ in $(seq 100); do
    redis-cli -p "$rport" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  REDIS_URL="redis://127.0.0.1:$rport/0"
fi

cat >"$dir/gateway.yaml" <<EOF
# Written by bench/run_gateway.sh
server: {host: 127.0.0.1, port: $PORT, workers: 1}
store: {url: "$REDIS_URL"}
backends:
  mock:
    kind: openai
    base_url: "$UPSTREAM_BASE"
    model: mock-gpt
    timeout: {connect: 2, read: 30}
models:
  mock-gpt:
    targets: [{backend: mock}]
    baidu_endpoint: mock_gpt        # the Baidu door: /rpc/2.0/ai_custom/v1/wenxinworkshop/chat/mock_gpt
keys:
  - name: bench
    key: sk-bench
    user: bench
    limits: {rpm: 100000000, tpm: 100000000000, concurrency: 100000}
users:
  bench:
    quota: {tokens_per_day: 1000000000000, requests_per_day: 1000000000}
EOF
echo "run_gateway.sh: config $dir/gateway.yaml, store ${REDIS_URL##*@}" >&2

exec "${LLM_GATEWAY:-llm-gateway}" serve --config "$dir/gateway.yaml" --host 127.0.0.1 \
  --port "$PORT" --workers 1 --log-level "${LOG_LEVEL:-info}"
