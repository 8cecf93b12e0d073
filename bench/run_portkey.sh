#!/usr/bin/env bash
# Start the open-source Portkey AI gateway (Node) in the foreground on 127.0.0.1.
#   PORTKEY_DIR=<folder where @portkey-ai/gateway was npm-installed> PORT=4410 ./run_portkey.sh
# PORTKEY_DIR defaults to bench/.venvs/portkey, the folder that `python bench/run.py --portkey`
# installs (@portkey-ai/gateway@1.15.2 + @hono/node-server@1.13.5 @hono/node-ws@1.2.0
# hono@4.9.7, the pins from its package-lock.json; see ../shared/bench/README.md pitfall 11).
# NODE (path to the node executable) defaults to the one on PATH.
#
# Portkey has no server-side model list: every request names the upstream in
# headers, and its Authorization bearer is passed on as the provider key:
#   x-portkey-provider: openai
#   x-portkey-custom-host: $UPSTREAM_BASE        (e.g. http://127.0.0.1:9000/v1)
# run.py --portkey sends them (loadgen and the readiness probe); UPSTREAM_BASE is
# therefore not read here. The open-source gateway has no auth of its own, no
# telemetry and no start-up network calls.
# Copied from ../shared/bench/run_portkey.sh; only the PORTKEY_DIR default differs.
set -euo pipefail

PORTKEY_DIR="${PORTKEY_DIR:-$(cd "$(dirname "$0")" && pwd)/.venvs/portkey}"
ENTRY="$PORTKEY_DIR/node_modules/@portkey-ai/gateway/build/start-server.js"
[ -f "$ENTRY" ] || { echo "run_portkey.sh: $ENTRY not found (python bench/run.py --portkey installs it)" >&2; exit 1; }

# Portkey calls serve({port}) without a hostname, so Node would listen on all
# interfaces. This preload makes a listen(port) without a host bind to
# BIND_HOST (default 127.0.0.1). It is a data: URL, so: no comments, no
# '#', '%' or '?' inside, and every statement ends with ';'.
BIND_LOOPBACK='data:text/javascript,import net from "node:net";
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (port, host, ...rest) {
  if (typeof port === "number" && (host == null || typeof host === "function")) {
    if (typeof host === "function") rest.unshift(host);
    host = process.env.BIND_HOST || "127.0.0.1";
  }
  return listen.call(this, port, host, ...rest);
};'

# --port=N is the only way to set the port (the PORT variable is not used for
# listening); --headless drops the web console routes. NODE_ENV stays unset,
# as in Portkey's own Docker image.
exec "${NODE:-node}" --import "$BIND_LOOPBACK" "$ENTRY" --port="${PORT:-4410}" --headless
